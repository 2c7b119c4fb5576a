"""LoRA on the flat batch: per-step segment metadata, and the two ways to apply it.

Every adapted projection computes  out[t] += scale_k * (x[t] @ A_k^T) @ B_k^T  for the slot k
of the segment that row t is in (slot -1: the base model, nothing added). A layer reaches the
kernels in three hops: layer -> `LoraBackend.apply` -> `loramux.kernels` (or the gather ops).

Segment metadata, worked example. Four sequences in batch order, grouped by slot:
    seq   slot  rows
    a     -1    0          (base model, decode)
    b      3    1..5       (adapter in slot 3, a 5-token prefill)
    c      3    6          (same adapter, decode)
    d      0    7          (decode)
  -> seg_starts = [0, 1, 7, 8], seg_slots = [-1, 3, 0]: one segment per slot, so the kernels
     read each adapter once. The buffers are allocated once at max_num_seqs and refilled each
     step; `seg_starts[:n+1]`, `seg_slots[:n]` are the live views.

Backends, chosen once at load time:
  - `KernelLora` calls sgmv_shrink / sgmv_expand on the registry's pool for every segment
    (Triton on CUDA). It is the contract.
  - `GatherLora` (CPU, lora_cpu.py) is a BGMV form over stacked copies of the adapters for
    short segments (decode) and longer ones cheap to pad (similar-length prefills), and these
    kernels for the rest.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from loramux.adapters.types import AdapterRef, LoraTables
from loramux.kernels.ops import sgmv_expand, sgmv_shrink


class LoraMeta:
    """One step's segment metadata, in buffers allocated once at max size.

    Invariants after `fill`: seg_starts[0] == 0, seg_starts[n] == T, non-decreasing; each slot
    >= 0 appears in at most one segment; `active` is False iff every segment has slot -1.
    """

    def __init__(self, max_segments: int, max_tokens: int, max_rank: int,
                 device: torch.device) -> None:
        self._starts = torch.zeros(max_segments + 1, dtype=torch.int32, device=device)
        self._slots = torch.full((max_segments,), -1, dtype=torch.int32, device=device)
        self._sgmv_slots = torch.full((max_segments,), -1, dtype=torch.int32, device=device)
        # Shrink output, float32 whatever the model dtype (no rounding between shrink and expand).
        self._shrink = torch.empty(max_tokens, max(max_rank, 1), dtype=torch.float32,
                                   device=device)
        self.device = device
        self.num_segments = 0
        self.num_tokens = 0
        self.active = False  # some row has an adapter
        self.sgmv_active = False  # some segment goes to the kernels (GatherLora: not stacked)
        self.segments: list[tuple[int, int, int]] = []  # (start, end, slot), host copy
        self.plan: Any = None  # a backend's own per-step plan (GatherLora: its BGMV indices)

    def fill(self, segments: list[tuple[int, int, int]],
             not_for_kernels: Collection[int] = ()) -> None:
        """Load (start, end, slot) segments in row order; the segments of every slot not in
        `not_for_kernels` (all, by default) are marked for the kernels in `sgmv_slots`."""
        n = len(segments)
        starts = [0] + [end for _, end, _ in segments]
        slots = [slot for _, _, slot in segments]
        sgmv = [-1 if slot in not_for_kernels else slot for slot in slots]
        self._starts[: n + 1].copy_(torch.tensor(starts, dtype=torch.int32))
        self._slots[:n].copy_(torch.tensor(slots, dtype=torch.int32))
        self._sgmv_slots[:n].copy_(torch.tensor(sgmv, dtype=torch.int32))
        self.num_segments = n
        self.num_tokens = starts[-1]
        self.segments = segments
        self.active = any(s >= 0 for s in slots)
        self.sgmv_active = any(s >= 0 for s in sgmv)
        self.plan = None

    @property
    def seg_starts(self) -> torch.Tensor:
        return self._starts[: self.num_segments + 1]  # int32 [N+1]

    @property
    def seg_slots(self) -> torch.Tensor:
        return self._slots[: self.num_segments]  # int32 [N]

    @property
    def sgmv_slots(self) -> torch.Tensor:
        return self._sgmv_slots[: self.num_segments]  # int32 [N], -1 where not for the kernels

    def shrink_buffer(self, rows: int) -> torch.Tensor:
        return self._shrink[:rows]  # float32 [T, R_max]


@dataclass(frozen=True)
class SlotGroup:
    """The rows of one adapter slot in a step (slot -1: the base model, ref None)."""

    slot: int
    ref: AdapterRef | None
    num_rows: int


def segments_in_order(groups: list[SlotGroup], order: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, slot) of each group when the groups are laid out in `order`."""
    segments, row = [], 0
    for i in order:
        segments.append((row, row + groups[i].num_rows, groups[i].slot))
        row += groups[i].num_rows
    return segments


class LoraBackend(Protocol):
    """How the runner applies LoRA to one projection's output, in place."""

    def prepare(self, groups: list[SlotGroup], meta: LoraMeta) -> list[int]:
        """Before a step: make the groups' adapters usable, choose the order of the groups in
        the flat batch (returned as indices into `groups`) and fill `meta` for that order."""
        ...

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, layer: int,
              module: int) -> None:
        """out += LoRA(x) for projection MODULES[module] of `layer`: x [T, in], out [T, out]."""
        ...


def lora_apply(x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, tables: LoraTables,
               layer: int, module: int, seg_slots: torch.Tensor | None = None) -> None:
    """out[t] += scales[k] * (x[t] @ A_k^T) @ B_k^T through the kernels, k = slot of t's segment.

    x [T, in]; out [T, out]; the [layer, module] slices of `tables` are [S] vectors.
    seg_slots overrides meta.seg_slots (GatherLora passes only the segments it does not stack).
    """
    slots = meta.seg_slots if seg_slots is None else seg_slots
    ranks = tables.ranks[layer, module]  # int32 [S]
    v = meta.shrink_buffer(x.shape[0])  # float32 [T, R_max]
    pool = tables.pool  # [P]
    sgmv_shrink(x, pool, tables.a_offsets[layer, module], ranks, meta.seg_starts, slots, v)
    sgmv_expand(v, pool, tables.b_offsets[layer, module], ranks, tables.scales[layer, module],
                meta.seg_starts, slots, out)


class KernelLora:
    """Every segment through loramux.kernels on the registry's pool (the contract; CUDA)."""

    def __init__(self, tables: LoraTables) -> None:
        self.tables = tables

    def prepare(self, groups: list[SlotGroup], meta: LoraMeta) -> list[int]:
        order = list(range(len(groups)))  # the tables are the kernels' input: nothing to copy
        meta.fill(segments_in_order(groups, order))
        return order

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, layer: int,
              module: int) -> None:
        lora_apply(x, out, meta, self.tables, layer, module)
