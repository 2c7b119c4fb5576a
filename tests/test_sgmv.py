"""SGMV shrink/expand: Triton (interpreted on the CPU), torch and reference against float64.

Every run draws fresh inputs (the seed is printed; set SGMV_SEED to replay one). Outputs are
poisoned with random values first, and whatever the contract says is untouched must come back
bit-identical. Pools put random NaN-filled gaps between adapter blocks, x rows without an
adapter and v columns past a slot's rank are NaN, so a read outside what the contract allows
turns into a NaN in the result.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from loramux.kernels.checks import OFFSET_ALIGN
from loramux.kernels.launch import Launcher, TorchSgmvLauncher, make_launcher
from loramux.kernels.ops import Backend, sgmv_expand, sgmv_shrink
from loramux.kernels.reference import sgmv_expand_ref, sgmv_shrink_ref

# loramux.kernels imports triton lazily, on the first Triton call, so this still comes before
# @triton.jit decorates the kernels (tests/conftest.py sets it too).
os.environ.setdefault("TRITON_INTERPRET", "1")

# Interpreted Triton runs on CPU tensors; with TRITON_INTERPRET=0 on a GPU host the same tests
# exercise the compiled kernels.
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
needs_triton = pytest.mark.skipif(
    not INTERPRET and DEVICE.type != "cuda", reason="Triton needs a GPU or TRITON_INTERPRET=1"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol): the float32 accumulation is nearly exact, so the output rounding dominates.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1.6e-2, 3e-2),
    torch.float16: (2e-3, 4e-3),
}
RANKS = [1, 3, 8, 16, 33, 64, 0]  # mixed in one call; 0: the slot does nothing
DISTRIBUTIONS = ["distinct", "uniform", "zipf", "identical", "skewed"]


def _seed() -> int:
    seed = int(os.environ.get("SGMV_SEED", random.randrange(2**31)))
    print(f"SGMV_SEED={seed}")  # shown by pytest when the test fails
    return seed


@dataclass(frozen=True)
class Case:
    """One batch shape: T rows in `segments` non-empty segments, adapters spread by `dist`."""

    name: str
    rows: int
    hidden: int
    out_features: int
    segments: int
    dist: str
    shared_pool: bool  # A and B blocks in one pool, or in two
    uncovered: bool = False  # leave rows before the first / after the last segment
    ranks: tuple[int, ...] = tuple(RANKS)  # ranks of the slots, assigned in random order


CASES = [
    Case("1row", 1, 16, 16, 1, "identical", shared_pool=True),
    Case("3rows", 3, 576, 1000, 3, "distinct", shared_pool=False),
    Case("7rows", 7, 1000, 576, 4, "uniform", shared_pool=True, uncovered=True),
    Case("decode40", 40, 576, 16, 40, "distinct", shared_pool=False),
    Case("133zipf", 133, 1000, 1000, 9, "zipf", shared_pool=False, uncovered=True),
    Case("133skewed", 133, 16, 576, 12, "skewed", shared_pool=True),
    Case("mixed", 70, 16, 1000, 11, "uniform", shared_pool=False),  # one prefill + decodes
]
# Small enough for sweeps of Triton launch configurations under the interpreter.
CONFIG_CASE = Case("configs", 37, 200, 100, 6, "uniform", shared_pool=True, uncovered=True)


@dataclass
class Problem:
    """Kernel arguments plus the float64 truth they were built from."""

    x: torch.Tensor  # [T, H], NaN in rows that no adapter reads
    a_pool: torch.Tensor  # [P]
    b_pool: torch.Tensor  # [P'] (the same tensor as a_pool when shared)
    a_offsets: torch.Tensor  # int64 [S]
    b_offsets: torch.Tensor  # int64 [S]
    ranks: torch.Tensor  # int32 [S]
    scales: torch.Tensor  # float32 [S]
    seg_starts: torch.Tensor  # int32 [N + 1]
    seg_slots: torch.Tensor  # int32 [N]
    a64: list[torch.Tensor]  # slot k's A as float64 [r, H], as written into the pool
    b64: list[torch.Tensor]  # slot k's B as float64 [O, r]
    row_slot: list[int]  # slot of each row, -1 for none (slot -1 or uncovered)
    max_rank: int


def _choose_slots(dist: str, n: int, slots: int, live: list[int], g: random.Random) -> list[int]:
    """Slot of each of n segments, spread like punica's benchmarks."""
    if dist == "distinct":
        order = g.sample(range(slots), slots)
        return [order[i % slots] for i in range(n)]
    if dist == "identical":
        return [g.choice(live)] * n
    if dist == "uniform":
        return [g.randrange(slots) for _ in range(n)]
    if dist == "zipf":  # popularity ~ 1 / rank^1.5
        weights = [1.0 / (i + 1) ** 1.5 for i in range(slots)]
        order = g.sample(range(slots), slots)
        return [order[i] for i in g.choices(range(slots), weights=weights, k=n)]
    if dist == "skewed":  # one hot adapter, a long tail of others
        hot = g.choice(live)
        return [hot if g.random() < 0.75 else g.randrange(slots) for _ in range(n)]
    raise ValueError(dist)


