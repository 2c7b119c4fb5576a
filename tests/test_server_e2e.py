"""The real server end to end: uvicorn on a loopback port, the real engine and registry, a
tiny random Llama with real PEFT adapters, and the official `openai` package as the client.

What it shows (issue 5): completions, chat, streaming, models list and errors through
`openai`; outputs equal to PEFT's for every adapter while requests for different adapters run
concurrently (greedy, float32); admin load / upload / reload / unload / pin / delete through
HTTP while other requests stream; admin auth; tenant isolation; 429 limits; the
vLLM-compatible /metrics series with the right values during a run; client disconnects
freeing KV blocks and adapter references; SIGTERM draining a running stream.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from adapter_factory import CONFIG_FILE, WEIGHTS_FILE, make_adapter
from reliability_world import World, scrape, value, wait_for
from server_harness import LiveServer
from server_model import SPECIALS, make_model_dir

from loramux.server.app import create_app
from loramux.server.config import ServerConfig
from loramux.server.local_engine import LocalEngineClient
from loramux.server.tenants import hash_key

BASE = "tiny-llama"
ADMIN = "admin-token-for-tests"
KEYS = {"acme": "sk-acme", "beta": "sk-beta", "limited": "sk-limited"}
ADAPTERS: dict[str, dict[str, Any]] = {  # name -> make_adapter arguments
    "acme-support": {"rank": 4, "target_modules": ("q_proj", "v_proj"), "seed": 1},
    "acme-summarize": {"rank": 8, "seed": 2, "use_rslora": True},
    "beta-chat": {"rank": 2, "target_modules": ("o_proj", "down_proj"), "seed": 3},
    "acme-lazy": {"rank": 4, "target_modules": ("gate_proj", "up_proj"), "seed": 4},
    "staging/v1": {"rank": 4, "target_modules": ("k_proj", "o_proj"), "seed": 5},
    "staging/v2": {"rank": 6, "target_modules": ("q_proj", "down_proj"), "seed": 6},
    "metrics-p": {"rank": 2, "target_modules": ("q_proj",), "seed": 7},
    "metrics-a": {"rank": 2, "target_modules": ("v_proj",), "seed": 8},
    "metrics-b": {"rank": 2, "target_modules": ("o_proj",), "seed": 9},
}
PRELOADED = ("acme-support", "acme-summarize", "beta-chat")
KV_TOKENS = 16384


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("server-e2e")
    model_dir, hf_config, tokenizer = make_model_dir(base / BASE, max_positions=4096)
    root = base / "adapters"
    for name, kwargs in ADAPTERS.items():
        # b_std large enough that every adapter changes the greedy text of the tiny model.
        make_adapter(root / name, hf_config, b_std=0.2, **kwargs)
    keys = base / "keys.yaml"
    keys.write_text(json.dumps({"tenants": {
        "acme": {"keys_sha256": [hash_key(KEYS["acme"])], "adapters": ["acme-*", BASE]},
        "beta": {"keys_sha256": [hash_key(KEYS["beta"])], "adapters": ["beta-*"]},
        "limited": {"keys_sha256": [hash_key(KEYS["limited"])], "adapters": ["*"],
                    "requests_per_minute": 2},
    }}))
    return World(model_dir=model_dir, root=root, keys_file=keys, hf_config=hf_config,
                 tokenizer=tokenizer, preloaded=PRELOADED)


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[LiveServer]:
    config = ServerConfig(engine=world.engine_config(kv_cache_tokens=KV_TOKENS),
                          api_keys=world.keys_file,
                          admin_token=ADMIN)
    app = create_app(config, LocalEngineClient(config.engine))
    with LiveServer(app) as live:
        yield live


def client(server: LiveServer, tenant: str = "acme") -> openai.OpenAI:
    # max_retries=0: the package retries 429 and 5xx by default, which would hide them.
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[tenant], max_retries=0)


def admin(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60,
                        headers={"Authorization": f"Bearer {ADMIN}"})


NO_EOS = {"ignore_eos": True}
GREEDY: dict[str, Any] = {"temperature": 0.0, "extra_body": NO_EOS}


def complete(c: openai.OpenAI, model: str, prompt: str, n: int) -> str:
    response = c.completions.create(model=model, prompt=prompt, max_tokens=n, **GREEDY)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == n
    return response.choices[0].text


# ============================================================================ OpenAI API


def test_models_list_per_tenant(server: LiveServer) -> None:
    acme = {m.id: m for m in client(server, "acme").models.list()}
    assert set(acme) == {BASE, "acme-support", "acme-summarize", "acme-lazy"}
    assert all(getattr(acme[n], "parent", None) == BASE for n in acme if n != BASE)
    assert getattr(acme[BASE], "parent", None) is None
    beta = [m.id for m in client(server, "beta").models.list()]
    assert beta == ["beta-chat"]  # not the base, not acme's adapters, not staging folders


def test_completions_chat_and_streaming_equal_peft(server: LiveServer, world: World) -> None:
    c = client(server)
    prompt = "The quick brown fox"
    ids = list(world.tokenizer.encode(prompt))
    for model, adapter in ((BASE, None), ("acme-support", "acme-support"),
                           ("acme-summarize", "acme-summarize")):
        assert complete(c, model, prompt, 24) == world.expected(adapter, ids, 24)
    # Adapters matter: three different texts.
    texts = {complete(c, m, prompt, 24) for m in (BASE, "acme-support", "acme-summarize")}
    assert len(texts) == 3

    # Streaming gives the same text, chunk by chunk, and the usage chunk at the end.
    stream = c.completions.create(model="acme-support", prompt=prompt, max_tokens=24,
                                  stream=True, stream_options={"include_usage": True},
                                  **GREEDY)
    chunks = list(stream)
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == world.expected("acme-support", ids, 24)
    assert len([ch for ch in chunks if ch.choices]) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == 24

    # Chat goes through the tokenizer's chat template.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat_ids = world.chat_ids(messages)
    expected = world.expected("acme-support", chat_ids, 16)
    response = c.chat.completions.create(model="acme-support", messages=messages,  # type: ignore[arg-type]
                                         max_completion_tokens=16, **GREEDY)
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    assert response.usage is not None and response.usage.prompt_tokens == len(chat_ids)
    streamed = c.chat.completions.create(model="acme-support", messages=messages,  # type: ignore[arg-type]
                                         max_tokens=16, stream=True, **GREEDY)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == \
        expected


def test_sampling_options_and_logprobs(server: LiveServer, world: World) -> None:
    c = client(server)
    prompt = "abc"
    ids = list(world.tokenizer.encode(prompt))
    full = world.expected("acme-support", ids, 20)
    # stop strings cut the text; finish_reason says why.
    stop = full[5:7]
    response = c.completions.create(model="acme-support", prompt=prompt, max_tokens=20,
                                    stop=[stop], **GREEDY)
    assert response.choices[0].text == full[:full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    # n choices with a seed are reproducible; logprobs come with tokens.
    sampled = c.completions.create(model="acme-support", prompt=prompt, max_tokens=8, n=2,
                                   seed=7, temperature=1.0, logprobs=2, extra_body=NO_EOS)
    again = c.completions.create(model="acme-support", prompt=prompt, max_tokens=8, n=2,
                                 seed=7, temperature=1.0, logprobs=2, extra_body=NO_EOS)
    assert [ch.text for ch in sampled.choices] == [ch.text for ch in again.choices]
    lp = sampled.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 8
    # Special tokens are listed by name in logprobs and left out of the text.
    assert "".join(t for t in lp.tokens if t not in SPECIALS) == sampled.choices[0].text
    assert lp.top_logprobs is not None and all(len(t) <= 2 for t in lp.top_logprobs)
    assert all(v is not None and v <= 0 for v in lp.token_logprobs or [])
    chat = c.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}],
                                     max_tokens=4, logprobs=True, top_logprobs=3,
                                     **GREEDY)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 3 for t in content)
    # The greedy token is the most likely one.
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_chat_template_kwargs_are_variables_not_a_template(server: LiveServer) -> None:
    """A client may pass template variables, never its own Jinja template (it would run on the
    server) nor arguments the server sets itself."""
    messages = [{"role": "user", "content": "x"}]
    h = {"Authorization": f"Bearer {KEYS['acme']}"}
    url = server.url + "/v1/chat/completions"
    for kwargs in ({"chat_template": "{% for i in range(9) %}{{ i }}{% endfor %}"},
                   {"tokenize": True}, {"add_generation_prompt": False}):
        response = httpx.post(url, headers=h, timeout=60, json={
            "model": BASE, "messages": messages, "max_tokens": 2,
            "chat_template_kwargs": kwargs})
        assert response.status_code == 400, response.text
        assert next(iter(kwargs)) in response.json()["error"]["message"]
    ok = httpx.post(url, headers=h, timeout=60, json={
        "model": BASE, "messages": messages, "max_tokens": 2,
        "chat_template_kwargs": {"enable_thinking": False}})
    assert ok.status_code == 200, ok.text


def test_concurrent_requests_for_different_adapters_equal_peft(server: LiveServer,
                                                               world: World) -> None:
    jobs: list[tuple[str, str | None, str, str, int]] = []  # tenant, adapter, model, prompt, n
    prompts = ["Hello there", "Tell me about LoRA", "x", "0123456789"]
    for i, prompt in enumerate(prompts):
        jobs.append(("acme", None, BASE, prompt, 12 + i))
        for name in ("acme-support", "acme-summarize", "acme-lazy"):  # lazy: loaded on use
            jobs.append(("acme", name, name, prompt, 10 + 3 * i))
        jobs.append(("beta", "beta-chat", "beta-chat", prompt, 14 + i))
    clients = {t: client(server, t) for t in ("acme", "beta")}
    expected = [world.expected(a, list(world.tokenizer.encode(p)), n) for _, a, _, p, n in jobs]

    def run(job: tuple[str, str | None, str, str, int]) -> str:
        tenant, _, model, prompt, n = job
        return complete(clients[tenant], model, prompt, n)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    for job, text, want in zip(jobs, got, expected):
        assert text == want, f"{job[2]} on {job[3]!r}"


def test_errors_through_the_openai_package(server: LiveServer, world: World) -> None:
    acme = client(server, "acme")
    with pytest.raises(openai.NotFoundError) as missing:
        acme.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError) as forbidden:
        acme.completions.create(model="beta-chat", prompt="x", max_tokens=2)
    assert missing.value.body["code"] == forbidden.value.body["code"] == "model_not_found"  # type: ignore[index]
    assert missing.value.body["message"].replace("no-such-adapter", "X") == \
        forbidden.value.body["message"].replace("beta-chat", "X")  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):  # beta may not use the base model
        client(server, "beta").chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "x"}])
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError) as err:
        acme.completions.create(model=BASE, prompt="x", temperature=5)
    assert "temperature" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        acme.completions.create(model=BASE, prompt="x" * 4000, max_tokens=200)
    assert "maximum context length" in err.value.message
    with pytest.raises(openai.BadRequestError):
        acme.chat.completions.create(model=BASE, messages=[])
    with pytest.raises(openai.BadRequestError) as err:
        acme.completions.create(model=BASE, prompt=[1, 2, 100000], max_tokens=2)
    assert err.value.param == "prompt"


def test_rate_limit_gives_429(server: LiveServer) -> None:
    limited = client(server, "limited")
    for _ in range(2):
        limited.completions.create(model=BASE, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        limited.completions.create(model=BASE, prompt="x", max_tokens=1)
    assert int(err.value.response.headers["retry-after"]) >= 1
    client(server, "acme").completions.create(model=BASE, prompt="x", max_tokens=1)


# ============================================================================ admin


class Stream:
    """A long greedy completion streamed in a background thread, collecting its text."""

    def __init__(self, server: LiveServer, model: str, prompt: str, n: int) -> None:
        self.model, self.prompt, self.n = model, prompt, n
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(client(server),), daemon=True)
        self.thread.start()
        assert self.first.wait(60), "the stream did not start"

    def _run(self, c: openai.OpenAI) -> None:
        try:
            for chunk in c.completions.create(model=self.model, prompt=self.prompt,
                                              max_tokens=self.n, stream=True, **GREEDY):
                self.text += chunk.choices[0].text
                self.finish_reason = chunk.choices[0].finish_reason or self.finish_reason
                self.first.set()
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
            self.first.set()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def join(self) -> str:
        self.thread.join(120)
        assert self.error is None, self.error
        assert self.finish_reason == "length"
        return self.text


def test_admin_requires_the_token(server: LiveServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Bearer {KEYS['acme']}"}):
        with httpx.Client(base_url=server.url, headers=headers) as h:
            for method, path, body in (
                ("GET", "/admin/adapters", None),
                ("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "x"}),
                ("POST", "/v1/unload_lora_adapter", {"lora_name": "acme-support"}),
                ("DELETE", "/admin/adapters/acme-support", None),
                ("POST", "/admin/adapters/acme-support/pin", None),
            ):
                response = h.request(method, path, json=body)
                assert response.status_code == 401, (method, path)
                assert response.json()["error"]["type"] == "authentication_error"
    # Nothing changed.
    assert "acme-support" in [m.id for m in client(server).models.list()]


def upload(h: httpx.Client, name: str, folder: Path) -> httpx.Response:
    files = {f: (f, (folder / f).read_bytes(), "application/octet-stream")
             for f in (CONFIG_FILE, WEIGHTS_FILE)}
    return h.put(f"/admin/adapters/{name}", files=files)


def test_admin_load_upload_reload_pin_unload_while_streaming(server: LiveServer,
                                                             world: World) -> None:
    c = client(server)
    h = admin(server)
    prompt = "Streaming on"
    ids = list(world.tokenizer.encode(prompt))
    short = "Check"
    short_ids = list(world.tokenizer.encode(short))
    long_n = 600
    s_support = Stream(server, "acme-support", prompt, long_n)
    s_base = Stream(server, BASE, prompt, long_n)

    # vLLM's runtime load, from a folder under the adapter root.
    response = h.post("/v1/load_lora_adapter",
                      json={"lora_name": "acme-new", "lora_path": str(world.root / "staging/v1")})
    assert response.status_code == 200, response.text
    assert response.text == "Success: LoRA adapter 'acme-new' added successfully."
    assert complete(c, "acme-new", short, 12) == world.expected("staging/v1", short_ids, 12)
    s_v1 = Stream(server, "acme-new", prompt, long_n)

    # Reload under the same name: a new version for new requests; the running stream stays
    # on version 1 to its end.
    response = h.post("/admin/adapters", json={"name": "acme-new", "path": "staging/v2"})
    assert response.status_code == 201, response.text
    row = response.json()
    assert row["version"] == 2 and row["current"] and row["rank"] == 6
    assert complete(c, "acme-new", short, 12) == world.expected("staging/v2", short_ids, 12)
    assert s_v1.running, "make long_n larger: the v1 stream ended before the reload"

    # Pin and unpin.
    response = h.post("/admin/adapters/acme-summarize/pin")
    assert response.status_code == 200 and response.json()["pinned"] is True
    deadline = time.monotonic() + 30
    while h.get("/admin/adapters/acme-summarize").json()["tier"] != "device":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    listing = h.get("/admin/adapters").json()
    rows = {(r["name"], r["version"]): r for r in listing["data"]}
    assert rows[("acme-summarize", 1)]["pinned"] is True
    assert rows[("acme-new", 1)]["current"] is False  # draining under the running stream
    assert rows[("acme-new", 1)]["refcount"] == 1
    assert {"tier", "rank", "size_bytes", "version", "digest", "refcount", "pinned",
            "last_use"} <= rows[("acme-support", 1)].keys()
    assert "acme-lazy" in listing["lazy"] or ("acme-lazy", 1) in rows
    assert h.post("/admin/adapters/acme-summarize/unpin").json()["pinned"] is False

    # Upload the two PEFT files: validated, moved under the root, registered.
    response = upload(h, "acme-up", world.root / "staging/v1")
    assert response.status_code == 201, response.text
    assert response.json()["digest"] == rows[("acme-new", 1)]["digest"]
    assert (world.root / "acme-up" / WEIGHTS_FILE).is_file()
    assert complete(c, "acme-up", short, 12) == world.expected("staging/v1", short_ids, 12)
    # A broken upload is refused and changes nothing.
    broken = world.root.parent / "broken"
    broken.mkdir(exist_ok=True)
    (broken / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": 4, "use_dora": true, '
                                      '"target_modules": ["q_proj"], "lora_alpha": 8}')
    (broken / WEIGHTS_FILE).write_bytes((world.root / "staging/v1" / WEIGHTS_FILE).read_bytes())
    response = upload(h, "acme-up", broken)
    assert response.status_code == 400 and "dora" in response.json()["error"]["message"].lower()
    assert complete(c, "acme-up", short, 12) == world.expected("staging/v1", short_ids, 12)
    # Loading from outside the adapter root is refused.
    response = h.post("/v1/load_lora_adapter",
                      json={"lora_name": "acme-evil", "lora_path": str(world.model_dir)})
    assert response.status_code == 400

    # Unload drains: the name is gone at once, the running stream finishes.
    response = h.post("/v1/unload_lora_adapter", json={"lora_name": "acme-new"})
    assert response.status_code == 200, response.text
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="acme-new", prompt=short, max_tokens=2)
    assert "acme-new" not in [m.id for m in c.models.list()]
    assert h.delete("/admin/adapters/acme-up").json()["files_removed"] is True
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="acme-up", prompt=short, max_tokens=2)

    assert s_v1.join() == world.expected("staging/v1", ids, long_n)
    assert s_support.join() == world.expected("acme-support", ids, long_n)
    assert s_base.join() == world.expected(None, ids, long_n)
    # The drained version is freed with its last reference.
    deadline = time.monotonic() + 10
    while any(r["name"] == "acme-new" for r in h.get("/admin/adapters").json()["data"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ============================================================================ metrics


def test_metrics_hold_the_router_series_during_a_run(world: World) -> None:
    # Two accelerator slots: one pinned adapter and one for everything else, so a request
    # for a second adapter must wait while the first one runs.
    config = ServerConfig(
        engine=world.engine_config(
            registry={"adapters": tuple((n, world.root / n) for n in
                                        ("metrics-p", "metrics-a", "metrics-b")),
                      "max_gpu_adapters": 2, "max_cpu_adapters": 4, "pinned": ("metrics-p",)},
            kv_cache_tokens=KV_TOKENS),
        admin_token=ADMIN)
    with LiveServer(create_app(config, LocalEngineClient(config.engine))) as live:
        body = {"prompt": "metrics", "max_tokens": 3000, "stream": True, "temperature": 0,
                "ignore_eos": True}
        with httpx.stream("POST", live.url + "/v1/completions",
                          json={**body, "model": "metrics-a"}, timeout=60) as first:
            first_lines = first.iter_lines()
            next(first_lines)
            with httpx.stream("POST", live.url + "/v1/completions",
                              json={**body, "model": "metrics-b"}, timeout=60) as second:
                wait_for(lambda: value(scrape(live.url), "vllm:num_requests_waiting") == 1)
                fams = scrape(live.url)
                before = time.time()
                assert fams["vllm:num_requests_running"] == [
                    ("vllm:num_requests_running", {"model_name": BASE}, 1.0)]
                assert 0 < value(fams, "vllm:kv_cache_usage_perc") < 1
                (info,) = fams["vllm:lora_requests_info"]
                labels = info[1]
                assert labels["max_lora"] == "2"
                assert sorted(labels["running_lora_adapters"].split(",")) == [
                    "metrics-a", "metrics-p"]
                assert labels["waiting_lora_adapters"] == "metrics-b"
                assert before - 5 < info[2] <= time.time() + 1  # value: time of the update
                tiers = {s[1]["tier"]: s[2] for s in fams["loramux_adapters"]}
                assert tiers["device"] == 2 and sum(tiers.values()) == 3
                # where each adapter lives, one series each (metrics-b waits in host memory)
                resident = {(s[1]["adapter"], s[1]["tier"]): s[2]
                            for s in fams["loramux_adapter_resident"]}
                assert resident == {("metrics-p", "device"): 1, ("metrics-a", "device"): 1,
                                    ("metrics-b", "host"): 1}
                assert value(fams, "loramux_http_requests_in_flight") == 2
                # Closing the first stream aborts it: its slot goes to the waiting request.
                first.close()
                wait_for(lambda: "metrics-b" in scrape(live.url)["vllm:lora_requests_info"][0][
                    1]["running_lora_adapters"])
                second_lines = second.iter_lines()
                assert next(second_lines).startswith("data: ")
                fams = scrape(live.url)
                assert value(fams, "vllm:num_requests_waiting") == 0
                assert fams["vllm:lora_requests_info"][0][1]["waiting_lora_adapters"] == ""
        # Both clients gone: nothing runs, no KV block is held, no adapter reference is left.
        wait_for(lambda: value(scrape(live.url), "vllm:num_requests_running") == 0)
        fams = scrape(live.url)
        assert value(fams, "vllm:kv_cache_usage_perc") == 0
        rows = httpx.get(live.url + "/admin/adapters",
                         headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
        assert all(r["refcount"] == 0 for r in rows)
        assert value(fams, "loramux_http_requests_in_flight") == 0
        ttft = {s[0]: s[2] for s in fams["loramux_time_to_first_token_seconds"]}
        assert ttft["loramux_time_to_first_token_seconds_count"] == 2
        prompt_tokens = {s[0]: s[2] for s in fams["loramux_prompt_tokens"]}
        assert prompt_tokens["loramux_prompt_tokens_total"] == 2 * len("metrics")
        assert {s[0]: s[2] for s in fams["loramux_adapter_loads"]}[
            "loramux_adapter_loads_total"] == 3


# ============================================================================ the CLI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cli_serves_and_drains_on_sigterm(world: World, tmp_path: Path) -> None:
    port = _free_port()
    exe = Path(sys.executable).with_name("loramux")
    env = {**os.environ, "LORAMUX_DEVICE": "cpu", "LORAMUX_DTYPE": "float32",
           "LORAMUX_SHUTDOWN_GRACE_SECONDS": "30"}
    log_path = tmp_path / "serve.log"
    log_file = log_path.open("w")
    proc = subprocess.Popen(
        [str(exe), "serve", "--model", str(world.model_dir), "--port", str(port),
         "--adapter", f"acme-support={world.root / 'acme-support'}"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert {m.id for m in c.models.list()} == {BASE, "acme-support"}
        stream = c.completions.create(model="acme-support", prompt="drain", max_tokens=400,
                                      stream=True, **GREEDY)
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        proc.send_signal(signal.SIGTERM)
        # While it drains (the process is up, the stream not over), new requests are refused:
        # the listener is closed (connection refused) or, on a connection that beat the
        # close, the app answers 503 shutting_down.
        try:
            refused = httpx.post(url + "/v1/completions", timeout=30, json={
                "model": "acme-support", "prompt": "late", "max_tokens": 2})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass
        assert proc.poll() is None
        finish = None
        for chunk in chunks:  # the running request finishes after SIGTERM
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        ids = list(world.tokenizer.encode("drain"))
        assert text == world.expected("acme-support", ids, 400)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log_file.close()
    out = log_path.read_text()
    assert "server is OPEN" in out  # an open server says so at start
    assert "draining" in out
    # Once ready, one banner: where, what, for whom, and a curl to paste.
    assert out.count("loramux is ready at") == 1
    banner = out[out.index("loramux is ready at"):]
    assert banner.startswith(f"loramux is ready at {url}\n")
    assert f"  model      {BASE}\n" in banner
    assert "  adapters   1 loaded: acme-support\n" in banner
    assert "  admin API  off" in banner and "  access     OPEN" in banner
    assert f"curl -s {url}/v1/completions" in banner and f'"model": "{BASE}"' in banner
