"""CPU LoRA: BGMV over stacked adapter copies, the SGMV kernels for groups too long to pad.

Why a CPU-specific path: a decode step with many adapters is bound by reading their weights
(32 adapters of rank 8-16 on every projection of a 135M model weigh ~87% of the base). A loop
over slots costs two tiny matmuls per adapter per projection, and gathering each row's weights
into a batch writes them all again every step. Instead the engine keeps copies of the adapters
in use in stacks, one per rank bucket R (a power of two >= the adapter's largest rank), in
float32 whatever the serving dtype (the product is added to the output with one rounding):

    a[l][m]  [cap, R, in]     A_k: rows 0..r-1 at position p, zero rows r..R-1
    bt[l][m] [cap, R, out]    (scale_k * B_k)^T the same way (A is read through a transposed
                              view: the batched matmul streams [R, in] rows faster than A^T)

and a step multiplies positions 0..P-1 of a stack with their rows' inputs in two batched
matmuls per projection: each adapter's weights are read once and nothing is copied per step.
Worked example, bucket R=16 holding slots 5, 2, 7 at positions 0, 1, 2; this step decodes one
row of slot 5 and two of slot 7, and slot 2 has no row. `prepare` lays the rows out in position
order, rows 10 (slot 5), 11 and 12 (slot 7), so the bucket covers rows r0=10 .. r1=13:
    k = 2 rows per position, x_index = [10, 10, 10, 10, 11, 12] (padding -> r0),
    take = [0, 4, 5] (the real (position, row) entries, already in row order)
    v = x[x_index].view(3, 2, in) @ a^T -> [3, 2, R];  delta = v @ bt -> [3, 2, out]
    out[10:13] += delta.view(6, out)[take]
In the common decode step (one row per adapter, no holes) x_index and take are not needed,
and a float32 model takes one bmm and one in-place baddbmm (the add fused into the second
matmul) per projection and bucket, on views of the stacks made once per bucket and count of
positions; otherwise the second bmm's float32 product is added with one rounding.
Numerically this is the kernels' contract: padding rows are zero, the scale is folded into B.
Which groups take this path (`_stacked`): every group of up to BGMV_MAX_SEGMENT_ROWS rows
(decode), and longer ones while the bucket's padded rows stay within PAD_ROWS_PER_GROUP per
longer group (prefills of similar length); the rest go to the kernels, one matmul pair each.

Invariants:
  - `where[s] = (R, p)` iff position p of bucket R holds a copy of the adapter that was in
    slot s when it was copied (`entries[p] == (s, ref)`); `prepare` re-copies a slot used this
    step whenever the registry's adapter in it changed (the registry reuses a slot only after
    every reference to its old adapter is released, and the engine holds one for every adapter
    it runs, so a copy is never stale while it is used);
  - positions whose slot has no row this step are computed but discarded (holes); a bucket is
    compacted when holes exceed a quarter of it, or cost more than PAD_ROWS_PER_GROUP padded
    rows (k each), moving tail positions into holes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

import torch
from loramux.adapters.types import MODULES, AdapterRef, BaseSpec, LoraTables
from loramux.engine.lora import (
    LoraMeta,
    SlotGroup,
    make_launchers,
    projection_tables,
    segments_in_order,
)

BGMV_MAX_SEGMENT_ROWS = 4  # groups this short always go through the stacks
# Padded rows a bucket may compute per group of more than BGMV_MAX_SEGMENT_ROWS rows it takes from
# the kernels. Measured on a 2-vCPU Xeon at SmolLM2's q and gate shapes, rank 16: a group costs
# the kernels ~28-33 us of calls per projection, a padded row ~0.32-0.37 us, a break-even of
# 79-91 rows in four runs; 64 stays on the cheap side. Rerun: python -m
# loramux.loadtest.benchmark_stacking
PAD_ROWS_PER_GROUP = 64

_Views: TypeAlias = list[list[tuple[torch.Tensor, torch.Tensor]]]  # [L][M] per bucket and P


@dataclass
class _Bucket:
    """Stacked copies of adapters whose largest rank fits `rank`."""

    rank: int
    a: list[list[torch.Tensor]]  # [L][M] -> [cap, R, in]
    bt: list[list[torch.Tensor]]  # [L][M] -> [cap, R, out]
    entries: list[tuple[int, AdapterRef] | None] = field(default_factory=list)  # [P]
    # P -> [L][M] (a[:P] transposed, bt[:P]): views made once, not per projection per step
    views: dict[int, _Views] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.a[0][0].shape[0]

    def views_of(self, num_pos: int) -> _Views:
        views = self.views.get(num_pos)
        if views is None:
            views = self.views[num_pos] = [
                [(a[:num_pos].transpose(1, 2), bt[:num_pos]) for a, bt in zip(a_l, bt_l)]
                for a_l, bt_l in zip(self.a, self.bt)]
        return views


@dataclass(frozen=True)
class _BucketPlan:
    """One bucket's share of a step: its rows are r0 .. r1-1, laid out in position order."""

    bucket: _Bucket
    num_pos: int  # P: positions multiplied (holes included)
    views: _Views  # [L][M] (a[:P]^T [P, in, R], bt[:P])
    k: int  # rows per position (the longest short segment of the bucket)
    r0: int
    r1: int
    x_index: torch.Tensor | None  # int64 [P * k] input row per (position, row); None: r0..r1-1
    take: torch.Tensor | None  # int64 [r1 - r0] real entries of the [P * k] products; None: all
    active: list[list[bool]]  # [L][M] some adapter with a row here has rank > 0 there


