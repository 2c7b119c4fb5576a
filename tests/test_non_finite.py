"""Issue 15, item 6: NaN or infinite logits fail that request alone, with a clear error.

Before, a row of NaN logits was sampled like any other (argmax of NaN picks some token), so the
client got garbage text with finish_reason "length", a 500 when it asked for logprobs (NaN is
not JSON), and a literal `NaN` in a stream. Validation refuses the adapters known to overflow;
this is the net under it, for whatever still makes a forward pass non-finite (an adapter inside
every bound on a prompt that overflows, a base model gone bad).

The sampler tests run on logits made by hand. The server tests poison the logits of one
adapter's rows inside the real engine (the runner's output, between the model and the sampler)
and check what each client sees while another adapter's request shares its steps.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from reliability_world import (
    ADMIN,
    World,
    assert_error,
    auth,
    build_world,
    completion,
    scrape,
    sse_events,
    value,
    wait_for,
)
from server_harness import LiveServer

from loramux.engine.sampler import Sampler, SamplingState
from loramux.engine.sampling_params import SamplingParams
from loramux.server.app import create_app
from loramux.server.config import ServerConfig
from loramux.server.local_engine import LocalEngineClient

POISONED = "acme-two"
HEALTHY = "acme-one"


# ----------------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("greedy", [True, False])
def test_a_non_finite_row_is_an_error_and_its_neighbours_are_untouched(bad: float,
                                                                       greedy: bool) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    logits[1, 7] = bad
    params = SamplingParams(max_tokens=4, temperature=0.0 if greedy else 0.8, logprobs=2,
                            seed=1)
    states = [SamplingState(params) for _ in range(3)]
    out = Sampler(eos_token_ids=[0]).sample(logits, states)
    assert out.finish_reasons[1] == "error" and out.token_ids[1] == -1
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert states[1].num_output == 0  # nothing was drawn for it
    fine = Sampler(eos_token_ids=[0]).sample(logits[[0, 2]],
                                             [SamplingState(params) for _ in range(2)])
    assert [out.token_ids[0], out.token_ids[2]] == fine.token_ids
    assert all(lp is not None and math.isfinite(lp) for lp in (out.logprobs[0], out.logprobs[2]))


def test_an_all_minus_infinity_row_is_an_error() -> None:
    logits = torch.zeros(2, 10)
    logits[0] = -math.inf
    out = Sampler().sample(logits, [SamplingState(SamplingParams(max_tokens=2))
                                    for _ in range(2)])
    assert out.finish_reasons == ["error", None] and out.token_ids[0] == -1


# ----------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("non_finite"))


def _poison(client: LocalEngineClient, *, after: int) -> None:
    """Make the logits of every POISONED row NaN once it has `after` output tokens."""
    engine = client._engine
    run = engine.runner.run

    def poisoned(scheduled: list[Any]) -> torch.Tensor:
        logits = run(scheduled).clone()
        rows = [s.seq for s in scheduled if s.samples]
        for i, seq in enumerate(rows):
            if seq.adapter is not None and seq.adapter.name == POISONED \
                    and seq.num_output_tokens >= after:
                logits[i] = math.nan
        return logits

    engine.runner.run = poisoned


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    config = ServerConfig(engine=world.engine_config(), api_keys=world.keys_file,
                          admin_token=ADMIN)
    client = LocalEngineClient(config.engine)
    with LiveServer(create_app(config, client)) as server:
        _poison(client, after=2)
        yield server


PROMPT = "the quick brown fox"


def _refuse(literal: str) -> None:
    raise AssertionError(f"{literal} is not JSON")


def test_non_streaming_is_a_500_naming_the_cause(live: LiveServer) -> None:
    err = assert_error(completion(live.url, "acme", POISONED, PROMPT, 8), 500)
    assert err["code"] == "non_finite_logits"
    assert "not finite" in err["message"] and POISONED in err["message"]


def test_logprobs_are_the_same_error_not_a_crash(live: LiveServer) -> None:
    err = assert_error(completion(live.url, "acme", POISONED, PROMPT, 8, logprobs=3), 500)
    assert err["code"] == "non_finite_logits"
    chat = httpx.post(live.url + "/v1/chat/completions", headers=auth("acme"), timeout=120,
                      json={"model": POISONED, "max_tokens": 8, "logprobs": True,
                            "top_logprobs": 2, "temperature": 0,
                            "messages": [{"role": "user", "content": PROMPT}]})
    assert assert_error(chat, 500)["code"] == "non_finite_logits"


def test_a_stream_ends_with_an_error_event_and_no_nan(live: LiveServer) -> None:
    body = {"model": POISONED, "prompt": PROMPT, "max_tokens": 8, "stream": True,
            "temperature": 0, "ignore_eos": True, "logprobs": 2}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, headers=auth("acme"),
                      timeout=120) as response:
        assert response.status_code == 200
        raw = [line for line in response.iter_lines()]
    for line in raw:  # strict JSON: a NaN or Infinity literal raises
        if line.startswith("data: {"):
            json.loads(line[len("data: "):], parse_constant=_refuse)
    events = list(sse_events(iter(raw)))
    assert events[-1] == "[DONE]"
    error = events[-2]
    assert isinstance(error, dict) and error["error"]["code"] == "non_finite_logits", events
    # the two tokens before the poison were real and were streamed
    text = "".join(e["choices"][0]["text"] for e in events[:-2] if isinstance(e, dict))
    assert text


def test_the_other_rows_of_the_same_steps_are_served_exactly(live: LiveServer,
                                                             world: World) -> None:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        bad = [pool.submit(completion, live.url, "acme", POISONED, PROMPT, 12)
               for _ in range(3)]
        good = [pool.submit(completion, live.url, "acme", HEALTHY, PROMPT, 12)
                for _ in range(3)]
        for future in bad:
            assert future.result().status_code == 500
        for future in good:
            response = future.result()
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == world.expected(HEALTHY, PROMPT, 12)
    wait_for(lambda: value(scrape(live.url, {"Authorization": f"Bearer {ADMIN}"}),
                           "vllm:num_requests_running") == 0, what="engine idle")
    assert httpx.get(live.url + "/health").status_code == 200


def test_nothing_is_held_after_the_errors(live: LiveServer) -> None:
    fams = scrape(live.url, {"Authorization": f"Bearer {ADMIN}"})
    assert value(fams, "vllm:kv_cache_usage_perc") == 0
    assert value(fams, "loramux_adapter_references") == 0
