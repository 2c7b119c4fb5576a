"""Accelerator tier: one flat pool within a byte budget, slots, and the tables the kernels read.

Each resident adapter version owns one slot (a column of `LoraTables`) and one contiguous region
of the flat pool, of exactly its own packed size (see host_cache.py for the layout), so memory
is proportional to each adapter's ranks and a page-in is one copy. Regions come from a
first-fit allocator whose free list is kept sorted and coalesced.

Invariants:
  - a resident with refcount > 0 or pinned is never evicted, its slot and region never reused;
  - a slot's table column is written only while the slot is being paged in (no request can use
    it yet) and its ranks are zeroed on eviction, so a stale slot applies nothing;
  - eviction picks, among ready, unpinned, unreferenced residents the caller allows, the least
    recently used first.
`DevicePool` is not thread-safe: the registry calls it under its lock, except `write`, which
touches only a region and column that the placing thread owns until it marks them ready.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from loramux.adapters.host_cache import HostAdapter
from loramux.adapters.types import MODULES, BaseSpec, LoraTables


class RegionAllocator:
    """First-fit allocation of element ranges in [0, capacity), free list coalesced."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity > 0 else []  # (start, n)

    @property
    def free_elements(self) -> int:
        return sum(n for _, n in self._free)

    @property
    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def alloc(self, numel: int) -> int | None:
        """Start of a free range of numel elements (the lowest that fits), or None."""
        for i, (start, n) in enumerate(self._free):
            if n >= numel:
                if n == numel:
                    del self._free[i]
                else:
                    self._free[i] = (start + numel, n - numel)
                return start
        return None

    def free(self, start: int, numel: int) -> None:
        """Return a range; merges with free neighbours so the list never fragments needlessly."""
        self._free = self._merged(self._free, start, numel)

    def fits_after_freeing(self, numel: int, ranges: list[tuple[int, int]]) -> bool:
        """Whether alloc(numel) would succeed once `ranges` are freed (nothing changes)."""
        free = self._free
        for start, n in ranges:
            free = self._merged(free, start, n)
        return any(n >= numel for _, n in free)

    @staticmethod
    def _merged(free: list[tuple[int, int]], start: int, numel: int) -> list[tuple[int, int]]:
        free = list(free)
        i = bisect.bisect_left(free, (start, 0))
        if i > 0 and free[i - 1][0] + free[i - 1][1] > start or (
            i < len(free) and start + numel > free[i][0]
        ):
            raise ValueError(f"range {start}+{numel} overlaps a free range")
        if i < len(free) and start + numel == free[i][0]:
            numel += free[i][1]
            del free[i]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == start:
            start, numel = free[i - 1][0], free[i - 1][1] + numel
            del free[i - 1]
            i -= 1
        free.insert(i, (start, numel))
        return free


@dataclass
class Resident:
    """One adapter version placed in the pool."""

    key: Hashable
    slot: int
    offset: int  # element offset of the region in the pool
    numel: int
    refcount: int = 0
    pinned: bool = False
    ready: bool = False  # False while its page-in copy runs
    last_use: float = 0.0  # monotonic time of the last acquire (LRU order)


