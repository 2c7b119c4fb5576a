"""SGMV shrink and expand as Triton kernels, with their launchers.

Semantics are those of reference.py. How the work is cut:

* Tiles. Segment n owns cdiv(len_n, BLOCK_M) row tiles, numbered segment after segment. Grid
  axis 0 is an upper bound on the tile count that needs no device data, cdiv(T, BLOCK_M) + N
  (each segment wastes at most one partial tile), and every program finds its own segment
  from seg_starts (a prefix sum over at most a few hundred segments, read from cache). So a
  launch never synchronises with the host and its grid depends only on shapes, which keeps it
  capturable in a CUDA graph. Programs past the last tile, of segments with slot -1, or of
  rank-0 slots return at once.
* Shrink grid: (tiles, rank blocks of BLOCK_R, SPLIT_K). Rank blocks at or past the slot's
  rank return at once, and the last one masks its columns, so work stops at ranks[k]. For
  decode (one short segment per request) the tiles alone are too few to fill the GPU, so
  the hidden dimension is split over SPLIT_K programs that write float32 partial sums; a
  second small kernel adds them up and writes out (deterministic, no atomics).
* Expand grid: (tiles, output blocks of BLOCK_N); the rank loop runs to ranks[k] only.

Loads are cast to float32 before tl.dot under the interpreter (which gets bf16/fp16 arithmetic
wrong) or when the two operands' dtypes differ; on a GPU, bf16/fp16 go to the tensor cores as
they are. The accumulator is always float32.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl
from loramux.kernels.checks import SgmvDims, check_expand, check_shrink

# Read once: @triton.jit fixed compiled-vs-interpreted mode when this module was imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

Regime = Literal["decode", "prefill"]


def _check_block(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")


@dataclass(frozen=True)
class ShrinkConfig:
    """Launch parameters of the shrink kernel (block sizes are powers of two, >= 16 for tl.dot)."""

    block_m: int = 16  # rows per tile
    block_r: int = 16  # rank columns per program
    block_k: int = 128  # hidden elements per loop step
    split_k: int = 1  # programs sharing one tile's hidden dimension (> 1: partial sums)
    num_warps: int = 4

    def __post_init__(self) -> None:
        _check_block("block_m", self.block_m, 16)
        _check_block("block_r", self.block_r, 16)
        _check_block("block_k", self.block_k, 16)
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


@dataclass(frozen=True)
class ExpandConfig:
    """Launch parameters of the expand kernel (block sizes are powers of two, >= 16 for tl.dot)."""

    block_m: int = 16  # rows per tile
    block_n: int = 128  # output columns per program
    block_r: int = 16  # rank elements per loop step
    num_warps: int = 4

    def __post_init__(self) -> None:
        _check_block("block_m", self.block_m, 16)
        _check_block("block_n", self.block_n, 16)
        _check_block("block_r", self.block_r, 16)


# Offline-tuned launch parameters, keyed by torch.cuda.get_device_name() and then by
# (op, regime), op in {"shrink", "expand"}. A tuning script fills it from
# loadtest/benchmark_sgmv.py runs; anything missing falls back to the heuristics below.
TUNED_CONFIGS: Mapping[str, Mapping[tuple[str, Regime], ShrinkConfig | ExpandConfig]] = {}


def regime_of(dims: SgmvDims) -> Regime:
    """decode when segments average at most 4 rows (one tile each, weight traffic dominates)."""
    return "decode" if dims.rows <= 4 * max(dims.segments, 1) else "prefill"


def _rank_block(max_rank: int) -> int:
    # One block covers ranks up to 64, the common case; tl.dot needs at least 16.
    return min(64, max(16, int(triton.next_power_of_2(max_rank))))


def shrink_heuristic(dims: SgmvDims, num_sms: int) -> ShrinkConfig:
    """Default shrink launch: split the hidden dimension until about 2 programs per SM."""
    decode = regime_of(dims) == "decode"
    block_m = 16 if decode else 64
    block_r = _rank_block(dims.outer)
    block_k = 128
    tiles = dims.segments if decode else triton.cdiv(dims.rows, block_m)
    programs = max(tiles, 1) * triton.cdiv(dims.outer, block_r)
    # Prefill reads x once per rank block; float32 partials would add 8 * SPLIT_K * R bytes
    # per row against 2 * H bytes of x, so prefill splits less than decode.
    max_split = min(triton.cdiv(dims.inner, block_k), 16 if decode else 4)
    split_k = 1
    while split_k * 2 <= max_split and programs * split_k < 2 * num_sms:
        split_k *= 2
    return ShrinkConfig(block_m=block_m, block_r=block_r, block_k=block_k, split_k=split_k)


def expand_heuristic(dims: SgmvDims) -> ExpandConfig:
    """Default expand launch: output blocks alone give enough programs (O is in the thousands)."""
    decode = regime_of(dims) == "decode"
    return ExpandConfig(block_m=16 if decode else 64, block_n=128, block_r=_rank_block(dims.inner))


def _device_info(device: torch.device) -> tuple[str, int]:
    """(name, SM count) of a CUDA device; the interpreter gets one "SM" so it never splits."""
    if device.type != "cuda":
        return "cpu", 1
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def _seg_block(segments: int) -> int:
    return max(16, int(triton.next_power_of_2(segments)))


def _dot_modes(a: torch.dtype, b: torch.dtype) -> tuple[bool, str]:
    """(upcast operands to float32, tl.dot input precision) for operand dtypes a and b."""
    upcast = _INTERPRET or a != b
    # float32 callers asked for full precision; an upcast bf16/fp16 operand is exact in tf32.
    precision = "ieee" if a == b == torch.float32 else "tf32"
    return upcast, precision


def _check_launchable(op: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not _INTERPRET:
        raise ValueError(
            f"{op}: the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"triton is imported), got {t.device}"
        )


@triton.jit
def _tile_rows(seg_starts_ptr, num_segs, tile, BLOCK_M: tl.constexpr, SEG_BLOCK: tl.constexpr):
    """Segment of the tile-th row tile and its rows [row_start, row_end).

    Returns seg >= num_segs for tiles past the last one (the grid is an upper bound).
    """
    n = tl.arange(0, SEG_BLOCK)
    valid = n < num_segs
    starts = tl.load(seg_starts_ptr + n, mask=valid, other=0)  # seg_starts[n]
    ends = tl.load(seg_starts_ptr + n + 1, mask=valid, other=0)  # seg_starts[n + 1]
    tiles = (tl.maximum(ends - starts, 0) + BLOCK_M - 1) // BLOCK_M  # 0 for empty/padding
    tiles_through = tl.cumsum(tiles, axis=0)  # tiles of segments 0..n
    # Segments whose tiles all come before this one; padding lanes count only past the end.
    seg = tl.sum((tiles_through <= tile).to(tl.int32), axis=0)
    first_tile = tl.sum(tl.where(n < seg, tiles, 0), axis=0)
    row_start = tl.sum(tl.where(n == seg, starts, 0), axis=0) + (tile - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(n == seg, ends, 0), axis=0)
    return seg, row_start, row_end


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,  # [T, H]
    a_pool_ptr,  # [P]
    a_offsets_ptr,  # int64 [S]
    ranks_ptr,  # int32 [S]
    seg_starts_ptr,  # int32 [N + 1]
    seg_slots_ptr,  # int32 [N]
    out_ptr,  # [T, R_max]; unused when SPLIT_K > 1
    partial_ptr,  # float32 [SPLIT_K, T, R_max], contiguous; unused when SPLIT_K == 1
    num_rows,
    hidden,
    max_rank,
    num_segs,
    k_per_split,  # hidden elements per split, a multiple of BLOCK_K
    stride_x_row,
    stride_x_col,
    stride_out_row,
    stride_out_col,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg, row_start, row_end = _tile_rows(seg_starts_ptr, num_segs, tl.program_id(0), BLOCK_M,
                                         SEG_BLOCK)
    if seg >= num_segs:
        return
    slot = tl.load(seg_slots_ptr + seg)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    r_start = tl.program_id(1) * BLOCK_R
    if r_start >= rank:
        return
    a_offset = tl.load(a_offsets_ptr + slot)  # int64: A_k's first element in the pool

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)  # rows * stride can pass 2**31 for long prefills
    r = r_start + tl.arange(0, BLOCK_R)
    r_mask = (r < rank) & (r < max_rank)
    k_start = tl.program_id(2) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, hidden)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        h = k + tl.arange(0, BLOCK_K)
        h_mask = h < k_end
        # x[t, h] sits at t * stride_x_row + h * stride_x_col.
        x_tile = tl.load(  # [BLOCK_M, BLOCK_K]
            x_ptr + rows[:, None] * stride_x_row + h[None, :] * stride_x_col,
            mask=row_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        # A_k is row-major [rank, H]: A_k[r, h] sits at a_offset + r * H + h. Loaded
        # transposed, so consecutive h (contiguous in memory) run down the tile.
        a_tile = tl.load(  # [BLOCK_K, BLOCK_R] = A_k[r, h].T
            a_pool_ptr + a_offset + r[None, :] * hidden + h[:, None],
            mask=h_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            x_tile = x_tile.to(tl.float32)
            a_tile = a_tile.to(tl.float32)
        acc = tl.dot(x_tile, a_tile, acc, input_precision=PRECISION)

    mask = row_mask[:, None] & r_mask[None, :]
    if SPLIT_K == 1:
        # out[t, r] sits at t * stride_out_row + r * stride_out_col.
        out_ptrs = out_ptr + rows[:, None] * stride_out_row + r[None, :] * stride_out_col
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # partial[s, t, r] sits at (s * T + t) * R_max + r.
        split_rows = tl.program_id(2) * num_rows + rows
        tl.store(partial_ptr + split_rows[:, None] * max_rank + r[None, :], acc, mask=mask)


@triton.jit
def _sgmv_shrink_reduce_kernel(
    partial_ptr,  # float32 [SPLIT_K, T, R_max], contiguous
    ranks_ptr,  # int32 [S]
    seg_starts_ptr,  # int32 [N + 1]
    seg_slots_ptr,  # int32 [N]
    out_ptr,  # [T, R_max]
    num_rows,
    max_rank,
    num_segs,
    stride_out_row,
    stride_out_col,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    # Same tiles and early exits as the shrink kernel, so it reads exactly what was written.
    seg, row_start, row_end = _tile_rows(seg_starts_ptr, num_segs, tl.program_id(0), BLOCK_M,
                                         SEG_BLOCK)
    if seg >= num_segs:
        return
    slot = tl.load(seg_slots_ptr + seg)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    r_start = tl.program_id(1) * BLOCK_R
    if r_start >= rank:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)
    r = r_start + tl.arange(0, BLOCK_R)
    mask = row_mask[:, None] & ((r < rank) & (r < max_rank))[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        # partial[s, t, r] sits at (s * T + t) * R_max + r.
        split_rows = s * num_rows + rows
        acc += tl.load(partial_ptr + split_rows[:, None] * max_rank + r[None, :], mask=mask,
                       other=0.0)
    out_ptrs = out_ptr + rows[:, None] * stride_out_row + r[None, :] * stride_out_col
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sgmv_expand_kernel(
    v_ptr,  # [T, R_max]
    b_pool_ptr,  # [P]
    b_offsets_ptr,  # int64 [S]
    ranks_ptr,  # int32 [S]
    scales_ptr,  # float32 [S]
    seg_starts_ptr,  # int32 [N + 1]
    seg_slots_ptr,  # int32 [N]
    out_ptr,  # [T, O]
    out_features,
    max_rank,
    num_segs,
    stride_v_row,
    stride_v_col,
    stride_out_row,
    stride_out_col,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seg, row_start, row_end = _tile_rows(seg_starts_ptr, num_segs, tl.program_id(0), BLOCK_M,
                                         SEG_BLOCK)
    if seg >= num_segs:
        return
    slot = tl.load(seg_slots_ptr + seg)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:  # nothing to add: skip the read-modify-write of out
        return
    scale = tl.load(scales_ptr + slot)
    b_offset = tl.load(b_offsets_ptr + slot)  # int64: B_k's first element in the pool

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)  # rows * stride can pass 2**31 for long prefills
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < out_features

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r_start in range(0, rank, BLOCK_R):
        r = r_start + tl.arange(0, BLOCK_R)
        r_mask = (r < rank) & (r < max_rank)
        # v[t, r] sits at t * stride_v_row + r * stride_v_col; columns >= rank are never read.
        v_tile = tl.load(  # [BLOCK_M, BLOCK_R]
            v_ptr + rows[:, None] * stride_v_row + r[None, :] * stride_v_col,
            mask=row_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        # B_k is row-major [O, rank]: B_k[o, r] sits at b_offset + o * rank + r. Loaded
        # transposed, so consecutive r (contiguous in memory) run down the tile.
        b_tile = tl.load(  # [BLOCK_R, BLOCK_N] = B_k[o, r].T
            b_pool_ptr + b_offset + cols[None, :] * rank + r[:, None],
            mask=r_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            v_tile = v_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(v_tile, b_tile, acc, input_precision=PRECISION)

    # out[t, o] sits at t * stride_out_row + o * stride_out_col.
    out_ptrs = out_ptr + rows[:, None] * stride_out_row + cols[None, :] * stride_out_col
    mask = row_mask[:, None] & col_mask[None, :]
    before = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (before + scale * acc).to(out_ptr.dtype.element_ty), mask=mask)


def sgmv_shrink_triton(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    a_offsets: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
    *,
    config: ShrinkConfig | None = None,
) -> torch.Tensor:
    """out[t, :ranks[k]] = x[t] @ A_k.T for every row t of a segment with slot k >= 0.

    x [T, H]; a_pool [P]; a_offsets int64 [S]; ranks int32 [S]; seg_starts int32 [N+1];
    seg_slots int32 [N]; out [T, R_max]. config overrides the tuned/heuristic launch.
    """
    dims = check_shrink(x, a_pool, a_offsets, ranks, seg_starts, seg_slots, out)
    _check_launchable("sgmv_shrink", x)
    if dims.rows == 0 or dims.segments == 0 or dims.outer == 0 or dims.inner == 0:
        return out  # nothing to write (an empty hidden dimension leaves out untouched too)
    if config is None:
        name, num_sms = _device_info(x.device)
        tuned = TUNED_CONFIGS.get(name, {}).get(("shrink", regime_of(dims)))
        config = tuned if isinstance(tuned, ShrinkConfig) else shrink_heuristic(dims, num_sms)

    rows, hidden, max_rank, segments = dims.rows, dims.inner, dims.outer, dims.segments
    split_k = config.split_k
    # float32 partial sums, only when split; every (split, row, rank) read back is written.
    partial = (
        torch.empty((split_k, rows, max_rank), dtype=torch.float32, device=x.device)
        if split_k > 1
        else out
    )
    k_per_split = triton.cdiv(triton.cdiv(hidden, split_k), config.block_k) * config.block_k
    tiles = triton.cdiv(rows, config.block_m) + segments
    r_blocks = triton.cdiv(max_rank, config.block_r)
    seg_block = _seg_block(segments)
    upcast, precision = _dot_modes(x.dtype, a_pool.dtype)
    _sgmv_shrink_kernel[(tiles, r_blocks, split_k)](
        x, a_pool, a_offsets, ranks, seg_starts, seg_slots, out, partial,
        rows, hidden, max_rank, segments, k_per_split,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
        SEG_BLOCK=seg_block, SPLIT_K=split_k, UPCAST=upcast, PRECISION=precision,
        num_warps=config.num_warps,
    )  # fmt: skip
    if split_k > 1:
        _sgmv_shrink_reduce_kernel[(tiles, r_blocks)](
            partial, ranks, seg_starts, seg_slots, out,
            rows, max_rank, segments, out.stride(0), out.stride(1),
            BLOCK_M=config.block_m, BLOCK_R=config.block_r, SEG_BLOCK=seg_block,
            SPLIT_K=split_k, num_warps=config.num_warps,
        )  # fmt: skip
    return out


def sgmv_expand_triton(
    v: torch.Tensor,
    b_pool: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
    *,
    config: ExpandConfig | None = None,
) -> torch.Tensor:
    """out[t] += scales[k] * v[t, :ranks[k]] @ B_k.T for every row t of a segment with slot k >= 0.

    v [T, R_max]; b_pool [P]; b_offsets int64 [S]; ranks int32 [S]; scales float32 [S];
    seg_starts int32 [N+1]; seg_slots int32 [N]; out [T, O]. config overrides the launch.
    """
    dims = check_expand(v, b_pool, b_offsets, ranks, scales, seg_starts, seg_slots, out)
    _check_launchable("sgmv_expand", v)
    if dims.rows == 0 or dims.segments == 0 or dims.outer == 0 or dims.inner == 0:
        return out  # nothing to add
    if config is None:
        name, _ = _device_info(v.device)
        tuned = TUNED_CONFIGS.get(name, {}).get(("expand", regime_of(dims)))
        config = tuned if isinstance(tuned, ExpandConfig) else expand_heuristic(dims)

    grid = (triton.cdiv(dims.rows, config.block_m) + dims.segments,
            triton.cdiv(dims.outer, config.block_n))
    upcast, precision = _dot_modes(v.dtype, b_pool.dtype)
    _sgmv_expand_kernel[grid](
        v, b_pool, b_offsets, ranks, scales, seg_starts, seg_slots, out,
        dims.outer, dims.inner, dims.segments,
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=config.block_r,
        SEG_BLOCK=_seg_block(dims.segments), UPCAST=upcast, PRECISION=precision,
        num_warps=config.num_warps,
    )  # fmt: skip
    return out