def _segment_lengths(case: Case, g: random.Random) -> tuple[int, list[int]]:
    """(first covered row, segment lengths) with empty segments mixed in."""
    lead = 1 if case.uncovered else 0
    tail = 2 if case.uncovered else 0
    covered = case.rows - lead - tail
    parts = min(case.segments, covered)
    if case.name == "mixed":  # one long prefill segment, then 1-row decode segments
        lengths = [covered - (parts - 1)] + [1] * (parts - 1)
    else:
        cuts = sorted(g.sample(range(1, covered), parts - 1))
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, covered])]
    for _ in range(2):  # empty segments
        lengths.insert(g.randrange(len(lengths) + 1), 0)
    return lead, lengths


def _place_blocks(
    pool: torch.Tensor, blocks: list[torch.Tensor], start: int, g: random.Random
) -> tuple[list[int], int]:
    """Write blocks into pool at random aligned offsets, in random order, with gaps; return
    offsets (multiples of OFFSET_ALIGN, which the kernels may assume)."""
    offsets = [0] * len(blocks)
    pos = start
    for k in g.sample(range(len(blocks)), len(blocks)):
        pos += g.randrange(1, 40)  # garbage gap
        pos += -pos % OFFSET_ALIGN
        offsets[k] = pos
        pool[pos : pos + blocks[k].numel()] = blocks[k].flatten()
        pos += blocks[k].numel()
    return offsets, pos


def make_problem(case: Case, dtype: torch.dtype, seed: int) -> Problem:
    g = random.Random(seed)
    torch.manual_seed(seed)
    hidden, out_features = case.hidden, case.out_features
    lead, lengths = _segment_lengths(case, g)
    num_slots = max(len(case.ranks), case.segments)
    ranks = [case.ranks[i % len(case.ranks)] for i in g.sample(range(num_slots), num_slots)]
    live = [k for k, r in enumerate(ranks) if r > 0]
    seg_slots = _choose_slots(case.dist, len(lengths), num_slots, live, g)
    if len(lengths) >= 5:  # some segment without an adapter
        seg_slots[g.randrange(len(lengths))] = -1

    # Values in the kernel's dtype; the float64 truth is taken from the rounded values.
    a = [(torch.randn(r, hidden) / hidden**0.5).to(dtype) for r in ranks]  # [r, H]
    b = [(torch.randn(out_features, r) / max(r, 1) ** 0.5).to(dtype) for r in ranks]  # [O, r]
    slack = (40 + OFFSET_ALIGN) * num_slots + 50  # gaps and alignment (_place_blocks)
    a_size = sum(t.numel() for t in a) + slack
    b_size = sum(t.numel() for t in b) + slack
    nan = float("nan")
    if case.shared_pool:
        a_pool = torch.full((a_size + b_size,), nan, dtype=dtype)
        a_offsets, end = _place_blocks(a_pool, a, 0, g)
        b_offsets, _ = _place_blocks(a_pool, b, end, g)
        b_pool = a_pool
    else:
        a_pool = torch.full((a_size,), nan, dtype=dtype)
        b_pool = torch.full((b_size,), nan, dtype=dtype)
        a_offsets, _ = _place_blocks(a_pool, a, 0, g)
        b_offsets, _ = _place_blocks(b_pool, b, 0, g)

    seg_starts = [lead]
    for length in lengths:
        seg_starts.append(seg_starts[-1] + length)
    row_slot = [-1] * case.rows
    for n, slot in enumerate(seg_slots):
        for t in range(seg_starts[n], seg_starts[n + 1]):
            row_slot[t] = slot
    x = torch.randn(case.rows, hidden).to(dtype)
    for t, slot in enumerate(row_slot):
        if slot < 0 or ranks[slot] == 0:
            x[t] = nan  # never read

    def ints(values: list[int], dt: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dt, device=DEVICE)

    return Problem(
        x=x.to(DEVICE),
        a_pool=a_pool.to(DEVICE),
        b_pool=a_pool.to(DEVICE) if case.shared_pool else b_pool.to(DEVICE),
        a_offsets=ints(a_offsets, torch.int64),
        b_offsets=ints(b_offsets, torch.int64),
        ranks=ints(ranks, torch.int32),
        scales=(torch.rand(num_slots) * 1.5 + 0.5).to(DEVICE),
        seg_starts=ints(seg_starts, torch.int32),
        seg_slots=ints(seg_slots, torch.int32),
        a64=[t.double() for t in a],
        b64=[t.double() for t in b],
        row_slot=row_slot,
        max_rank=max(ranks),
    )


