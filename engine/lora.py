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
  - `GatherLora` (CPU) is a BGMV form for short segments (decode): each row gathers its own
    adapter's A and B^T rows from a per-slot copy kept by the engine, in one index_select per
    projection for the whole batch, and applies them with two batched matmuls, so a step with
    32 adapters costs 4 ops per projection instead of 64 small matmuls. Rows beyond a slot's
    rank point to an all-zero row, so memory traffic is proportional to each adapter's rank.
    Long segments (prefill) go to the kernels, which read their adapter once per segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from loramux.adapters.types import MODULES, AdapterRef, BaseSpec, LoraTables
from loramux.kernels import sgmv_expand, sgmv_shrink

BGMV_MAX_SEGMENT_ROWS = 4  # GatherLora: segments longer than this go to the SGMV kernels


@dataclass(frozen=True)
class GatherPlan:
    """GatherLora's per-step index: which rows gather, and from which stack rows."""

    rows: torch.Tensor | None  # int64 [Tb] rows of short adapter segments; None: all T rows
    num_rows: int  # Tb
    rank: int  # R: the largest rank of any (layer, module, slot) gathered this step
    index: torch.Tensor  # int64 [L, M, Tb * R] stack row per (row, rank position)
    active: list[list[bool]]  # [L][M] some gathered row has rank > 0 there


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
        self.sgmv_active = False  # some segment goes to the kernels (GatherLora: long ones)
        self.segments: list[tuple[int, int, int]] = []  # (start, end, slot), host copy
        self.gather: GatherPlan | None = None

    def fill(self, segments: list[tuple[int, int, int]], sgmv_min_rows: int = 0) -> None:
        """Load (start, end, slot) segments in row order; segments of at least sgmv_min_rows
        rows (all, by default) are marked for the kernels in `sgmv_slots`."""
        n = len(segments)
        starts = [0] + [end for _, end, _ in segments]
        slots = [slot for _, _, slot in segments]
        sgmv = [slot if end - start >= sgmv_min_rows else -1 for start, end, slot in segments]
        self._starts[: n + 1].copy_(torch.tensor(starts, dtype=torch.int32))
        self._slots[:n].copy_(torch.tensor(slots, dtype=torch.int32))
        self._sgmv_slots[:n].copy_(torch.tensor(sgmv, dtype=torch.int32))
        self.num_segments = n
        self.num_tokens = starts[-1]
        self.segments = segments
        self.active = any(s >= 0 for s in slots)
        self.sgmv_active = any(s >= 0 for s in sgmv)
        self.gather = None

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


class LoraBackend(Protocol):
    """How the runner applies LoRA to one projection's output, in place."""

    def prepare(self, slots: dict[int, AdapterRef], segments: list[tuple[int, int, int]],
                meta: LoraMeta) -> None:
        """Before a step: make `slots` (slot -> the adapter it holds now) usable and fill `meta`
        with the step's (start, end, slot) segments."""
        ...

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, layer: int,
              module: int) -> None:
        """out += LoRA(x) for projection MODULES[module] of `layer`: x [T, in], out [T, out]."""
        ...


