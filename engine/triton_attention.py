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
    compiled kernel): float32 tiles are twice the bytes, so at D = 128 they stay 16 x 16.
    """
    group_rows = triton.next_power_of_2(group)
    block_m = max(16, group_rows, min(triton.next_power_of_2(max_query_len * group), 64))
    block_n = 32 if max_query_len == 1 or head_dim > 64 else 64
    if dtype == torch.float32 and head_dim > 64:
        block_m, block_n = max(16, group_rows), 16
    return AttentionConfig(block_m=block_m, block_n=block_n, num_warps=4 if block_m <= 32 else 8)


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
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    kv_head_off = kv_head.to(tl.int64)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max (base 2)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for start in range(0, kv_end, BLOCK_N):
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
        # Padding rows see only -inf; 0 keeps exp2(-inf - m_new) at 0 instead of NaN. A live
        # row always sees position 0 in its first tile, so its max is finite from then on.
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

    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    # out[t, h, d] sits at t * stride_o_t + h * stride_o_h + d * stride_o_d.
    out_ptrs = (out_ptr + rows[:, None] * stride_o_t + heads[:, None] * stride_o_h
                + d[None, :] * stride_o_d)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


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


def _config(q: torch.Tensor, meta: AttentionMetadata, group: int) -> AttentionConfig:
    head_dim = q.shape[2]
    name = torch.cuda.get_device_name(q.device) if q.device.type == "cuda" else "cpu"
    regime: Regime = "decode" if meta.max_query_len == 1 else "prefill"
    tuned = TUNED_CONFIGS.get(name, {}).get((regime, head_dim))
    return tuned or attention_heuristic(meta.max_query_len, group, head_dim, q.dtype)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, *,
                           out: torch.Tensor | None = None,
                           config: AttentionConfig | None = None) -> torch.Tensor:
    """out[t, h] = softmax(q[t, h] K_b^T * scale, causal) V_b, K_b/V_b = kv head h // (nH // nKV).

    q [T, nH, D]; k_cache, v_cache [NB, bs, nKV, D]; meta: query_start_loc int32 [B+1],
    context_lens int32 [B], block_tables int32 [B, max_blocks], max_query_len (launch
    heuristic only); out [T, nH, D] (allocated when None); config overrides the launch.
    Returns out.
    """
    _check(q, k_cache, v_cache, meta, out)
    if out is None:
        out = torch.empty_like(q)
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    num_seqs = meta.context_lens.numel()
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv
    config = config or _config(q, meta, group)
    if config.block_m < group:
        raise ValueError(f"paged_attention_triton: block_m {config.block_m} < GQA group {group}")
    block_q = config.block_m // group
    # Float32 callers asked for full precision: tf32 alone costs ~1e-3 relative error, three
    # tf32 products recover float32's on the tensor cores ("ieee" spills registers at D = 128).
    precision = "tf32x3" if q.dtype == torch.float32 else "tf32"
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
        BLOCK_N=config.block_n, UPCAST=_INTERPRET, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


# The name engine.engine._attention_backend imports on CUDA.
paged_attention = paged_attention_triton
