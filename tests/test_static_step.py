"""The static-buffer step, pure CPU: what a CUDA graph of a decode step replays, run eagerly.

Decode steps are padded to their batch bucket (padding rows: token 0 at position 0, KV in the
dummy block, adapter slot -1); every input lives in a buffer allocated once. These tests fail
if padding rows leak into real rows' tokens or KV, if a real row reads the dummy block, or if
a buffer a graph would read by address is reallocated between steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_factory import base_spec
from engine_helpers import make_adapters, prompts, tiny_config, tiny_model
from loramux.adapters.config import RegistryConfig
from loramux.adapters.registry import AdapterRegistry
from loramux.engine.config import EngineConfig
from loramux.engine.engine import LLMEngine
from loramux.engine.graphs import StepInputs, bucket_of, decode_buckets
from loramux.engine.lora import LoraMeta
from loramux.engine.request import Sequence
from loramux.engine.sampler import SamplingState
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.scheduler import ScheduledSeq
from loramux.server.cli import build_parser, config_from_args

NAMES = ["r4-attn", "r16-all", "r8-mlp"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cfg = tiny_config()
    paths = make_adapters(tmp_path_factory.mktemp("adapters"), cfg, NAMES)
    reg = AdapterRegistry(
        RegistryConfig(adapters=tuple(paths.items()), max_gpu_adapters=len(paths),
                       max_cpu_adapters=len(paths), max_lora_rank=16),
        base_spec(cfg), "cpu", torch.float32)
    reg.start()
    _make_resident(reg, paths)
    yield {"base": tiny_model(cfg), "reg": reg}
    reg.close()


def _make_resident(reg: AdapterRegistry, paths: dict[str, Path]) -> None:
    """Page every adapter in, so that two engines sharing the registry schedule alike."""
    deadline = time.monotonic() + 60
    for name in paths:
        ref = reg.resolve(name)
        reg.prefetch(ref)
        while reg.acquire(ref) is None:
            assert time.monotonic() < deadline, "adapter page-in stalled"
            time.sleep(0.002)
        reg.release(ref)


def _engine(setup: dict[str, Any], backend: str, *, padded: bool = True) -> LLMEngine:
    engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=8, kv_cache_tokens=1024,
                                                   block_size=4),
                       adapters=setup["reg"], lora_backend=backend)
    if not padded:
        engine.runner.buckets = ()  # no bucket: every step runs at its own size
    return engine


def _kv_rows(engine: LLMEngine, seq: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the sequence's computed positions: [L, num_computed, nKV, D] each."""
    blocks = torch.tensor(seq.block_table)
    k = engine.kv.k[:, blocks].flatten(1, 2)[:, :seq.num_computed]
    v = engine.kv.v[:, blocks].flatten(1, 2)[:, :seq.num_computed]
    return k, v


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("backend", ["stacked", "kernels"])
@pytest.mark.parametrize("num_seqs", [3, 5])
def test_padded_decode_gives_the_unpadded_tokens_and_kv(setup: dict[str, Any], backend: str,
                                                         num_seqs: int) -> None:
    """Two engines in lockstep, one padding each decode step to its bucket (3 -> 4, 5 -> 8
    rows), one not. The padded engine's dummy block is NaN before every step except for what
    padding rows write there themselves: a real row reading it would turn NaN. Every step's
    tokens and every real position's K/V must match."""
    padded, plain = _engine(setup, backend), _engine(setup, backend, padded=False)
    names: list[str | None] = [*NAMES, None]
    cases = {f"r{i}": (p, names[i % len(names)])
             for i, p in enumerate(prompts(num_seqs, seed=num_seqs))}
    for engine in (padded, plain):
        for rid, (prompt, adapter) in cases.items():
            engine.add_request(rid, prompt, GREEDY, adapter)
    padded_steps = 0
    while padded.has_unfinished() or plain.has_unfinished():
        padded.kv.k[:, padded.kv.dummy_block] = float("nan")
        padded.kv.v[:, padded.kv.dummy_block] = float("nan")
        running = list(padded.scheduler.running)
        will_pad = (len(running) == num_seqs and all(s.num_computed == s.num_tokens - 1
                                                     for s in running))
        got = {o.request_id: o.token_ids for o in padded.step()}
        want = {o.request_id: o.token_ids for o in plain.step()}
        assert got == want
        padded_steps += will_pad
        for rid, seq in padded.requests.items():
            other = plain.requests[rid]
            assert seq.block_table == other.block_table
            for a, b in zip(_kv_rows(padded, seq), _kv_rows(plain, other)):
                torch.testing.assert_close(a, b)
    assert padded_steps >= 3  # the decode steps really were padded