def lora_apply(x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, tables: LoraTables,
               layer: int, module: int, seg_slots: torch.Tensor | None = None) -> None:
    """out[t] += scales[k] * (x[t] @ A_k^T) @ B_k^T through the kernels, k = slot of t's segment.

    x [T, in]; out [T, out]; the [layer, module] slices of `tables` are [S] vectors.
    seg_slots overrides meta.seg_slots (GatherLora passes only its long segments).
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

    def prepare(self, slots: dict[int, AdapterRef], segments: list[tuple[int, int, int]],
                meta: LoraMeta) -> None:
        meta.fill(segments)  # the registry's tables are the kernels' input: nothing to copy

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, layer: int,
              module: int) -> None:
        lora_apply(x, out, meta, self.tables, layer, module)


class GatherLora:
    """CPU LoRA: BGMV by gather for short segments, the kernels for long ones.

    Keeps, per (layer, module), a copy of each slot's A rows ([r, in]) and scaled B^T rows
    ([r, out], scale folded in) at rows slot * R_cap .. slot * R_cap + r - 1 of one stack, plus
    a final all-zero row. Invariant: `owner[s]` is the adapter whose weights stack rows of slot
    s hold; `prepare` re-copies a slot whenever the adapter holding it changed (a slot is only
    reused by the registry after every reference to its old adapter was released, and the
    engine holds a reference to every adapter it runs, so a copy is never stale while in use).
    """

    def __init__(self, tables: LoraTables, base: BaseSpec) -> None:
        self.tables = tables
        self.base = base
        self.num_layers = base.num_layers
        self.num_slots = int(tables.ranks.shape[2])
        self.dims = [base.shapes[m] for m in MODULES]  # (in, out) per module
        self.owner: list[AdapterRef | None] = [None] * self.num_slots
        self.rank_cap = 0
        self.ranks = torch.zeros(self.num_layers, len(MODULES), self.num_slots,
                                 dtype=torch.int64)  # [L, M, S] ranks of the copies
        self.a_stack: list[list[torch.Tensor]] = []  # [L][M] -> [S * R_cap + 1, in]
        self.bt_stack: list[list[torch.Tensor]] = []  # [L][M] -> [S * R_cap + 1, out]

    @property
    def zero_row(self) -> int:
        return self.num_slots * self.rank_cap

    def prepare(self, slots: dict[int, AdapterRef], segments: list[tuple[int, int, int]],
                meta: LoraMeta) -> None:
        meta.fill(segments, sgmv_min_rows=BGMV_MAX_SEGMENT_ROWS + 1)
        stale = {s: ref for s, ref in slots.items() if self.owner[s] != ref}
        if stale:
            need = max(int(self.tables.ranks[:, :, s].max()) for s in stale)
            if need > self.rank_cap:
                self._grow(need)  # drops every copy: re-copy all slots of this step
                stale = dict(slots)
            for slot, ref in stale.items():
                self._copy_slot(slot, ref)
        meta.gather = self._plan(meta)

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, layer: int,
              module: int) -> None:
        plan = meta.gather
        if plan is not None and plan.active[layer][module]:
            n, r = plan.num_rows, plan.rank
            xb = x if plan.rows is None else x.index_select(0, plan.rows)  # [Tb, in]
            index = plan.index[layer, module]  # [Tb * R]
            a = self.a_stack[layer][module].index_select(0, index).view(n, r, -1)  # [Tb, R, in]
            v = torch.bmm(a, xb.unsqueeze(2))  # [Tb, R, 1]
            bt = self.bt_stack[layer][module].index_select(0, index).view(n, r, -1)  # [Tb, R, out]
            delta = torch.bmm(v.transpose(1, 2), bt).squeeze(1)  # [Tb, out]
            if plan.rows is None:
                out += delta
            else:
                out.index_add_(0, plan.rows, delta)
        if meta.sgmv_active:
            lora_apply(x, out, meta, self.tables, layer, module, meta.sgmv_slots)

    # ------------------------------------------------------------------ internals

    def _grow(self, rank: int) -> None:
        """Reallocate every stack for ranks up to `rank` (rare: the first adapter of a new max)."""
        self.rank_cap = rank
        rows = self.num_slots * rank + 1
        pool = self.tables.pool
        self.a_stack = [[pool.new_zeros(rows, i) for i, _ in self.dims]
                        for _ in range(self.num_layers)]
        self.bt_stack = [[pool.new_zeros(rows, o) for _, o in self.dims]
                         for _ in range(self.num_layers)]
        self.owner = [None] * self.num_slots
        self.ranks.zero_()

    def _copy_slot(self, slot: int, ref: AdapterRef) -> None:
        t = self.tables
        pool = t.pool
        ranks = t.ranks[:, :, slot].tolist()
        a_off = t.a_offsets[:, :, slot].tolist()
        b_off = t.b_offsets[:, :, slot].tolist()
        scales = t.scales[:, :, slot].tolist()
        row = slot * self.rank_cap
        for layer in range(self.num_layers):
            for m, (in_f, out_f) in enumerate(self.dims):
                r = ranks[layer][m]
                if r == 0:
                    continue
                a = pool[a_off[layer][m]: a_off[layer][m] + r * in_f].view(r, in_f)
                b = pool[b_off[layer][m]: b_off[layer][m] + out_f * r].view(out_f, r)
                self.a_stack[layer][m][row: row + r] = a
                self.bt_stack[layer][m][row: row + r] = (b.float() * scales[layer][m]).T
        self.ranks[:, :, slot] = torch.tensor(ranks, dtype=torch.int64)
        self.owner[slot] = ref

    def _plan(self, meta: LoraMeta) -> GatherPlan | None:
        rows: list[int] = []
        row_slots: list[int] = []
        for start, end, slot in meta.segments:
            if slot >= 0 and end - start <= BGMV_MAX_SEGMENT_ROWS:
                rows.extend(range(start, end))
                row_slots.extend([slot] * (end - start))
        if not rows:
            return None
        slots = torch.tensor(row_slots, dtype=torch.int64)  # [Tb]
        ranks = self.ranks[:, :, slots]  # [L, M, Tb]
        rank = max(int(ranks.max()), 1)
        j = torch.arange(rank)  # [R]
        index = torch.where(j < ranks.unsqueeze(-1), (slots * self.rank_cap)[:, None] + j,
                            self.zero_row)  # [L, M, Tb, R]
        return GatherPlan(
            rows=None if len(rows) == meta.num_tokens else torch.tensor(rows, dtype=torch.int64),
            num_rows=len(rows),
            rank=rank,
            index=index.reshape(self.num_layers, len(MODULES), -1),
            active=(ranks.amax(dim=-1) > 0).tolist(),
        )
