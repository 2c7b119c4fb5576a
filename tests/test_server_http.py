"""The HTTP edge with a fake engine: error bodies and statuses, auth, limits, SSE framing,
request ids and the access log, admin auth, disconnects. The real engine is in
tests/test_server_e2e.py."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from server_fakes import FakeEngine
from server_harness import LiveServer

from loramux.engine.config import EngineConfig
from loramux.server.app import create_app
from loramux.server.config import ServerConfig
from loramux.server.tenants import hash_key, parse_tenants

ADMIN = "admin-secret"
KEYS = {"acme": "sk-acme", "beta": "sk-beta", "slow": "sk-slow"}


def tenant_table() -> Any:
    return parse_tenants({"tenants": {
        "acme": {"keys_sha256": [hash_key(KEYS["acme"])], "adapters": ["acme-*", "base"]},
        "beta": {"keys_sha256": [hash_key(KEYS["beta"])], "adapters": ["beta-*"],
                 "requests_per_minute": 2},
        "slow": {"keys_sha256": [hash_key(KEYS["slow"])], "adapters": ["*"],
                 "max_concurrent": 1},
    }})


def make_client(engine: FakeEngine | None = None, *, tenants: bool = True,
                **config: Any) -> TestClient:
    app = create_app(ServerConfig(admin_token=config.pop("admin_token", ADMIN), **config),
                     engine or FakeEngine(), tenants=tenant_table() if tenants else None)
    return TestClient(app, raise_server_exceptions=False)


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]
    return body["error"]  # type: ignore[no-any-return]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


# ============================================================================ errors


def test_bad_bodies_are_openai_400s(client: TestClient) -> None:
    h = auth("acme")
    err = assert_error(client.post("/v1/completions", content=b"{oops", headers=h), 400)
    assert "not valid JSON" in err["message"] and err["type"] == "invalid_request_error"
    err = assert_error(client.post("/v1/completions", json={"prompt": "x"}, headers=h), 400)
    assert err["param"] == "model"
    err = assert_error(client.post("/v1/chat/completions", json={"model": "base",
                                                                 "messages": []}, headers=h), 400)
    assert err["param"] == "messages"
    err = assert_error(client.post("/v1/completions", json={
        "model": "base", "prompt": "x", "temperature": 5}, headers=h), 400)
    assert "temperature" in err["message"]
    err = assert_error(client.post("/v1/completions", json={
        "model": "base", "prompt": "x", "logit_bias": {"1": 5}}, headers=h), 400)
    assert err["param"] == "logit_bias"
    err = assert_error(client.post("/v1/completions", json={
        "model": "base", "prompt": "x" * 100, "max_tokens": 100}, headers=h), 400)
    assert "maximum context length is 128" in err["message"]
    err = assert_error(client.post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function"}]}, headers=h), 400)
    assert err["param"] == "tools"


def test_seeds_beyond_64_bits_are_400_before_anything_runs() -> None:
    """torch refuses such seeds; inside the step that would fail every running request."""
    engine = FakeEngine()
    with make_client(engine) as client:
        h = auth("acme")
        for seed, n in ((2**64, 1), (2**63, 1), (2**63 - 1, 2)):  # n=2: seed + 1 overflows
            err = assert_error(client.post("/v1/completions", headers=h, json={
                "model": "base", "prompt": "x", "seed": seed, "n": n}), 400)
            assert "seed" in err["message"]
        assert engine.started == []
        ok = client.post("/v1/completions", headers=h,
                         json={"model": "base", "prompt": "x", "seed": 2**63 - 2, "n": 2})
        assert ok.status_code == 200, ok.text


def test_a_request_larger_than_the_server_is_400_even_when_idle() -> None:
    """prompts x n beyond max_num_seqs + max_queue can never fit: refused, not let in alone."""
    engine = FakeEngine()
    app = create_app(ServerConfig(engine=EngineConfig(max_num_seqs=2), max_queue=2), engine,
                     tenants=tenant_table())
    with TestClient(app, raise_server_exceptions=False) as client:
        body = {"model": "base", "prompt": ["a", "b", "c"], "n": 2}
        err = assert_error(client.post("/v1/completions", headers=auth("acme"), json=body), 400)
        assert err["param"] == "n" and "at most 4" in err["message"]
        assert engine.started == []
        body["n"] = 1
        assert client.post("/v1/completions", headers=auth("acme"), json=body).status_code == 200


def test_reused_client_request_ids_do_not_collide_in_the_engine() -> None:
    engine = FakeEngine()
    with make_client(engine) as client:
        headers = {**auth("acme"), "X-Request-Id": "retry-1"}
        for _ in range(2):
            ok = client.post("/v1/completions", headers=headers,
                             json={"model": "base", "prompt": "x", "n": 2})
            assert ok.status_code == 200, ok.text
        assert len(set(engine.started)) == 4


def test_oversize_json_bodies_are_413_without_reading_them_whole(client: TestClient) -> None:
    from loramux.server.openai_schemas import MAX_BODY_BYTES

    body = json.dumps({"model": "base", "prompt": "x" * MAX_BODY_BYTES}).encode()
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_error(client.post(path, content=body, headers=auth("acme")), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b" " * (1 << 20)

    assert_error(client.post("/v1/completions", content=chunks(), headers=auth("acme")), 413)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert_error(client.post("/v1/load_lora_adapter", content=body, headers=admin), 413)


def test_json_body_without_content_type_is_accepted(client: TestClient) -> None:
    # `curl -d '{...}'` sends application/x-www-form-urlencoded.
    response = client.post(
        "/v1/completions", headers={**auth("acme"),
                                    "Content-Type": "application/x-www-form-urlencoded"},
        content=json.dumps({"model": "base", "prompt": "hi", "max_tokens": 3}))
    assert response.status_code == 200, response.text




# ============================================================================ request fields

BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"model": "base", "prompt": "hi", "max_tokens": 3},
    "/v1/chat/completions": {"model": "base", "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 3},
}
CHAT = "/v1/chat/completions"


def post_ok(client: TestClient, path: str, fields: dict[str, Any]) -> httpx.Response:
    """POST the endpoint's minimal body plus `fields`; it must succeed, streamed or not."""
    response = client.post(path, headers=auth("acme"), json={**BODIES[path], **fields})
    assert response.status_code == 200, (fields, response.text)
    if fields.get("stream"):
        events = [e for e in response.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), events
    return response


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize(("fields", "param"), [
    ({"max_token": 3}, "max_token"),
    ({"temprature": 0.5}, "temprature"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),  # an OpenAI field loramux lacks
    ({"stream_options": {"include_usage": True, "include_usgae": True}},
     "stream_options.include_usgae"),
], ids=["max_token", "temprature", "reasoning_effort", "nested"])
def test_unknown_fields_are_400_naming_them(path: str, stream: bool, fields: dict[str, Any],
                                            param: str) -> None:
    engine = FakeEngine()
    with make_client(engine) as client:
        response = client.post(path, headers=auth("acme"),
                               json={**BODIES[path], "stream": stream, **fields})
        err = assert_error(response, 400)
        assert err == {"message": f"Unrecognized request argument supplied: {param}",
                       "type": "invalid_request_error", "param": param, "code": None}
        assert engine.started == []  # refused before anything ran


