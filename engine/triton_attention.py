"""Paged attention as one Triton kernel: prefills, prefill chunks and decodes in one launch.

Semantics are those of `paged_attention_torch` in engine/attention.py (the specification):
sequence b's query row i sits at position context_lens[b] - query_len_b + i and attends
causally to positions 0..that position of its context, read from the paged cache through
block_tables[b]. Only the device fields of `AttentionMetadata` are read, never its torch plan.

How the work is cut:

* Programs. Grid (query tiles, nKV). A program owns BLOCK_Q consecutive query rows of one
  sequence and all GROUP = nH // nKV query heads that share one KV head, flattened into the
  BLOCK_M = BLOCK_Q * GROUP (padded to a power of two) rows of its tiles, so every K/V tile
  it loads serves the whole head group (GQA costs no extra cache reads). A decode is one tile
  of GROUP live rows; a prefill of Q rows is cdiv(Q, BLOCK_Q) tiles.
* Tile numbering. Sequence b's tiles are numbered from query_start_loc[b] // BLOCK_Q + b.
  That wastes at most one number per sequence, so T // BLOCK_Q + B tiles cover any batch:
  the grid depends on shapes only (no device read, no host sync; a CUDA graph can capture
  it). Each program finds its sequence by binary search over query_start_loc; numbers past
  the end of a sequence's tiles return at once.
* KV loop. Flash-attention online softmax in float32 over tiles of BLOCK_N context positions,
  independent of the cache's block size: each position finds its physical row through the
  block table (block_tables[b, j // bs] * bs + j % bs). The loop stops at the tile's last
  query position, so causal work above the diagonal is never loaded.

Split-KV decodes (flash-decoding), through `PagedAttention`:

* Why. A decode-only step has only B * nKV programs (8 at batch 1 with 8 KV heads: 8 of an
  H100's 132 SMs), each walking its whole context alone. Splitting every context over
  S programs multiplies the programs and divides the serial walk.
* Programs. Grid (B, nKV, S), S splits. Split s of a sequence with context L takes positions
  s * n .. min((s + 1) * n, L) - 1, n = cdiv(L, S) rounded up to whole BLOCK_N tiles,
  computed on the device; a split whose chunk is empty returns at once. It writes its online
  softmax state unnormalised (running max, running sum, acc) to float32 scratch.
* Reduce. Grid (B, nH): each program rescales the live splits of one (sequence, head) to their
  common max and divides: out = sum_s acc_s 2^(m_s - m) / sum_s l_s 2^(m_s - m). It recomputes
  which splits are live from L, so dead splits' scratch is never read (it may hold anything).
* CUDA graphs. S comes from host facts only (B, nKV, SM count, max_model_len; see
  `decode_splits`), the scratch is allocated once by `PagedAttention`, and both grids depend on
  shapes only, so one captured graph serves every context length. Steps with a prefill row, and
  decode batches that already fill the SMs, take the unsplit kernel above.

Loads are cast to float32 before tl.dot under the interpreter (which gets bf16/fp16
arithmetic wrong); on a GPU, bf16/fp16 go to the tensor cores as they are, float32 as tf32x3
(float32 accuracy). Accumulators are float32 whatever the dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal, NoReturn

import torch
import triton
import triton.language as tl
from loramux.engine.attention import AttentionMetadata

# Read once: @triton.jit fixed compiled-vs-interpreted mode when this module was imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_HEAD_DIM = 128

Regime = Literal["decode", "prefill"]


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters (powers of two; tl.dot needs >= 16). block_m >= the GQA group."""

    block_m: int = 16  # query rows x heads per program
    block_n: int = 32  # context positions per KV loop step
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name, value in (("block_m", self.block_m), ("block_n", self.block_n)):
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


# Offline-tuned launch parameters, keyed by torch.cuda.get_device_name() then (regime, D).
# Anything missing falls back to `attention_heuristic`.
TUNED_CONFIGS: Mapping[str, Mapping[tuple[Regime, int], AttentionConfig]] = {}


