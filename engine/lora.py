"""LoRA on the flat batch: per-step segment metadata, and the two ways to apply it.

Every adapted projection computes  out[t] += scale_k * (x[t] @ A_k^T) @ B_k^T  for the slot k
of the segment that row t is in (slot -1: the base model, nothing added). A layer reaches the
kernels in three calls: the runner's projection -> `LoraBackend.apply` -> the kernel launcher
picked for that module at load (no device check, no view making per call).

Segment metadata, worked example. Four sequences in batch order, grouped by slot:
    seq   slot  rows
    a     -1    0          (base model, decode)
    b      3    1..5       (adapter in slot 3, a 5-token prefill)
    c      3    6          (same adapter, decode)
    d      0    7          (decode)
  -> seg_starts = [0, 1, 7, 8], seg_slots = [-1, 3, 0]: one segment per slot, so the kernels
     read each adapter once. A decode step padded to a batch bucket (engine/graphs.py) gets
     exactly `bucket` segments: three decodes of slots 3, 3, 0 in bucket 4 are
     seg_starts = [0, 2, 3, 4, 4], seg_slots = [3, 0, -1, -1] (the padding row's segment,
     then empty ones), so a CUDA graph's kernel grids never change. The buffers are allocated
     once at max_num_seqs and refilled each step.

Backends, chosen once at load time:
  - `KernelLora` calls the SGMV kernels on the registry's pool for every segment (Triton on
    CUDA). It is the contract.
  - `StackedLora` (CPU, lora_cpu.py) is a BGMV form over stacked copies of the adapters for
    short segments (decode) and longer ones cheap to pad (similar-length prefills), and these
    kernels for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from loramux.adapters.types import MODULES, AdapterRef, BaseSpec, LoraTables
from loramux.engine.graphs import Staging
from loramux.kernels.launch import Launcher, make_launcher


class LoraMeta:
    """One step's segment metadata, in buffers allocated once at max size.

    Invariants after `fill`: seg_starts[0] == 0, seg_starts[N] == T (padding rows included),
    non-decreasing; each slot >= 0 appears in at most one segment; `active` is False iff
    every segment has slot -1. `seg_starts`, `seg_slots` and `shrink_out` are views of the
    same buffers every step (a CUDA graph reads them by address).
    """

    def __init__(self, max_segments: int, max_tokens: int, max_rank: int,
                 device: torch.device) -> None:
        self.staging = Staging(device)
        self._starts = self.staging.buffer((max_segments + 1,), torch.int32)
        self._slots = self.staging.buffer((max_segments,), torch.int32)
        # Shrink output, float32 whatever the model dtype (no rounding between shrink and expand).
        self._shrink = torch.empty(max_tokens, max(max_rank, 1), dtype=torch.float32,
                                   device=device)
        self.max_segments = max_segments
        self.device = device
        self.num_segments = 0
        self.num_tokens = 0
        self.active = False  # some row has an adapter
        self.segments: list[tuple[int, int, int]] = []  # (start, end, slot) of real rows, host
        self.seg_starts = self._starts.dev[:1]  # int32 [N+1]
        self.seg_slots = self._slots.dev[:0]  # int32 [N]
        self.shrink_out = self._shrink[:0]  # float32 [T, R_max]

    def fill(self, segments: list[tuple[int, int, int]], pad_to: int | None = None) -> None:
        """Load (start, end, slot) segments in row order; with pad_to (a decode step padded to
        its batch bucket), pad to pad_to rows and pad_to segments, all of slot -1."""
        real = len(segments)
        tokens = segments[-1][1] if segments else 0
        rows, n = (tokens, real) if pad_to is None else (pad_to, pad_to)
        assert real <= n and tokens <= rows, "a padded step holds at most pad_to rows"
        self.staging.wait()
        starts, slots = self._starts.np, self._slots.np
        starts[0] = 0
        starts[1:real + 1] = [end for _, end, _ in segments]
        slots[:real] = [slot for _, _, slot in segments]
        starts[real + 1:n + 1] = rows  # the padding rows' segment, then empty ones
        slots[real:n] = -1
        self._starts.send(n + 1)
        self._slots.send(n)
        self.staging.sent()
        self.num_segments, self.num_tokens, self.segments = n, rows, segments
        self.active = any(slot >= 0 for _, _, slot in segments)
        self.seg_starts = self._starts.dev[:n + 1]
        self.seg_slots = self._slots.dev[:n]
        self.shrink_out = self._shrink[:rows]


@dataclass(frozen=True)
class SlotGroup:
    """The rows of one adapter slot in a step (slot -1: the base model, ref None; a slot with
    ref None is a warm-up's: whatever the slot holds, results are discarded)."""

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

    # True when `apply` launches the same work for every step of a shape, reading only
    # buffers whose addresses never change, so a CUDA graph of it replays any later step.
    graph_safe: bool

    def prepare(self, groups: list[SlotGroup], meta: LoraMeta, pad_to: int | None) -> list[int]:
        """Before a step: make the groups' adapters usable, choose the order of the groups in
        the flat batch (returned as indices into `groups`) and fill `meta` for that order,
        padded to `pad_to` rows (a decode step padded to its batch bucket) unless None."""
        ...

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, layer: int,
              module: int) -> None:
        """out += LoRA(x) for projection MODULES[module] of `layer`: x [T, in], out [T, out]."""
        ...


