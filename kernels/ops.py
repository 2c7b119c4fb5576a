"""The kernels' public entry points: `sgmv_shrink` and `sgmv_expand`, on any device.

Each checks its arguments and dispatches to the Triton kernels (sgmv.py) for CUDA tensors, or
to plain torch (torch_ops.py) for CPU tensors; reference.py is the specification both match.
"""

from __future__ import annotations

from typing import Literal

import torch
from loramux.kernels.checks import check_expand, check_shrink
from loramux.kernels.torch_ops import sgmv_expand_torch, sgmv_shrink_torch

__all__ = [
    "Backend",
    "sgmv_expand",
    "sgmv_shrink",
]

# "auto": Triton for CUDA tensors, torch for CPU tensors; "triton": force Triton (CPU tensors
# need TRITON_INTERPRET=1); "torch": the reference semantics in plain torch, on any device.
Backend = Literal["auto", "triton", "torch"]


def _use_triton(backend: Backend, t: torch.Tensor) -> bool:
    if backend == "auto":
        return t.device.type == "cuda"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend == "triton"


def sgmv_shrink(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    a_offsets: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """out[t, :ranks[k]] = x[t] @ A_k.T for every row t of a segment with slot k >= 0.

    x [T, H]; a_pool [P] (x's dtype; A_k is row-major [ranks[k], H] at a_offsets[k]);
    a_offsets int64 [S]; ranks int32 [S]; seg_starts int32 [N+1]; seg_slots int32 [N]
    (-1: no adapter); out [T, R_max]. Nothing else in out is written. Returns out.
    """
    if _use_triton(backend, x):
        # Imported here so that importing loramux.kernels never imports triton.
        from loramux.kernels.sgmv import sgmv_shrink_triton

        return sgmv_shrink_triton(x, a_pool, a_offsets, ranks, seg_starts, seg_slots, out)
    check_shrink(x, a_pool, a_offsets, ranks, seg_starts, seg_slots, out)
    return sgmv_shrink_torch(x, a_pool, a_offsets, ranks, seg_starts, seg_slots, out)


def sgmv_expand(
    v: torch.Tensor,
    b_pool: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """out[t] += scales[k] * v[t, :ranks[k]] @ B_k.T for every row t of a segment with slot k >= 0.

    v [T, R_max] (b_pool's dtype or float32); b_pool [P] (B_k is row-major [O, ranks[k]] at
    b_offsets[k]); b_offsets int64 [S]; ranks int32 [S]; scales float32 [S];
    seg_starts int32 [N+1]; seg_slots int32 [N] (-1: no adapter); out [T, O]. Returns out.
    """
    if _use_triton(backend, v):
        from loramux.kernels.sgmv import sgmv_expand_triton

        return sgmv_expand_triton(v, b_pool, b_offsets, ranks, scales, seg_starts, seg_slots, out)
    check_expand(v, b_pool, b_offsets, ranks, scales, seg_starts, seg_slots, out)
    return sgmv_expand_torch(v, b_pool, b_offsets, ranks, scales, seg_starts, seg_slots, out)
