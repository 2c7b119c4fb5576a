"""The bad-input matrix against a real server on loopback: each bad request gets its own status,
the OpenAI error body, the parameter it names and a message that says what is wrong; a refused
request or upload changes nothing, and the server serves correctly afterwards.

Rows: malformed JSON, wrong types, negative / zero / huge max_tokens, out-of-range sampling
values, prompts longer than the context, empty prompts and messages, token ids outside the
vocabulary, unknown models, an adapter the tenant may not use (the same 404 as an unknown one),
invalid adapter names (path characters, `..`, very long) in requests and admin calls, and
uploads that are truncated, oversize, not safetensors, not multipart, with NaN or wrong shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import torch
from adapter_factory import CONFIG_FILE, WEIGHTS_FILE, edit_config, make_adapter, rewrite_tensors
from reliability_world import (
    ADMIN_HEADERS,
    BASE,
    World,
    assert_error,
    auth,
    build_world,
    completion,
    poison,
    upload_files,
)
from server_harness import LiveServer

CONTEXT = 256  # the tiny model's max_position_embeddings in this module
MAX_ADAPTER_BYTES = 64 << 10  # registry limit on the weights file
MAX_UPLOAD_BYTES = 256 << 10  # HTTP limit on an upload body


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("input"), max_positions=CONTEXT)


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    with world.serve(registry={"max_adapter_bytes": MAX_ADAPTER_BYTES},
                     max_upload_bytes=MAX_UPLOAD_BYTES) as server:
        yield server


CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG_NAME = "acme-" + "x" * 300

# (id, path, body: dict or raw bytes, status, param, fragment of the message)
REQUESTS: list[tuple[str, str, dict[str, Any] | bytes, int, str | None, str]] = [
    ("malformed-json", CMPL, b'{"model": "tiny-llama", "prompt": ', 400, None, "not valid JSON"),
    ("malformed-json-chat", CHAT, b"{'model': 'tiny-llama'}", 400, None, "not valid JSON"),
    ("not-utf8", CMPL, b'{"model": "\xff\xfe"}', 400, None, "not valid JSON"),
    ("body-not-object", CMPL, b"[1, 2, 3]", 400, None, "JSON object"),
    ("empty-body", CMPL, b"", 400, None, "JSON object"),
    ("missing-model", CMPL, {"prompt": "x"}, 400, "model", "required"),
    ("model-wrong-type", CMPL, {"model": 5, "prompt": "x"}, 400, "model", "string"),
    ("prompt-wrong-type", CMPL, {"model": BASE, "prompt": {"a": 1}}, 400, "prompt", ""),
    ("max-tokens-string", CMPL, {"model": BASE, "prompt": "x", "max_tokens": "ten"}, 400,
     "max_tokens", "integer"),
    ("stream-wrong-type", CMPL, {"model": BASE, "prompt": "x", "stream": "maybe"}, 400,
     "stream", "boolean"),
    ("messages-wrong-type", CHAT, {"model": BASE, "messages": "hi"}, 400, "messages", "list"),
    ("message-without-role", CHAT, {"model": BASE, "messages": [{"content": "hi"}]}, 400,
     "messages.0.role", "required"),
    ("negative-max-tokens", CMPL, {"model": BASE, "prompt": "x", "max_tokens": -1}, 400,
     "max_tokens", "greater than or equal to 1"),
    ("zero-max-tokens", CMPL, {"model": BASE, "prompt": "x", "max_tokens": 0}, 400,
     "max_tokens", "greater than or equal to 1"),
    ("huge-max-tokens", CMPL, {"model": BASE, "prompt": "x", "max_tokens": 10**9}, 400,
     "max_tokens", f"maximum context length is {CONTEXT} tokens"),
    ("huger-than-int64-max-tokens", CMPL, {"model": BASE, "prompt": "x", "max_tokens": 10**30},
     400, "max_tokens", "maximum context length"),
    ("huge-max-completion-tokens", CHAT, {"model": BASE, "messages": MSG,
                                          "max_completion_tokens": 10**6}, 400,
     "max_completion_tokens", "maximum context length"),
    ("negative-max-tokens-chat", CHAT, {"model": BASE, "messages": MSG, "max_tokens": -5}, 400,
     "max_tokens", "greater than or equal to 1"),
    ("temperature-negative", CMPL, {"model": BASE, "prompt": "x", "temperature": -0.1}, 400,
     "temperature", "greater than or equal to 0"),
    ("temperature-too-high", CHAT, {"model": BASE, "messages": MSG, "temperature": 2.5}, 400,
     "temperature", "less than or equal to 2"),
    ("temperature-nan", CMPL, b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}', 400,
     "temperature", ""),
    ("top-p-zero", CMPL, {"model": BASE, "prompt": "x", "top_p": 0}, 400, "top_p",
     "greater than 0"),
    ("top-p-too-high", CHAT, {"model": BASE, "messages": MSG, "top_p": 1.5}, 400, "top_p",
     "less than or equal to 1"),
    ("top-k-negative", CMPL, {"model": BASE, "prompt": "x", "top_k": -2}, 400, "top_k", ""),
    ("n-zero", CMPL, {"model": BASE, "prompt": "x", "n": 0}, 400, "n", ""),
    ("n-too-many", CMPL, {"model": BASE, "prompt": "x", "n": 65}, 400, "n", ""),
    ("logprobs-too-many", CMPL, {"model": BASE, "prompt": "x", "logprobs": 21}, 400,
     "logprobs", ""),
    ("too-many-stops", CMPL, {"model": BASE, "prompt": "x", "stop": ["a"] * 17}, 400, None,
     "stop"),
    ("prompt-longer-than-context", CMPL, {"model": BASE, "prompt": "x" * (CONTEXT + 10)}, 400,
     "prompt", f"maximum context length is {CONTEXT} tokens"),
    ("prompt-fills-context", CMPL, {"model": BASE, "prompt": "x" * CONTEXT}, 400, "prompt",
     "maximum context length"),
    ("prompt-plus-max-tokens", CMPL, {"model": BASE, "prompt": "x" * 200, "max_tokens": 100},
     400, "max_tokens", "However, you requested 300 tokens"),
    ("chat-longer-than-context", CHAT, {"model": BASE, "messages": [
        {"role": "user", "content": "y" * CONTEXT}]}, 400, "prompt", "maximum context length"),
    ("empty-prompt", CMPL, {"model": BASE, "prompt": ""}, 400, "prompt", "empty"),
    ("empty-prompt-list", CMPL, {"model": BASE, "prompt": []}, 400, "prompt", "empty"),
    ("token-id-outside-vocab", CMPL, {"model": BASE, "prompt": [1, 2, 10**6]}, 400, "prompt",
     "token ids must be in"),
    ("negative-token-id", CMPL, {"model": BASE, "prompt": [3, -1]}, 400, "prompt",
     "token ids must be in"),
    ("empty-messages", CHAT, {"model": BASE, "messages": []}, 400, "messages", "at least 1"),
    ("non-text-content", CHAT, {"model": BASE, "messages": [
        {"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages", "image_url"),
    ("unsupported-tools", CHAT, {"model": BASE, "messages": MSG, "tools": [{"type": "f"}]}, 400,
     "tools", "not supported"),
    ("unsupported-logit-bias", CMPL, {"model": BASE, "prompt": "x", "logit_bias": {"1": 3}},
     400, "logit_bias", "not supported"),
    ("unknown-field", CMPL, {"model": BASE, "prompt": "x", "max_token": 3}, 400, "max_token",
     "Unrecognized request argument supplied: max_token"),
    ("unknown-field-chat-stream", CHAT, {"model": BASE, "messages": MSG, "stream": True,
                                         "max_tokenz": 3}, 400, "max_tokenz",
     "Unrecognized request argument supplied: max_tokenz"),
]

# Models that must all get the very same 404 (but for the name): unknown, another tenant's,
# and names no adapter can have (path characters, `..`, very long). acme may use "acme-*".
NOT_FOUND = ["no-such-model", "beta-one", "gamma-one", "shared-sum", "acme-one/../beta-one",
             "acme-../beta-one", "../acme-one", "acme-one/", "acme-%2e%2e", ".acme-one",
             "acme-\x00", LONG_NAME, "acme-one\n", ""]


@pytest.mark.parametrize(("path", "body", "status", "param", "fragment"),
                         [row[1:] for row in REQUESTS], ids=[row[0] for row in REQUESTS])
def test_bad_requests(live: LiveServer, path: str, body: dict[str, Any] | bytes, status: int,
                      param: str | None, fragment: str) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(live.url + path, headers=auth("acme"), timeout=30, **kwargs)
    err = assert_error(response, status)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert fragment.lower() in err["message"].lower(), err


@pytest.mark.parametrize("model", NOT_FOUND, ids=range(len(NOT_FOUND)))
def test_unknown_forbidden_and_invalid_models_are_one_404(live: LiveServer, model: str) -> None:
    for path, body in ((CMPL, {"prompt": "x", "max_tokens": 2}),
                       (CHAT, {"messages": MSG, "max_tokens": 2})):
        response = httpx.post(live.url + path, headers=auth("acme"), timeout=30,
                              json={"model": model, **body})
        err = assert_error(response, 404)
        # A name longer than any model can have is cut in the echo (issue 15: 14 MB echoed).
        shown = model if len(model) <= 256 else f"{model[:64]}...({len(model)} characters)"
        assert err == {"message": f"The model `{shown}` does not exist or you do not have "
                                  "access to it.", "type": "invalid_request_error",
                       "param": "model", "code": "model_not_found"}
    # (Starlette's path pattern ends in `$`, which matches before a final newline, so
    # /v1/models/acme-one%0A is acme-one's card: harmless, and not asked here.)
    if model and not model.endswith("\n"):
        response = httpx.get(f"{live.url}/v1/models/{quote(model, safe='')}",
                             headers=auth("acme"), timeout=30)
        assert assert_error(response, 404)["code"] == "model_not_found"


def test_bad_requests_change_nothing(live: LiveServer, world: World) -> None:
    """After the matrix, the server is idle and answers exactly as PEFT does."""
    response = completion(live.url, "acme", "acme-one", "Still fine?", 12)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == world.expected("acme-one", "Still fine?", 12)
    names = [m["id"] for m in httpx.get(live.url + "/v1/models", headers=auth("acme")).json()[
        "data"]]
    assert names == [BASE, "acme-one", "acme-two"]


# ============================================================================ admin names


BAD_NAMES = ["../evil", "..", "a..b", ".hidden", "-dash", "has space", "tab\tname",
             "semi;colon", "x" * 129, "ünïcode", "a/b"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=range(len(BAD_NAMES)))
def test_admin_refuses_invalid_adapter_names(live: LiveServer, world: World, name: str) -> None:
    folder = str(world.root / "var-a")
    for path, body in (("/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder}),
                       ("/admin/adapters", {"name": name, "path": "var-a"})):
        err = assert_error(httpx.post(live.url + path, json=body, headers=ADMIN_HEADERS,
                                      timeout=30), 400)
        assert err["param"] == "name" and err["message"].startswith("name syntax"), err
    assert name not in [r["name"] for r in httpx.get(
        live.url + "/admin/adapters", headers=ADMIN_HEADERS).json()["data"]]


@pytest.mark.parametrize(("lora_path", "fragment"), [
    ("../tiny-llama", "path outside adapter root"),
    ("/etc", "path outside adapter root"),
    ("no-such-folder", "not a PEFT adapter"),
    (".", "has no adapter_config.json"),
])
def test_admin_load_refuses_paths(live: LiveServer, world: World, lora_path: str,
                                  fragment: str) -> None:
    body = {"lora_name": "acme-pathy", "lora_path": str(world.root / lora_path)
            if not lora_path.startswith("/") else lora_path}
    err = assert_error(httpx.post(live.url + "/v1/load_lora_adapter", json=body,
                                  headers=ADMIN_HEADERS, timeout=30), 400)
    assert fragment in err["message"], err


# ============================================================================ uploads


def put(live: LiveServer, name: str, headers: dict[str, str] | None = None,
        **kwargs: Any) -> httpx.Response:
    return httpx.put(f"{live.url}/admin/adapters/{quote(name, safe='')}", timeout=60,
                     headers={**ADMIN_HEADERS, **(headers or {})}, **kwargs)


def broken(world: World, tmp: Path, how: str) -> Path:
    """A copy of a good adapter broken in one way."""
    folder = tmp / how
    if how == "oversize-weights":  # rank 16 on every module: ~130 KB of float32
        return make_adapter(folder, world.hf_config, rank=16, seed=3)
    if how == "rank-over-limit":
        return make_adapter(folder, world.hf_config, rank=32, target_modules=("q_proj",))
    make_adapter(folder, world.hf_config, rank=4, target_modules=("q_proj", "v_proj"), seed=3)
    weights = folder / WEIGHTS_FILE
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "not-safetensors":
        weights.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    elif how == "pickle-named-safetensors":
        torch.save({"x": torch.zeros(2)}, weights)
    elif how == "nan":
        rewrite_tensors(folder, lambda t: poison(t, "lora_B", float("nan")))
    elif how == "inf":
        rewrite_tensors(folder, lambda t: poison(t, "lora_A", float("inf")))
    elif how == "wrong-shape":
        def reshape(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            key = next(k for k in t if "lora_A" in k)
            t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)
            return t
        rewrite_tensors(folder, reshape)
    elif how == "config-not-json":
        (folder / CONFIG_FILE).write_text("{this is not json")
    elif how == "dora":
        edit_config(folder, use_dora=True)
    return folder


UPLOADS = [  # (how, status, fragment)
    ("truncated", 400, "corrupt weights"),
    ("not-safetensors", 400, "corrupt weights"),
    ("pickle-named-safetensors", 400, "corrupt weights"),
    ("nan", 400, "non-finite values"),
    ("inf", 400, "non-finite values"),
    ("wrong-shape", 400, "shape mismatch"),
    ("config-not-json", 400, "invalid adapter_config.json"),
    ("dora", 400, "unsupported feature"),
    ("rank-over-limit", 400, "rank limit"),
    ("oversize-weights", 413, "size limit"),
]


@pytest.mark.parametrize(("how", "status", "fragment"), UPLOADS, ids=[u[0] for u in UPLOADS])
def test_bad_uploads_are_refused_and_change_nothing(live: LiveServer, world: World,
                                                   tmp_path: Path, how: str, status: int,
                                                   fragment: str) -> None:
    name = f"acme-up-{how}"
    err = assert_error(put(live, name, files=upload_files(broken(world, tmp_path, how))), status)
    assert fragment in err["message"], err
    assert_error(completion(live.url, "acme", name, "x", 2), 404)
    assert not (world.root / name).exists()
    assert not any((world.root / ".uploads").iterdir())  # staging cleaned up


def test_upload_body_over_the_limit_is_413(live: LiveServer, world: World) -> None:
    files = upload_files(world.root / "var-a")
    files[WEIGHTS_FILE] = (WEIGHTS_FILE, b"\0" * (MAX_UPLOAD_BYTES + 1), "application/octet-stream")
    err = assert_error(put(live, "acme-huge", files=files), 413)
    assert str(MAX_UPLOAD_BYTES) in err["message"]
    # The same without a Content-Length (chunked): refused while it streams in.
    request = httpx.Request("PUT", "http://x", files=files)
    body, content_type = request.read(), request.headers["content-type"]

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i:i + 8192]

    response = put(live, "acme-huge", content=chunks(),
                   headers={"Content-Type": content_type})
    assert_error(response, 413)
    assert_error(completion(live.url, "acme", "acme-huge", "x", 2), 404)


def test_upload_framing_errors(live: LiveServer, world: World) -> None:
    folder = world.root / "var-a"
    # Not multipart at all.
    err = assert_error(put(live, "acme-frame", content=(folder / WEIGHTS_FILE).read_bytes()), 415)
    assert "multipart/form-data" in err["message"]
    # One of the two files missing.
    files = upload_files(folder)
    del files[CONFIG_FILE]
    err = assert_error(put(live, "acme-frame", files=files), 400)
    assert "lacks adapter_config.json" in err["message"]
    # A multipart body cut off in the middle (no closing boundary).
    request = httpx.Request("PUT", "http://x", files=upload_files(folder))
    body = request.read()
    err = assert_error(put(live, "acme-frame", content=body[: len(body) // 2],
                           headers={"Content-Type": request.headers["content-type"]}), 400)
    # An invalid name in the path.
    # ("/admin/adapters/.." is normalised to "/admin" by clients: no such route, a 404.)
    for name in ("a..b", ".hidden", "x" * 129, "a b"):
        err = assert_error(put(live, name, files=upload_files(folder)), 400)
        assert err["message"].startswith("name syntax")
    assert_error(completion(live.url, "acme", "acme-frame", "x", 2), 404)