@dataclass(frozen=True)
class ProjectionTables:
    """The [layer, module] slices of LoraTables: [S] views made once (the registry refills the
    tables in place, so the views stay current)."""

    a_offsets: torch.Tensor  # int64 [S]
    b_offsets: torch.Tensor  # int64 [S]
    ranks: torch.Tensor  # int32 [S]
    scales: torch.Tensor  # float32 [S]


def projection_tables(tables: LoraTables, num_layers: int) -> list[list[ProjectionTables]]:
    """[L][M] views of the tables, one per adapted projection."""
    return [[ProjectionTables(tables.a_offsets[layer, m], tables.b_offsets[layer, m],
                              tables.ranks[layer, m], tables.scales[layer, m])
             for m in range(len(MODULES))] for layer in range(num_layers)]


def make_launchers(base: BaseSpec, tables: LoraTables, x_dtype: torch.dtype,
                   device: torch.device, *, max_rows: int, max_segments: int) -> list[Launcher]:
    """One launcher per module (in MODULES order) for the module's in/out features, launch
    configurations fixed now (kernels/launch.py); the shrink output v is float32."""
    return [make_launcher(*base.shapes[m], tables.max_rank, x_dtype, tables.pool.dtype,
                          torch.float32, device, max_rows=max_rows, max_segments=max_segments)
            for m in MODULES]


class KernelLora:
    """Every segment through the SGMV kernels on the registry's pool (the contract; CUDA)."""

    graph_safe = True  # grids from shapes only; metadata, tables and pool read by address

    def __init__(self, tables: LoraTables, base: BaseSpec, x_dtype: torch.dtype,
                 device: torch.device, *, max_rows: int, max_segments: int) -> None:
        self.pool = tables.pool  # [P], allocated once by the registry
        self.proj = projection_tables(tables, base.num_layers)
        self.launchers = make_launchers(base, tables, x_dtype, device, max_rows=max_rows,
                                        max_segments=max_segments)

    def prepare(self, groups: list[SlotGroup], meta: LoraMeta, pad_to: int | None) -> list[int]:
        order = list(range(len(groups)))  # the tables are the kernels' input: nothing to copy
        meta.fill(segments_in_order(groups, order), pad_to)
        return order

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, layer: int,
              module: int) -> None:
        t, launch, v = self.proj[layer][module], self.launchers[module], meta.shrink_out
        launch.shrink(x, self.pool, t.a_offsets, t.ranks, meta.seg_starts, meta.seg_slots, v)
        launch.expand(v, self.pool, t.b_offsets, t.ranks, t.scales, meta.seg_starts,
                      meta.seg_slots, out)
