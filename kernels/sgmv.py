"""SGMV shrink and expand as Triton kernels: raw launches, and checked entry points.

launch_shrink / launch_expand launch with a given config and check nothing (launch.py's
SgmvLauncher calls them with configs fixed at construction); sgmv_shrink_triton /
sgmv_expand_triton check their arguments and pick the config per call.

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

Alignment. Pool offsets are multiples of OFFSET_ALIGN elements (checks.py), and Triton marks
int arguments divisible by 16 on its own (H, O, strides of real models), so rows of A_k load
as 16-byte vectors (cp.async). Rows of B_k are `rank` elements long and rank is data: the
expand kernel branches once per program on rank % 8 == 0 into a copy of its loop that the
compiler may vectorise, and other ranks take scalar loads.

Loads are cast to float32 before tl.dot under the interpreter (which gets bf16/fp16 arithmetic
wrong) or when the two operands' dtypes differ; on a GPU, bf16/fp16 go to the tensor cores as
they are. The accumulator is always float32.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from loramux.kernels.checks import OFFSET_ALIGN as _OFFSET_ALIGN
from loramux.kernels.checks import check_expand, check_shrink
from loramux.kernels.sgmv_config import (
    ExpandConfig,
    Op,
    ShapeKey,
    ShrinkConfig,
    TunedTable,
    batch_bucket,
    dtype_name,
    rank_bucket,
    regime_of,
)

if TYPE_CHECKING:
    from loramux.kernels.compile_check import KernelVariant

# Read once: @triton.jit fixed compiled-vs-interpreted mode when this module was imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# What the kernels may assume of every pool offset (checks.py states and checks it).
OFFSET_ALIGN = tl.constexpr(_OFFSET_ALIGN)

# Loaded once; anything it lacks for this GPU falls back to the heuristics (sgmv_config.py).
TUNED_TABLE = TunedTable.load()


def device_info(device: torch.device) -> tuple[str, int]:
    """(name, SM count) of a CUDA device; the interpreter gets one "SM" so it never splits."""
    if device.type != "cuda":
        return "cpu", 1
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def shape_key(op: Op, rows: int, segments: int, features: int, max_rank: int,
              pool_dtype: torch.dtype) -> ShapeKey:
    """The tuned-table key of one call (features: H for shrink, O for expand)."""
    regime = regime_of(rows, segments)
    return ShapeKey(op, regime, features, rank_bucket(max_rank),
                    batch_bucket(regime, rows, segments), dtype_name(pool_dtype))


def seg_block(segments: int) -> int:
    """SEG_BLOCK: the lanes that scan seg_starts, a power of two >= segments (and >= 16)."""
    return max(16, int(triton.next_power_of_2(segments)))


def dot_modes(a: torch.dtype, b: torch.dtype, *,
              interpret: bool = _INTERPRET) -> tuple[bool, str]:
    """(upcast operands to float32, tl.dot input precision) for operand dtypes a and b."""
    upcast = interpret or a != b
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
    # int64: A_k's first element in the pool, a multiple of OFFSET_ALIGN (the pool's packing
    # guarantees it), so rows of A_k start 16-byte aligned when H is a multiple of 16.
    a_offset = tl.multiple_of(tl.load(a_offsets_ptr + slot), OFFSET_ALIGN)

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


@triton.jit(do_not_specialize=["num_splits"])
def _sgmv_shrink_reduce_kernel(
    partial_ptr,  # float32 [num_splits, T, R_max], contiguous
    ranks_ptr,  # int32 [S]
    seg_starts_ptr,  # int32 [N + 1]
    seg_slots_ptr,  # int32 [N]
    out_ptr,  # [T, R_max]
    num_rows,
    max_rank,
    num_segs,
    stride_out_row,
    stride_out_col,
    num_splits,  # SPLIT_K of the shrink launch: read at run time, one compiled reduce for all
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SEG_BLOCK: tl.constexpr,
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
    for s in range(num_splits):
        # partial[s, t, r] sits at (s * T + t) * R_max + r.
        split_rows = s * num_rows + rows
        acc += tl.load(partial_ptr + split_rows[:, None] * max_rank + r[None, :], mask=mask,
                       other=0.0)
    out_ptrs = out_ptr + rows[:, None] * stride_out_row + r[None, :] * stride_out_col
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expand_tile(v_ptr, b_ptr, rows, row_mask, cols, col_mask, rank, max_rank, stride_v_row,
                 stride_v_col, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_R: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """v[rows, :rank] @ B_k[cols, :rank].T, accumulated in float32: [BLOCK_M, BLOCK_N]."""
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
        # B_k is row-major [O, rank]: B_k[o, r] sits at b_ptr + o * rank + r. Loaded
        # transposed, so consecutive r (contiguous in memory) run down the tile.
        b_tile = tl.load(  # [BLOCK_R, BLOCK_N] = B_k[o, r].T
            b_ptr + cols[None, :] * rank + r[:, None],
            mask=r_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            v_tile = v_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(v_tile, b_tile, acc, input_precision=PRECISION)
    return acc


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
    # int64: B_k's first element in the pool, a multiple of OFFSET_ALIGN (see shrink).
    b_offset = tl.multiple_of(tl.load(b_offsets_ptr + slot), OFFSET_ALIGN)

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)  # rows * stride can pass 2**31 for long prefills
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < out_features

    b_ptr = b_pool_ptr + b_offset  # B_k
    if rank % 8 == 0:
        # (rank >> 3) << 3 is rank here, and the compiler can see it is a multiple of 8: rows
        # of B_k then start 16-byte aligned and the tile loads vectorise. Any other rank takes
        # the scalar loads below (a hint on rank itself would mark every use of it).
        acc = _expand_tile(v_ptr, b_ptr, rows, row_mask, cols, col_mask, (rank >> 3) << 3,
                           max_rank, stride_v_row, stride_v_col, BLOCK_M, BLOCK_N, BLOCK_R,
                           UPCAST, PRECISION)
    else:
        acc = _expand_tile(v_ptr, b_ptr, rows, row_mask, cols, col_mask, rank, max_rank,
                           stride_v_row, stride_v_col, BLOCK_M, BLOCK_N, BLOCK_R, UPCAST,
                           PRECISION)

    # out[t, o] sits at t * stride_out_row + o * stride_out_col.
    out_ptrs = out_ptr + rows[:, None] * stride_out_row + cols[None, :] * stride_out_col
    mask = row_mask[:, None] & col_mask[None, :]
    before = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (before + scale * acc).to(out_ptr.dtype.element_ty), mask=mask)


def launch_shrink(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    a_offsets: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
    partial: torch.Tensor,
    config: ShrinkConfig,
    segments_block: int,
    upcast: bool,
    precision: str,
) -> None:
    """The shrink launch alone, nothing checked (see sgmv_shrink_triton for the semantics).

    partial: float32, >= split_k * T * R_max elements when config.split_k > 1, else unused;
    segments_block: seg_block(N) or more. Allocates nothing and never syncs: capturable.
    """
    rows, hidden = x.shape
    max_rank, segments = out.shape[1], seg_slots.shape[0]
    split_k = config.split_k
    k_per_split = triton.cdiv(triton.cdiv(hidden, split_k), config.block_k) * config.block_k
    grid = (triton.cdiv(rows, config.block_m) + segments, triton.cdiv(max_rank, config.block_r),
            split_k)
    _sgmv_shrink_kernel[grid](
        x, a_pool, a_offsets, ranks, seg_starts, seg_slots, out, partial,
        rows, hidden, max_rank, segments, k_per_split,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_R=config.block_r, BLOCK_K=config.block_k,
        SEG_BLOCK=segments_block, SPLIT_K=split_k, UPCAST=upcast, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split_k > 1:
        _sgmv_shrink_reduce_kernel[grid[:2]](
            partial, ranks, seg_starts, seg_slots, out,
            rows, max_rank, segments, out.stride(0), out.stride(1), split_k,
            BLOCK_M=config.block_m, BLOCK_R=config.block_r, SEG_BLOCK=segments_block,
            num_warps=config.num_warps,
        )  # fmt: skip


def launch_expand(
    v: torch.Tensor,
    b_pool: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
    config: ExpandConfig,
    segments_block: int,
    upcast: bool,
    precision: str,
) -> None:
    """The expand launch alone, nothing checked (see sgmv_expand_triton for the semantics)."""
    rows, max_rank = v.shape
    out_features, segments = out.shape[1], seg_slots.shape[0]
    grid = (triton.cdiv(rows, config.block_m) + segments, triton.cdiv(out_features,
                                                                      config.block_n))
    _sgmv_expand_kernel[grid](
        v, b_pool, b_offsets, ranks, scales, seg_starts, seg_slots, out,
        out_features, max_rank, segments,
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=config.block_r,
        SEG_BLOCK=segments_block, UPCAST=upcast, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


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
    Checks its arguments and allocates split-K partials per call; the engine's hot path uses
    launch.SgmvLauncher instead.
    """
    dims = check_shrink(x, a_pool, a_offsets, ranks, seg_starts, seg_slots, out)
    _check_launchable("sgmv_shrink", x)
    if dims.rows == 0 or dims.segments == 0 or dims.outer == 0 or dims.inner == 0:
        return out  # nothing to write (an empty hidden dimension leaves out untouched too)
    if config is None:
        name, num_sms = device_info(x.device)
        key = shape_key("shrink", dims.rows, dims.segments, dims.inner, dims.outer,
                        a_pool.dtype)
        tuned = TUNED_TABLE.choose(name, key, num_sms)
        assert isinstance(tuned, ShrinkConfig)
        config = tuned
    # float32 partial sums, only when split; every (split, row, rank) read back is written.
    partial = (
        torch.empty(config.split_k * dims.rows * dims.outer, dtype=torch.float32,
                    device=x.device)
        if config.split_k > 1
        else out
    )
    upcast, precision = dot_modes(x.dtype, a_pool.dtype)
    launch_shrink(x, a_pool, a_offsets, ranks, seg_starts, seg_slots, out, partial, config,
                  seg_block(dims.segments), upcast, precision)
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
        name, num_sms = device_info(v.device)
        key = shape_key("expand", dims.rows, dims.segments, dims.outer, dims.inner,
                        b_pool.dtype)
        tuned = TUNED_TABLE.choose(name, key, num_sms)
        assert isinstance(tuned, ExpandConfig)
        config = tuned
    upcast, precision = dot_modes(v.dtype, b_pool.dtype)
    launch_expand(v, b_pool, b_offsets, ranks, scales, seg_starts, seg_slots, out, config,
                  seg_block(dims.segments), upcast, precision)
    return out


