"""Tenant isolation against a real server on loopback.

- Under a mixed concurrent load of three tenants (completions and chat, streamed or not, n > 1,
  six adapters and the base in one batch), every response is PEFT's greedy output for the
  requester's own adapter, and every adapter gives a different text, so a response computed
  with another tenant's adapter (a wrong slot, a stale segment) could not pass.
- Requests for another tenant's adapter, interleaved with that load, get the very 404 of a name
  that does not exist.
- No listing, error or metric shows a tenant another tenant's adapter names.

Metrics: docs/design.md gives /metrics to operators and inference routers, and
`vllm:lora_requests_info` must carry the adapter names (routers route on them), so the
adapters of every tenant are in its labels. Metrics are therefore an operator surface, like
the admin API, whose token is "separate from API keys": with `--metrics-token` a tenant's API
key (or no key) gets 401 from /metrics and never reads those labels; the request series carry
no adapter label at all. Without the token /metrics is open as vLLM's is, for deployments
where only routers and Prometheus reach the pod's port (the server warns at start when tenants
are configured without one).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from reliability_world import (
    ADMIN_HEADERS,
    ADAPTERS,
    BASE,
    GREEDY,
    KEYS,
    METRICS_TOKEN,
    World,
    assert_error,
    auth,
    build_world,
    idle,
    scrape,
    sse_events,
    wait_for,
)
from server_harness import LiveServer

OWN = {  # tenant -> the models it may use (shared-sum is gamma's too)
    "acme": [BASE, "acme-one", "acme-two"],
    "beta": ["beta-one", "beta-two"],
    "gamma": ["gamma-one", "shared-sum"],
}
ALL_ADAPTERS = ["acme-one", "acme-two", "beta-one", "beta-two", "gamma-one", "shared-sum"]
PROMPTS = ["Tenant A asks", "Summarize this:", "0123", "Isolation test"]
N_TOKENS = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("isolation"))


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    with world.serve(metrics_token=METRICS_TOKEN) as server:
        yield server


def folder(model: str) -> str | None:
    return None if model == BASE else model


def request(live: LiveServer, tenant: str, model: str, prompt: str, *, chat: bool,
            stream: bool, n: int) -> tuple[int, list[str], dict[str, Any] | None]:
    """(status, the text of each choice, the error body if any)."""
    if chat:
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update(model=model, max_tokens=N_TOKENS, stream=stream, n=n, **GREEDY)
    texts = [""] * n
    with httpx.stream("POST", live.url + path, json=body, headers=auth(tenant),
                      timeout=120) as response:
        if response.status_code != 200:
            return response.status_code, [], response.read() and response.json()
        if not stream:
            response.read()
            for choice in response.json()["choices"]:
                texts[choice["index"]] = choice.get("text") or choice["message"]["content"]
            return 200, texts, None
        for event in sse_events(response.iter_lines()):
            if event == "[DONE]":
                break
            assert isinstance(event, dict) and "error" not in event, event
            for choice in event["choices"]:
                texts[choice["index"]] += (choice.get("text") or
                                           (choice.get("delta") or {}).get("content") or "")
    return 200, texts, None


def test_mixed_tenant_load_never_crosses_adapters(live: LiveServer, world: World) -> None:
    # The check has teeth: on every prompt, all seven models answer differently.
    for prompt in PROMPTS:
        for chat in (False, True):
            ids = (world.chat_ids([{"role": "user", "content": prompt}]) if chat
                   else world.ids(prompt))
            texts = {world.expected(folder(m), ids, N_TOKENS) for m in [BASE, *ALL_ADAPTERS]}
            assert len(texts) == 7, (prompt, chat)

    rng = random.Random(8)
    jobs: list[tuple[str, str, str, bool, bool, int]] = []
    for tenant, models in OWN.items():
        for model in models:
            for prompt in PROMPTS:
                jobs.append((tenant, model, prompt, rng.random() < 0.4, rng.random() < 0.5,
                             rng.choice((1, 1, 2))))
    # Interleaved: each tenant also asks for every adapter it may not use.
    probes = [(tenant, model, PROMPTS[0], False, False, 1)
              for tenant, models in OWN.items() for model in ALL_ADAPTERS if model not in models]
    everything = jobs + probes
    rng.shuffle(everything)
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda job: request(live, job[0], job[1], job[2],
                                                    chat=job[3], stream=job[4], n=job[5]),
                                everything))
    answered = 0
    for (tenant, model, prompt, chat, _, n), (status, texts, error) in zip(everything, results):
        if model not in OWN[tenant]:
            assert status == 404 and error is not None, (tenant, model, status)
            assert error["error"]["message"] == (f"The model `{model}` does not exist or you "
                                                 "do not have access to it.")
            continue
        assert status == 200, (tenant, model, error)
        ids = (world.chat_ids([{"role": "user", "content": prompt}]) if chat
               else world.ids(prompt))
        want = world.expected(folder(model), ids, N_TOKENS)
        assert texts == [want] * n, (tenant, model, prompt, chat)
        answered += 1
    assert answered == len(jobs) == 28
    wait_for(lambda: idle(scrape(live.url, {"Authorization": f"Bearer {METRICS_TOKEN}"})))


def test_listings_show_only_the_tenants_own_adapters(live: LiveServer) -> None:
    for tenant, models in OWN.items():
        listing = httpx.get(live.url + "/v1/models", headers=auth(tenant)).json()
        assert sorted(m["id"] for m in listing["data"]) == sorted(models)
        for other in ALL_ADAPTERS:
            response = httpx.get(f"{live.url}/v1/models/{other}", headers=auth(tenant))
            if other in models:
                assert response.json()["id"] == other
            else:
                assert assert_error(response, 404)["code"] == "model_not_found"
                assert other in response.text  # it names only what was asked for
    # Lazy adapters under the root (the var-* folders) are listed only to whoever may use
    # them: here "flood" ("*").
    flood = [m["id"] for m in httpx.get(live.url + "/v1/models", headers=auth("flood")).json()[
        "data"]]
    assert {"var-a", "var-b"} <= set(flood)


def test_errors_name_no_other_adapter(live: LiveServer) -> None:
    """The errors a tenant can provoke mention no adapter but the one it named."""
    bodies = []
    for tenant in OWN:
        for model in ALL_ADAPTERS + ["nope", "var-a"]:
            for path, extra in (("/v1/completions", {"prompt": "x" * 600}),
                                ("/v1/completions", {"prompt": "x", "temperature": 9}),
                                ("/v1/chat/completions", {"messages": []})):
                response = httpx.post(live.url + path, headers=auth(tenant), timeout=30,
                                      json={"model": model, **extra})
                assert response.status_code in (400, 404)
                bodies.append((model, response.text))
    for tenant_key in [*KEYS.values(), "sk-wrong"]:
        response = httpx.get(live.url + "/v1/models/none",
                             headers={"Authorization": f"Bearer {tenant_key}"})
        bodies.append(("none", response.text))
    for asked, text in bodies:
        leaked = [name for name in ADAPTERS if name != asked and name in text]
        assert not leaked, (asked, text)


def test_metrics_are_for_operators_not_tenants(live: LiveServer) -> None:
    for headers in ({}, *(auth(t) for t in KEYS), {"Authorization": "Bearer sk-wrong"},
                    {"Authorization": f"Basic {METRICS_TOKEN}"}):
        response = httpx.get(live.url + "/metrics", headers=headers)
        err = assert_error(response, 401)
        assert err["code"] == "invalid_metrics_token"
        assert not [name for name in ADAPTERS if name in response.text]
    # The operator's token (or the admin token) reads them; they do name the adapters (this
    # is what the gate is for), and only in the router's info gauge and the residency series.
    for headers in ({"Authorization": f"Bearer {METRICS_TOKEN}"}, ADMIN_HEADERS):
        assert httpx.get(live.url + "/metrics", headers=headers).status_code == 200
    fams = scrape(live.url, {"Authorization": f"Bearer {METRICS_TOKEN}"})
    (info,) = fams["vllm:lora_requests_info"]
    assert set(info[1]["running_lora_adapters"].split(",")) & set(ALL_ADAPTERS)
    assert {labels["adapter"] for _, labels, _ in fams["loramux_adapter_resident"]} \
        <= set(ALL_ADAPTERS)
    for family, samples in fams.items():
        if family in ("vllm:lora_requests_info", "loramux_adapter_resident"):
            continue
        for _, labels, _ in samples:
            assert not set(labels.values()) & set(ADAPTERS), (family, labels)
    # Nothing else a tenant can reach without a key names an adapter.
    for path in ("/health", "/ready", "/openapi.json"):
        response = httpx.get(live.url + path)
        assert response.status_code == 200
        assert not [name for name in ADAPTERS if name in response.text], path


def test_metrics_token_flag_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from loramux.server.cli import build_parser, config_from_args

    args = build_parser().parse_args(["serve", "--metrics-token", "m-token"])
    assert config_from_args(args).metrics_token == "m-token"
    monkeypatch.setenv("LORAMUX_METRICS_TOKEN", "from-env")
    assert config_from_args(build_parser().parse_args(["serve"])).metrics_token == "from-env"
    monkeypatch.setenv("LORAMUX_METRICS_TOKEN", "")  # empty: open metrics, as before
    assert config_from_args(build_parser().parse_args(["serve"])).metrics_token is None
