"""Residency bounded by the adapter pool's bytes, not by a slot count (issue 18).

- a pool of mixed ranks holds as many adapters as its bytes allow, more than any fixed slot
  count would have, and refuses the next one only for lack of bytes;
- with default flags, a step of N rows for N distinct adapters (N = 24 > the old 16 slots)
  carries all N, and every request gives PEFT's greedy tokens (both CPU LoRA backends);
- an explicit --max-gpu-adapters cap is still honoured (never more resident, or in a step);
- Zipf demand over more adapters than fit: every request finishes within a number of steps
  derived from the fairness rule (registry clock = the step count, so the bound is in steps).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from adapter_factory import base_spec, make_adapter
from engine_helpers import (
    ALL,
    ATTN,
    MLP,
    peft_greedy,
    peft_model,
    prompts,
    tiny_config,
    tiny_model,
)
from loramux.adapters.config import RegistryConfig
from loramux.adapters.host_cache import full_rank_numel
from loramux.adapters.registry import AdapterRegistry
from loramux.adapters.sizing import SLOT_RANK, size_pool
from loramux.engine.config import EngineConfig
from loramux.engine.engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams

N_ADAPTERS = 24  # more than the old default of 16 slots
MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
ELEMENT = 4  # float32
ARRIVALS = 6  # requests per step in the Zipf test


def _spec(i: int) -> dict[str, Any]:
    """Ranks 4, 8 and 16 on all, attention-only or MLP-only projections."""
    return {"rank": (4, 8, 16)[i % 3], "target_modules": (ALL, ATTN, MLP)[i % 3 if i % 2 else 0]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cfg = tiny_config()
    root = tmp_path_factory.mktemp("residency")
    paths = {f"a{i:02d}": make_adapter(root / f"a{i:02d}", cfg, seed=300 + i, b_std=0.15,
                                       alpha=2 * _spec(i)["rank"], **_spec(i))
             for i in range(N_ADAPTERS)}
    base = tiny_model(cfg)
    pm = peft_model(tiny_model(cfg), paths)
    refs: dict[tuple[tuple[int, ...], str, int], list[int]] = {}

    def reference(prompt: list[int], adapter: str, max_new: int = MAX_NEW) -> list[int]:
        key = (tuple(prompt), adapter, max_new)
        if key not in refs:
            refs[key] = peft_greedy(pm, adapter, prompt, max_new)
        return refs[key]

    yield {"cfg": cfg, "paths": paths, "base": base, "ref": reference}


def _registry(world: dict[str, Any], *, max_num_seqs: int = 64, clock: Any = None,
              **config: Any) -> AdapterRegistry:
    config = {"adapters": tuple(world["paths"].items()), **config}
    extra = {"clock": clock} if clock is not None else {}
    reg = AdapterRegistry(RegistryConfig(**config), base_spec(world["cfg"]), "cpu",
                          torch.float32, max_num_seqs=max_num_seqs, **extra)
    reg.start()
    return reg


def _record_steps(engine: LLMEngine) -> list[list[int]]:
    """Each step's rows' slots (-1: base), as the runner received them."""
    steps: list[list[int]] = []
    prepare = engine.runner.prepare_adapters

    def recording(scheduled: list[Any]) -> list[Any]:
        steps.append([s.seq.slot if s.seq.slot is not None else -1 for s in scheduled])
        return prepare(scheduled)

    engine.runner.prepare_adapters = recording  # type: ignore[method-assign]
    return steps


def _wait_resident(reg: AdapterRegistry, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(reg.resident()) < n:
        assert time.monotonic() < deadline, f"{len(reg.resident())} of {n} resident"
        time.sleep(0.005)


# ---------------------------------------------------------------------------- sizing


def test_default_slots_never_bind_before_bytes(world: dict[str, Any]) -> None:
    """No cap: slots >= max_num_seqs and >= the pool's count of rank-8 all-projection adapters."""
    base = base_spec(world["cfg"])
    pool = 40 * full_rank_numel(base, SLOT_RANK) * ELEMENT
    size = size_pool(RegistryConfig(gpu_pool_bytes=pool), base, torch.float32,
                     torch.device("cpu"), max_num_seqs=8)
    assert size.num_slots == 40 and size.capacity_bytes == pool
    assert size_pool(RegistryConfig(gpu_pool_bytes=pool), base, torch.float32,
                     torch.device("cpu"), max_num_seqs=64).num_slots == 64
    capped = size_pool(RegistryConfig(gpu_pool_bytes=pool, max_gpu_adapters=3), base,
                       torch.float32, torch.device("cpu"), max_num_seqs=64)
    # a cap of 3 can never use more than 3 max-rank adapters' bytes
    assert capped.num_slots == 3
    assert capped.capacity_bytes == min(pool, 3 * full_rank_numel(base, 64) * ELEMENT)
    default = size_pool(RegistryConfig(), base, torch.float32, torch.device("cpu"))
    assert 0 < default.capacity_bytes <= 2 << 30