def test_prepare_adapters_returns_the_order_and_leaves_the_batch_alone(
        setup: dict[str, Any]) -> None:
    """The stacked backend may reorder groups; the scheduler's list is not touched and the
    engine samples in the returned order."""
    engine = _engine(setup, "stacked")
    for i, (p, name) in enumerate(zip(prompts(4, seed=9), [None, "r16-all", "r4-attn", None])):
        engine.add_request(f"q{i}", p, GREEDY, name)
    engine.step()  # the prefills
    batch = engine.scheduler.schedule()
    before = list(batch.scheduled)
    rows = engine.runner.prepare_adapters(batch.scheduled)
    assert batch.scheduled == before
    assert sorted(map(id, rows)) == sorted(map(id, before))
    meta = engine.runner.lora_meta
    assert meta is not None
    assert [slot for _, _, slot in meta.segments] == [
        key for key, _ in groupby(s.seq.slot_key for s in rows)]


# ----------------------------------------------------------------------------- buffers


def test_static_buffers_are_not_reallocated_between_steps(setup: dict[str, Any]) -> None:
    """Prefills, chunked prefills, mixed and padded decode steps: the forward always reads the
    same buffers (a CUDA graph reads them by address)."""
    engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=8, max_num_batched_tokens=16,
                                                   kv_cache_tokens=1024, block_size=4),
                       adapters=setup["reg"], lora_backend="kernels")
    runner, inputs = engine.runner, engine.runner.inputs
    meta = runner.lora_meta
    assert meta is not None
    buffers = [inputs.input_ids.dev, inputs.positions.dev, inputs.slot_mapping.dev,
               inputs.query_start_loc.dev, inputs.context_lens.dev, inputs.block_tables,
               inputs.sample_rows.dev]
    addresses = [b.data_ptr() for b in buffers]
    lora_addresses = (meta._starts.dev.data_ptr(), meta._slots.dev.data_ptr(),
                      meta._shrink.data_ptr())
    seen: list[tuple[int | None, ...]] = []
    forward = runner.forward

    def recording(ids: torch.Tensor, attn: Any, lora: LoraMeta | None,
                  rows: torch.Tensor) -> torch.Tensor:
        views = (ids, attn.positions, attn.slot_mapping, attn.query_start_loc,
                 attn.context_lens, attn.block_tables, rows)
        seen.append(tuple(t.data_ptr() if t.numel() else None for t in views))  # empty: none
        if lora is not None:
            assert (lora.seg_starts.data_ptr(), lora.seg_slots.data_ptr(),
                    lora.shrink_out.data_ptr()) == lora_addresses
        return forward(ids, attn, lora, rows)

    runner.forward = recording  # type: ignore[method-assign]
    names: list[str | None] = ["r8-mlp", None, "r16-all", "r4-attn", None]
    for i, (p, name) in enumerate(zip(prompts(5, seed=4, low=10, high=30), names)):
        engine.add_request(f"s{i}", p, GREEDY, name)
    while engine.has_unfinished():
        engine.step()
    assert len(seen) > 8
    assert all(p in (a, None) for s in seen for p, a in zip(s, addresses))
    assert any(s[-1] is None for s in seen)  # a chunk that samples nothing ran too
    assert [b.data_ptr() for b in buffers] == addresses


def _seq(context: int, table: list[int]) -> ScheduledSeq:
    params = SamplingParams()
    seq = Sequence(request_id=f"c{context}", prompt_token_ids=list(range(10, 10 + context)),
                   params=params, adapter=None, arrival=0,
                   sampling=SamplingState(params, [1]), block_table=table)
    return ScheduledSeq(seq, context - 1, 1)