def test_a_misspelt_field_is_named_before_the_missing_one(client: TestClient) -> None:
    err = assert_error(client.post("/v1/completions", headers=auth("acme"), json={
        "model": "base", "promt": "hi", "max_tokens": 3, "max_token": 3}), 400)
    assert err["param"] == "promt"
    assert err["message"] == ("Unrecognized request arguments supplied: promt, max_token "
                              "(and 1 more)")
    # A field of the other endpoint is unknown here.
    err = assert_error(client.post(CHAT, headers=auth("acme"), json={
        **BODIES[CHAT], "prompt": "hi"}), 400)
    assert err["param"] == "prompt"
    err = assert_error(client.post("/v1/completions", headers=auth("acme"), json={
        **BODIES["/v1/completions"], "messages": []}), 400)
    assert err["param"] == "messages"


@pytest.mark.parametrize("path", list(BODIES))
@pytest.mark.parametrize(("field", "value"), [
    ("top_k", 5), ("min_p", 0.1), ("min_tokens", 2), ("ignore_eos", True),
    ("repetition_penalty", 1.1), ("stop_token_ids", [7]), ("include_stop_str_in_output", True),
])
def test_vllm_sampling_extensions_are_accepted(path: str, field: str, value: Any) -> None:
    engine = FakeEngine()
    with make_client(engine) as client:
        for stream in (False, True):
            post_ok(client, path, {field: value, "stream": stream})
            assert engine.last_params is not None
            got = getattr(engine.last_params, field)
            assert got == (tuple(value) if isinstance(value, list) else value), field


