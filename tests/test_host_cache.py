"""The host tier's byte budget counts what pinned buffers really hold.

PyTorch's CUDA host allocator rounds every pinned allocation up to a power of two, so a budget
that counts buffer sizes lets up to ~2x (1.7x for the usual adapter sizes) more memory be
pinned than configured. With `pinned=True` the cache counts the rounded size. Pure CPU: the
rounding is arithmetic, the buffers here are plain tensors.
"""

from __future__ import annotations

import pytest
import torch
from loramux.adapters.host_cache import AdapterLayout, HostAdapter, HostCache, pinned_host_bytes

MIB = 2**20


def _entry(nbytes: int) -> HostAdapter:
    numel = nbytes // 2  # bfloat16
    empty = torch.zeros((1, 1), dtype=torch.int64)
    layout = AdapterLayout(numel=numel, a_offsets=empty, b_offsets=empty,
                           ranks=torch.zeros((1, 1), dtype=torch.int32),
                           scales=torch.zeros((1, 1)))
    return HostAdapter(layout=layout, buffer=torch.empty(numel, dtype=torch.bfloat16))


@pytest.mark.parametrize("nbytes, held", [
    (0, 0), (1, 1), (2, 2), (3, 4), (4096, 4096), (4097, 8192),
    (79953920, 128 * MIB),  # a rank-16 all-projection Llama-2-7B adapter in bf16: 1.68x
    (int(1.2 * MIB), 2 * MIB), (2**30, 2**30), (2**30 + 1, 2**31),
])
def test_pinned_host_bytes_is_the_allocators_power_of_two(nbytes: int, held: int) -> None:
    assert pinned_host_bytes(nbytes) == held


def always(_key: object) -> bool:
    return True


def test_a_pinned_cache_budgets_the_rounded_size() -> None:
    """Three 1.2 MiB entries fit a 4 MiB budget as plain memory, but pinned each holds 2 MiB:
    only two fit, and putting a third evicts the least recently used."""
    plain = HostCache(max_entries=8, max_bytes=4 * MIB)
    for key in "abc":
        assert plain.put(key, _entry(int(1.2 * MIB)), always)
    assert len(plain) == 3 and plain.evictions == 0

    pinned = HostCache(max_entries=8, max_bytes=4 * MIB, pinned=True)
    assert pinned.put("a", _entry(int(1.2 * MIB)), always)
    assert pinned.put("b", _entry(int(1.2 * MIB)), always)
    assert pinned.nbytes == 4 * MIB  # what the allocator pinned, not 2.4 MiB
    assert pinned.room_for(int(1.2 * MIB), always) == ["a"]
    assert pinned.put("c", _entry(int(1.2 * MIB)), always)
    assert "a" not in pinned and len(pinned) == 2 and pinned.evictions == 1
    pinned.drop("b")
    assert pinned.nbytes == 2 * MIB


def test_a_pinned_cache_refuses_what_would_round_past_the_budget() -> None:
    """A 2.5 MiB buffer fits a 3 MiB budget unpinned; pinned it would hold 4 MiB: it never
    fits (the registry refuses such an adapter at load, naming the host cache)."""
    assert HostCache(max_entries=4, max_bytes=3 * MIB).fits(int(2.5 * MIB))
    pinned = HostCache(max_entries=4, max_bytes=3 * MIB, pinned=True)
    assert not pinned.fits(int(2.5 * MIB))
    assert pinned.room_for(int(2.5 * MIB), always) is None
    assert not pinned.put("big", _entry(int(2.5 * MIB)), always)
    assert len(pinned) == 0 and pinned.nbytes == 0


def test_the_unpinned_cache_counts_buffer_sizes_as_before() -> None:
    cache = HostCache(max_entries=4, max_bytes=None)
    cache.put("a", _entry(int(1.2 * MIB)), always)
    assert cache.nbytes == _entry(int(1.2 * MIB)).nbytes