def attention_heuristic(max_query_len: int, group: int, head_dim: int,
                        dtype: torch.dtype) -> AttentionConfig:
    """Decode-only steps: 16-row tiles (one query row per head group); prefills: up to 64 rows.

    Sized so that no tile spills registers on sm_80/sm_90 (ptxas resource usage of the
    compiled kernels, checked by tests/test_attention_compile.py): each KV tile gathers its
    rows through the block table with 64-bit addresses, so tiles of 2048 scores and more get
    8 warps; float32 tiles are twice the bytes and run three tf32 products (tf32x3), so they
    keep 16 context positions per step except for decodes at D = 64.
    """
    group_rows = triton.next_power_of_2(group)
    block_m = max(16, group_rows, min(triton.next_power_of_2(max_query_len * group), 64))
    block_n = 32 if max_query_len == 1 or head_dim > 64 else 64
    num_stages = 2
    if dtype == torch.float32:
        if head_dim > 64:
            block_m = max(16, group_rows)
        if head_dim > 64 or block_m > 16:
            block_n = 16
    elif head_dim > 64:
        if block_m == 16:
            num_stages = 3  # at 2, ptxas spills 8 bytes on sm_80 (group 1)
        elif block_m == 64:
            block_n = 16  # 64 x 32 spills on sm_80 at any stage count but 1
    big = block_m * block_n >= 2048 or (dtype == torch.float32 and head_dim > 64)
    return AttentionConfig(block_m=block_m, block_n=block_n, num_warps=8 if big else 4,
                           num_stages=num_stages)


# A split must be able to get this many context positions (at max_model_len): below, its fixed
# costs (loading q, writing partials, the reduce) outweigh the parallelism it adds.
MIN_SPLIT_LEN = 256
MAX_SPLITS = 64  # the reduce holds [MAX_SPLITS, D] float32 partials in registers
REDUCE_WARPS = 4


