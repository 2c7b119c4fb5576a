"""Faults against a real server on loopback, with every output checked against PEFT and every
leak checked through /metrics:

- clients that disconnect mid-stream (and mid non-streaming request) free their KV blocks and
  adapter references;
- a failing adapter load, reload or upload leaves the previous version serving, also for the
  requests already running on it;
- cycles of reload and unload while streams run: each stream ends on the version it started
  with, new requests get the new version or a 404, drained versions are freed;
- a slow adapter load or lazy resolution (validation held by a gate) stalls neither running
  streams, nor new requests, nor /health, and succeeds once released;
- KV cache exhaustion preempts (and recomputes) sequences instead of failing them;
- draining (what SIGTERM turns on) refuses new requests with 503 and lets running ones finish.
  The signal itself, through `loramux serve`, is in tests/test_server_e2e.py.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapter_factory import WEIGHTS_FILE, copy_adapter, rewrite_tensors
from reliability_world import (
    ADMIN_HEADERS,
    BASE,
    Stream,
    World,
    assert_error,
    auth,
    build_world,
    completion,
    idle,
    poison,
    scrape,
    upload_files,
    value,
    wait_for,
)
from server_harness import LiveServer

import loramux.adapters.registry as registry_module


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    world = build_world(tmp_path_factory.mktemp("faults"))
    # Broken copies of var-b under the root, for failing loads.
    nan = copy_adapter(world.root / "var-b", world.root / "broken-nan")
    rewrite_tensors(nan, lambda t: poison(t, "lora_B", float("nan")))
    (copy_adapter(world.root / "var-b", world.root / "broken-cut") / WEIGHTS_FILE).write_bytes(
        (world.root / "var-b" / WEIGHTS_FILE).read_bytes()[:100])
    return world


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    with world.serve() as server:
        yield server


def wait_idle(live: LiveServer) -> None:
    wait_for(lambda: idle(scrape(live.url)), what="idle: no request, KV block or reference")


def admin_post(live: LiveServer, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(live.url + path, json=body, headers=ADMIN_HEADERS, timeout=60)


def versions(live: LiveServer, name: str) -> list[dict[str, object]]:
    rows = httpx.get(live.url + "/admin/adapters", headers=ADMIN_HEADERS).json()["data"]
    return [r for r in rows if r["name"] == name]


def check_short(live: LiveServer, world: World, model: str, folder: str | None,
                tenant: str = "acme") -> None:
    response = completion(live.url, tenant, model, "Short check", 10)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == world.expected(folder, "Short check", 10)


# ============================================================================ disconnects


def test_disconnects_free_kv_blocks_and_adapter_references(live: LiveServer,
                                                           world: World) -> None:
    wait_idle(live)
    streams = [
        Stream(live.url, "acme", "acme-one", "Disconnect me", 400),
        Stream(live.url, "acme", "acme-two", "Disconnect me too", 400, chat=True),
        Stream(live.url, "beta", "beta-one", "And me", 400, n=2),
        Stream(live.url, "gamma", "shared-sum", "Me as well", 400),
    ]
    # Non-streaming requests whose clients give up (read timeout) while they generate.
    gave_up: list[BaseException] = []

    def impatient(model: str, tenant: str) -> None:
        try:
            completion(live.url, tenant, model, "I will not wait", 490, timeout=0.2)
        except httpx.TimeoutException as exc:
            gave_up.append(exc)

    quitters = [threading.Thread(target=impatient, args=a)
                for a in (("acme-one", "acme"), ("gamma-one", "gamma"))]
    for thread in quitters:
        thread.start()
    for stream in streams:
        stream.wait_started()
    busy = scrape(live.url)
    assert value(busy, "vllm:num_requests_running") + value(
        busy, "vllm:num_requests_waiting") >= 5
    assert value(busy, "loramux_adapter_references") >= 4
    assert value(busy, "vllm:kv_cache_usage_perc") > 0
    for stream in streams:
        stream.disconnect()
        assert not stream.done and stream.finish_reason is None  # cut off mid-stream
    for thread in quitters:
        thread.join(30)
    assert len(gave_up) == 2
    wait_idle(live)
    fams = scrape(live.url)
    assert value(fams, "loramux_http_requests_in_flight") == 0
    # The server still answers exactly as PEFT, for the adapters whose requests were cut.
    check_short(live, world, "acme-one", "acme-one")
    check_short(live, world, "beta-one", "beta-one", tenant="beta")


# ============================================================================ failing loads


def test_failing_loads_leave_the_previous_version_serving(live: LiveServer,
                                                          world: World) -> None:
    response = admin_post(live, "/v1/load_lora_adapter",
                          {"lora_name": "acme-live", "lora_path": str(world.root / "var-a")})
    assert response.status_code == 200, response.text
    before = versions(live, "acme-live")
    assert [(r["version"], r["current"]) for r in before] == [(1, True)]
    stream = Stream(live.url, "acme", "acme-live", "Keep serving", 300).wait_started()

    failures = [
        admin_post(live, "/v1/load_lora_adapter", {
            "lora_name": "acme-live", "lora_path": str(world.root / "broken-nan")}),
        admin_post(live, "/admin/adapters", {"name": "acme-live", "path": "broken-cut"}),
        admin_post(live, "/admin/adapters", {"name": "acme-live", "path": "no-such-folder"}),
        admin_post(live, "/v1/load_lora_adapter", {
            "lora_name": "acme-live", "lora_path": str(world.model_dir)}),  # outside the root
        httpx.put(live.url + "/admin/adapters/acme-live", headers=ADMIN_HEADERS, timeout=60,
                  files=upload_files(world.root / "broken-nan")),
    ]
    messages = [assert_error(r, 400)["message"] for r in failures]
    assert messages[0].startswith("non-finite values") and messages[4].startswith(
        "non-finite values")
    assert messages[1].startswith("corrupt weights")
    assert messages[2].startswith("not a PEFT adapter")
    assert messages[3].startswith("path outside adapter root")

    # Nothing changed: the same single version, serving var-a to new and running requests.
    assert versions(live, "acme-live") == [
        {**before[0], "last_use": r["last_use"], "refcount": r["refcount"], "tier": r["tier"],
         "slot": r["slot"]} for r in versions(live, "acme-live")]
    check_short(live, world, "acme-live", "var-a")
    assert stream.running
    assert stream.result() == stream.expected_from(world, "var-a")

    # A good reload after the failures works as usual.
    response = admin_post(live, "/admin/adapters", {"name": "acme-live", "path": "var-b"})
    assert response.status_code == 201 and response.json()["version"] == 2, response.text
    check_short(live, world, "acme-live", "var-b")
    assert admin_post(live, "/v1/unload_lora_adapter",
                      {"lora_name": "acme-live"}).status_code == 200
    wait_idle(live)


def test_failing_upload_over_an_upload_keeps_the_first(live: LiveServer, world: World) -> None:
    def upload(folder: Path) -> httpx.Response:
        return httpx.put(live.url + "/admin/adapters/acme-upl", headers=ADMIN_HEADERS,
                         files=upload_files(folder), timeout=60)

    assert upload(world.root / "var-b").status_code == 201
    stream = Stream(live.url, "acme", "acme-upl", "Uploaded", 200).wait_started()
    assert_error(upload(world.root / "broken-cut"), 400)
    assert [r["version"] for r in versions(live, "acme-upl")] == [1]
    assert (world.root / "acme-upl" / WEIGHTS_FILE).read_bytes() == (
        world.root / "var-b" / WEIGHTS_FILE).read_bytes()
    check_short(live, world, "acme-upl", "var-b")
    assert stream.result() == stream.expected_from(world, "var-b")
    assert httpx.delete(live.url + "/admin/adapters/acme-upl",
                        headers=ADMIN_HEADERS).json()["files_removed"] is True


# ============================================================================ churn


def test_reload_and_unload_cycles_during_streams(live: LiveServer, world: World) -> None:
    name = "acme-churn"
    variants = ("var-a", "var-b")
    for cycle in range(3):
        current, other = variants[cycle % 2], variants[(cycle + 1) % 2]
        # Load (first through vLLM's endpoint, then through the admin API).
        if cycle % 2 == 0:
            response = admin_post(live, "/v1/load_lora_adapter",
                                  {"lora_name": name, "lora_path": str(world.root / current)})
        else:
            response = admin_post(live, "/admin/adapters", {"name": name, "path": current})
        assert response.status_code in (200, 201), response.text
        first = [Stream(live.url, "acme", name, f"Cycle {cycle}", 250),
                 Stream(live.url, "acme", name, f"Chat cycle {cycle}", 200, chat=True)]
        for stream in first:
            stream.wait_started()
        # Reload mid-stream: new requests get the other variant, running ones keep theirs.
        response = admin_post(live, "/admin/adapters", {"name": name, "path": other})
        assert response.status_code == 201, response.text
        check_short(live, world, name, other)
        second = Stream(live.url, "acme", name, f"Second {cycle}", 200).wait_started()
        # Unload mid-stream: the name is gone at once; running streams finish.
        assert admin_post(live, "/v1/unload_lora_adapter",
                          {"lora_name": name}).status_code == 200
        assert_error(completion(live.url, "acme", name, "gone?", 2), 404)
        assert name not in [m["id"] for m in httpx.get(
            live.url + "/v1/models", headers=auth("acme")).json()["data"]]
        assert any(s.running for s in [*first, second]), "streams too short for the test"
        for stream in first:
            assert stream.result() == stream.expected_from(world, current)
        assert second.result() == second.expected_from(world, other)
    # Every drained version was freed with its last reference.
    wait_for(lambda: not versions(live, name), what="drained versions freed")
    wait_idle(live)


def test_queued_request_for_an_adapter_unloaded_before_it_runs_is_404(world: World) -> None:
    """Found by the soak: a request that resolved a name, then waited while the name was
    unloaded, got 503 "overloaded"; it is the unknown-model 404 (in-stream for a stream)."""
    with world.serve(engine={"max_num_seqs": 1}) as live:
        response = admin_post(live, "/admin/adapters", {"name": "acme-gone", "path": "var-a"})
        assert response.status_code == 201, response.text
        blocker = Stream(live.url, "acme", "acme-one", "Blocking", 400).wait_started()
        plain: list[httpx.Response] = []
        waiter = threading.Thread(target=lambda: plain.append(
            completion(live.url, "acme", "acme-gone", "Queued", 5)))
        waiter.start()
        streamed = Stream(live.url, "acme", "acme-gone", "Queued too", 5)
        wait_for(lambda: value(scrape(live.url), "vllm:num_requests_waiting") == 2,
                 what="two requests queued behind the blocker")
        assert admin_post(live, "/v1/unload_lora_adapter",
                          {"lora_name": "acme-gone"}).status_code == 200
        blocker.disconnect()
        waiter.join(60)
        err = assert_error(plain[0], 404)
        assert err["code"] == "model_not_found" and "acme-gone" in err["message"]
        streamed.thread.join(60)
        assert streamed.status == 200 and streamed.text == ""
        assert streamed.failure["error"]["code"] == "model_not_found", streamed.failure
        wait_idle(live)


# ============================================================================ slow validation


def _load_var_a(live: LiveServer, world: World) -> httpx.Response:
    return admin_post(live, "/v1/load_lora_adapter",
                      {"lora_name": "acme-slow", "lora_path": str(world.root / "var-a")})


def _lazy_var_a(live: LiveServer, world: World) -> httpx.Response:
    copy_adapter(world.root / "var-a", world.root / "acme-slow")
    return completion(live.url, "acme", "acme-slow", "Short check", 10)


@pytest.mark.parametrize("slow", [_load_var_a, _lazy_var_a], ids=["admin-load", "lazy-load"])
def test_slow_adapter_validation_does_not_stall_serving(
        live: LiveServer, world: World, monkeypatch: pytest.MonkeyPatch,
        slow: Callable[[LiveServer, World], httpx.Response]) -> None:
    """Validation runs off the step loop and the event loop (vLLM #13698, SGLang #8162): while
    the reading of one adapter is held, a running stream keeps receiving tokens, a new request
    is served and /health answers; once released, the load succeeds and serves var-a."""
    gate, entered = threading.Event(), threading.Event()
    real_read = registry_module.read_adapter

    def held_read(path: Path, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name in ("var-a", "acme-slow"):
            entered.set()
            gate.wait(60)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(registry_module, "read_adapter", held_read)
    stream = Stream(live.url, "acme", "acme-one", "Stream on", 480).wait_started()
    answers: list[httpx.Response] = []
    loader = threading.Thread(target=lambda: answers.append(slow(live, world)))
    loader.start()
    try:
        assert entered.wait(30), "the adapter's validation did not start"
        seen = len(stream.text)
        wait_for(lambda: len(stream.text) > seen + 5,
                 what="stream tokens while the validation is held")
        assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        check_short(live, world, "acme-two", "acme-two")
        assert loader.is_alive() and not answers  # still held: nothing waited for it
        gate.set()
        loader.join(60)
        assert answers and answers[0].status_code == 200, answers
        check_short(live, world, "acme-slow", "var-a")
        assert stream.result() == stream.expected_from(world, "acme-one")
    finally:
        gate.set()
        loader.join(60)
        admin_post(live, "/v1/unload_lora_adapter", {"lora_name": "acme-slow"})
        shutil.rmtree(world.root / "acme-slow", ignore_errors=True)
    wait_idle(live)


# ============================================================================ KV exhaustion


def test_kv_exhaustion_preempts_instead_of_failing(world: World) -> None:
    # 128 KV tokens (8 blocks): six requests of ~110 tokens each cannot all fit at once.
    jobs = [("acme", "acme-one"), ("acme", "acme-two"), ("acme", BASE), ("beta", "beta-one"),
            ("beta", "beta-two"), ("gamma", "gamma-one")]
    prompts = [f"Preempt {i}" for i in range(len(jobs))]
    n = 100
    with world.serve(engine={"kv_cache_tokens": 128}) as live:
        results: list[httpx.Response | None] = [None] * len(jobs)

        def run(i: int) -> None:
            tenant, model = jobs[i]
            results[i] = completion(live.url, tenant, model, prompts[i], n)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for (_, model), prompt, response in zip(jobs, prompts, results):
            assert response is not None and response.status_code == 200, response
            choice = response.json()["choices"][0]
            assert choice["finish_reason"] == "length"
            assert choice["text"] == world.expected(None if model == BASE else model, prompt, n)
        fams = scrape(live.url)
        assert value(fams, "loramux_num_preemptions", "loramux_num_preemptions_total") > 0
        wait_idle(live)


# ============================================================================ draining


def test_draining_refuses_new_requests_and_finishes_running_ones(world: World) -> None:
    with world.serve() as live:
        running = Stream(live.url, "acme", "acme-two", "Drain", 300).wait_started()
        live.app.state.loramux.draining = True  # what the first SIGTERM does (server/cli.py)
        for path, body in (("/v1/completions", {"prompt": "x"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user",
                                                                   "content": "x"}]})):
            response = httpx.post(live.url + path, headers=auth("acme"), timeout=30,
                                  json={"model": "acme-one", "max_tokens": 2, **body})
            err = assert_error(response, 503)
            assert err["code"] == "shutting_down"
            assert int(response.headers["retry-after"]) >= 1
        assert assert_error(httpx.get(live.url + "/ready"), 503)["code"] == "shutting_down"
        assert running.running
        assert running.result() == running.expected_from(world, "acme-two")
        wait_idle(live)