class DevicePool:
    """Slots, regions and the kernel tables for up to `num_slots` resident adapters."""

    def __init__(
        self,
        base: BaseSpec,
        *,
        num_slots: int,
        capacity_elements: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.base = base
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        shape = (base.num_layers, len(MODULES), num_slots)
        # Allocated once and only ever written in place, so CUDA graphs may capture them.
        self.tables = LoraTables(
            # empty, not zeros: kernels read only the blocks of ranks > 0, which a page-in wrote
            # (and on CPU untouched pages of a large default pool are never committed).
            pool=torch.empty(capacity_elements, dtype=dtype, device=device),
            a_offsets=torch.zeros(shape, dtype=torch.int64, device=device),
            b_offsets=torch.zeros(shape, dtype=torch.int64, device=device),
            ranks=torch.zeros(shape, dtype=torch.int32, device=device),
            scales=torch.zeros(shape, dtype=torch.float32, device=device),
            max_rank=max_rank,
        )
        self.allocator = RegionAllocator(capacity_elements)
        self._free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._residents: dict[Hashable, Resident] = {}
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    # ------------------------------------------------------------------ queries

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.capacity * self.tables.pool.element_size()

    @property
    def used_bytes(self) -> int:
        return (self.allocator.capacity - self.allocator.free_elements) * \
            self.tables.pool.element_size()

    def get(self, key: Hashable) -> Resident | None:
        return self._residents.get(key)

    def residents(self) -> list[Resident]:
        return list(self._residents.values())

    def victims_for(
        self, numel: int, allow: Callable[[Resident], bool], *, referenced: bool = False
    ) -> list[Resident] | None:
        """Fewest LRU residents whose eviction frees a slot and a region of numel, or None.

        Candidates are ready, unpinned residents that `allow` accepts and, unless `referenced`
        (the fairness rule asks which in-use adapters to close), have refcount 0.
        """
        candidates = sorted(
            (r for r in self._residents.values()
             if r.ready and not r.pinned and (referenced or r.refcount == 0) and allow(r)),
            key=lambda r: r.last_use,
        )
        victims: list[Resident] = []
        while True:
            ranges = [(v.offset, v.numel) for v in victims]
            if (self._free_slots or victims) and self.allocator.fits_after_freeing(numel, ranges):
                return victims
            if len(victims) == len(candidates):
                return None
            victims.append(candidates[len(victims)])

    # ------------------------------------------------------------------ changes

    def place(self, key: Hashable, numel: int, now: float) -> Resident:
        """Give `key` a free slot and region (not ready until `write`); caller evicted first."""
        if key in self._residents:
            raise ValueError(f"{key} is already resident")
        offset = self.allocator.alloc(numel)
        if offset is None or not self._free_slots:
            if offset is not None:
                self.allocator.free(offset, numel)
            raise RuntimeError(f"no room for {numel} elements: evict first")
        resident = Resident(key=key, slot=self._free_slots.pop(), offset=offset, numel=numel,
                            last_use=now)
        self._residents[key] = resident
        return resident

    def evict(self, key: Hashable) -> Resident:
        """Free the slot and region of an unreferenced resident; its ranks become 0."""
        resident = self._residents[key]
        if resident.refcount:
            raise RuntimeError(f"{key} is referenced ({resident.refcount}); never evicted")
        del self._residents[key]
        with self._on_copy_stream():
            self.tables.ranks[:, :, resident.slot].zero_()
        self.allocator.free(resident.offset, resident.numel)
        self._free_slots.append(resident.slot)
        return resident

    def write(self, resident: Resident, host: HostAdapter,
              after: torch.cuda.Stream | None = None) -> None:
        """Copy the packed buffer into the resident's region (one copy) and fill its column.

        On CUDA the copy runs on a side stream that first waits for `after` (the engine's
        compute stream; the default stream if None), so a region freed by an eviction is not
        overwritten under a kernel still reading it. Returns when the copy is complete: only
        the calling (background) thread waits, never the step loop.
        """
        layout = host.layout
        if layout.numel != resident.numel:
            raise ValueError("layout and region sizes differ")
        has = layout.ranks > 0  # [L, M]
        a_abs = torch.where(has, layout.a_offsets + resident.offset, 0)
        b_abs = torch.where(has, layout.b_offsets + resident.offset, 0)
        tables, slot = self.tables, resident.slot
        with self._on_copy_stream(after):
            tables.pool.narrow(0, resident.offset, resident.numel).copy_(
                host.buffer, non_blocking=True)
            tables.a_offsets[:, :, slot].copy_(a_abs, non_blocking=True)
            tables.b_offsets[:, :, slot].copy_(b_abs, non_blocking=True)
            tables.scales[:, :, slot].copy_(layout.scales, non_blocking=True)
            # ranks last: a reader that sees a rank sees the offsets and weights it needs.
            tables.ranks[:, :, slot].copy_(layout.ranks, non_blocking=True)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    def _on_copy_stream(
        self, after: torch.cuda.Stream | None = None
    ) -> contextlib.AbstractContextManager[object]:
        if self._copy_stream is None:
            return contextlib.nullcontext()
        self._copy_stream.wait_stream(after or torch.cuda.default_stream(self.device))
        return torch.cuda.stream(self._copy_stream)
