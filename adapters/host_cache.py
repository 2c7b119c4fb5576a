"""Host tier: each adapter packed in one contiguous buffer, LRU within a byte and count budget.

The packed layout is the device layout. An adapter's buffer holds, for every (layer, module) it
changes in (layer, MODULES) order, A as a row-major [r, in] block and then B as a row-major
[out, r] block, each block starting at a multiple of ALIGN elements, in the serving dtype:

    buffer: | A(0,q) | B(0,q) | A(0,v) | B(0,v) | A(1,q) | ... |      numel = layout.numel
    layout.a_offsets[l, m] = element offset of A(l, m) in the buffer (0 where ranks[l, m] = 0)

A device region of the same numel at element offset `o` of the flat pool receives the buffer
with ONE copy, after which slot tables are `o + layout.a_offsets` etc. Memory is proportional
to the adapter's own ranks (plus < ALIGN elements of padding per block).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from loramux.adapters.peft import PeftAdapter
from loramux.adapters.types import MODULES, BaseSpec

# Block starts are multiples of 64 elements (128 B in 16-bit dtypes): aligned, vectorisable
# loads for the kernels at a padding cost far below one rank-1 row of any real model.
ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class AdapterLayout:
    """Where each block of one adapter sits inside its contiguous buffer (relative offsets)."""

    numel: int  # elements of the buffer / device region
    a_offsets: torch.Tensor  # int64 [L, M]
    b_offsets: torch.Tensor  # int64 [L, M]
    ranks: torch.Tensor  # int32 [L, M], 0 where the adapter skips (layer, module)
    scales: torch.Tensor  # float32 [L, M]


def plan_layout(base: BaseSpec, blocks: list[tuple[int, str, int, float]]) -> AdapterLayout:
    """The layout for (layer, module, rank, scale) entries, in (layer, MODULES) order."""
    shape = (base.num_layers, len(MODULES))
    # Built in Python lists: hundreds of scalar tensor writes would cost milliseconds.
    a_offsets = [[0] * shape[1] for _ in range(shape[0])]
    b_offsets = [[0] * shape[1] for _ in range(shape[0])]
    ranks = [[0] * shape[1] for _ in range(shape[0])]
    scales = [[0.0] * shape[1] for _ in range(shape[0])]
    cursor = 0
    for layer, module, rank, scale in sorted(blocks, key=lambda e: (e[0], MODULES.index(e[1]))):
        m = MODULES.index(module)
        in_features, out_features = base.shapes[module]
        a_offsets[layer][m] = cursor
        cursor += _align(rank * in_features)
        b_offsets[layer][m] = cursor
        cursor += _align(out_features * rank)
        ranks[layer][m] = rank
        scales[layer][m] = scale
    return AdapterLayout(numel=cursor,
                         a_offsets=torch.tensor(a_offsets, dtype=torch.int64).reshape(shape),
                         b_offsets=torch.tensor(b_offsets, dtype=torch.int64).reshape(shape),
                         ranks=torch.tensor(ranks, dtype=torch.int32).reshape(shape),
                         scales=torch.tensor(scales, dtype=torch.float32).reshape(shape))


def pinned_host_bytes(nbytes: int) -> int:
    """Host memory a pinned buffer of nbytes really holds.

    PyTorch's CUDA host allocator (CachingHostAllocator) rounds each request up to the next
    power of two before asking CUDA for it (`c10::llvm::PowerOf2Ceil`,
    ATen/core/CachingHostAllocator.h): a rank-16 adapter on every projection of Llama-2-7B
    (76 MiB in bf16) holds 128 MiB pinned. torch 2.13 can be told to stop rounding above a
    size (PYTORCH_CUDA_ALLOC_CONF's pinned_max_round_threshold); by default it always rounds,
    and counting the rounded size is then only conservative.
    """
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


def full_rank_numel(base: BaseSpec, rank: int) -> int:
    """Elements one adapter takes when it changes every module of every layer at `rank`."""
    return plan_layout(base, [(layer, m, rank, 1.0) for layer in range(base.num_layers)
                              for m in MODULES if m in base.shapes]).numel


@dataclass(frozen=True)
class HostAdapter:
    """One adapter in host memory: its layout and the buffer a page-in copies in one go."""

    layout: AdapterLayout
    buffer: torch.Tensor  # [layout.numel], serving dtype, contiguous, pinned when CUDA serves

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def pack(adapter: PeftAdapter, base: BaseSpec, dtype: torch.dtype, *, pin: bool) -> HostAdapter:
    """Pack a validated adapter into its contiguous buffer (padding zeroed)."""
    layout = plan_layout(base, [(m.layer, m.module, m.rank, m.scale) for m in adapter.modules])
    buffer = torch.zeros(layout.numel, dtype=dtype, pin_memory=pin)
    a_offsets, b_offsets = layout.a_offsets.tolist(), layout.b_offsets.tolist()
    for entry in adapter.modules:
        idx = MODULES.index(entry.module)
        a_at, b_at = a_offsets[entry.layer][idx], b_offsets[entry.layer][idx]
        buffer[a_at:a_at + entry.a.numel()].view(entry.a.shape).copy_(entry.a)
        buffer[b_at:b_at + entry.b.numel()].view(entry.b.shape).copy_(entry.b)
    return HostAdapter(layout=layout, buffer=buffer)


class HostCache:
    """LRU cache of packed adapters, bounded by count and (optionally) bytes.

    Invariants: an entry with a hold (a page-in reading its buffer) is never dropped; `put`
    evicts least recently used entries that are not held and that `may_evict` allows, and
    refuses (returns False) rather than exceed a bound. Not thread-safe: the registry calls it
    under its lock.

    Bytes are what an entry holds in host memory: with `pinned` (the buffers come from CUDA's
    pinned allocator) an entry of n bytes counts `pinned_host_bytes(n)`, the allocator's
    power-of-two rounding, and `fits`, `room_for` and `nbytes` all count that way, so the
    budget bounds the memory really pinned. (Blocks the allocator caches after an entry is
    dropped are not counted: it reuses them for entries of the same rounded size.)
    """

    def __init__(self, max_entries: int, max_bytes: int | None, *, pinned: bool = False) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.pinned = pinned
        self._entries: OrderedDict[Hashable, HostAdapter] = OrderedDict()  # LRU first
        self._holds: dict[Hashable, int] = {}
        self._doomed: set[Hashable] = set()  # dropped while held: removed on the last unhold
        self.nbytes = 0  # host memory held by the entries (rounded when pinned)
        self.evictions = 0

    def charge(self, nbytes: int) -> int:
        """Bytes an entry whose buffer has nbytes counts against the budget."""
        return pinned_host_bytes(nbytes) if self.pinned else nbytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> HostAdapter | None:
        """The entry (marked most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of nbytes (its buffer's size) could ever fit (the byte bound alone)."""
        return self.max_bytes is None or self.charge(nbytes) <= self.max_bytes

    def room_for(self, nbytes: int, may_evict: Callable[[Hashable], bool]) -> list[Hashable] | None:
        """The LRU victims whose removal makes room for an entry of nbytes, or None if
        impossible now."""
        if not self.fits(nbytes):
            return None
        nbytes = self.charge(nbytes)
        count, total, victims = len(self._entries), self.nbytes, []
        for key, entry in self._entries.items():
            if count < self.max_entries and (self.max_bytes is None
                                             or total + nbytes <= self.max_bytes):
                break
            if self._holds.get(key, 0) == 0 and may_evict(key):
                victims.append(key)
                count -= 1
                total -= self.charge(entry.nbytes)
        if count < self.max_entries and (self.max_bytes is None or total + nbytes <= self.max_bytes):
            return victims
        return None

    def put(self, key: Hashable, entry: HostAdapter, may_evict: Callable[[Hashable], bool]) -> bool:
        """Insert (evicting LRU entries `may_evict` allows); False if it cannot fit now."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        victims = self.room_for(entry.nbytes, may_evict)
        if victims is None:
            return False
        for victim in victims:
            self.drop(victim)
            self.evictions += 1
        self._entries[key] = entry
        self.nbytes += self.charge(entry.nbytes)
        return True

    def drop(self, key: Hashable) -> None:
        """Remove an entry if present and not held (a held entry is dropped on its last unhold)."""
        if self._holds.get(key, 0):
            self._doomed.add(key)
            return
        self._doomed.discard(key)
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= self.charge(entry.nbytes)

    def hold(self, key: Hashable) -> HostAdapter:
        """Pin an entry while a copy reads it; KeyError if absent."""
        entry = self._entries[key]
        self._holds[key] = self._holds.get(key, 0) + 1
        return entry

    def unhold(self, key: Hashable) -> None:
        left = self._holds[key] - 1
        if left:
            self._holds[key] = left
        else:
            del self._holds[key]
            if key in self._doomed:
                self.drop(key)