def test_vllm_chat_extensions_are_accepted(client: TestClient) -> None:
    post_ok(client, CHAT, {"add_generation_prompt": False, "continue_final_message": True,
                           "chat_template_kwargs": {"enable_thinking": False}})
    post_ok(client, "/v1/completions", {"stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})


# What clients send routinely without changing the text: each must pass (one field at a time,
# so that a failure names it). Fields declared before the unknown-field check keep their
# behaviour: logit_bias, response_format, suffix and best_of are refused when set to
# something loramux does not do (test_declared_fields_still_refuse_what_loramux_lacks).
ROUTINE_FIELDS: list[tuple[str, dict[str, Any]]] = [
    *((path, fields) for path in BODIES for fields in (
        {"user": "user-1234"}, {"n": 1}, {"seed": 7}, {"presence_penalty": 0.5},
        {"frequency_penalty": -0.5}, {"stop": "\n"}, {"stop": ["\n", "###"]}, {"stop": None},
        {"temperature": 0.7}, {"top_p": 0.9}, {"logit_bias": {}}, {"logit_bias": None},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"stream": False, "stream_options": None},
    )),
    *(("/v1/completions", fields) for fields in (
        {"echo": False}, {"echo": True}, {"best_of": 1}, {"suffix": None}, {"suffix": ""},
        {"logprobs": None}, {"logprobs": 1},
    )),
    *((CHAT, fields) for fields in (
        {"max_completion_tokens": 3}, {"parallel_tool_calls": False}, {"metadata": {"a": "b"}},
        {"store": False}, {"store": True}, {"service_tier": "auto"},
        {"response_format": {"type": "text"}}, {"tool_choice": "none"},
        {"function_call": "none"}, {"prompt_cache_key": "conv-1"},
        {"safety_identifier": "hashed-user"}, {"logprobs": False}, {"top_logprobs": None},
        {"stream": True, "stream_options": {"include_usage": True,
                                            "include_obfuscation": False}},
    )),
]


@pytest.mark.parametrize(("path", "fields"), ROUTINE_FIELDS,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{'+'.join(f)}" for p, f in ROUTINE_FIELDS])
def test_fields_clients_send_routinely_are_accepted(client: TestClient, path: str,
                                                    fields: dict[str, Any]) -> None:
    post_ok(client, path, fields)


# Whole bodies as the clients build them (their default request plus common options).
CLIENT_BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "langchain-chatopenai": (CHAT, {
        "model": "base", "stream": True, "n": 1, "temperature": 0.7,
        "stream_options": {"include_usage": True}, "max_completion_tokens": 3,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "weather?", "name": "alice"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is sunny.", "refusal": None},
            {"role": "user", "content": [{"type": "text", "text": "thanks",
                                          "cache_control": {"type": "ephemeral"}}]},
        ]}),
    "litellm": (CHAT, {
        "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "user": "litellm-key-alias", "stream": False, "metadata": {"trace": "t-1"}}),
    "guidellm-completions": ("/v1/completions", {
        "model": "base", "prompt": "hi", "max_tokens": 3, "stop": None, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True,
                                           "continuous_usage_stats": True}}),
    "guidellm-chat": (CHAT, {
        "model": "base", "messages": [{"role": "user",
                                       "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 3, "stop": None, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    "vllm-bench-serve": ("/v1/completions", {
        "model": "base", "prompt": "hi", "temperature": 0.0, "repetition_penalty": 1.0,
        "best_of": 1, "max_tokens": 3, "logprobs": None, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True}),
}


@pytest.mark.parametrize("name", list(CLIENT_BODIES))
def test_bodies_as_common_clients_send_them_are_accepted(client: TestClient, name: str) -> None:
    path, body = CLIENT_BODIES[name]
    response = client.post(path, headers=auth("acme"), json=body)
    assert response.status_code == 200, response.text
    assert "[DONE]" in response.text if body.get("stream") else response.json()["choices"]


@pytest.mark.parametrize(("path", "fields", "param"), [
    (CHAT, {"logit_bias": {"1": 5}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"1": 5}}, "logit_bias"),
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"tools": [{"type": "function"}], "parallel_tool_calls": True}, "tools"),
    ("/v1/completions", {"suffix": "tail"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
])
def test_declared_fields_still_refuse_what_loramux_lacks(client: TestClient, path: str,
                                                         fields: dict[str, Any],
                                                         param: str) -> None:
    response = client.post(path, headers=auth("acme"), json={**BODIES[path], **fields})
    err = assert_error(response, 400)
    assert err["param"] == param and "Unrecognized" not in err["message"]


def test_admin_bodies_refuse_unknown_fields(client: TestClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for path, body, param in (
            ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "a", "lora_pth": "b"},
             "lora_pth"),
            ("/v1/unload_lora_adapter", {"lora_name": "acme-a", "force": True}, "force"),
            ("/admin/adapters", {"name": "a", "pinned": True}, "pinned")):
        err = assert_error(client.post(path, headers=admin, json=body), 400)
        assert err["param"] == param
        assert err["message"] == f"Unrecognized request argument supplied: {param}"
    assert "acme-a" in client.app.state.loramux.engine.adapters  # nothing was unloaded
    # vLLM's own fields stay accepted.
    ok = client.post("/v1/unload_lora_adapter", headers=admin,
                     json={"lora_name": "acme-a", "lora_int_id": 1})
    assert ok.status_code == 200, ok.text


def test_the_openai_package_is_accepted_and_sees_unknown_fields_named() -> None:
    """The real SDK against a live server: its requests, with the options SDK users set
    routinely, pass; a field the server does not know comes back as a BadRequestError."""
    with _live(FakeEngine()) as server:
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS["acme"], max_retries=0)
        assert sdk.completions.create(model="base", prompt="hi", max_tokens=3
                                      ).choices[0].text == "bas"
        out = sdk.completions.create(
            model="base", prompt="hi", max_tokens=3, n=1, best_of=1, echo=False, seed=1,
            frequency_penalty=0.1, presence_penalty=0.1, stop=["\n"], temperature=0.5,
            top_p=0.9, user="u-1", logit_bias={}, suffix=None,
            extra_body={"top_k": 5, "ignore_eos": True, "min_tokens": 1})
        assert out.choices[0].text == "bas"
        messages: list[Any] = [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hi", "name": "alice"}]
        chat = sdk.chat.completions.create(
            model="base", messages=messages, max_completion_tokens=3, n=1, seed=1,
            user="u-1", metadata={"app": "test"}, store=False, service_tier="auto",
            parallel_tool_calls=False, response_format={"type": "text"}, stop="\n",
            prompt_cache_key="conv-1", safety_identifier="hashed")
        assert chat.choices[0].message.content == "bas"
        stream = sdk.chat.completions.create(
            model="base", messages=messages, max_tokens=3, stream=True,
            stream_options={"include_usage": True, "include_obfuscation": False})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "bas"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
        for stream_it in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                sdk.chat.completions.create(model="base", messages=messages, stream=stream_it,
                                            extra_body={"max_token": 3})
            assert err.value.status_code == 400 and err.value.param == "max_token"
            assert "Unrecognized request argument supplied: max_token" in err.value.message


def test_auth_errors_are_401(client: TestClient) -> None:
    body = {"model": "base", "prompt": "hi"}
    for headers in ({}, {"Authorization": "Bearer sk-nope"}, {"Authorization": KEYS["acme"]},
                    {"Authorization": f"Basic {KEYS['acme']}"}):
        err = assert_error(client.post("/v1/completions", json=body, headers=headers), 401)
        assert err["code"] == "invalid_api_key"
    assert_error(client.get("/v1/models"), 401)
    # Auth comes before body validation: nothing about the API leaks without a key.
    assert_error(client.post("/v1/completions", content=b"{oops"), 401)


def test_forbidden_adapter_is_the_same_404_as_a_missing_one(client: TestClient) -> None:
    missing = client.post("/v1/completions", headers=auth("acme"),
                          json={"model": "no-such", "prompt": "hi"})
    forbidden = client.post("/v1/completions", headers=auth("acme"),
                            json={"model": "beta-x", "prompt": "hi"})
    err = assert_error(missing, 404)
    assert err["code"] == "model_not_found"
    assert_error(forbidden, 404)
    assert forbidden.json() == json.loads(missing.content.replace(b"no-such", b"beta-x"))
    # beta may not use the base: also 404, for chat too
    assert_error(client.post("/v1/chat/completions", headers=auth("beta"), json={
        "model": "base", "messages": [{"role": "user", "content": "x"}]}), 404)


def test_models_list_shows_only_what_the_tenant_may_use(client: TestClient) -> None:
    ids = [m["id"] for m in client.get("/v1/models", headers=auth("acme")).json()["data"]]
    assert ids == ["base", "acme-a", "acme-b"]
    data = client.get("/v1/models", headers=auth("beta")).json()["data"]
    assert [(m["id"], m["parent"]) for m in data] == [("beta-x", "base")]
    assert client.get("/v1/models/acme-a", headers=auth("acme")).json()["parent"] == "base"
    assert_error(client.get("/v1/models/beta-x", headers=auth("acme")), 404)


def test_lazy_names_are_listed() -> None:
    engine = FakeEngine(lazy={"acme-lazy"})
    with make_client(engine) as client:
        ids = [m["id"] for m in client.get("/v1/models", headers=auth("acme")).json()["data"]]
        assert "acme-lazy" in ids


def test_adapter_that_fails_validation_is_400() -> None:
    with make_client(FakeEngine(broken={"acme-bad"})) as client:
        err = assert_error(client.post("/v1/completions", headers=auth("acme"),
                                       json={"model": "acme-bad", "prompt": "x"}), 400)
        assert "corrupt weights" in err["message"] and err["code"] == "adapter_unavailable"
        assert err["param"] == "model" and "/" not in err["message"]  # no server paths


def test_rate_limit_is_429_with_retry_after(client: TestClient) -> None:
    body = {"model": "beta-x", "prompt": "hi", "max_tokens": 2}
    for _ in range(2):
        assert client.post("/v1/completions", json=body, headers=auth("beta")).status_code == 200
    response = client.post("/v1/completions", json=body, headers=auth("beta"))
    err = assert_error(response, 429)
    assert err["code"] == "rate_limit_exceeded" and int(response.headers["retry-after"]) >= 1
    # Other tenants are not affected.
    assert client.post("/v1/completions", headers=auth("acme"),
                       json={"model": "base", "prompt": "hi"}).status_code == 200


def test_unexpected_errors_are_500_without_internals() -> None:
    with make_client(FakeEngine(crash=True)) as client:
        for stream in (False, True):
            response = client.post("/v1/completions", headers=auth("acme"), json={
                "model": "base", "prompt": "hi", "stream": stream})
            if stream:
                assert response.status_code == 200
                events = [line for line in response.text.splitlines() if line]
                assert events[-1] == "data: [DONE]"
                err = json.loads(events[-2][len("data: "):])["error"]
                assert err["type"] == "server_error"
                text = response.text
            else:
                err = assert_error(response, 500)
                text = response.text
            assert "secret" not in text and "/srv" not in text and "Traceback" not in text


def test_unknown_route_and_method_use_the_error_body(client: TestClient) -> None:
    err = assert_error(client.get("/v1/nothing"), 404)
    assert err["message"] == "Invalid URL (GET /v1/nothing)." and err["code"] == "not_found"
    assert_error(client.post("/v1/nope", json={"model": "base"}, headers=auth("acme")), 404)
    response = client.get("/v1/completions")
    err = assert_error(response, 405)
    assert err["message"] == "Invalid method for URL (GET /v1/completions); use POST."
    assert err["code"] == "method_not_allowed" and response.headers["allow"] == "POST"
    # With admin on, a path under /admin that no route has is an ordinary unknown URL.
    err = assert_error(client.get("/admin/nope", headers={"Authorization": f"Bearer {ADMIN}"}),
                       404)
    assert err["message"] == "Invalid URL (GET /admin/nope)."
    long = "/v1/" + "x" * 5000
    assert len(assert_error(client.get(long), 404)["message"]) < 300


def test_not_ready_is_503_with_retry_after() -> None:
    engine = FakeEngine(ready=False)
    with make_client(engine) as client:
        response = client.get("/ready")
        assert_error(response, 503)
        assert "retry-after" in response.headers
        assert client.get("/health").json() == {"status": "ok"}
        response = client.post("/v1/completions", headers=auth("acme"),
                               json={"model": "base", "prompt": "hi"})
        assert_error(response, 503)
        # the context length is not known yet: null, not a 0 that a client could cache
        cards = client.get("/v1/models", headers=auth("acme")).json()["data"]
        assert cards and all(card["max_model_len"] is None for card in cards)
        engine.ready = True
        assert client.get("/ready").status_code == 200
        cards = client.get("/v1/models", headers=auth("acme")).json()["data"]
        assert all(card["max_model_len"] == engine.max_len for card in cards)


def test_request_id_is_returned_and_logged_without_the_prompt(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loramux.access")
    response = client.post("/v1/completions", headers={**auth("acme"), "X-Request-Id": "abc-1"},
                           json={"model": "acme-a", "prompt": "TOP-SECRET-PROMPT"})
    assert response.status_code == 200
    # The id is the server's; the client's comes back beside it (issue 15, item 11).
    server_id = response.headers["x-request-id"]
    assert len(server_id) == 32 and response.headers["x-client-request-id"] == "abc-1"
    assert response.json()["id"] == f"cmpl-{server_id}"
    generated = client.get("/health").headers["x-request-id"]
    assert len(generated) == 32
    lines = [r.getMessage() for r in caplog.records if r.name == "loramux.access"]
    line = next(msg for msg in lines if msg.startswith(f"{server_id} "))
    assert line.endswith(" client_id=abc-1"), line
    assert "POST /v1/completions 200" in line and "adapter=acme-a" in line
    assert "tenant=acme" in line
    assert all("TOP-SECRET" not in r.getMessage() for r in caplog.records)
    # An unusable caller id is replaced.
    assert client.get("/health", headers={"X-Request-Id": "bad id\n"}).headers[
        "x-request-id"] != "bad id"


# ============================================================================ responses


def test_responses_are_counted_by_endpoint_and_status(client: TestClient) -> None:
    client.post("/v1/completions", headers=auth("acme"), json={"model": "base", "prompt": "x"})
    client.post("/v1/completions", headers=auth("acme"), json={"model": "zzz", "prompt": "x"})
    client.get("/v1/models/whatever-name-1", headers=auth("acme"))
    client.get("/some/random/path")
    text = client.get("/metrics").text
    assert 'loramux_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text
    assert 'loramux_requests_total{endpoint="/v1/completions",status="404"} 1.0' in text
    assert 'loramux_requests_total{endpoint="/v1/models/{model}",status="404"} 1.0' in text
    assert 'loramux_requests_total{endpoint="other",status="404"} 1.0' in text
    assert 'loramux_request_finish_total{reason="length"} 1.0' in text
    assert "whatever-name" not in text and "random" not in text


def test_completion_shape_n_and_logprobs(client: TestClient) -> None:
    body = client.post("/v1/completions", headers=auth("acme"), json={
        "model": "acme-a", "prompt": ["ab", "c"], "n": 2, "max_tokens": 4, "logprobs": 1,
        "echo": False}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == "acme" and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == list("acme") and lp["text_offset"] == [0, 1, 2, 3]
    assert lp["token_logprobs"] == [-0.5] * 4 and lp["top_logprobs"][0] == {"a": -0.5}


def test_stream_framing_and_usage(client: TestClient) -> None:
    response = client.post("/v1/completions", headers=auth("acme"), json={
        "model": "base", "prompt": "hi", "max_tokens": 3, "stream": True,
        "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "bas"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    # Chat: the first delta carries the role, the last one the finish reason.
    response = client.post("/v1/chat/completions", headers=auth("acme"), json={
        "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "stream": True})
    chunks = [json.loads(e[6:]) for e in response.text.split("\n\n") if e and "[DONE]" not in e]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


# ============================================================================ admin


ADMIN_OFF = ("The admin API is disabled on this server: start loramux with --admin-token "
             "(or LORAMUX_ADMIN_TOKEN) to enable it.")


def test_admin_off_without_token() -> None:
    """Every admin path, known or not and whatever the method, says the admin API is off."""
    calls = [("GET", "/admin/adapters"), ("POST", "/admin/adapters"),
             ("GET", "/admin/adapters/x"), ("PUT", "/admin/adapters/x"),
             ("DELETE", "/admin/adapters/x"), ("POST", "/admin/adapters/x/pin"),
             ("POST", "/admin/adapters/x/unpin"), ("POST", "/v1/load_lora_adapter"),
             ("POST", "/v1/unload_lora_adapter"),
             ("GET", "/admin"), ("GET", "/admin/nope"), ("POST", "/admin/adapters/x/y/z"),
             ("GET", "/v1/load_lora_adapter"), ("PATCH", "/admin/adapters")]  # wrong methods
    with make_client(admin_token=None) as client:
        for method, path in calls:
            for headers in ({}, {"Authorization": "Bearer x"}):
                response = client.request(method, path, headers=headers,
                                          json={"lora_name": "a", "lora_path": "a"})
                err = assert_error(response, 404)
                assert err == {"message": ADMIN_OFF, "type": "invalid_request_error",
                               "param": None, "code": "admin_disabled"}, (method, path)
                assert "allow" not in response.headers
        # The rest of the server is not affected.
        assert assert_error(client.get("/v1/nope"), 404)["code"] == "not_found"
        assert client.get("/v1/models", headers=auth("acme")).status_code == 200


def test_admin_needs_the_admin_token(client: TestClient) -> None:
    calls = [("GET", "/admin/adapters", None),
             ("POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "a"}),
             ("POST", "/v1/unload_lora_adapter", {"lora_name": "acme-a"}),
             ("POST", "/admin/adapters", {"name": "a"}),
             ("PUT", "/admin/adapters/a", None),
             ("DELETE", "/admin/adapters/acme-a", None),
             ("POST", "/admin/adapters/acme-a/pin", None),
             ("POST", "/admin/adapters/acme-a/unpin", None)]
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, auth("acme"),
                        {"Authorization": ADMIN}):
            err = assert_error(client.request(method, path, json=body, headers=headers), 401)
            assert err["type"] == "authentication_error"
    good = {"Authorization": f"Bearer {ADMIN}"}
    assert client.get("/admin/adapters", headers=good).status_code == 200
    response = client.post("/v1/unload_lora_adapter", headers=good, json={"lora_name": "acme-a"})
    assert response.status_code == 200
    assert response.text == "Success: LoRA adapter 'acme-a' removed successfully."
    assert_error(client.post("/v1/unload_lora_adapter", headers=good,
                             json={"lora_name": "acme-a"}), 404)


def test_upload_limits(tmp_path: Path) -> None:
    good = {"Authorization": f"Bearer {ADMIN}"}
    with make_client(FakeEngine(root=tmp_path), max_upload_bytes=1000) as client:
        files = {"adapter_config.json": ("adapter_config.json", b"{}"),
                 "adapter_model.safetensors": ("adapter_model.safetensors", b"x" * 5000)}
        err = assert_error(client.put("/admin/adapters/up", headers=good, files=files), 413)
        assert "limit" in err["message"]
        assert_error(client.put("/admin/adapters/up", headers=good, content=b"raw"), 415)
        small = {"adapter_config.json": ("adapter_config.json", b"{}")}
        err = assert_error(client.put("/admin/adapters/up", headers=good, files=small), 400)
        assert "adapter_model.safetensors" in err["message"]
        assert_error(client.put("/admin/adapters/..", headers=good, files=small), 404)
        assert_error(client.put("/admin/adapters/bad%20name", headers=good, files=small), 400)
        assert not any((tmp_path / ".uploads").glob("*"))  # nothing left behind


# ============================================================================ live server


def _live(fake: FakeEngine, **config: Any) -> LiveServer:
    app = create_app(ServerConfig(admin_token=ADMIN, **config), fake, tenants=tenant_table())
    return LiveServer(app)


def _wait(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_client_disconnect_aborts_streaming_and_plain_requests() -> None:
    engine = FakeEngine(delay=0.05, answer="x" * 200, max_len=1024)
    with _live(engine) as server:
        app_state = server.app.state.loramux
        with httpx.stream("POST", server.url + "/v1/completions", headers=auth("acme"), json={
                "model": "acme-a", "prompt": "hi", "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        _wait(lambda: len(engine.aborted) == 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", headers=auth("acme"), timeout=0.3,
                       json={"model": "acme-a", "prompt": "hi", "max_tokens": 200})
        _wait(lambda: len(engine.aborted) == 2)
        _wait(lambda: app_state.limiter.in_flight == 0 and engine.running == 0)
        assert engine.finished == []


def test_queue_bound_503_and_concurrency_429_live() -> None:
    engine = FakeEngine(delay=0.05, answer="x" * 100, max_len=1024)
    config = {"engine": EngineConfig(max_num_seqs=1), "max_queue": 1}
    with _live(engine, **config) as server:
        body = {"model": "acme-a", "prompt": "hi", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          headers=auth("slow")) as first:
            first_lines = first.iter_lines()  # keep it: a dropped iterator closes the stream
            next(first_lines)
            over = httpx.post(server.url + "/v1/completions", headers=auth("slow"), json=body)
            assert_error(over, 429)  # slow's max_concurrent is 1
            with httpx.stream("POST", server.url + "/v1/completions", json=body,
                              headers=auth("acme")) as second:
                second_lines = second.iter_lines()
                next(second_lines)
                full = httpx.post(server.url + "/v1/completions", headers=auth("acme"),
                                  json=body)
                assert_error(full, 503)
                assert full.json()["error"]["code"] == "overloaded"
                assert int(full.headers["retry-after"]) >= 1


def test_access_log_escapes_control_characters(
        client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """A `model` with \\r\\n must not forge a second access-log line."""
    caplog.set_level(logging.INFO, logger="loramux.access")
    forged = "acme-a\r\nabc-2 POST /admin/adapters 200 1.0ms tenant=root adapter=x"
    client.post("/v1/completions", headers={**auth("acme"), "X-Request-Id": "abc-3"},
                json={"model": forged, "prompt": "hi"})
    client.get("/v1/models", headers={"X-Request-Id": "abc-4\n"})
    lines = [r.getMessage() for r in caplog.records if r.name == "loramux.access"]
    assert lines and not any("\r" in line or "\n" in line for line in lines)
    assert not any(line.startswith("abc-2 ") for line in lines)
    assert not any(line.startswith("abc-4") for line in lines)  # "abc-4\n" is no valid id
