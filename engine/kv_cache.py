"""Paged KV cache: fixed-size blocks, a free list, and the cache tensors.

A sequence's keys and values live in blocks of `block_size` token rows; its block table lists
them in order, so token position p of the sequence sits in row `p % block_size` of block
`block_table[p // block_size]`, i.e. at flat cache row `block * block_size + p % block_size`
(the "slot mapping" the attention writes to). Blocks are not shared between sequences (no
prefix caching yet), so freeing a sequence frees all of its blocks.
"""

from __future__ import annotations

from collections import deque

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` token rows."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Hands out KV block ids in [first_id, first_id + num_blocks).

    Invariants: every id is either in the free list or owned by exactly one sequence; `allocate`
    never returns an id twice before it is freed; `free` of an id that is already free is an
    error (it would let two sequences write the same rows).
    """

    def __init__(self, num_blocks: int, first_id: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(first_id, first_id + num_blocks))
        self._is_free = [False] * first_id + [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n free block ids, now owned by the caller; raises if fewer than n are free."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._is_free[b] = False
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give blocks back (most recently freed are reused last, which eases debugging)."""
        for b in blocks:
            if self._is_free[b]:
                raise RuntimeError(f"KV block {b} freed twice")
            self._is_free[b] = True
            self._free.append(b)


class KVCache:
    """Key and value tensors of every layer, `[L, 2 + num_blocks, block_size, nKV, D]` each.

    Block 0 is the null block: never allocated, all zeros. Padded positions of the torch
    attention path read it (they are masked, but a masked value must still be finite: 0 * NaN
    would poison the row). The last block, `dummy_block`, is never allocated either: the
    padding rows of a decode step padded to its batch bucket write their K/V to its row 0 and
    attend to that row alone, and the warm-up's throw-away sequences write there too; no real
    sequence ever reads it. Blocks 1..num_blocks are the allocator's. Every other row is written before it is read, so the rest of the cache is
    left uninitialised, and on the CPU its memory is committed only as it is used.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, 2 + num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dummy_block = 1 + num_blocks
        self.k = torch.empty(shape, dtype=dtype, device=device)  # [L, 2 + NB, bs, nKV, D]
        self.v = torch.empty(shape, dtype=dtype, device=device)  # [L, 2 + NB, bs, nKV, D]
        for block in (0, self.dummy_block):
            self.k[:, block].zero_()
            self.v[:, block].zero_()
        self.allocator = BlockAllocator(num_blocks, first_id=1)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (the kv_cache_usage_perc gauge)."""
        return self.allocator.num_used / self.num_blocks

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """K and V bytes one token takes over all layers."""
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
