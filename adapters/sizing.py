"""How many bytes the accelerator adapter pool has and how many slots, decided once at start.

Residency is bounded by bytes: each adapter takes pool memory in proportion to its own ranks
(pool.py), so the slot count S only has to be large enough never to bind first. The slot tables
are [L, M, S] of int64, int64, int32 and float32 (24 B per layer, module and slot: 5.3 KiB a slot
on Llama-2-7B) and nothing does work in proportion to S (the kernels and the CPU stacks read the
slots of a step's segments only), so S is generous:

    S = max_gpu_adapters                                        the operator's cap, if given
      = max(max_num_seqs, min(MAX_SLOTS, bytes // B(SLOT_RANK)))  otherwise

where B(r) is the packed size of a rank-r adapter on every projection of every layer. S is at
least max_num_seqs so every row of a step may carry its own adapter, and covers as many
adapters as the bytes hold down to rank SLOT_RANK (smaller adapters may find the slots full
before the bytes: they are then evicted LRU like any other).

Pool bytes, first that applies:
  1. `gpu_pool_bytes`, as given;
  2. CUDA: `gpu_pool_fraction` of the memory free when the registry is built, which is after
     the weights are loaded and before the engine sizes its KV cache; the cache's default (85%
     of free memory) is then taken of what the pool left: weights -> adapter pool -> KV cache,
     the order in which vLLM reserves its LoRA buffers before profiling the KV cache;
  3. CPU: CPU_POOL_BYTES, at most CPU_POOL_SHARE of the host's (or its cgroup's) memory.
With a slot cap, bytes beyond cap x B(max_lora_rank) can never be used, so the pool stops there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.adapters.config import RegistryConfig
from loramux.adapters.host_cache import full_rank_numel
from loramux.adapters.types import BaseSpec

SLOT_RANK = 8  # the smallest all-projection adapter the slot count is sized for
MAX_SLOTS = 1024  # 5.5 MiB of tables on Llama-2-7B
CPU_POOL_BYTES = 2 << 30
CPU_POOL_SHARE = 1 / 8


@dataclass(frozen=True)
class PoolSize:
    """The pool's byte budget and slot count, and where the bytes came from (for the log)."""

    capacity_bytes: int
    num_slots: int
    source: str

    def __post_init__(self) -> None:
        if self.capacity_bytes < 0 or self.num_slots < 1:
            raise ValueError("a pool has >= 0 bytes and >= 1 slot")

    def adapters_at(self, base: BaseSpec, rank: int, element_size: int) -> int:
        """How many adapters of `rank` on every projection fit, slots and bytes both."""
        numel = full_rank_numel(base, rank)
        return min(self.num_slots, self.capacity_bytes // element_size // max(numel, 1))


def size_pool(config: RegistryConfig, base: BaseSpec, dtype: torch.dtype,
              device: torch.device, *, max_num_seqs: int = 1) -> PoolSize:
    """The pool for `config` on `device` (see the module docstring for the rules)."""
    element = torch.empty((), dtype=dtype).element_size()
    if config.gpu_pool_bytes is not None:
        budget, source = config.gpu_pool_bytes, "--adapter-pool-bytes"
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.gpu_pool_fraction)
        source = f"{config.gpu_pool_fraction:.0%} of {free / 2**30:.1f} GiB free after the weights"
    else:
        host = host_memory_bytes()
        budget = min(CPU_POOL_BYTES, int(host * CPU_POOL_SHARE))
        source = f"min(2 GiB, 1/8 of {host / 2**30:.1f} GiB host memory)"
    if config.max_gpu_adapters is not None:
        most = config.max_gpu_adapters * full_rank_numel(base, config.max_lora_rank) * element
        if most < budget:
            budget, source = most, (f"--max-gpu-adapters {config.max_gpu_adapters} at rank "
                                    f"{config.max_lora_rank}")
        return PoolSize(budget, config.max_gpu_adapters, source)
    small = budget // element // max(full_rank_numel(base, SLOT_RANK), 1)
    return PoolSize(budget, max(max_num_seqs, min(MAX_SLOTS, small), 1), source)


def host_memory_bytes() -> int:
    """Physical memory, or the cgroup v2 limit of this process where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return int(total)
    return int(min(total, int(limit))) if limit.isdigit() else int(total)