# Launch arguments of a representative call, as compile_check specialises them: a row and
# segment count that are not multiples of 16, the model's sizes as they are.
_SOME_ROWS, _SOME_SEGMENTS = 1001, 17


def shrink_variants(config: ShrinkConfig, hidden: int, max_rank: int, x_dtype: torch.dtype,
                    v_dtype: torch.dtype, segments_block: int, arch: int) -> list[KernelVariant]:
    """The kernels a GPU shrink launch with these parameters compiles (see compile_check).

    Parameters are a launch's: config, H, R_max (v's width), x's (and the pool's) dtype, v's
    dtype, SEG_BLOCK, and the target sm_<arch>.
    """
    from loramux.kernels.compile_check import KernelVariant

    upcast, precision = dot_modes(x_dtype, x_dtype, interpret=False)
    split_k = config.split_k
    k_per_split = triton.cdiv(triton.cdiv(hidden, split_k), config.block_k) * config.block_k
    common = {"ranks_ptr": torch.int32, "seg_starts_ptr": torch.int32,
              "seg_slots_ptr": torch.int32, "out_ptr": v_dtype, "max_rank": max_rank,
              "num_rows": _SOME_ROWS, "num_segs": _SOME_SEGMENTS, "stride_out_row": max_rank,
              "stride_out_col": 1, "BLOCK_M": config.block_m, "BLOCK_R": config.block_r,
              "SEG_BLOCK": segments_block, "SPLIT_K": split_k}
    shrink = {**common, "x_ptr": x_dtype, "a_pool_ptr": x_dtype, "a_offsets_ptr": torch.int64,
              "partial_ptr": torch.float32, "hidden": hidden, "k_per_split": k_per_split,
              "stride_x_row": hidden, "stride_x_col": 1, "BLOCK_K": config.block_k,
              "UPCAST": upcast, "PRECISION": precision}
    if split_k > 1:
        # The shrink kernel reads SPLIT_K only as SPLIT_K == 1 and then never writes out, so
        # every split compiles the same code as 2 with any out dtype: one variant for all.
        shrink.update(SPLIT_K=2, out_ptr=torch.float32)
    options = {"arch": arch, "num_warps": config.num_warps}
    variants = [KernelVariant.of(_sgmv_shrink_kernel, shrink, num_stages=config.num_stages,
                                 **options)]
    if split_k > 1:
        reduce = {key: value for key, value in common.items() if key != "SPLIT_K"}
        # num_splits is not specialised (do_not_specialize): one reduce for every split count.
        reduce.update(partial_ptr=torch.float32, num_splits=2)
        variants.append(KernelVariant.of(_sgmv_shrink_reduce_kernel, reduce, **options))
    return variants


