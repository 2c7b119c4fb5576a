"""Configuration of the adapter registry, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RegistryConfig:
    """Where adapters come from and how much memory each tier may hold.

    The accelerator pool is a byte budget in which each adapter takes memory in proportion to
    its own ranks, and residency is bounded by those bytes: adapters/sizing.py sizes the pool
    (`gpu_pool_bytes`, else `gpu_pool_fraction` of free CUDA memory, else a share of host
    memory) and gives it slots enough never to bind first. `max_gpu_adapters`, when set,
    caps the slots (the kernels' S) and so how many adapters are resident at once.
    """

    adapters: tuple[tuple[str, Path], ...] = ()  # --adapter NAME=PATH, loaded at start
    adapter_root: Path | None = None  # lazy resolution of unknown names, uploads
    desired_set: Path | None = None  # declarative list reconciled at start
    # --adapter-state: runtime loads, reloads, pins and unloads are written here (atomically)
    # and applied at start after the start-up set; None: they are lost on restart.
    state_file: Path | None = None
    max_gpu_adapters: int | None = None  # None: the pool's bytes decide
    max_cpu_adapters: int = 64
    max_lora_rank: int = 64
    gpu_pool_bytes: int | None = None  # None: from gpu_pool_fraction (CUDA) or host memory
    gpu_pool_fraction: float = 0.10  # CUDA: share of the memory free after the weights
    cpu_cache_bytes: int | None = None  # None: no byte bound beyond max_cpu_adapters
    max_adapter_bytes: int = 2 << 30
    allow_pickle: bool = False
    pinned: tuple[str, ...] = field(default=())
    # Fairness (adapters/registry.py): a waiter older than this may close hot adapters' room.
    fairness_wait_s: float = 1.0
    # ... and a request parked mid-run (it has its first token) after this long: its turn on
    # the device comes less often than a new request's, so adapters are not swapped every
    # few steps when more are in use than fit (each swap costs a page-in and a bubble).
    parked_wait_s: float = 4.0
    # A prefetch or acquire wish lapses after this long without a renewal (request gone).
    want_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_gpu_adapters is not None and self.max_gpu_adapters < 1:
            raise ValueError("max_gpu_adapters must be at least 1 (or None: no cap)")
        if self.max_gpu_adapters is not None and self.max_cpu_adapters < self.max_gpu_adapters:
            raise ValueError("max_cpu_adapters must be at least max_gpu_adapters")
        if self.max_cpu_adapters < 1:
            raise ValueError("max_cpu_adapters must be at least 1")
        if self.gpu_pool_bytes is not None and self.gpu_pool_bytes < 1:
            raise ValueError("gpu_pool_bytes must be positive")
        if not 0 < self.gpu_pool_fraction < 1:
            raise ValueError("gpu_pool_fraction must be in (0, 1)")
        if not 1 <= self.max_lora_rank <= 1024:
            raise ValueError("max_lora_rank must be in 1..1024")
        if self.fairness_wait_s < 0 or self.parked_wait_s < 0 or self.want_ttl_s <= 0:
            raise ValueError("fairness_wait_s and parked_wait_s must be >= 0 and want_ttl_s > 0")
        names = [name for name, _ in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names given twice: {sorted(names)}")