def _poison(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape) * 3 + 1234.5).to(dtype).to(DEVICE)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret as integers, so equality is bit equality."""
    return t.cpu().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _assert_result(
    out: torch.Tensor, before: torch.Tensor, expected: torch.Tensor, written: torch.Tensor
) -> None:
    """written cells match expected (float64) within the dtype's tolerance; the rest are intact."""
    out_cpu = out.cpu()
    assert not torch.isnan(out_cpu).any(), "NaN in out: a read outside a block, rank or segment"
    assert torch.equal(_bits(out_cpu)[~written], _bits(before)[~written]), "untouched cells changed"
    rtol, atol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out_cpu.double()[written], expected[written], rtol=rtol, atol=atol)


ShrinkFn = Callable[..., torch.Tensor]
ExpandFn = Callable[..., torch.Tensor]
SHRINK_IMPLS: dict[str, ShrinkFn] = {
    "triton": partial(sgmv_shrink, backend="triton"),
    "torch": partial(sgmv_shrink, backend="torch"),
    "reference": sgmv_shrink_ref,
}
EXPAND_IMPLS: dict[str, ExpandFn] = {
    "triton": partial(sgmv_expand, backend="triton"),
    "torch": partial(sgmv_expand, backend="torch"),
    "reference": sgmv_expand_ref,
}
IMPLS = [
    pytest.param("triton", marks=needs_triton),
    pytest.param("torch"),
    pytest.param("reference"),
]


def run_shrink(
    p: Problem, shrink: ShrinkFn, width: int, out_dtype: torch.dtype
) -> None:
    """Run shrink into a poisoned out [T, width] and check it against float64."""
    rows = p.x.shape[0]
    before = _poison((rows, width), out_dtype)
    out = before.clone()
    result = shrink(p.x, p.a_pool, p.a_offsets, p.ranks, p.seg_starts, p.seg_slots, out)
    assert result is out

    x64 = p.x.cpu().double()
    expected = torch.zeros(rows, width, dtype=torch.float64)
    written = torch.zeros(rows, width, dtype=torch.bool)
    for t, slot in enumerate(p.row_slot):
        if slot >= 0:
            rank = p.a64[slot].shape[0]
            expected[t, :rank] = p.a64[slot] @ x64[t]
            written[t, :rank] = True
    _assert_result(out, before.cpu(), expected, written)


