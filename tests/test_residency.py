"""Residency bounded by the adapter pool's bytes, not by a slot count (issue 18).

- a pool of mixed ranks holds as many adapters as its bytes allow, more than any fixed slot
  count would have, and refuses the next one only for lack of bytes;
- with default flags, a step of N rows for N distinct adapters (N = 24 > the old 16 slots)
  carries all N, and every request gives PEFT's greedy tokens (both CPU LoRA backends);
- an explicit --max-gpu-adapters cap is still honoured (never more resident, or in a step);
- demand above capacity whose hot head never lets go of its adapters and whose tail is drawn
  Zipf: every request finishes within a number of steps derived from the fairness rule
  (registry clock = the step count, so the bound is in steps), and without the rule the same
  demand starves the tail (the control that shows the test can fail).
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
from loramux.adapters.types import AdapterNotFound
from loramux.engine.config import EngineConfig
from loramux.engine.engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams

N_ADAPTERS = 24  # more than the old default of 16 slots
MAX_NEW = 6
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
ELEMENT = 4  # float32


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


def _acquire_parked(reg: AdapterRegistry, ref: Any, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while (slot := reg.acquire(ref, parked=True)) is None:
        assert time.monotonic() < deadline, f"{ref} did not page back in"
        time.sleep(0.005)
    return slot


def test_a_parked_reference_keeps_an_unloaded_version_until_it_is_taken_back(
        world: dict[str, Any]) -> None:
    """A request parks its adapter (gives the reference back mid-run), the device evicts it
    for another, and the operator unloads it: the version stays for the parked request, which
    takes it back (paged in again); its last release frees it. An unpark frees it likewise."""
    base = base_spec(world["cfg"])
    reg = _registry(world, gpu_pool_bytes=full_rank_numel(base, 16) * ELEMENT,
                    fairness_wait_s=0.0)
    try:
        a, b = reg.resolve(HOT[0]), reg.resolve(HOT[1])  # rank 16 everywhere: one at a time
        reg.acquire_wait(a)
        reg.prefetch(b)  # an older waiter than a's own want once it parks
        reg.park(a)
        assert reg.stats.parks == 1
        reg.acquire_wait(b)  # a was evicted for it
        assert reg.resident() == [b]
        reg.unload(HOT[0])
        with pytest.raises(AdapterNotFound):
            reg.acquire(a)  # a new request cannot take an unloaded version ...
        reg.release(b)
        _acquire_parked(reg, a)  # ... the parked one can, paged in again
        assert reg.resident() == [a]
        reg.release(a)  # the last holder: freed
        with pytest.raises(AdapterNotFound):
            reg.acquire(a, parked=True)
        assert HOT[0] not in reg.names() and reg.memory()["device_used_bytes"] == 0

        reg.acquire_wait(b)
        reg.park(b)
        reg.unload(HOT[1])
        assert reg.memory()["device_used_bytes"] > 0  # kept for the parked request
        reg.unpark(b)  # which ended instead
        assert reg.memory()["device_used_bytes"] == 0
        with pytest.raises(ValueError):
            reg.unpark(b)
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


HOT = ("a02", "a08")  # rank 16 on every projection: the pool holds exactly these two
FAIRNESS_STEPS = 6
PAGE_IN_STEPS = 2
COLD_EVERY = 25  # steps between tail arrivals: the tail alone stays well under capacity
DEMAND_STEPS = 300


def _starvation_bound() -> int:
    """Steps within which every request finishes, from the fairness rule (registry clock =
    step count). A request's adapter is resident, or the request waits F steps, then closes
    the resident adapters in its way; their running requests end within T steps (prefill and
    MAX_NEW - 1 decodes), the page-in takes at most PAGE_IN steps, and older waiters go first.
    At most W adapters wait at once (the two hot ones closed for a tail adapter, and one tail
    adapter: a tail arrival is served long before the next one, COLD_EVERY steps later), each
    ahead of it taking T + PAGE_IN steps; then it runs its own T steps:
        F + W * (T + PAGE_IN) + T."""
    t, waiting = MAX_NEW, len(HOT) + 1
    return FAIRNESS_STEPS + waiting * (t + PAGE_IN_STEPS) + t


def _hot_and_tail(world: dict[str, Any], *, fairness_steps: float, steps: int
                  ) -> tuple[dict[str, int], dict[str, int], dict[str, list[int]],
                             dict[str, tuple[list[int], str]]]:
    """Run the head-and-tail demand for `steps` steps (arrivals stop at DEMAND_STEPS, then it
    drains); returns arrival step, finish step, tokens and (prompt, adapter) by request."""
    base = base_spec(world["cfg"])
    clock = [0]
    reg = _registry(world, gpu_pool_bytes=len(HOT) * full_rank_numel(base, 16) * ELEMENT,
                    fairness_wait_s=fairness_steps, clock=lambda: float(clock[0]))
    try:
        assert reg.pool_capacity(16) == len(HOT)  # a tail adapter must evict a hot one
        engine = LLMEngine(world["base"], EngineConfig(), adapters=reg)
        tail = [n for n in world["paths"] if n not in HOT]
        tail_draws = iter(_zipf(DEMAND_STEPS // COLD_EVERY + 1, len(tail), 1.1, seed=7))
        pool_prompts = prompts(4, seed=20, high=8)
        arrived: dict[str, int] = {}
        finished: dict[str, int] = {}
        tokens: dict[str, list[int]] = {}
        cases: dict[str, tuple[list[int], str]] = {}
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        for step in range(steps):
            clock[0] = step
            if step < DEMAND_STEPS:
                new = [(f"h{step}", HOT[step % len(HOT)])]
                if step % COLD_EVERY == 1:
                    new.append((f"c{step}", tail[next(tail_draws)]))
                for rid, name in new:
                    prompt = pool_prompts[len(cases) % len(pool_prompts)]
                    engine.add_request(rid, prompt, params, name)
                    arrived[rid], tokens[rid], cases[rid] = step, [], (prompt, name)
            _settle(reg)
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
                if out.finished:
                    finished[out.request_id] = step
            if step >= DEMAND_STEPS and not engine.has_unfinished():
                break
        return arrived, finished, tokens, cases
    finally:
        reg.close()


def test_tail_adapters_never_starve_behind_endless_hot_demand(world: dict[str, Any]) -> None:
    """Demand above capacity with a Zipf shape: the two hottest adapters always have requests
    running (one arrival every step, alternating), and a tail adapter, drawn Zipf(1.1) from
    the other 22, arrives every COLD_EVERY steps; the pool holds exactly the two hot ones.
    Hot adapters are never unreferenced, so only the fairness rule ever makes room: every
    request must finish within the bound its rule gives (and with PEFT's tokens). The control
    run without the rule shows the demand is one that starves: its first tail request is
    still waiting long after that bound."""
    bound = _starvation_bound()
    arrived, finished, tokens, cases = _hot_and_tail(
        world, fairness_steps=float(FAIRNESS_STEPS), steps=DEMAND_STEPS + 10 * bound)
    assert set(finished) == set(arrived), "requests left unfinished"
    waits = {rid: finished[rid] - arrived[rid] for rid in arrived}
    assert max(waits.values()) <= bound, sorted(waits.items(), key=lambda kv: -kv[1])[:5]
    assert sum(rid.startswith("c") for rid in arrived) >= 10
    for rid, (prompt, name) in cases.items():
        assert tokens[rid] == world["ref"](prompt, name), (rid, name)

    arrived, finished, _, _ = _hot_and_tail(world, fairness_steps=1e9, steps=4 * bound)
    first_tail = min((rid for rid in arrived if rid.startswith("c")), key=arrived.get)
    assert first_tail not in finished, "without the rule the tail should starve here"


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