def decode_splits(num_seqs: int, num_kv_heads: int, sm_count: int, max_model_len: int,
                  min_split_len: int = MIN_SPLIT_LEN) -> int:
    """KV splits per (sequence, KV head) of a decode-only step; 1 means the unsplit kernel.

    The largest power of two s with num_seqs * nKV * s <= sm_count (about one program per SM),
    s <= max_model_len // min_split_len and s <= MAX_SPLITS. Host facts only, never context
    lengths: a captured CUDA graph replays its grid for every context.
    """
    cap = min(sm_count // (num_seqs * num_kv_heads), max_model_len // min_split_len, MAX_SPLITS)
    return 1 << (cap.bit_length() - 1) if cap >= 2 else 1


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first tile, query_start_loc[b] // BLOCK_Q + b, is <= tile."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:  # invariant: first_tile(b) <= tile for b < lo, > tile for b >= hi
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend(
    q,  # [BLOCK_M, HEAD_DIM] query rows (float32 under the interpreter)
    q_pos,  # [BLOCK_M] position of each row: it sees context positions <= q_pos
    m_i,  # [BLOCK_M] running max (base 2)
    l_i,  # [BLOCK_M] running sum of exp2(s - m_i)
    acc,  # [BLOCK_M, HEAD_DIM] running sum of exp2(s - m_i) v, float32
    kv_start,
    kv_end,
    bt_row_ptr,  # this sequence's row of block_tables
    k_cache_ptr,
    v_cache_ptr,
    kv_head_off,  # int64 KV head
    block_size,
    qk_scale,
    stride_k_blk,
    stride_k_off,
    stride_k_h,
    stride_k_d,
    stride_v_blk,
    stride_v_off,
    stride_v_h,
    stride_v_d,
    stride_bt_blk,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax of q over context positions kv_start .. kv_end-1: (m_i, l_i, acc) updated."""
    d = tl.arange(0, HEAD_DIM)
    for start in range(kv_start, kv_end, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
        j_mask = j < kv_end
        # block_tables[b, i] sits at b * stride_bt_seq + i * stride_bt_blk; position j is in
        # row j % bs of block block_tables[b, j // bs].
        blk = tl.load(bt_row_ptr + (j // block_size) * stride_bt_blk, mask=j_mask, other=0)
        blk = blk.to(tl.int64)  # blk * stride_k_blk passes 2**31 on large caches
        off = j % block_size
        # k_cache[n, o, h, d] sits at n * stride_k_blk + o * stride_k_off + h * stride_k_h
        # + d * stride_k_d; loaded transposed, [HEAD_DIM, BLOCK_N], ready for q @ k.
        k = tl.load(
            k_cache_ptr + blk[None, :] * stride_k_blk + off[None, :] * stride_k_off
            + kv_head_off * stride_k_h + d[:, None] * stride_k_d,
            mask=j_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        causal = (j[None, :] <= q_pos[:, None]) & j_mask[None, :]
        s = tl.where(causal, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows that see only -inf (padding) keep 0, so exp2(-inf - m_new) is 0 instead of NaN.
        # A live row sees kv_start <= its position in its first tile: finite from then on.
        m_new = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.math.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        m_i = m_new

        # v_cache[n, o, h, d]: same layout as k_cache, loaded [BLOCK_N, HEAD_DIM].
        v = tl.load(
            v_cache_ptr + blk[:, None] * stride_v_blk + off[:, None] * stride_v_off
            + kv_head_off * stride_v_h + d[None, :] * stride_v_d,
            mask=j_mask[:, None],
            other=0.0,
        )
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return m_i, l_i, acc


# num_seqs == 1 would otherwise become a constexpr, which the binary search cannot reassign.
@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
    q_ptr,  # [T, nH, D]
    k_cache_ptr,  # [NB, bs, nKV, D]
    v_cache_ptr,  # [NB, bs, nKV, D]
    out_ptr,  # [T, nH, D]
    query_start_loc_ptr,  # int32 [B + 1]
    context_lens_ptr,  # int32 [B]
    block_tables_ptr,  # int32/int64 [B, max_blocks]
    num_seqs,
    block_size,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    stride_q_t,
    stride_q_h,
    stride_q_d,
    stride_o_t,
    stride_o_h,
    stride_o_d,
    stride_k_blk,
    stride_k_off,
    stride_k_h,
    stride_k_d,
    stride_v_blk,
    stride_v_off,
    stride_v_h,
    stride_v_d,
    stride_bt_seq,
    stride_bt_blk,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # BLOCK_M // GROUP query rows per program
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(query_start_loc_ptr, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = tile - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(context_lens_ptr + seq)

    # Tile row m is query row q_local = q_block * BLOCK_Q + m // GROUP of the sequence, head
    # kv_head * GROUP + m % GROUP; rows m >= BLOCK_Q * GROUP pad BLOCK_M to a power of two.
    m = tl.arange(0, BLOCK_M)
    q_local = q_block * BLOCK_Q + m // GROUP
    row_mask = (m < BLOCK_Q * GROUP) & (q_local < q_len)
    q_pos = ctx_len - q_len + q_local  # [BLOCK_M] position of each row in its sequence
    rows = (q_start + q_local).to(tl.int64)  # rows * stride can pass 2**31 for long batches
    heads = kv_head * GROUP + m % GROUP
    d = tl.arange(0, HEAD_DIM)

    # q[t, h, d] sits at t * stride_q_t + h * stride_q_h + d * stride_q_d.
    q = tl.load(  # [BLOCK_M, HEAD_DIM]
        q_ptr + rows[:, None] * stride_q_t + heads[:, None] * stride_q_h + d[None, :] * stride_q_d,
        mask=row_mask[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    # Context positions 0 .. kv_end-1: up to the tile's last live query row (causal).
    last_q = tl.minimum((q_block + 1) * BLOCK_Q, q_len) - 1
    kv_end = ctx_len - q_len + last_q + 1
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i, l_i, acc = _attend(
        q, q_pos, m_i, l_i, acc, 0, kv_end, block_tables_ptr + seq.to(tl.int64) * stride_bt_seq,
        k_cache_ptr, v_cache_ptr, kv_head.to(tl.int64), block_size, qk_scale,
        stride_k_blk, stride_k_off, stride_k_h, stride_k_d,
        stride_v_blk, stride_v_off, stride_v_h, stride_v_d, stride_bt_blk,
        HEAD_DIM, BLOCK_N, UPCAST, PRECISION,
    )  # fmt: skip

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    # out[t, h, d] sits at t * stride_o_t + h * stride_o_h + d * stride_o_d.
    out_ptrs = (out_ptr + rows[:, None] * stride_o_t + heads[:, None] * stride_o_h
                + d[None, :] * stride_o_d)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _split_len(ctx_len, num_splits, BLOCK_N: tl.constexpr):
    """Context positions per split: an equal share of ctx_len in whole KV tiles, >= one tile."""
    share = tl.cdiv(tl.maximum(ctx_len, 1), num_splits)
    return tl.cdiv(share, BLOCK_N) * BLOCK_N


# The split count is a runtime argument: one compiled kernel serves every count.
@triton.jit(do_not_specialize=["num_splits"])
def _paged_attention_split_kernel(
    q_ptr,  # [B, nH, D]: a decode-only step, query row b belongs to sequence b
    k_cache_ptr,  # [NB, bs, nKV, D]
    v_cache_ptr,  # [NB, bs, nKV, D]
    part_max_ptr,  # float32 [B, nH, S] running max (base 2) of each split, S = num_splits
    part_sum_ptr,  # float32 [B, nH, S] sum of exp2(s - max) over the split
    part_acc_ptr,  # float32 [B, nH, S, D] sum of exp2(s - max) v over the split
    context_lens_ptr,  # int32 [B]
    block_tables_ptr,  # int32/int64 [B, max_blocks]
    num_heads,
    num_splits,
    block_size,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    stride_q_t,
    stride_q_h,
    stride_q_d,
    stride_k_blk,
    stride_k_off,
    stride_k_h,
    stride_k_d,
    stride_v_blk,
    stride_v_off,
    stride_v_h,
    stride_v_d,
    stride_bt_seq,
    stride_bt_blk,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= GROUP: the head group padded to a power of two
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(context_lens_ptr + seq)
    split_len = _split_len(ctx_len, num_splits, BLOCK_N)
    kv_start = split * split_len
    if kv_start >= ctx_len:  # an empty chunk: the reduce never reads this split
        return
    kv_end = tl.minimum(kv_start + split_len, ctx_len)

    # Tile row m is head kv_head * GROUP + m; rows m >= GROUP pad BLOCK_M to a power of two.
    m = tl.arange(0, BLOCK_M)
    row_mask = m < GROUP
    heads = kv_head * GROUP + m
    d = tl.arange(0, HEAD_DIM)
    row = seq.to(tl.int64)
    # q[t, h, d] sits at t * stride_q_t + h * stride_q_h + d * stride_q_d.
    q = tl.load(  # [BLOCK_M, HEAD_DIM]
        q_ptr + row * stride_q_t + heads[:, None] * stride_q_h + d[None, :] * stride_q_d,
        mask=row_mask[:, None],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    q_pos = tl.zeros((BLOCK_M,), dtype=tl.int32) + ctx_len - 1  # a decode sees its context
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i, l_i, acc = _attend(
        q, q_pos, m_i, l_i, acc, kv_start, kv_end, block_tables_ptr + row * stride_bt_seq,
        k_cache_ptr, v_cache_ptr, kv_head.to(tl.int64), block_size, qk_scale,
        stride_k_blk, stride_k_off, stride_k_h, stride_k_d,
        stride_v_blk, stride_v_off, stride_v_h, stride_v_d, stride_bt_blk,
        HEAD_DIM, BLOCK_N, UPCAST, PRECISION,
    )  # fmt: skip

    # Scratch is dense: (b, h, s) is slot (b * nH + h) * S + s, acc rows HEAD_DIM wide.
    slot = (row * num_heads + heads) * num_splits + split  # [BLOCK_M]
    tl.store(part_max_ptr + slot, m_i, mask=row_mask)
    tl.store(part_sum_ptr + slot, l_i, mask=row_mask)
    tl.store(part_acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], acc, mask=row_mask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _split_reduce_kernel(
    part_max_ptr,  # float32 [B, nH, S], S = num_splits
    part_sum_ptr,  # float32 [B, nH, S]
    part_acc_ptr,  # float32 [B, nH, S, D]
    out_ptr,  # [B, nH, D]
    context_lens_ptr,  # int32 [B]
    num_heads,
    num_splits,
    stride_o_t,
    stride_o_h,
    stride_o_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the split kernel's: chunks are whole BLOCK_N tiles
    BLOCK_S: tl.constexpr,  # MAX_SPLITS >= num_splits: one compiled reduce for every count
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ctx_len = tl.load(context_lens_ptr + seq)
    # The splits the split kernel found non-empty; the others' scratch is stale.
    live = tl.cdiv(ctx_len, _split_len(ctx_len, num_splits, BLOCK_N))  # <= num_splits
    s = tl.arange(0, BLOCK_S)
    s_mask = s < live
    d = tl.arange(0, HEAD_DIM)
    slot = (seq * num_heads + head) * num_splits + s  # [BLOCK_S], as the split kernel
    m_s = tl.load(part_max_ptr + slot, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_sum_ptr + slot, mask=s_mask, other=0.0)
    acc_s = tl.load(part_acc_ptr + slot[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None],
                    other=0.0)  # [BLOCK_S, HEAD_DIM]
    m = tl.max(m_s, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)  # no live split (context 0): 0, not NaN
    w = tl.math.exp2(m_s - m)  # [BLOCK_S] each split's rescale to the common max
    l_sum = tl.sum(l_s * w, axis=0)
    o = tl.sum(acc_s * w[:, None], axis=0) / tl.where(l_sum > 0.0, l_sum, 1.0)  # [HEAD_DIM]
    # out[t, h, d] sits at t * stride_o_t + h * stride_o_h + d * stride_o_d.
    tl.store(out_ptr + seq * stride_o_t + head * stride_o_h + d * stride_o_d,
             o.to(out_ptr.dtype.element_ty))


def _fail(message: str) -> NoReturn:
    raise ValueError(f"paged_attention_triton: {message}")


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           meta: AttentionMetadata, out: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices always; metadata values only when they live on the CPU
    (reading CUDA metadata would synchronise every layer of every step)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        _fail(f"q must be [T, nH, D] and k_cache [NB, bs, nKV, D], got {tuple(q.shape)} and "
              f"{tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv, kv_dim = k_cache.shape
    if kv_dim != head_dim:
        _fail(f"q has head dim {head_dim} but the cache {kv_dim}")
    if head_dim < 16 or head_dim > _MAX_HEAD_DIM or head_dim & (head_dim - 1):
        _fail(f"head dim must be a power of two in [16, {_MAX_HEAD_DIM}], got {head_dim}")
    if num_kv < 1 or num_heads % num_kv:
        _fail(f"{num_heads} query heads are not a multiple of {num_kv} KV heads")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        _fail(f"q, k_cache, v_cache must share one of float32/bfloat16/float16, got "
              f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        _fail(f"out must be {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    qsl, ctx, table = meta.query_start_loc, meta.context_lens, meta.block_tables
    num_seqs = ctx.numel()
    if qsl.dtype != torch.int32 or ctx.dtype != torch.int32:
        _fail(f"query_start_loc and context_lens must be int32, got {qsl.dtype}, {ctx.dtype}")
    if table.dtype not in (torch.int32, torch.int64) or table.dim() != 2:
        _fail(f"block_tables must be int32 or int64 [B, max_blocks], got {table.dtype} "
              f"{tuple(table.shape)}")
    if ctx.dim() != 1 or qsl.shape != (num_seqs + 1,) or table.shape[0] != num_seqs:
        _fail(f"query_start_loc {tuple(qsl.shape)}, context_lens {tuple(ctx.shape)} and "
              f"block_tables {tuple(table.shape)} disagree on the number of sequences")
    if (qsl.numel() > 1 and qsl.stride(0) != 1) or (ctx.numel() > 1 and ctx.stride(0) != 1):
        _fail("query_start_loc and context_lens must be contiguous")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "query_start_loc": qsl,
               "context_lens": ctx, "block_tables": table}
    if out is not None:
        tensors["out"] = out
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        _fail(f"all tensors must be on one device, got {devices}")
    if q.device.type != "cuda" and not _INTERPRET:
        _fail(f"needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported), "
              f"got {q.device}")
    if qsl.device.type != "cpu" or num_seqs == 0:
        return
    starts = qsl.tolist()
    q_lens = [b - a for a, b in pairwise(starts)]
    if starts[0] != 0 or starts[-1] != num_tokens:
        _fail(f"query_start_loc must run from 0 to T = {num_tokens}, got {starts[0]}.."
              f"{starts[-1]}")
    for b, (q_len, ctx_len) in enumerate(zip(q_lens, ctx.tolist())):
        if not 1 <= q_len <= ctx_len:
            _fail(f"sequence {b}: need 1 <= query_len ({q_len}) <= context_len ({ctx_len})")
        used = -(-ctx_len // block_size)
        if used > table.shape[1]:
            _fail(f"sequence {b}: {ctx_len} positions need {used} blocks, block_tables has "
                  f"{table.shape[1]}")
        blocks = table[b, :used]
        if bool(((blocks < 0) | (blocks >= num_blocks)).any()):
            _fail(f"sequence {b}: block ids must lie in [0, {num_blocks}), got "
                  f"{blocks.tolist()}")


def _config(q: torch.Tensor, meta: AttentionMetadata, group: int,
            config: AttentionConfig | None, device_name: str | None = None) -> AttentionConfig:
    """`config`, else the tuned entry for this GPU (device_name: q's device's, read when
    None), else the heuristic; checked against group."""
    if config is None:
        head_dim = q.shape[2]
        name = device_name or (torch.cuda.get_device_name(q.device)
                               if q.device.type == "cuda" else "cpu")
        regime: Regime = "decode" if meta.max_query_len == 1 else "prefill"
        tuned = TUNED_CONFIGS.get(name, {}).get((regime, head_dim))
        config = tuned or attention_heuristic(meta.max_query_len, group, head_dim, q.dtype)
    if config.block_m < group:
        _fail(f"block_m {config.block_m} < GQA group {group}")
    return config


def _precision(dtype: torch.dtype) -> str:
    # Float32 callers asked for full precision: tf32 alone costs ~1e-3 relative error, three
    # tf32 products recover float32's on the tensor cores ("ieee" spills registers at D = 128).
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _launch_tiles(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float, out: torch.Tensor,
                  config: AttentionConfig) -> None:
    """The unsplit kernel over every row of the step (arguments already checked)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    num_seqs = meta.context_lens.numel()
    group = num_heads // num_kv
    block_q = config.block_m // group
    table = meta.block_tables
    grid = (num_tokens // block_q + num_seqs, num_kv)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, meta.query_start_loc, meta.context_lens, table,
        num_seqs, k_cache.shape[1], scale * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        table.stride(0), table.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_Q=block_q,
        BLOCK_N=config.block_n, UPCAST=_INTERPRET, PRECISION=_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, *,
                           out: torch.Tensor | None = None,
                           config: AttentionConfig | None = None) -> torch.Tensor:
    """out[t, h] = softmax(q[t, h] K_b^T * scale, causal) V_b, K_b/V_b = kv head h // (nH // nKV).

    q [T, nH, D]; k_cache, v_cache [NB, bs, nKV, D]; meta: query_start_loc int32 [B+1],
    context_lens int32 [B], block_tables int32 [B, max_blocks], max_query_len (launch
    heuristic only); out [T, nH, D] (allocated when None); config overrides the launch.
    Returns out. Never splits a context: `PagedAttention` does, for decode-only steps.
    """
    _check(q, k_cache, v_cache, meta, out)
    if out is None:
        out = torch.empty_like(q)
    if q.shape[0] == 0 or meta.context_lens.numel() == 0:
        return out
    config = _config(q, meta, q.shape[1] // k_cache.shape[2], config)
    _launch_tiles(q, k_cache, v_cache, meta, scale, out, config)
    return out


class PagedAttention:
    """`paged_attention_triton` plus split-KV decodes, with the split scratch allocated once.

    Invariants: the float32 scratch is allocated here, at its largest (the most slots any batch
    of 1..max_num_seqs decodes uses), and never again, so every call launches into the same
    memory; the split count and both grids depend on the number of sequences (a shape) and on
    what the constructor fixed, never on context lengths, so a CUDA graph captured at one
    batch size replays for every context. Splits apply to decode-only steps (max_query_len 1)
    whose B * nKV programs leave SMs idle (`decode_splits`); other steps take the unsplit
    kernel. Scratch of a split whose context chunk is empty is neither written nor read.
    """

    def __init__(self, max_num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 max_model_len: int, device: torch.device, *, sm_count: int | None = None,
                 min_split_len: int = MIN_SPLIT_LEN) -> None:
        """sm_count: the device's SMs when None (1 on the CPU, which then never splits)."""
        if min(max_num_seqs, num_heads, num_kv_heads, head_dim, max_model_len) < 1:
            _fail("max_num_seqs, heads, head_dim and max_model_len must be positive")
        if num_heads % num_kv_heads:
            _fail(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        cuda = device.type == "cuda"
        if sm_count is None:
            sm_count = (torch.cuda.get_device_properties(device).multi_processor_count
                        if cuda else 1)
        self.device_name = torch.cuda.get_device_name(device) if cuda else "cpu"  # read once
        self.max_num_seqs = max_num_seqs
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sm_count = sm_count
        # splits[b - 1]: the split count of a decode-only step of b sequences.
        self.splits = tuple(decode_splits(b, num_kv_heads, sm_count, max_model_len,
                                          min_split_len) for b in range(1, max_num_seqs + 1))
        slots = max((b * num_heads * s for b, s in enumerate(self.splits, 1) if s > 1), default=0)
        f32 = {"dtype": torch.float32, "device": device}
        self.part_max = torch.empty(slots, **f32)  # [slots] flat [B, nH, S], S splits
        self.part_sum = torch.empty(slots, **f32)  # [slots]
        self.part_acc = torch.empty(slots, head_dim, **f32)  # [slots, D]

    def num_splits(self, num_seqs: int, max_query_len: int) -> int:
        """KV splits a step of num_seqs sequences takes: > 1 only when every row is a decode."""
        if max_query_len != 1 or not 1 <= num_seqs <= self.max_num_seqs:
            return 1
        return self.splits[num_seqs - 1]

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata, scale: float, *, out: torch.Tensor | None = None,
                 config: AttentionConfig | None = None) -> torch.Tensor:
        """As `paged_attention_triton` (same arguments and result); q [T, nH, D] and the caches
        [NB, bs, nKV, D] must have the nH, nKV, D given to the constructor, B <= max_num_seqs."""
        _check(q, k_cache, v_cache, meta, out)
        num_seqs = meta.context_lens.numel()
        shape = (self.num_heads, self.num_kv_heads, self.head_dim)
        if (q.shape[1], k_cache.shape[2], q.shape[2]) != shape:
            _fail(f"built for (nH, nKV, D) = {shape}, got q {tuple(q.shape)} and k_cache "
                  f"{tuple(k_cache.shape)}")
        if num_seqs > self.max_num_seqs:
            _fail(f"{num_seqs} sequences, built for at most {self.max_num_seqs}")
        splits = self.num_splits(num_seqs, meta.max_query_len)
        if splits > 1 and q.shape[0] != num_seqs:
            _fail(f"max_query_len 1 needs one query row per sequence, got {q.shape[0]} rows for "
                  f"{num_seqs} sequences")
        if out is None:
            out = torch.empty_like(q)
        if q.shape[0] == 0 or num_seqs == 0:
            return out
        config = _config(q, meta, self.num_heads // self.num_kv_heads, config,
                         self.device_name)
        if splits == 1:
            _launch_tiles(q, k_cache, v_cache, meta, scale, out, config)
        else:
            self._launch_split(q, k_cache, v_cache, meta, scale, out, config, splits)
        return out

    def _launch_split(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float, out: torch.Tensor,
                      config: AttentionConfig, splits: int) -> None:
        num_seqs, num_heads, head_dim = q.shape
        num_kv = k_cache.shape[2]
        table = meta.block_tables
        _paged_attention_split_kernel[(num_seqs, num_kv, splits)](
            q, k_cache, v_cache, self.part_max, self.part_sum, self.part_acc,
            meta.context_lens, table, num_heads, splits, k_cache.shape[1],
            scale * math.log2(math.e),
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
            table.stride(0), table.stride(1),
            GROUP=num_heads // num_kv, HEAD_DIM=head_dim, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, UPCAST=_INTERPRET,
            PRECISION=_precision(q.dtype), num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
        _split_reduce_kernel[(num_seqs, num_heads)](
            self.part_max, self.part_sum, self.part_acc, out, meta.context_lens, num_heads,
            splits, out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim, BLOCK_N=config.block_n, BLOCK_S=MAX_SPLITS,
            num_warps=REDUCE_WARPS,
        )  # fmt: skip


# The name engine.engine._attention_backend imports on CUDA.
paged_attention = paged_attention_triton