def test_step_inputs_fill_the_worked_example() -> None:
    """engine/graphs.py's docstring: three decodes padded to bucket 4, block size 4, dummy 9."""
    inputs = StepInputs(8, 16, 4, 4, 9, torch.device("cpu"), torch_plan=True)
    inputs.block_tables[:] = 7  # stale entries from earlier steps stay where unused
    scheduled = [_seq(5, [2, 3]), _seq(2, [1]), _seq(7, [5, 6])]
    assert inputs.fill(scheduled, 4, 4) == 4
    assert inputs.input_ids.dev[:4].tolist() == [14, 11, 16, 0]
    assert inputs.positions.dev[:4].tolist() == [4, 1, 6, 0]
    assert inputs.slot_mapping.dev[:4].tolist() == [12, 5, 26, 36]
    assert inputs.context_lens.dev[:4].tolist() == [5, 2, 7, 1]
    assert inputs.query_start_loc.dev[:5].tolist() == [0, 1, 2, 3, 4]
    tables = inputs.block_tables[:4].tolist()  # entries past a context are never read
    assert [t[:n] for t, n in zip(tables, [2, 1, 2, 1])] == [[2, 3], [1], [5, 6], [9]]
    assert all(t[2:] == [7, 7] for t in tables)  # only the step's width was sent
    assert inputs.sample_rows.dev[:4].tolist() == [0, 1, 2, 3]
    attn = inputs.attention(4, 4, 1, 7)
    assert attn.plan is not None and attn.plan.decode is not None
    assert attn.plan.decode.num_seqs == 4


def test_lora_meta_pads_a_bucket_with_empty_segments() -> None:
    """engine/lora.py's docstring: slots 3, 3, 0 decoding in bucket 4."""
    meta = LoraMeta(8, 16, 4, torch.device("cpu"))
    meta.fill([(0, 2, 3), (2, 3, 0)], pad_to=4)
    assert meta.seg_starts.tolist() == [0, 2, 3, 4, 4]
    assert meta.seg_slots.tolist() == [3, 0, -1, -1]
    assert meta.shrink_out.shape == (4, 4) and meta.active
    meta.fill([(0, 5, -1)])
    assert meta.seg_starts.tolist() == [0, 5] and meta.seg_slots.tolist() == [-1]
    assert not meta.active


def test_decode_buckets() -> None:
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert decode_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert decode_buckets(3) == (1, 2, 3)
    assert decode_buckets(1) == (1,)
    assert bucket_of(9, decode_buckets(64)) == 16 and bucket_of(65, decode_buckets(64)) is None


# ----------------------------------------------------------------------------- start-up


def test_warm_up_takes_no_kv_block_and_changes_no_output(setup: dict[str, Any]) -> None:
    warm, cold = _engine(setup, "stacked"), _engine(setup, "stacked")
    warm.warm_up()
    assert warm.kv.allocator.num_used == 0 and warm.runner.graphs is None  # CPU: no graphs
    batch = [(p, name) for p, name in zip(prompts(4, seed=2), [None, *NAMES])]
    outs = [e.generate([p for p, _ in batch], GREEDY, [n for _, n in batch])
            for e in (warm, cold)]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]


def test_enforce_eager_flag_reaches_the_engine_config() -> None:
    args = build_parser().parse_args(["serve", "--enforce-eager"])
    assert config_from_args(args).engine.enforce_eager
    assert not config_from_args(build_parser().parse_args(["serve"])).engine.enforce_eager


# ----------------------------------------------------------------------------- CUDA only


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA and compiled Triton (run with TRITON_INTERPRET=0)")
def test_cuda_graphs_replay_the_eager_decode(tmp_path: Path) -> None:
    """Graph replay against the same padded steps run eagerly, LoRA on and off, mixed
    adapters: the same kernels over the same buffers, so the very same tokens."""
    cfg = tiny_config()
    paths = make_adapters(tmp_path, cfg, NAMES)
    reg = AdapterRegistry(
        RegistryConfig(adapters=tuple(paths.items()), max_gpu_adapters=len(paths),
                       max_cpu_adapters=len(paths), max_lora_rank=16),
        base_spec(cfg), "cuda", torch.float32)
    reg.start()
    try:
        _make_resident(reg, paths)
        base = tiny_model(cfg).cuda()
        engines = [LLMEngine(base, EngineConfig(max_num_seqs=8, kv_cache_tokens=1024,
                                                block_size=4, enforce_eager=eager),
                             adapters=reg) for eager in (True, False)]
        for engine in engines:
            engine.warm_up()
        assert engines[0].runner.graphs is None and engines[1].runner.graphs is not None
        names: list[str | None] = [*NAMES, None, "r16-all"]
        batch = list(zip(prompts(5, seed=7), names))
        outs = [e.generate([p for p, _ in batch], GREEDY, [n for _, n in batch])
                for e in engines]
        assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
    finally:
        reg.close()
