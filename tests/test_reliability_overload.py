"""Overload against a real server on loopback: with more concurrent requests than the engine
and its queue hold, the excess is refused at once (503, or 429 for a tenant over its own
limit) with Retry-After and the OpenAI error body, while the admitted requests finish with
PEFT's outputs in bounded time; afterwards the server is idle and admits again.

No tight timings (the machine is shared): refusals are checked by order (all of them are back
while every admitted request still runs) and admitted latency against a generous bound.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from reliability_world import (
    BASE,
    GREEDY,
    Stream,
    World,
    assert_error,
    auth,
    build_world,
    completion,
    idle,
    scrape,
    value,
    wait_for,
)
from server_harness import LiveServer

MAX_NUM_SEQS = 2
MAX_QUEUE = 2  # so 4 sequences in flight at most
ADMITTED_BOUND_S = 90.0  # generous: a 2-core machine shared with other test runs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("overload"))


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    with world.serve(engine={"max_num_seqs": MAX_NUM_SEQS}, max_queue=MAX_QUEUE) as server:
        yield server


def post(live: LiveServer, tenant: str, body: dict[str, Any], chat: bool = False
         ) -> tuple[httpx.Response, float]:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    started = time.monotonic()
    response = httpx.post(live.url + path, json=body, headers=auth(tenant), timeout=120)
    return response, time.monotonic() - started


def test_excess_gets_503_at_once_while_admitted_requests_finish(live: LiveServer,
                                                               world: World) -> None:
    wait_for(lambda: idle(scrape(live.url)))
    started = time.monotonic()
    admitted = [Stream(live.url, tenant, model, f"Admitted {i}", 480)
                for i, (tenant, model) in enumerate((("acme", "acme-one"), ("beta", "beta-one"),
                                                     ("gamma", "gamma-one"), ("acme", BASE)))]
    wait_for(lambda: value(scrape(live.url), "loramux_http_requests_in_flight") == 4,
             what="four requests admitted")
    # Two run, two wait in the queue; the queue is full now.
    fams = scrape(live.url)
    assert value(fams, "vllm:num_requests_running") <= MAX_NUM_SEQS

    burst: list[tuple[str, dict[str, Any], bool]] = []
    for i in range(10):
        tenant, model = (("acme", "acme-two"), ("beta", "beta-two"), ("gamma", "shared-sum"))[
            i % 3]
        if i % 2:
            burst.append((tenant, {"model": model, "max_tokens": 20, "stream": i % 4 == 1,
                                   "messages": [{"role": "user", "content": "x"}], **GREEDY},
                          True))
        else:
            burst.append((tenant, {"model": model, "prompt": f"Burst {i}", "max_tokens": 20,
                                   "n": 1 + i % 3, **GREEDY}, False))
    with ThreadPoolExecutor(max_workers=len(burst)) as pool:
        refused = list(pool.map(lambda job: post(live, *job), burst))
    # Every refusal was back while every admitted request still ran.
    assert all(stream.running for stream in admitted), "make the admitted requests longer"
    for response, elapsed in refused:
        err = assert_error(response, 503)
        assert err["code"] == "overloaded" and err["type"] == "server_error"
        assert int(response.headers["retry-after"]) >= 1
        assert elapsed < ADMITTED_BOUND_S

    for stream in admitted:
        assert stream.result() == stream.expected_from(
            world, None if stream.model == BASE else stream.model)
    assert time.monotonic() - started < ADMITTED_BOUND_S
    wait_for(lambda: idle(scrape(live.url)), what="idle after the overload")
    fams = scrape(live.url)
    refusals = sum(s[2] for s in fams["loramux_requests"]
                   if s[0] == "loramux_requests_total" and s[1]["status"] == "503"
                   and s[1]["endpoint"] in ("/v1/completions", "/v1/chat/completions"))
    assert refusals == len(burst)
    # Admission was given back: the server admits (and answers right) again.
    response = completion(live.url, "acme", "acme-two", "After", 8)
    assert response.json()["choices"][0]["text"] == world.expected("acme-two", "After", 8)


def test_queue_absorbs_what_fits_and_queued_requests_complete(live: LiveServer,
                                                              world: World) -> None:
    """Exactly capacity (running + queue) concurrent requests: none refused, all right."""
    wait_for(lambda: idle(scrape(live.url)))
    jobs = [("acme", "acme-one"), ("beta", "beta-two"), ("gamma", "shared-sum"),
            ("acme", "acme-two")]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: post(live, job[0], {
            "model": job[1], "prompt": "Queued", "max_tokens": 40, **GREEDY}), jobs))
    for (_, model), (response, elapsed) in zip(jobs, results):
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == world.expected(model, "Queued", 40)
        assert elapsed < ADMITTED_BOUND_S


def test_tenant_over_its_concurrency_limit_gets_429_others_are_served(live: LiveServer,
                                                                      world: World) -> None:
    wait_for(lambda: idle(scrape(live.url)))
    # "flood" may run 2 requests at once.
    mine = [Stream(live.url, "flood", "acme-one", f"Flood {i}", 480).wait_started()
            for i in range(2)]
    extra = [post(live, "flood", {"model": "beta-one", "prompt": "More", "max_tokens": 4})
             for _ in range(3)]
    for response, _ in extra:
        err = assert_error(response, 429)
        assert err["type"] == "rate_limit_error" and "limit 2" in err["message"]
        assert int(response.headers["retry-after"]) >= 1
    assert all(stream.running for stream in mine), "make flood's requests longer"
    # Another tenant's limits are its own: admitted (it queues behind flood's two, as the
    # engine runs two sequences here) and served right.
    response, _ = post(live, "beta", {"model": "beta-one", "prompt": "Unaffected",
                                      "max_tokens": 6, **GREEDY})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == world.expected("beta-one", "Unaffected", 6)
    for stream in mine:
        assert stream.result() == stream.expected_from(world, "acme-one")
    # Its slots are back once they end.
    response, _ = post(live, "flood", {"model": "beta-one", "prompt": "More", "max_tokens": 4,
                                       **GREEDY})
    assert response.status_code == 200, response.text