@dataclass(frozen=True)
class StepPlan:
    """StackedLora's share of one step: the stacks' work and the kernels' segments."""

    buckets: list[_BucketPlan]  # in rank order
    # int32 [N]: meta.seg_slots with the stacked segments (and padding) at -1; None: no
    # segment goes to the kernels
    sgmv_slots: torch.Tensor | None


def _bucket_rank(rank: int) -> int:
    return 1 << max(rank - 1, 0).bit_length()


class StackedLora:
    """The CPU LoraBackend: adapters stacked per rank bucket (see the module docstring)."""

    graph_safe = False  # each step's plan has its own shapes and index tensors

    def __init__(self, tables: LoraTables, base: BaseSpec, *, max_rows: int, max_segments: int,
                 pad_rows_per_group: int = PAD_ROWS_PER_GROUP) -> None:
        self.tables = tables
        self.pad_rows_per_group = pad_rows_per_group
        self.num_layers = base.num_layers
        self.dims = [base.shapes[m] for m in MODULES]  # (in, out) per module
        self.buckets: dict[int, _Bucket] = {}
        self.where: dict[int, tuple[int, int]] = {}  # slot -> (bucket rank, position)
        self.plan = StepPlan([], None)  # the last prepared step's
        # the groups too long to stack go through the kernels (the torch path on the CPU)
        self.proj = projection_tables(tables, base.num_layers)
        self.launchers = make_launchers(base, tables, tables.pool.dtype, tables.pool.device,
                                        max_rows=max_rows, max_segments=max_segments)

    def prepare(self, groups: list[SlotGroup], meta: LoraMeta, pad_to: int | None) -> list[int]:
        """Place the stacked groups' adapters (`_stacked`) in the stacks and lay the batch out
        as: kernel and base groups first, then stacked groups by (bucket, position), so that
        each bucket's rows are one contiguous range in the order of its positions (the
        padding rows of a decode padded to `pad_to` rows come after all of them)."""
        bucket_of = {g.slot: _bucket_rank(int(self.tables.ranks[:, :, g.slot].max()))
                     for g in groups if g.slot >= 0}  # slot -> its bucket's rank R
        short = self._stacked(groups, bucket_of)
        for slot, group in short.items():
            assert group.ref is not None
            self._place(slot, group.ref, bucket_of[slot])
        for bucket in self.buckets.values():
            used = [short[e[0]].num_rows for e in bucket.entries
                    if e is not None and e[0] in short]
            holes = len(bucket.entries) - len(used)
            # a hole costs a bucket k padded rows: compact when there are many holes, or when
            # they would cost more than the padding one longer group may add
            if used and (holes > max(2, len(bucket.entries) // 4)
                         or holes * max(used) > self.pad_rows_per_group):
                self._compact(bucket, short)
        order = [i for i, g in enumerate(groups) if g.slot not in short]
        order += sorted((i for i, g in enumerate(groups) if g.slot in short),
                        key=lambda i: self.where[groups[i].slot])
        segments = segments_in_order(groups, order)
        meta.fill(segments, pad_to)
        starts = {slot: start for start, _, slot in segments}
        kernel_slots = [-1 if slot in short else slot for _, _, slot in segments]
        kernel_slots += [-1] * (meta.num_segments - len(segments))  # padding segments
        self.plan = StepPlan(
            buckets=[self._plan(b, short, starts)
                     for b in sorted(self.buckets.values(), key=lambda b: b.rank)
                     if any(e is not None and e[0] in short for e in b.entries)],
            sgmv_slots=(torch.tensor(kernel_slots, dtype=torch.int32, device=meta.device)
                        if any(s >= 0 for s in kernel_slots) else None))
        return order

    def _stacked(self, groups: list[SlotGroup],
                 bucket_of: dict[int, int]) -> dict[int, SlotGroup]:
        """The adapter groups that go through the stacks this step; the rest go to the kernels.

        A bucket multiplies k rows per position, k = its longest group, so a group of n rows
        costs k - n padded rows. Groups of up to BGMV_MAX_SEGMENT_ROWS rows always go (decode);
        a bucket also takes longer groups, longest last, while its padded rows stay within
        pad_rows_per_group per longer group it takes from the kernels (prefills of similar
        length, a popular adapter among several).
        """
        by_bucket: dict[int, list[SlotGroup]] = {}
        for g in groups:
            if g.slot >= 0 and g.ref is not None:  # a warm-up's slot (no ref) is not copied
                by_bucket.setdefault(bucket_of[g.slot], []).append(g)
        short: dict[int, SlotGroup] = {}
        for members in by_bucket.values():
            members.sort(key=lambda g: g.num_rows)
            rows = sum(g.num_rows for g in members)
            taken = sum(g.num_rows > BGMV_MAX_SEGMENT_ROWS for g in members)  # from the kernels
            while members and members[-1].num_rows > BGMV_MAX_SEGMENT_ROWS:
                padded = len(members) * members[-1].num_rows - rows
                if padded <= self.pad_rows_per_group * taken:
                    break
                rows -= members.pop().num_rows
                taken -= 1
            short.update((g.slot, g) for g in members)
        return short

    def apply(self, x: torch.Tensor, out: torch.Tensor, meta: LoraMeta, layer: int,
              module: int) -> None:
        plan: _BucketPlan
        for plan in self.plan.buckets:
            if not plan.active[layer][module]:
                continue
            n, k, r0, r1 = plan.num_pos, plan.k, plan.r0, plan.r1
            a_t, bt = plan.views[layer][module]  # float32 [P, in, R], [P, R, out]
            xs = x[r0:r1] if plan.x_index is None else x.index_select(0, plan.x_index)
            v = torch.bmm(xs.view(n, k, -1).float(), a_t)  # float32 [P, k, R]
            if plan.x_index is None and out.dtype == torch.float32:
                out[r0:r1].view(n, k, -1).baddbmm_(v, bt)  # dense: row r0 + p*k + j is (p, j)
                continue
            delta = torch.bmm(v, bt).view(n * k, -1)  # float32 [P * k, out]
            if plan.take is not None:
                delta = delta.index_select(0, plan.take)  # [r1 - r0, out]
            if out.dtype == torch.float32:
                out[r0:r1] += delta
            else:  # one rounding, into out's dtype
                out[r0:r1] = (out[r0:r1].float() + delta).to(out.dtype)
        slots = self.plan.sgmv_slots
        if slots is not None:
            t, launch, v = self.proj[layer][module], self.launchers[module], meta.shrink_out
            pool = self.tables.pool
            launch.shrink(x, pool, t.a_offsets, t.ranks, meta.seg_starts, slots, v)
            launch.expand(v, pool, t.b_offsets, t.ranks, t.scales, meta.seg_starts, slots, out)

    # ------------------------------------------------------------------ placement

    def _place(self, slot: int, ref: AdapterRef, rank: int) -> None:
        """Make sure a position of bucket `rank` holds the adapter now in `slot`."""
        loc = self.where.get(slot)
        if loc is not None:
            bucket_rank, pos = loc
            if bucket_rank == rank and self.buckets[rank].entries[pos] == (slot, ref):
                return
            self.buckets[bucket_rank].entries[pos] = None
            del self.where[slot]
        bucket = self.buckets.get(rank)
        if bucket is None:
            bucket = self.buckets[rank] = self._new_bucket(rank, capacity=8)
        pos = next((p for p, e in enumerate(bucket.entries) if e is None), len(bucket.entries))
        if pos == len(bucket.entries):
            if pos == bucket.capacity:
                self._grow(bucket)
            bucket.entries.append(None)
        self._copy(bucket, pos, slot)
        bucket.entries[pos] = (slot, ref)
        self.where[slot] = (rank, pos)

    def _new_bucket(self, rank: int, capacity: int) -> _Bucket:
        # float32 whatever the pool's dtype: nothing is rounded between shrink and expand, and
        # (scale * B) is not rounded to 16 bits (the kernels' contract)
        pool = self.tables.pool
        a = [[pool.new_zeros(capacity, rank, i, dtype=torch.float32) for i, _ in self.dims]
             for _ in range(self.num_layers)]
        bt = [[pool.new_zeros(capacity, rank, o, dtype=torch.float32) for _, o in self.dims]
              for _ in range(self.num_layers)]
        return _Bucket(rank=rank, a=a, bt=bt)

    def _grow(self, bucket: _Bucket) -> None:
        bigger = self._new_bucket(bucket.rank, 2 * bucket.capacity)
        n = bucket.capacity
        for layer in range(self.num_layers):
            for m in range(len(MODULES)):
                bigger.a[layer][m][:n] = bucket.a[layer][m]
                bigger.bt[layer][m][:n] = bucket.bt[layer][m]
        bucket.a, bucket.bt = bigger.a, bigger.bt
        bucket.views.clear()

    def _copy(self, bucket: _Bucket, pos: int, slot: int) -> None:
        """Copy the adapter in `slot` from the registry's pool to position `pos`."""
        t = self.tables
        ranks = t.ranks[:, :, slot].tolist()
        a_off = t.a_offsets[:, :, slot].tolist()
        b_off = t.b_offsets[:, :, slot].tolist()
        scales = t.scales[:, :, slot].tolist()
        for layer in range(self.num_layers):
            for m, (in_f, out_f) in enumerate(self.dims):
                a_dst = bucket.a[layer][m][pos]  # [R, in]
                bt_dst = bucket.bt[layer][m][pos]  # [R, out]
                r = ranks[layer][m]
                a_dst[r:] = 0
                bt_dst[r:] = 0
                if r == 0:
                    continue
                a_src = t.pool[a_off[layer][m]: a_off[layer][m] + r * in_f].view(r, in_f)
                b_src = t.pool[b_off[layer][m]: b_off[layer][m] + out_f * r].view(out_f, r)
                a_dst[:r] = a_src
                bt_dst[:r] = (b_src.float() * scales[layer][m]).T

    def _compact(self, bucket: _Bucket, rows: dict[int, SlotGroup]) -> None:
        """Drop positions without rows this step; move tail positions into the holes."""
        entries = bucket.entries
        for pos, entry in enumerate(entries):
            if entry is not None and entry[0] not in rows:
                entries[pos] = None
                del self.where[entry[0]]
        hole, last = 0, len(entries) - 1
        while True:
            while hole < len(entries) and entries[hole] is not None:
                hole += 1
            while last >= 0 and entries[last] is None:
                last -= 1
            if hole >= last:
                break
            for layer in range(self.num_layers):
                for m in range(len(MODULES)):
                    bucket.a[layer][m][hole] = bucket.a[layer][m][last]
                    bucket.bt[layer][m][hole] = bucket.bt[layer][m][last]
            entry = entries[last]
            assert entry is not None
            entries[hole], entries[last] = entry, None
            self.where[entry[0]] = (bucket.rank, hole)
        del entries[last + 1:]

    # ------------------------------------------------------------------ the step's plan

    def _plan(self, bucket: _Bucket, short: dict[int, SlotGroup],
              starts: dict[int, int]) -> _BucketPlan:
        num_pos = len(bucket.entries)
        used = [(p, e[0]) for p, e in enumerate(bucket.entries) if e is not None and e[0] in short]
        k = max(short[slot].num_rows for _, slot in used)
        r0 = starts[used[0][1]]
        r1 = r0 + sum(short[slot].num_rows for _, slot in used)
        x_index = [r0] * (num_pos * k)
        take: list[int] = []
        for pos, slot in used:
            for j in range(short[slot].num_rows):
                x_index[pos * k + j] = starts[slot] + j
                take.append(pos * k + j)
        dense = len(take) == num_pos * k  # no holes, no padding: rows r0.. are the products
        slots = torch.tensor([slot for _, slot in used], dtype=torch.int64)
        return _BucketPlan(
            bucket=bucket, num_pos=num_pos, views=bucket.views_of(num_pos), k=k, r0=r0, r1=r1,
            x_index=None if dense else torch.tensor(x_index, dtype=torch.int64),
            take=None if dense else torch.tensor(take, dtype=torch.int64),
            active=(self.tables.ranks[:, :, slots].amax(dim=-1) > 0).tolist())
