"""Argument checks shared by every SGMV backend, so bad inputs fail the same way everywhere.

Shapes, dtypes, devices and strides are always checked. Values (segment bounds, slot ids, ranks
against the output width, pool bounds) are checked only when the metadata lives on the CPU:
reading CUDA metadata would synchronise the device on every call, so on CUDA the caller (the
engine, which fills the metadata once per step) is responsible for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import NoReturn

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Every block of a slot with rank > 0 starts at a multiple of this many elements in its pool
# (adapters/host_cache.py packs at multiples of 64). The Triton kernels rely on it to load
# weight rows with 16-byte vector loads; the torch backends do not need it but check it too.
OFFSET_ALIGN = 16


@dataclass(frozen=True)
class SgmvDims:
    """Sizes of one SGMV call: rows T, reduced dimension, output columns, segments N."""

    rows: int  # T
    inner: int  # H for shrink, R_max for expand
    outer: int  # R_max for shrink, O for expand
    segments: int  # N


def _fail(op: str, message: str) -> NoReturn:
    raise ValueError(f"{op}: {message}")


def _check_matrix(op: str, name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        _fail(op, f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_vector(op: str, name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    # The kernels index metadata and pools as ptr + i, so they must be dense 1-D tensors.
    if t.dim() != 1:
        _fail(op, f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        _fail(op, f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() > 1 and t.stride(0) != 1:
        _fail(op, f"{name} must be contiguous, got stride {t.stride(0)}")


def _check_common(
    op: str,
    pool: torch.Tensor,
    offsets_name: str,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    tensors: dict[str, torch.Tensor],
) -> int:
    """Check the pool and the segment metadata; return the number of segments N."""
    if pool.dim() != 1:
        _fail(op, f"pool must be 1-D (flat), got shape {tuple(pool.shape)}")
    if pool.numel() > 1 and pool.stride(0) != 1:
        _fail(op, f"pool must be contiguous, got stride {pool.stride(0)}")
    _check_vector(op, offsets_name, offsets, torch.int64)
    _check_vector(op, "ranks", ranks, torch.int32)
    _check_vector(op, "seg_starts", seg_starts, torch.int32)
    _check_vector(op, "seg_slots", seg_slots, torch.int32)
    if offsets.numel() != ranks.numel():
        _fail(op, f"{offsets_name} has {offsets.numel()} slots but ranks has {ranks.numel()}")
    if seg_starts.numel() != seg_slots.numel() + 1:
        _fail(
            op,
            f"seg_starts must have len(seg_slots) + 1 = {seg_slots.numel() + 1} entries, "
            f"got {seg_starts.numel()}",
        )
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        _fail(op, f"all tensors must be on one device, got {devices}")
    return seg_slots.numel()


def _check_values(
    op: str,
    offsets_name: str,
    offsets: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    rows: int,
    max_rank: int,
    max_rank_name: str,
    elems_per_rank: int,
    pool_size: int,
) -> None:
    """Value checks on CPU metadata (see the module docstring for why not on CUDA)."""
    starts = seg_starts.tolist()
    if starts and (starts[0] < 0 or starts[-1] > rows):
        _fail(op, f"segments must lie within rows 0..{rows}, got {starts[0]}..{starts[-1]}")
    if any(b < a for a, b in pairwise(starts)):
        _fail(op, "seg_starts must be non-decreasing")
    slot_count = ranks.numel()
    used = {k for k in seg_slots.tolist() if k != -1}
    bad = sorted(k for k in used if not 0 <= k < slot_count)
    if bad:
        _fail(op, f"seg_slots must be -1 or in [0, {slot_count}), got {bad}")
    rank_list = ranks.tolist()
    offset_list = offsets.tolist()
    for k in sorted(used):
        rank, offset = rank_list[k], offset_list[k]
        if rank < 0:
            _fail(op, f"ranks[{k}] = {rank} is negative")
        if rank > max_rank:
            _fail(op, f"ranks[{k}] = {rank} exceeds {max_rank_name} = {max_rank}")
        if rank > 0 and offset % OFFSET_ALIGN:
            _fail(op, f"slot {k}: {offsets_name}[{k}] = {offset} is not a multiple of "
                      f"{OFFSET_ALIGN}")
        if rank > 0 and (offset < 0 or offset + rank * elems_per_rank > pool_size):
            _fail(
                op,
                f"slot {k}: block [{offset}, {offset + rank * elems_per_rank}) lies outside "
                f"the pool of {pool_size} elements ({offsets_name}[{k}] = {offset})",
            )


def check_shrink(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    a_offsets: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
) -> SgmvDims:
    """Validate sgmv_shrink arguments (see loramux.kernels.sgmv_shrink); raise ValueError."""
    op = "sgmv_shrink"
    _check_matrix(op, "x", x)
    _check_matrix(op, "out", out)
    if a_pool.dtype != x.dtype:
        _fail(op, f"a_pool must share x's dtype {x.dtype}, got {a_pool.dtype}")
    if out.shape[0] != x.shape[0]:
        _fail(op, f"out has {out.shape[0]} rows but x has {x.shape[0]}")
    tensors = {"x": x, "a_pool": a_pool, "a_offsets": a_offsets, "ranks": ranks,
               "seg_starts": seg_starts, "seg_slots": seg_slots, "out": out}
    segments = _check_common(op, a_pool, "a_offsets", a_offsets, ranks, seg_starts, seg_slots,
                             tensors)
    rows, hidden = x.shape
    max_rank = out.shape[1]
    if seg_starts.device.type == "cpu":
        _check_values(op, "a_offsets", a_offsets, ranks, seg_starts, seg_slots, rows, max_rank,
                      "out.shape[1]", hidden, a_pool.numel())
    return SgmvDims(rows=rows, inner=hidden, outer=max_rank, segments=segments)


def check_expand(
    v: torch.Tensor,
    b_pool: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
) -> SgmvDims:
    """Validate sgmv_expand arguments (see loramux.kernels.sgmv_expand); raise ValueError."""
    op = "sgmv_expand"
    _check_matrix(op, "v", v)
    _check_matrix(op, "out", out)
    # v may stay float32 between shrink and expand (more precise than rounding it to the pool's
    # dtype); any other mix is a caller bug.
    if b_pool.dtype not in FLOAT_DTYPES:
        _fail(op, f"b_pool must be float32, bfloat16 or float16, got {b_pool.dtype}")
    if v.dtype not in (b_pool.dtype, torch.float32):
        _fail(op, f"v must be float32 or b_pool's dtype {b_pool.dtype}, got {v.dtype}")
    if out.shape[0] != v.shape[0]:
        _fail(op, f"out has {out.shape[0]} rows but v has {v.shape[0]}")
    _check_vector(op, "scales", scales, torch.float32)
    tensors = {"v": v, "b_pool": b_pool, "b_offsets": b_offsets, "ranks": ranks,
               "scales": scales, "seg_starts": seg_starts, "seg_slots": seg_slots, "out": out}
    segments = _check_common(op, b_pool, "b_offsets", b_offsets, ranks, seg_starts, seg_slots,
                             tensors)
    if scales.numel() != ranks.numel():
        _fail(op, f"scales has {scales.numel()} slots but ranks has {ranks.numel()}")
    rows, max_rank = v.shape
    out_features = out.shape[1]
    if seg_starts.device.type == "cpu":
        _check_values(op, "b_offsets", b_offsets, ranks, seg_starts, seg_slots, rows, max_rank,
                      "v.shape[1]", out_features, b_pool.numel())
    return SgmvDims(rows=rows, inner=max_rank, outer=out_features, segments=segments)
