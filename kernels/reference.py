"""The torch reference of SGMV shrink/expand. It is the specification: every backend matches it.

Worked example. Three segments over T = 5 rows, two slots in the pools:

    seg_starts = [0, 2, 2, 5]   # segment 0: rows 0-1, segment 1: empty, segment 2: rows 2-4
    seg_slots  = [1, 0, -1]     # segment 0 uses slot 1, segment 2 has no adapter
    ranks      = [8, 4]         # slot 1's A is [4, H] at a_offsets[1] in a_pool

    shrink writes out[0:2, 0:4] = x[0:2] @ A_1.T and nothing else;
    expand adds scales[1] * v[0:2, 0:4] @ B_1.T to out[0:2]; rows 2-4 stay as they were.

Arguments are not validated here; the public entry points in loramux.kernels do that.
"""

from __future__ import annotations

import torch


def sgmv_shrink_ref(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    a_offsets: torch.Tensor,
    ranks: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[t, :ranks[k]] = x[t] @ A_k.T for every row t of a segment with slot k >= 0.

    x [T, H]; a_pool [P]; a_offsets int64 [S]; ranks int32 [S]; seg_starts int32 [N+1];
    seg_slots int32 [N]; out [T, R_max]. Accumulates in float32. Returns out.
    """
    hidden = x.shape[1]
    for n in range(seg_slots.numel()):
        slot = int(seg_slots[n])
        if slot < 0:
            continue
        start, end = int(seg_starts[n]), int(seg_starts[n + 1])
        rank, offset = int(ranks[slot]), int(a_offsets[slot])
        a = a_pool[offset : offset + rank * hidden].view(rank, hidden)  # [r, H], lora_A.weight
        out[start:end, :rank] = x[start:end].float() @ a.float().T  # [rows, r]
    return out


def sgmv_expand_ref(
    v: torch.Tensor,
    b_pool: torch.Tensor,
    b_offsets: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[t] += scales[k] * v[t, :ranks[k]] @ B_k.T for every row t of a segment with slot k >= 0.

    v [T, R_max]; b_pool [P]; b_offsets int64 [S]; ranks int32 [S]; scales float32 [S];
    seg_starts int32 [N+1]; seg_slots int32 [N]; out [T, O]. Accumulates in float32 and
    rounds once into out's dtype. Returns out.
    """
    out_features = out.shape[1]
    for n in range(seg_slots.numel()):
        slot = int(seg_slots[n])
        if slot < 0:
            continue
        start, end = int(seg_starts[n]), int(seg_starts[n + 1])
        rank, offset = int(ranks[slot]), int(b_offsets[slot])
        b = b_pool[offset : offset + out_features * rank].view(out_features, rank)  # [O, r]
        delta = scales[slot].item() * (v[start:end, :rank].float() @ b.float().T)  # [rows, O]
        out[start:end] = (out[start:end].float() + delta).to(out.dtype)
    return out