def test_mixed_ranks_fill_the_bytes_not_a_slot_count(world: dict[str, Any]) -> None:
    """Every adapter held (referenced): the pool takes adapters until their bytes run out,
    however many that is, and the next one waits for bytes, not for a slot."""
    base = base_spec(world["cfg"])
    # room for 2 adapters of rank 64: by the old default, 2 slots
    pool = 2 * full_rank_numel(base, 64) * ELEMENT
    reg = _registry(world, gpu_pool_bytes=pool)
    try:
        rows = {row.name: row for row in reg.list()}
        sizes = [rows[name].size_bytes for name in world["paths"]]
        fit = 0
        while fit < len(sizes) and sum(sizes[:fit + 1]) <= pool:
            fit += 1
        assert 16 < fit < N_ADAPTERS, "the test needs a pool that holds > 16, not all"
        assert reg.max_slots > fit  # slots never bind first
        held = [reg.resolve(name) for name in list(world["paths"])[:fit]]
        for ref in held:
            reg.acquire_wait(ref, timeout=30)
        assert len(reg.resident()) == fit
        assert reg.memory()["device_used_bytes"] == sum(sizes[:fit])
        nxt = reg.resolve(list(world["paths"])[fit])
        with pytest.raises(TimeoutError):  # every byte is referenced: nothing can be evicted
            reg.acquire_wait(nxt, timeout=0.3)
        for ref in held[:len(held) // 2]:
            reg.release(ref)  # bytes free up: now it is placed (evicting LRU)
        reg.acquire_wait(nxt, timeout=30)
        reg.release(nxt)
        for ref in held[len(held) // 2:]:
            reg.release(ref)
    finally:
        reg.close()


# ---------------------------------------------------------------------------- engine


@pytest.mark.parametrize("backend", ["stacked", "kernels"])
def test_default_step_carries_every_adapter_and_matches_peft(world: dict[str, Any],
                                                             backend: str) -> None:
    """Default flags, 24 requests for 24 distinct adapters: once they are resident one step
    carries all 24 rows with 24 distinct slots, and each request gives PEFT's tokens."""
    reg = _registry(world)
    try:
        engine = LLMEngine(world["base"], EngineConfig(), adapters=reg, lora_backend=backend)
        steps = _record_steps(engine)
        names = list(world["paths"])
        cases = list(zip(prompts(N_ADAPTERS, seed=18), names))
        for i, (prompt, name) in enumerate(cases):
            engine.add_request(f"r{i}", prompt, GREEDY, name)
        _wait_resident(reg, N_ADAPTERS)  # prefetched by add_request
        outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(N_ADAPTERS)}
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] += out.token_ids
        assert steps and all(len(rows) == N_ADAPTERS for rows in steps)
        assert all(len(set(rows)) == N_ADAPTERS and -1 not in rows for rows in steps)
        for i, (prompt, name) in enumerate(cases):
            assert outputs[f"r{i}"] == world["ref"](prompt, name), name
    finally:
        reg.close()