def run_expand(
    p: Problem, expand: ExpandFn, v_dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    """Run expand on a v with NaN past each row's rank into a random out; check against float64."""
    rows = p.x.shape[0]
    out_features = p.b64[0].shape[0]
    v = torch.full((rows, p.max_rank), float("nan"))
    for t, slot in enumerate(p.row_slot):
        if slot >= 0:
            rank = p.a64[slot].shape[0]
            v[t, :rank] = torch.randn(rank)
    v = v.to(v_dtype).to(DEVICE)
    before = (torch.randn(rows, out_features)).to(out_dtype).to(DEVICE)
    out = before.clone()
    result = expand(v, p.b_pool, p.b_offsets, p.ranks, p.scales, p.seg_starts, p.seg_slots, out)
    assert result is out

    v64, scales = v.cpu().double(), p.scales.cpu().double()
    expected = before.cpu().double().clone()
    written = torch.zeros(rows, out_features, dtype=torch.bool)
    for t, slot in enumerate(p.row_slot):
        rank = p.a64[slot].shape[0] if slot >= 0 else 0
        if rank > 0:  # rank 0 adds nothing, so its rows must stay bit-identical too
            expected[t] += scales[slot] * (p.b64[slot] @ v64[t, :rank])
            written[t] = True
    _assert_result(out, before.cpu(), expected, written)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_shrink_matches_float64(impl: str, dtype: torch.dtype, case: Case) -> None:
    p = make_problem(case, dtype, _seed())
    run_shrink(p, SHRINK_IMPLS[impl], p.max_rank + 3, dtype)  # columns past R_max untouched


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_expand_matches_float64(impl: str, dtype: torch.dtype, case: Case) -> None:
    p = make_problem(case, dtype, _seed())
    run_expand(p, EXPAND_IMPLS[impl], dtype, dtype)


# Every rank up to 64, then ranks around and past the block sizes, up to the largest allowed
# (adapters have been silently corrupted at some ranks only: vLLM #5036, LoRAX #301).
EVERY_RANK = (*range(1, 65), 65, 96, 127, 128, 129, 200, 255, 256, 512, 1024)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_rank(impl: str) -> None:
    """A slot per rank in EVERY_RANK, two one-row segments per slot, in one call (shrink and
    expand)."""
    n = len(EVERY_RANK)
    case = Case("every-rank", 2 * n + 3, 24, 20, 2 * n, "distinct", shared_pool=False,
                uncovered=True, ranks=EVERY_RANK)
    p = make_problem(case, torch.float32, _seed())
    used = {int(p.ranks[slot]) for slot in p.seg_slots.tolist() if slot >= 0}
    assert used == set(EVERY_RANK)  # make_problem sets one segment's slot to -1: still all
    run_shrink(p, SHRINK_IMPLS[impl], p.max_rank + 1, torch.float32)
    run_expand(p, EXPAND_IMPLS[impl], torch.float32, torch.float32)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("impl", IMPLS)
def test_distributions_over_many_segments(impl: str, dist: str) -> None:
    """Every adapter distribution on 24 short segments over 24 slots (shrink and expand)."""
    case = Case(dist, 48, 64, 48, 24, dist, shared_pool=dist in ("uniform", "identical"))
    p = make_problem(case, torch.bfloat16, _seed())
    run_shrink(p, SHRINK_IMPLS[impl], p.max_rank, torch.bfloat16)
    run_expand(p, EXPAND_IMPLS[impl], torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize(
    ("v_dtype", "out_dtype"),
    [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
    ids=["v_f32-out_bf16", "v_f16-out_f32"],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes(impl: str, v_dtype: torch.dtype, out_dtype: torch.dtype) -> None:
    """Shrink may write float32 (or any float dtype); expand takes a float32 v on any pool."""
    pool_dtype = out_dtype if v_dtype == torch.float32 else v_dtype
    p = make_problem(CASES[4], pool_dtype, _seed())
    run_shrink(p, SHRINK_IMPLS[impl], p.max_rank, v_dtype)
    run_expand(p, EXPAND_IMPLS[impl], v_dtype, out_dtype)


@needs_triton
@pytest.mark.parametrize(
    "config",
    [
        {"block_m": 16, "block_r": 16, "block_k": 16, "split_k": 1},  # many rank blocks, short k steps
        {"block_m": 32, "block_r": 32, "block_k": 64, "split_k": 2},
        {"block_m": 16, "block_r": 64, "block_k": 128, "split_k": 3},  # uneven split of H
        {"block_m": 64, "block_r": 16, "block_k": 32, "split_k": 8},  # some splits past H
    ],
    ids=["r16-k16", "split2", "split3", "split8"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shrink_triton_launch_configs(dtype: torch.dtype, config: dict[str, int]) -> None:
    from loramux.kernels.sgmv import ShrinkConfig, sgmv_shrink_triton

    p = make_problem(CONFIG_CASE, dtype, _seed())
    run_shrink(p, partial(sgmv_shrink_triton, config=ShrinkConfig(**config)), p.max_rank, dtype)


@needs_triton
@pytest.mark.parametrize(
    "config",
    [
        {"block_m": 16, "block_n": 16, "block_r": 16},  # rank loop runs up to 4 times
        {"block_m": 32, "block_n": 64, "block_r": 32},
        {"block_m": 64, "block_n": 128, "block_r": 64},
    ],
    ids=["n16-r16", "n64-r32", "n128-r64"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expand_triton_launch_configs(dtype: torch.dtype, config: dict[str, int]) -> None:
    from loramux.kernels.sgmv import ExpandConfig, sgmv_expand_triton

    p = make_problem(CONFIG_CASE, dtype, _seed())
    run_expand(p, partial(sgmv_expand_triton, config=ExpandConfig(**config)), dtype, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views(impl: str) -> None:
    """x and out may be column slices of wider buffers (e.g. one projection of a fused qkv)."""
    p = make_problem(CASES[2], torch.float32, _seed())
    rows, hidden = p.x.shape
    wide_x = torch.full((rows, hidden + 24), float("nan"), device=DEVICE)
    wide_x[:, 8 : 8 + hidden] = p.x
    p.x = wide_x[:, 8 : 8 + hidden]  # stride (H + 24, 1)
    wide_out = _poison((rows, 3 * p.max_rank), torch.float32)
    before = wide_out.clone()
    out = wide_out[:, p.max_rank : 2 * p.max_rank]  # stride (3 * R_max, 1)
    SHRINK_IMPLS[impl](p.x, p.a_pool, p.a_offsets, p.ranks, p.seg_starts, p.seg_slots, out)
    written = torch.zeros(rows, 3 * p.max_rank, dtype=torch.bool)
    expected = torch.zeros(rows, 3 * p.max_rank, dtype=torch.float64)
    for t, slot in enumerate(p.row_slot):
        if slot >= 0:
            rank = p.a64[slot].shape[0]
            cols = slice(p.max_rank, p.max_rank + rank)
            expected[t, cols] = p.a64[slot] @ p.x[t].cpu().double()
            written[t, cols] = True
    _assert_result(wide_out, before.cpu(), expected, written)


@pytest.mark.parametrize("impl", IMPLS)
def test_lora_delta_end_to_end(impl: str) -> None:
    """shrink then expand adds scale * x @ A.T @ B.T, the LoRA term, to each adapter row."""
    p = make_problem(CASES[4], torch.float32, _seed())
    rows = p.x.shape[0]
    v = torch.zeros(rows, p.max_rank, device=DEVICE)
    SHRINK_IMPLS[impl](p.x, p.a_pool, p.a_offsets, p.ranks, p.seg_starts, p.seg_slots, v)
    out = torch.zeros(rows, p.b64[0].shape[0], device=DEVICE)
    EXPAND_IMPLS[impl](v, p.b_pool, p.b_offsets, p.ranks, p.scales, p.seg_starts, p.seg_slots,
                       out)
    expected = torch.zeros(out.shape, dtype=torch.float64)
    for t, slot in enumerate(p.row_slot):
        if slot >= 0:
            x64 = p.x[t].cpu().double()
            expected[t] = float(p.scales[slot]) * (p.b64[slot] @ (p.a64[slot] @ x64))
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_nothing_to_do_leaves_out_untouched(impl: str) -> None:
    """No segments, only slot -1, only rank 0, or only empty segments: out is bit-identical."""
    p = make_problem(CASES[2], torch.bfloat16, _seed())
    rows = p.x.shape[0]
    rank0 = p.ranks.tolist().index(0)
    metas = [
        ([0], []),
        ([0, rows], [-1]),
        ([0, 2, rows], [rank0, rank0]),
        ([0, 0, 0], [0, 1]),
    ]
    for starts, slots in metas:
        seg_starts = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
        seg_slots = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
        out = _poison((rows, p.max_rank), torch.bfloat16)
        before = out.clone()
        SHRINK_IMPLS[impl](p.x, p.a_pool, p.a_offsets, p.ranks, seg_starts, seg_slots, out)
        assert torch.equal(_bits(out), _bits(before)), (starts, slots)
        v = torch.randn(rows, p.max_rank, device=DEVICE).to(torch.bfloat16)
        EXPAND_IMPLS[impl](v, p.b_pool, p.b_offsets, p.ranks, p.scales, seg_starts, seg_slots,
                           out)
        assert torch.equal(_bits(out), _bits(before)), (starts, slots)


def test_auto_backend_on_cpu_is_torch() -> None:
    """On CPU tensors "auto" gives the torch backend's result bit for bit."""
    p = make_problem(CASES[5], torch.bfloat16, _seed())
    outs = []
    for backend in ("auto", "torch"):
        out = torch.zeros(p.x.shape[0], p.max_rank, dtype=torch.bfloat16)
        sgmv_shrink(p.x.cpu(), p.a_pool.cpu(), p.a_offsets.cpu(), p.ranks.cpu(),
                    p.seg_starts.cpu(), p.seg_slots.cpu(), out, backend=backend)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


# --- bad inputs -------------------------------------------------------------------------------

def _small_args() -> dict[str, torch.Tensor]:
    """A valid little problem: 5 rows, H 16, O 24, two slots of ranks 4 and 8."""
    rows, hidden, out_features = 5, 16, 24

    def ints(values: list[int], dt: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dt, device=DEVICE)

    return {
        "x": torch.randn(rows, hidden, device=DEVICE),
        "a_pool": torch.randn(12 * hidden, device=DEVICE),
        "a_offsets": ints([0, 4 * hidden], torch.int64),
        "b_pool": torch.randn(12 * out_features, device=DEVICE),
        "b_offsets": ints([0, 4 * out_features], torch.int64),
        "ranks": ints([4, 8], torch.int32),
        "scales": torch.ones(2, device=DEVICE),
        "seg_starts": ints([0, 2, 5], torch.int32),
        "seg_slots": ints([1, 0], torch.int32),
        "out": torch.zeros(rows, 8, device=DEVICE),  # shrink's out [T, R_max]
        "v": torch.randn(rows, 8, device=DEVICE),  # expand's v [T, R_max]
        "y": torch.zeros(rows, out_features, device=DEVICE),  # expand's out [T, O]
    }


def _call_shrink(args: dict[str, torch.Tensor], backend: Backend) -> None:
    sgmv_shrink(args["x"], args["a_pool"], args["a_offsets"], args["ranks"], args["seg_starts"],
                args["seg_slots"], args["out"], backend=backend)


def _call_expand(args: dict[str, torch.Tensor], backend: Backend) -> None:
    sgmv_expand(args["v"], args["b_pool"], args["b_offsets"], args["ranks"], args["scales"],
                args["seg_starts"], args["seg_slots"], args["y"], backend=backend)


def _int32(t: torch.Tensor | list[int]) -> torch.Tensor:
    return torch.as_tensor(t, device=DEVICE).to(torch.int32)


# Value checks read the metadata, which the launchers only do for CPU metadata (no device sync).
VALUE_CHECKS = {"out_narrower_than_rank", "slot_out_of_range", "decreasing_starts",
                "segment_past_rows", "block_past_pool", "v_narrower_than_rank",
                "offset_unaligned"}


BAD_INPUTS: list[tuple[str, str, Callable[[dict[str, torch.Tensor]], None], str]] = [
    ("shrink", "offsets_int32", lambda a: a.update(a_offsets=_int32(a["a_offsets"])),
     "a_offsets must be torch.int64"),
    ("shrink", "ranks_int64", lambda a: a.update(ranks=a["ranks"].long()),
     "ranks must be torch.int32"),
    ("shrink", "seg_starts_length", lambda a: a.update(seg_starts=a["seg_starts"][:2]),
     "seg_starts must have"),
    ("shrink", "slots_int64", lambda a: a.update(seg_slots=a["seg_slots"].long()),
     "seg_slots must be torch.int32"),
    ("shrink", "out_narrower_than_rank", lambda a: a.update(out=a["out"][:, :6]),
     "exceeds out.shape[1]"),
    ("shrink", "out_rows", lambda a: a.update(out=a["out"][:4]), "out has 4 rows"),
    ("shrink", "pool_dtype", lambda a: a.update(a_pool=a["a_pool"].half()),
     "a_pool must share x's dtype"),
    ("shrink", "pool_2d", lambda a: a.update(a_pool=a["a_pool"].view(12, -1)), "must be 1-D"),
    ("shrink", "pool_strided", lambda a: a.update(a_pool=a["a_pool"].repeat(2)[::2]),
     "pool must be contiguous"),
    ("shrink", "x_int", lambda a: a.update(x=a["x"].int()), "x must be float32"),
    ("shrink", "slot_out_of_range", lambda a: a.update(seg_slots=_int32([1, 2])),
     "seg_slots must be -1 or in"),
    ("shrink", "decreasing_starts", lambda a: a.update(seg_starts=_int32([0, 3, 2])),
     "non-decreasing"),
    ("shrink", "segment_past_rows", lambda a: a.update(seg_starts=_int32([0, 2, 6])),
     "within rows"),
    ("shrink", "block_past_pool", lambda a: a.update(a_pool=a["a_pool"][:-1]),
     "outside the pool"),
    ("shrink", "offset_unaligned", lambda a: a.update(a_offsets=a["a_offsets"] + 8),
     f"a_offsets[0] = 8 is not a multiple of {OFFSET_ALIGN}"),
    ("shrink", "slot_count_mismatch", lambda a: a.update(ranks=a["ranks"][:1]),
     "a_offsets has 2 slots"),
    ("expand", "scales_float64", lambda a: a.update(scales=a["scales"].double()),
     "scales must be torch.float32"),
    ("expand", "scales_length", lambda a: a.update(scales=a["scales"][:1]), "scales has 1"),
    ("expand", "v_narrower_than_rank", lambda a: a.update(v=a["v"][:, :4]),
     "exceeds v.shape[1]"),
    ("expand", "v_dtype", lambda a: a.update(b_pool=a["b_pool"].half(), v=a["v"].bfloat16()),
     "v must be float32 or b_pool's dtype"),
    ("expand", "b_offsets_int32", lambda a: a.update(b_offsets=_int32(a["b_offsets"])),
     "b_offsets must be torch.int64"),
    ("expand", "block_past_pool", lambda a: a.update(b_pool=a["b_pool"][:-1]),
     "outside the pool"),
    ("expand", "offset_unaligned", lambda a: a.update(b_offsets=a["b_offsets"] + 8),
     f"b_offsets[0] = 8 is not a multiple of {OFFSET_ALIGN}"),
    ("expand", "out_1d", lambda a: a.update(y=a["y"][0]), "out must be 2-D"),
]


@pytest.mark.parametrize(
    ("op", "mutate", "message"),
    [
        pytest.param(op, mutate, message, id=f"{op}-{name}", marks=pytest.mark.skipif(
            DEVICE.type == "cuda" and name in VALUE_CHECKS, reason="value checks are CPU-only"))
        for op, name, mutate, message in BAD_INPUTS
    ],
)
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "torch"])
def test_bad_inputs_raise(
    backend: Backend, op: str, mutate: Callable[[dict[str, torch.Tensor]], None], message: str
) -> None:
    args = _small_args()
    (_call_shrink if op == "shrink" else _call_expand)(args, backend)  # valid as built
    mutate(args)
    with pytest.raises(ValueError, match=re.escape(message)):
        (_call_shrink if op == "shrink" else _call_expand)(args, backend)


def test_unknown_backend_raises() -> None:
    with pytest.raises(ValueError, match="backend must be"):
        _call_shrink(_small_args(), "cuda")  # type: ignore[arg-type]


@needs_triton
def test_tuned_table_overrides_the_heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tuned-table entry for this device and shape is what the checked launchers use."""
    from loramux.kernels import sgmv
    from loramux.kernels.sgmv_config import ExpandConfig, ShrinkConfig, TunedTable

    p = make_problem(CONFIG_CASE, torch.float32, _seed())
    rows, segments = p.x.shape[0], p.seg_slots.shape[0]
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    chosen: list[object] = []
    shrink = ShrinkConfig(block_m=32, split_k=2)
    expand = ExpandConfig(block_m=32, block_n=32)
    table = TunedTable().with_entries(name, {
        sgmv.shape_key("shrink", rows, segments, p.x.shape[1], p.max_rank, p.a_pool.dtype): shrink,
        sgmv.shape_key("expand", rows, segments, p.b64[0].shape[0], p.max_rank,
                       p.a_pool.dtype): expand,
    })
    monkeypatch.setattr(sgmv, "TUNED_TABLE", table)
    launch_shrink, launch_expand = sgmv.launch_shrink, sgmv.launch_expand

    def spy_shrink(*args: object) -> None:
        chosen.append(args[8])
        launch_shrink(*args)  # type: ignore[arg-type]

    def spy_expand(*args: object) -> None:
        chosen.append(args[8])
        launch_expand(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sgmv, "launch_shrink", spy_shrink)
    monkeypatch.setattr(sgmv, "launch_expand", spy_expand)
    run_shrink(p, sgmv.sgmv_shrink_triton, p.max_rank, torch.float32)
    run_expand(p, sgmv.sgmv_expand_triton, torch.float32, torch.float32)
    assert chosen == [shrink, expand]


def test_heuristics_fill_an_h100_and_stay_valid() -> None:
    """Decode splits the hidden dimension to fill 132 SMs; prefill splits little; all valid."""
    from loramux.kernels.sgmv_config import ShapeKey, expand_heuristic, shrink_heuristic

    decode = shrink_heuristic(ShapeKey("shrink", "decode", 4096, 16, 32, "bf16"), 132)
    assert decode.block_m == 16 and decode.split_k > 1
    prefill = shrink_heuristic(ShapeKey("shrink", "prefill", 4096, 64, 4096, "bf16"), 132)
    assert prefill.block_m == 64 and prefill.split_k <= 4
    one = expand_heuristic(ShapeKey("expand", "decode", 4096, 16, 1, "bf16"), 132)
    assert one.block_n < 128  # one decode row: narrower output blocks for more programs
    for regime in ("decode", "prefill"):
        for bucket in (1, 64, 4096, 8192):
            for rank in (16, 32, 64, 128):
                for dtype in ("bf16", "fp16", "fp32"):
                    # __post_init__ validates the block sizes
                    shrink_heuristic(ShapeKey("shrink", regime, 4096, rank, bucket, dtype), 132)
                    expand_heuristic(ShapeKey("expand", regime, 11008, rank, bucket, dtype),
                                     132)


# --- launchers --------------------------------------------------------------------------------

LAUNCHERS = [pytest.param("triton", marks=needs_triton), pytest.param("torch")]


def _launcher(kind: str, p: Problem, v_dtype: torch.dtype, **kwargs: object) -> Launcher:
    """A launcher built for problem p's shapes, as the engine builds one per projection."""
    rows, hidden = p.x.shape
    sizes = dict(max_rows=rows, max_segments=p.seg_slots.shape[0], **kwargs)
    if kind == "torch":
        return TorchSgmvLauncher(hidden, p.b64[0].shape[0], p.max_rank, **sizes)  # type: ignore[arg-type]
    from loramux.kernels.launch import SgmvLauncher

    return SgmvLauncher(hidden, p.b64[0].shape[0], p.max_rank, p.x.dtype, p.a_pool.dtype,
                        v_dtype, DEVICE, **sizes)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", LAUNCHERS)
def test_launcher_matches_float64(kind: str, dtype: torch.dtype, case: Case) -> None:
    """shrink into the engine's float32 v, expand from it: the reference results."""
    p = make_problem(case, dtype, _seed())
    launcher = _launcher(kind, p, torch.float32, debug=True)
    run_shrink(p, launcher.shrink, p.max_rank, torch.float32)
    run_expand(p, launcher.expand, torch.float32, dtype)


@needs_triton
@pytest.mark.parametrize("split_k", [2, 5])
def test_launcher_uses_tuned_configs_and_its_partials(split_k: int) -> None:
    """Tuned entries for every bucket replace the heuristics; split-K sums land in the buffer
    allocated at construction, sized for the largest call."""
    from loramux.kernels.sgmv_config import REGIMES, ExpandConfig, ShapeKey, ShrinkConfig
    from loramux.kernels.sgmv_config import TunedTable, heuristic_buckets, rank_bucket

    p = make_problem(CONFIG_CASE, torch.float32, _seed())
    rows, hidden = p.x.shape
    segments, out_features = p.seg_slots.shape[0], p.b64[0].shape[0]
    shrink = ShrinkConfig(block_m=16, block_r=16, block_k=32, split_k=split_k)
    expand = ExpandConfig(block_m=16, block_n=32, block_r=16)
    entries: dict[ShapeKey, ShrinkConfig | ExpandConfig] = {}
    for regime in REGIMES:
        for bucket in heuristic_buckets(regime, rows if regime == "prefill" else segments):
            r = rank_bucket(p.max_rank)
            entries[ShapeKey("shrink", regime, hidden, r, bucket, "fp32")] = shrink
            entries[ShapeKey("expand", regime, out_features, r, bucket, "fp32")] = expand
    table = TunedTable().with_entries("cpu" if DEVICE.type == "cpu" else
                                      torch.cuda.get_device_name(), entries)
    launcher = _launcher("triton", p, torch.float32, table=table)
    assert launcher.configs_for(rows, segments) == (shrink, expand)
    partial = launcher._partial.data_ptr()
    run_shrink(p, launcher.shrink, p.max_rank, torch.float32)
    run_expand(p, launcher.expand, torch.float32, torch.float32)
    assert launcher._partial.data_ptr() == partial


@pytest.mark.parametrize("kind", LAUNCHERS)
def test_launcher_refuses_calls_past_its_sizes(kind: str) -> None:
    p = make_problem(CASES[1], torch.float32, _seed())
    launcher = _launcher(kind, p, torch.float32)
    rows, width = p.x.shape[0], p.max_rank
    x = torch.cat([p.x, p.x])  # twice the rows it was built for
    with pytest.raises(ValueError, match="exceed the launcher's"):
        launcher.shrink(x, p.a_pool, p.a_offsets, p.ranks, p.seg_starts, p.seg_slots,
                        torch.zeros(2 * rows, width, device=DEVICE))


@needs_triton
def test_debug_launcher_checks_dtypes() -> None:
    p = make_problem(CASES[1], torch.float32, _seed())
    launcher = _launcher("triton", p, torch.float32, debug=True)
    v = torch.zeros(p.x.shape[0], p.max_rank, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="the launcher was built for"):
        launcher.shrink(p.x, p.a_pool, p.a_offsets, p.ranks, p.seg_starts, p.seg_slots, v)


def test_make_launcher_picks_torch_for_cpu() -> None:
    launcher = make_launcher(64, 32, 16, torch.float32, torch.float32, torch.float32,
                             torch.device("cpu"), max_rows=8, max_segments=4)
    assert isinstance(launcher, TorchSgmvLauncher)
