"""Paged attention: the Triton kernel (interpreted on the CPU) against float64 dense attention
and against the torch backend (engine.attention.paged_attention_torch).

Every run draws fresh inputs (the seed is printed; set ATTN_SEED to replay one). Outputs are
poisoned first. Blocks are scattered through the cache in random order, and every cache row
that no context covers (spare blocks, the tail of a sequence's last block) is NaN, so a read
outside a context turns into a NaN in the result. Queries are a strided view of a fused qkv
projection, as the model runner produces them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
import torch

# Before engine.triton_attention imports triton (tests/conftest.py sets it too).
os.environ.setdefault("TRITON_INTERPRET", "1")

from loramux.engine.attention import (
    AttentionMetadata,
    build_metadata,
    paged_attention_torch,
)
from loramux.engine import triton_attention
from loramux.engine.triton_attention import (
    MAX_SPLITS,
    AttentionConfig,
    PagedAttention,
    attention_heuristic,
    decode_splits,
    paged_attention,
    paged_attention_triton,
)

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
pytestmark = pytest.mark.skipif(
    not INTERPRET and DEVICE.type != "cuda", reason="Triton needs a GPU or TRITON_INTERPRET=1"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol) against float64 on the same rounded inputs: the float32 accumulation is nearly
# exact, so rounding the output (and on a GPU, the probabilities before P @ V) dominates.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1.6e-2, 2e-2),
    torch.float16: (2e-3, 3e-3),
}
GQA = [(4, 4), (4, 2), (6, 2)]  # (nH, nKV): group 1, 2, 3
NAN = float("nan")


@dataclass(frozen=True)
class Case:
    """One step: sequence b has query_lens[b] new rows and context_lens[b] positions in all."""

    name: str
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    head_dim: int = 16
    block_size: int = 16


CASES = [
    Case("decode", (1, 1, 1, 1), (1, 17, 33, 63)),
    Case("prefill", (17, 6, 33), (17, 6, 33), head_dim=32),
    Case("mixed", (1, 17, 1, 5, 1), (33, 17, 1, 40, 16)),  # decodes, a prompt, a chunk
    Case("chunked", (16, 7, 1), (48, 33, 2)),  # prompt chunks after earlier chunks
]
MIXED = CASES[2]


@dataclass
class Problem:
    q: torch.Tensor  # [T, nH, D], a strided view of a fused [T, (nH + 2 nKV) D] projection
    k_cache: torch.Tensor  # [NB, bs, nKV, D], NaN outside every context
    v_cache: torch.Tensor  # [NB, bs, nKV, D]
    meta: AttentionMetadata
    tables: list[list[int]]  # block table of each sequence
    scale: float


def _seed() -> int:
    seed = int(os.environ.get("ATTN_SEED", random.randrange(2**31)))
    print(f"ATTN_SEED={seed}")  # shown by pytest when the test fails
    return seed


def make_problem(case: Case, num_heads: int, num_kv: int, dtype: torch.dtype,
                 poison_cache: bool = True) -> Problem:
    seed = _seed()
    g = random.Random(seed)
    torch.manual_seed(seed)
    bs, dim = case.block_size, case.head_dim
    needed = [-(-c // bs) for c in case.context_lens]
    num_blocks = sum(needed) + 5  # spare blocks nobody owns
    ids = g.sample(range(num_blocks), num_blocks)  # scattered, never in order
    tables = []
    for n in needed:
        tables.append(ids[:n])
        ids = ids[n:]

    fill = NAN if poison_cache else 0.0
    k_cache = torch.full((num_blocks, bs, num_kv, dim), fill, dtype=dtype)
    v_cache = torch.full((num_blocks, bs, num_kv, dim), fill, dtype=dtype)
    for table, ctx in zip(tables, case.context_lens):
        for p in range(ctx):
            k_cache[table[p // bs], p % bs] = torch.randn(num_kv, dim).to(dtype)
            v_cache[table[p // bs], p % bs] = torch.randn(num_kv, dim).to(dtype)

    num_tokens = sum(case.query_lens)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv) * dim).to(dtype)
    q = qkv.to(DEVICE)[:, :num_heads * dim].view(num_tokens, num_heads, dim)
    meta = build_metadata(list(case.query_lens), list(case.context_lens), tables, bs, DEVICE,
                          torch_plan=True)
    return Problem(q=q, k_cache=k_cache.to(DEVICE), v_cache=v_cache.to(DEVICE), meta=meta,
                   tables=tables, scale=dim**-0.5)


def dense_reference(p: Problem, case: Case) -> torch.Tensor:
    """float64 softmax(q K^T * scale, causal with offset) V per sequence, from gathered rows."""
    q = p.q.cpu().double()  # [T, nH, D]
    num_heads, num_kv, dim = q.shape[1], p.k_cache.shape[2], q.shape[2]
    k_flat = p.k_cache.cpu().double().reshape(-1, num_kv, dim)  # [NB*bs, nKV, D]
    v_flat = p.v_cache.cpu().double().reshape(-1, num_kv, dim)
    bs = case.block_size
    out = torch.empty_like(q)
    start = 0
    for table, q_len, ctx in zip(p.tables, case.query_lens, case.context_lens):
        rows = torch.tensor([table[j // bs] * bs + j % bs for j in range(ctx)])
        k = k_flat[rows].repeat_interleave(num_heads // num_kv, dim=1)  # [L, nH, D]
        v = v_flat[rows].repeat_interleave(num_heads // num_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:start + q_len], k) * p.scale
        pos = torch.arange(ctx - q_len, ctx)[:, None]  # [Q, 1] position of each query row
        scores = scores.masked_fill(torch.arange(ctx)[None, :] > pos, float("-inf"))
        out[start:start + q_len] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        start += q_len
    return out


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full_like(q, NAN)


def run_triton(p: Problem, config: AttentionConfig | None = None) -> torch.Tensor:
    out = poisoned_like(p.q)
    result = paged_attention_triton(p.q, p.k_cache, p.v_cache, p.meta, p.scale, out=out,
                                    config=config)
    assert result is out
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_dense(case: Case, heads: tuple[int, int], dtype: torch.dtype) -> None:
    p = make_problem(case, *heads, dtype)
    assert_close(run_triton(p), dense_reference(p, case), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [MIXED, CASES[3]], ids=lambda c: c.name)
def test_matches_torch_backend(case: Case, dtype: torch.dtype) -> None:
    # The torch path gathers padding from cache row 0 and masks it, so its cache must be finite
    # everywhere (as the engine's zero-initialised cache is).
    p = make_problem(case, 6, 2, dtype, poison_cache=False)
    expected = paged_attention_torch(p.q, p.k_cache, p.v_cache, p.meta, p.scale)
    rtol, atol = TOLERANCES[dtype]
    # Both round their output to dtype (and the torch path may compute in it): twice the slack.
    torch.testing.assert_close(run_triton(p).double(), expected.double(), rtol=2 * rtol,
                               atol=2 * atol)


CONFIGS = [
    AttentionConfig(block_m=16, block_n=16),  # tiles as small as tl.dot allows
    AttentionConfig(block_m=32, block_n=64),  # a KV tile spans several cache blocks
    AttentionConfig(block_m=64, block_n=16),  # query tiles longer than most sequences
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
@pytest.mark.parametrize("block_size", [5, 32])  # odd blocks; blocks longer than a KV tile
def test_launch_configs(config: AttentionConfig, block_size: int) -> None:
    case = Case(f"bs{block_size}", (1, 9, 1, 20), (23, 9, 41, 29), block_size=block_size)
    p = make_problem(case, 6, 2, torch.float32)
    assert_close(run_triton(p, config), dense_reference(p, case), torch.float32)


def test_allocates_output_and_leaves_rest_of_buffer() -> None:
    """Without `out` it allocates; with a strided `out` view, nothing outside it changes."""
    p = make_problem(MIXED, 4, 2, torch.float32)
    expected = dense_reference(p, MIXED)
    assert_close(paged_attention(p.q, p.k_cache, p.v_cache, p.meta, p.scale), expected,
                 torch.float32)
    num_tokens, num_heads, dim = p.q.shape
    buffer = torch.randn(num_tokens, num_heads + 1, dim + 3, device=DEVICE)
    before = buffer.clone()
    out = buffer[:, 1:, 2:dim + 2]  # [T, nH, D] with padding on two axes
    paged_attention_triton(p.q, p.k_cache, p.v_cache, p.meta, p.scale, out=out)
    assert_close(out, expected, torch.float32)
    buffer[:, 1:, 2:dim + 2] = before[:, 1:, 2:dim + 2]
    assert torch.equal(buffer, before)


@pytest.mark.parametrize("max_query_len", [1, 7, 500])
@pytest.mark.parametrize("group", [1, 3, 8, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_heuristic_covers_the_group(max_query_len: int, group: int, dtype: torch.dtype) -> None:
    config = attention_heuristic(max_query_len, group, 128, dtype)
    assert config.block_m >= group and config.block_m <= max(64, group)


def _bad(p: Problem, **changes: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  AttentionMetadata]:
    meta_fields = {k: v for k, v in changes.items() if k in AttentionMetadata.__dataclass_fields__}
    meta = AttentionMetadata(**{**p.meta.__dict__, **meta_fields})
    q = changes.get("q", p.q)
    k = changes.get("k_cache", p.k_cache)
    v = changes.get("v_cache", p.v_cache)
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
    assert isinstance(v, torch.Tensor)
    return q, k, v, meta


def test_rejects_bad_arguments() -> None:
    p = make_problem(Case("small", (1, 3), (5, 3)), 4, 2, torch.float32)
    ctx, qsl, table = p.meta.context_lens, p.meta.query_start_loc, p.meta.block_tables

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=DEVICE)

    odd_cache = zeros(*p.k_cache.shape[:3], 24)
    big_cache = zeros(*p.k_cache.shape[:3], 256)
    bad: list[tuple[dict[str, object], str]] = [
        ({"q": zeros(*p.q.shape[:2], 24), "k_cache": odd_cache, "v_cache": odd_cache},
         "power of two"),
        ({"q": zeros(*p.q.shape[:2], 256), "k_cache": big_cache, "v_cache": big_cache},
         r"power of two in \[16, 128\]"),
        ({"q": zeros(p.q.shape[0], 3, 16)}, "multiple of 2 KV heads"),
        ({"q": p.q.half()}, "share one of"),
        ({"context_lens": ctx.long()}, "int32"),
        ({"query_start_loc": qsl[:2]}, "number of sequences"),
    ]
    if ctx.device.type == "cpu":  # values of CUDA metadata are the engine's responsibility
        bad += [
            ({"context_lens": torch.tensor([5, 2], dtype=torch.int32)}, "query_len"),
            ({"query_start_loc": torch.tensor([0, 1, 3], dtype=torch.int32)},
             "run from 0 to T"),
            ({"block_tables": table[:, :0]}, "blocks"),
            ({"block_tables": table + 1000}, "block ids"),
        ]
    for changes, message in bad:
        with pytest.raises(ValueError, match=message):
            paged_attention_triton(*_bad(p, **changes), p.scale)


# --- Split-KV decodes (PagedAttention) -------------------------------------------------------

# (nH, nKV): group 1, 3, 4, 8.
SPLIT_GQA = [(4, 4), (6, 2), (8, 2), (8, 1)]
SPLIT_CASES = [
    Case("short", (1, 1, 1), (1, 5, 17)),  # every context shorter than one split's tile
    Case("boundaries", (1, 1, 1, 1), (16, 32, 64, 128)),  # on cache-block and split boundaries
    Case("ragged", (1, 1, 1, 1, 1), (1, 33, 97, 129, 200), block_size=5),
    Case("one", (1,), (1,)),  # a single row seeing a single position
]


class Recorder:
    """Stands in for a @triton.jit kernel and records the grid of every launch."""

    def __init__(self, kernel: object) -> None:
        self.kernel = kernel
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        self.grids.append(grid)
        return self.kernel[grid]  # type: ignore[index]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorder]:
    """The grids each attention kernel was launched with during the test, by kernel."""
    names = ("_paged_attention_kernel", "_paged_attention_split_kernel", "_split_reduce_kernel")
    recorders = {}
    for name in names:
        recorders[name] = Recorder(getattr(triton_attention, name))
        monkeypatch.setattr(triton_attention, name, recorders[name])
    return recorders


def make_attention(case: Case, heads: tuple[int, int], splits: int) -> PagedAttention:
    """A PagedAttention whose SM count makes a decode step of `case` take `splits` splits."""
    num_seqs = len(case.context_lens)
    att = PagedAttention(num_seqs + 2, heads[0], heads[1], case.head_dim, max_model_len=1024,
                         device=DEVICE, sm_count=num_seqs * heads[1] * splits, min_split_len=16)
    assert att.num_splits(num_seqs, max_query_len=1) == splits
    return att


def poison_scratch(att: PagedAttention) -> None:
    for t in (att.part_max, att.part_sum, att.part_acc):
        t.fill_(NAN)


def run_split(att: PagedAttention, p: Problem) -> torch.Tensor:
    poison_scratch(att)
    out = poisoned_like(p.q)
    assert att(p.q, p.k_cache, p.v_cache, p.meta, p.scale, out=out) is out
    return out


def live_splits(ctx: int, splits: int, block_n: int) -> int:
    """Splits with a non-empty chunk: chunks are cdiv(ctx, splits) rounded up to whole tiles."""
    chunk = -(-(-(-max(ctx, 1) // splits)) // block_n) * block_n
    return -(-ctx // chunk)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", SPLIT_GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: c.name)
def test_split_matches_dense(case: Case, heads: tuple[int, int], dtype: torch.dtype,
                             launches: dict[str, Recorder]) -> None:
    p = make_problem(case, *heads, dtype)
    att = make_attention(case, heads, splits=4)
    assert_close(run_split(att, p), dense_reference(p, case), dtype)
    assert launches["_paged_attention_split_kernel"].grids == [(len(case.context_lens),
                                                                heads[1], 4)]
    assert launches["_split_reduce_kernel"].grids == [(len(case.context_lens), heads[0])]
    assert launches["_paged_attention_kernel"].grids == []


@pytest.mark.parametrize("splits", [2, 8, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_matches_unsplit_and_torch(splits: int, dtype: torch.dtype) -> None:
    case = SPLIT_CASES[2]
    p = make_problem(case, 8, 2, dtype, poison_cache=False)
    split = run_split(make_attention(case, (8, 2), splits), p)
    rtol, atol = TOLERANCES[dtype]
    # Each rounds its output to dtype once: twice the slack between two of them.
    for other in (run_triton(p), paged_attention_torch(p.q, p.k_cache, p.v_cache, p.meta,
                                                       p.scale)):
        torch.testing.assert_close(split.double(), other.double(), rtol=2 * rtol, atol=2 * atol)


@pytest.mark.parametrize("heads", [(6, 2), (8, 1)], ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("case", SPLIT_CASES[1:3], ids=lambda c: c.name)
def test_split_writes_only_live_splits(case: Case, heads: tuple[int, int]) -> None:
    """The split kernel ran: scratch of every split with context is written, of no other (at
    context 64 the chunks are 32 long, so split 2 starts exactly at the end: empty)."""
    splits = 8
    p = make_problem(case, *heads, torch.float32)
    att = make_attention(case, heads, splits)
    run_split(att, p)
    block_n = attention_heuristic(1, heads[0] // heads[1], case.head_dim, torch.float32).block_n
    used = len(case.context_lens) * heads[0] * splits
    written = ~att.part_max[:used].view(len(case.context_lens), heads[0], splits).isnan()
    for b, ctx in enumerate(case.context_lens):
        live = live_splits(ctx, splits, block_n)
        assert 1 <= live <= splits
        expected = torch.arange(splits, device=DEVICE) < live
        assert torch.equal(written[b], expected.expand(heads[0], splits)), (b, ctx)
    assert att.part_max[used:].isnan().all()


def test_grid_and_scratch_do_not_depend_on_context(launches: dict[str, Recorder]) -> None:
    """Same batch size, contexts 1..3 vs 150..250: same grids, same scratch, nothing allocated."""
    short = Case("short", (1, 1, 1), (1, 2, 3))
    long = Case("long", (1, 1, 1), (150, 201, 250))
    att = make_attention(short, (8, 2), splits=4)
    scratch = [(t.data_ptr(), t.shape) for t in (att.part_max, att.part_sum, att.part_acc)]
    for case in (short, long, short):
        p = make_problem(case, 8, 2, torch.bfloat16)
        assert_close(run_split(att, p), dense_reference(p, case), torch.bfloat16)
    assert launches["_paged_attention_split_kernel"].grids == [(3, 2, 4)] * 3
    assert launches["_split_reduce_kernel"].grids == [(3, 8)] * 3
    assert [(t.data_ptr(), t.shape) for t in (att.part_max, att.part_sum, att.part_acc)] == scratch


@pytest.mark.parametrize("case", [MIXED, CASES[1], CASES[3]], ids=lambda c: c.name)
def test_steps_with_prefills_take_the_unsplit_kernel(case: Case,
                                                     launches: dict[str, Recorder]) -> None:
    p = make_problem(case, 8, 2, torch.float32, poison_cache=True)
    num_seqs = len(case.context_lens)
    att = PagedAttention(num_seqs, 8, 2, case.head_dim, 1024, DEVICE, sm_count=1000,
                         min_split_len=16)
    assert att.num_splits(num_seqs, 1) > 1 and att.num_splits(num_seqs, p.meta.max_query_len) == 1
    assert_close(run_split(att, p), dense_reference(p, case), torch.float32)
    assert launches["_paged_attention_split_kernel"].grids == []
    assert len(launches["_paged_attention_kernel"].grids) == 1


def test_decode_batches_that_fill_the_sms_take_the_unsplit_kernel(
        launches: dict[str, Recorder]) -> None:
    case = SPLIT_CASES[1]
    p = make_problem(case, 8, 2, torch.float32)
    att = PagedAttention(8, 8, 2, case.head_dim, 1024, DEVICE, sm_count=15, min_split_len=16)
    assert att.num_splits(4, 1) == 1  # 4 sequences x 2 KV heads x 2 splits > 15 SMs
    assert_close(run_split(att, p), dense_reference(p, case), torch.float32)
    assert launches["_paged_attention_split_kernel"].grids == []


@pytest.mark.parametrize("config", CONFIGS[:2], ids=lambda c: f"m{c.block_m}n{c.block_n}")
def test_split_launch_configs_and_strided_out(config: AttentionConfig) -> None:
    case = SPLIT_CASES[2]  # block size 5: chunk edges fall inside cache blocks
    p = make_problem(case, 6, 2, torch.float32)
    att = make_attention(case, (6, 2), splits=4)
    poison_scratch(att)
    num_tokens, num_heads, dim = p.q.shape
    buffer = torch.randn(num_tokens, num_heads + 1, dim + 3, device=DEVICE)
    before = buffer.clone()
    out = buffer[:, 1:, 2:dim + 2]  # [T, nH, D] with padding on two axes
    att(p.q, p.k_cache, p.v_cache, p.meta, p.scale, out=out, config=config)
    assert_close(out, dense_reference(p, case), torch.float32)
    buffer[:, 1:, 2:dim + 2] = before[:, 1:, 2:dim + 2]
    assert torch.equal(buffer, before)


@pytest.mark.parametrize(("num_seqs", "num_kv", "sm_count", "max_model_len", "expected"), [
    (1, 8, 132, 4096, 16),  # batch 1, 8 KV heads on an H100: 128 programs
    (1, 8, 132, 131072, 16),
    (1, 8, 132, 1024, 4),  # capped by 1024 / 256 positions per split
    (4, 8, 132, 4096, 4),
    (8, 8, 132, 4096, 2),
    (9, 8, 132, 4096, 1),  # 72 programs: doubling would pass 132
    (64, 8, 132, 4096, 1),
    (1, 1, 10_000, 10**6, MAX_SPLITS),
    (1, 8, 132, 256, 1),
])
def test_decode_splits(num_seqs: int, num_kv: int, sm_count: int, max_model_len: int,
                       expected: int) -> None:
    assert decode_splits(num_seqs, num_kv, sm_count, max_model_len) == expected


def test_scratch_is_sized_for_the_largest_split_batch() -> None:
    att = PagedAttention(64, 32, 8, 128, 4096, DEVICE, sm_count=132)
    assert att.splits[:9] == (16, 8, 4, 4, 2, 2, 2, 2, 1)
    # 1 x 32 x 16 = 2 x 32 x 8 = 4 x 32 x 4 = 8 x 32 x 2 slots of 128 floats: 256 KiB.
    assert att.part_acc.shape == (512, 128) and att.part_max.shape == (512,)
    assert PagedAttention(4, 4, 4, 16, 4096, DEVICE, sm_count=4).part_acc.numel() == 0


def test_split_rejects_bad_arguments() -> None:
    case = SPLIT_CASES[0]
    p = make_problem(case, 8, 2, torch.float32)
    att = make_attention(case, (8, 2), splits=4)
    with pytest.raises(ValueError, match=r"built for \(nH, nKV, D\)"):
        PagedAttention(3, 4, 2, 16, 1024, DEVICE)(p.q, p.k_cache, p.v_cache, p.meta, p.scale)
    with pytest.raises(ValueError, match="at most 2"):
        PagedAttention(2, 8, 2, 16, 1024, DEVICE)(p.q, p.k_cache, p.v_cache, p.meta, p.scale)
    mixed = make_problem(Case("mixed", (1, 2, 1), (3, 4, 5)), 8, 2, torch.float32)
    lying = AttentionMetadata(**{**mixed.meta.__dict__, "max_query_len": 1})
    with pytest.raises(ValueError, match="one query row per sequence"):
        att(mixed.q, mixed.k_cache, mixed.v_cache, lying, mixed.scale)
    with pytest.raises(ValueError, match="not a multiple"):
        PagedAttention(3, 6, 4, 16, 1024, DEVICE)