def test_explicit_cap_is_honoured(world: dict[str, Any]) -> None:
    """--max-gpu-adapters 8 with 24 adapters in demand: never more than 8 resident or in a
    step, every request still served with PEFT's tokens."""
    reg = _registry(world, max_gpu_adapters=8)
    try:
        assert reg.max_slots == 8 and reg.pool_capacity(4) <= 8
        engine = LLMEngine(world["base"], EngineConfig(), adapters=reg)
        steps = _record_steps(engine)
        names = list(world["paths"])
        cases = list(zip(prompts(N_ADAPTERS, seed=19), names))
        outs = engine.generate([p for p, _ in cases], GREEDY, [n for _, n in cases])
        assert max(len(set(rows) - {-1}) for rows in steps) <= 8
        assert len(reg.resident()) <= 8
        for out, (prompt, name) in zip(outs, cases):
            assert out.token_ids == world["ref"](prompt, name), name
    finally:
        reg.close()


def _zipf(n: int, k: int, s: float, seed: int) -> list[int]:
    weights = torch.tensor([1.0 / (i + 1) ** s for i in range(k)])
    return torch.multinomial(weights, n, replacement=True,
                             generator=torch.Generator().manual_seed(seed)).tolist()


def test_zipf_demand_above_capacity_never_starves(world: dict[str, Any]) -> None:
    """Zipf(1.1) demand over 24 adapters, a pool that holds about 3 of them, 6 arrivals per
    step for 30 steps. The registry's clock is the step count, so the fairness rule reads in
    steps: a waiter is placed, or after F = fairness_wait_s steps starves and closes the hot adapters
    in its way, whose running requests end within T = MAX_NEW + 1 steps (prefill, decodes);
    older starving waiters go first, at most K - 1 of them, each clearing within T steps
    plus a step or two of page-in. So every request finishes within
        F + K * (T + PAGE_IN) + T
    steps of its arrival; an adapter that starved would never finish."""
    base = base_spec(world["cfg"])
    steps = 0
    fairness_steps, page_in_steps, k = 6, 2, N_ADAPTERS
    reg = _registry(world, gpu_pool_bytes=3 * full_rank_numel(base, 8) * ELEMENT,
                    fairness_wait_s=float(fairness_steps), clock=lambda: float(steps))
    try:
        assert reg.pool_capacity(8) < k
        engine = LLMEngine(world["base"], EngineConfig(), adapters=reg)
        names = list(world["paths"])
        demand = _zipf(ARRIVALS * 30, k, 1.1, seed=7)
        cases = [(p, names[a]) for p, a in zip(prompts(len(demand), seed=20, high=8), demand)]
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        t = params.max_tokens + 1
        bound = fairness_steps + k * (t + page_in_steps) + t
        arrived: dict[str, int] = {}
        finished: dict[str, int] = {}
        tokens: dict[str, list[int]] = {}
        while len(finished) < len(cases):
            for i in range(ARRIVALS * steps, min(ARRIVALS * (steps + 1), len(cases))):
                engine.add_request(f"z{i}", cases[i][0], params, cases[i][1])
                arrived[f"z{i}"], tokens[f"z{i}"] = steps, []
            _settle(reg)
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
                if out.finished:
                    finished[out.request_id] = steps
            steps += 1
            late = [rid for rid, at in arrived.items()
                    if rid not in finished and steps - at > bound]
            assert not late, f"{late} waited more than {bound} steps"
        waits = [finished[rid] - arrived[rid] for rid in finished]
        assert max(waits) <= bound
        for i, (prompt, name) in enumerate(cases):
            assert tokens[f"z{i}"] == world["ref"](prompt, name), name
    finally:
        reg.close()


def _settle(reg: AdapterRegistry) -> None:
    """Let the page-in thread catch up with the step loop: finish copies in flight, and give
    a waiter that can be placed now the chance to be (the registry's clock is stopped while
    the loop waits, so this changes no age, only how soon a copy lands)."""
    deadline = time.monotonic() + 0.02
    while True:
        paging = any(row.tier == "paging" for row in reg.list())
        if not paging and (time.monotonic() > deadline or not reg.waiting()):
            return
        time.sleep(0.001)