def expand_variants(config: ExpandConfig, out_features: int, max_rank: int,
                    v_dtype: torch.dtype, pool_dtype: torch.dtype, segments_block: int,
                    arch: int) -> list[KernelVariant]:
    """The kernel a GPU expand launch with these parameters compiles (see compile_check).

    out's dtype is the pool's (the model's): it is read and written once per element.
    """
    from loramux.kernels.compile_check import KernelVariant

    upcast, precision = dot_modes(v_dtype, pool_dtype, interpret=False)
    args = {"v_ptr": v_dtype, "b_pool_ptr": pool_dtype, "b_offsets_ptr": torch.int64,
            "ranks_ptr": torch.int32, "scales_ptr": torch.float32,
            "seg_starts_ptr": torch.int32, "seg_slots_ptr": torch.int32,
            "out_ptr": pool_dtype, "out_features": out_features, "max_rank": max_rank,
            "num_segs": _SOME_SEGMENTS, "stride_v_row": max_rank, "stride_v_col": 1,
            "stride_out_row": out_features, "stride_out_col": 1, "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n, "BLOCK_R": config.block_r, "SEG_BLOCK": segments_block,
            "UPCAST": upcast, "PRECISION": precision}
    return [KernelVariant.of(_sgmv_expand_kernel, args, arch=arch, num_warps=config.num_warps,
                             num_stages=config.num_stages)]
