"""SGMV in plain torch, organised for speed: the CPU backend the engine runs in its hot loop.

Same semantics as reference.py. On the CPU each torch call costs microseconds whatever its
size, so this file minimises calls, not FLOPs:

* the metadata is read into Python lists once; slot -1, rank-0 slots and empty segments drop out;
* all segments of one slot become one matmul (a slice when contiguous, one gather otherwise);
* slots that own a single row (decode with many distinct adapters) are batched by rank into one
  gather of their weight blocks and one bmm (BGMV), instead of one matmul per adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import torch

# Largest weight block (elements) worth gathering into a batch: the gather copies each block
# once more, which pays off while a block costs less to copy than the torch calls it saves
# (several microseconds each); measured break-even is a few 10k elements on a laptop-class CPU.
_MAX_BATCHED_BLOCK = 32768

# Rows of one slot: a slice when they are contiguous, else an index tensor for a gather.
Rows: TypeAlias = slice | torch.Tensor


@dataclass
class _Plan:
    """Work of one call: multi-row slots one by one, single-row slots batched by rank."""

    # slot -> its rows
    groups: dict[int, Rows] = field(default_factory=dict)
    # rank -> (row of each single-row slot, the slot)
    singles: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)


def _plan(
    seg_starts: torch.Tensor, seg_slots: torch.Tensor, ranks: list[int], elems_per_rank: int
) -> _Plan:
    """Group rows by slot; batch single-row slots whose block is small (see _MAX_BATCHED_BLOCK)."""
    starts = seg_starts.tolist()
    spans: dict[int, list[tuple[int, int]]] = {}  # slot -> [start, end) spans in row order
    for n, slot in enumerate(seg_slots.tolist()):
        start, end = starts[n], starts[n + 1]
        if slot < 0 or end <= start or ranks[slot] == 0:
            continue
        slot_spans = spans.setdefault(slot, [])
        if slot_spans and slot_spans[-1][1] == start:  # adjacent segments of one slot: merge
            slot_spans[-1] = (slot_spans[-1][0], end)
        else:
            slot_spans.append((start, end))

    plan = _Plan()
    for slot, slot_spans in spans.items():
        single = len(slot_spans) == 1 and slot_spans[0][1] - slot_spans[0][0] == 1
        if single and ranks[slot] * elems_per_rank <= _MAX_BATCHED_BLOCK:
            rows, slots = plan.singles.setdefault(ranks[slot], ([], []))
            rows.append(slot_spans[0][0])
            slots.append(slot)
        elif len(slot_spans) == 1:
            plan.groups[slot] = slice(*slot_spans[0])
        else:  # one index tensor built in Python: a torch call per span would cost more
            rows = [t for start, end in slot_spans for t in range(start, end)]
            plan.groups[slot] = torch.tensor(rows, device=seg_starts.device)
    for rank in [r for r, (rows, _) in plan.singles.items() if len(rows) == 1]:
        (row,), (slot,) = plan.singles.pop(rank)  # a batch of one: the plain path is cheaper
        plan.groups[slot] = slice(row, row + 1)
    return plan


def _gather_blocks(pool: torch.Tensor, offsets: list[int], size: int) -> torch.Tensor:
    """The size-element blocks of pool at offsets, stacked: [len(offsets), size], one copy."""
    windows = pool.unfold(0, size, 1)  # view [P - size + 1, size]: every block start
    return windows.index_select(0, torch.tensor(offsets, device=pool.device))


def sgmv_shrink_torch(
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
    rank_list, offset_list = ranks.tolist(), a_offsets.tolist()
    plan = _plan(seg_starts, seg_slots, rank_list, hidden)
    exact = x.dtype == a_pool.dtype == out.dtype == torch.float32  # no casts to make
    for slot, rows in plan.groups.items():
        rank, offset = rank_list[slot], offset_list[slot]
        a = a_pool[offset : offset + rank * hidden].view(rank, hidden)  # [r, H]
        if exact:
            out[rows, :rank] = x[rows] @ a.T  # [rows, r]
        else:
            out[rows, :rank] = (x[rows].float() @ a.float().T).to(out.dtype)
    for rank, (row_list, slots) in plan.singles.items():
        offsets = [offset_list[k] for k in slots]
        a = _gather_blocks(a_pool, offsets, rank * hidden).view(-1, rank, hidden)  # [g, r, H]
        rows = torch.tensor(row_list, device=x.device)
        xs = x.index_select(0, rows).float().unsqueeze(2)  # [g, H, 1]
        out[rows, :rank] = torch.bmm(a.float(), xs).squeeze(2).to(out.dtype)  # [g, r]
    return out


def sgmv_expand_torch(
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
    rank_list, offset_list, scale_list = ranks.tolist(), b_offsets.tolist(), scales.tolist()
    plan = _plan(seg_starts, seg_slots, rank_list, out_features)
    exact = v.dtype == b_pool.dtype == out.dtype == torch.float32  # no casts to make
    for slot, rows in plan.groups.items():
        rank, offset = rank_list[slot], offset_list[slot]
        b = b_pool[offset : offset + out_features * rank].view(out_features, rank)  # [O, r]
        if exact and isinstance(rows, slice):  # in place on the view: one call, no temporary
            out[rows].addmm_(v[rows, :rank], b.T, alpha=scale_list[slot])
            continue
        delta = scale_list[slot] * (v[rows, :rank].float() @ b.float().T)  # [rows, O]
        if out.dtype == torch.float32 and isinstance(rows, slice):
            out[rows] += delta
        else:
            out[rows] = (out[rows].float() + delta).to(out.dtype)
    for rank, (row_list, slots) in plan.singles.items():
        offsets = [offset_list[k] for k in slots]
        b = _gather_blocks(b_pool, offsets, out_features * rank).view(-1, out_features, rank)
        rows = torch.tensor(row_list, device=v.device)
        scale = torch.tensor([scale_list[k] for k in slots], device=v.device)  # [g] float32
        vs = v.index_select(0, rows)[:, :rank].float().unsqueeze(2)  # [g, r, 1]
        delta = scale[:, None] * torch.bmm(b.float(), vs).squeeze(2)  # [g, O]
        out[rows] = (out.index_select(0, rows).float() + delta).to(out.dtype)
    return out
