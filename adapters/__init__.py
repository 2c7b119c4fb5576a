"""Adapters: PEFT loading and validation, registry, tiered paging.

Map: types.py is the contract with the engine; peft.py reads and validates PEFT adapters;
host_cache.py packs each adapter into one contiguous buffer (the layout shared by both tiers)
and keeps them LRU in host memory; pool.py places them in the flat device pool and fills the
kernel tables; registry.py ties it together (versions, references, paging threads, fairness).
"""

from loramux.adapters.config import RegistryConfig
from loramux.adapters.peft import AdapterRefused, PeftAdapter, Rule, ValidationLimits, read_adapter
from loramux.adapters.registry import (
    AdapterInfo,
    AdapterRegistry,
    LoadResult,
    RegistryStats,
)
from loramux.adapters.types import (
    MODULE_PARENTS,
    MODULES,
    AdapterError,
    AdapterNotFound,
    AdapterRef,
    AdapterSource,
    BaseSpec,
    LoraTables,
)

__all__ = [
    "MODULES",
    "MODULE_PARENTS",
    "AdapterError",
    "AdapterInfo",
    "AdapterNotFound",
    "AdapterRef",
    "AdapterRefused",
    "AdapterRegistry",
    "AdapterSource",
    "BaseSpec",
    "LoadResult",
    "LoraTables",
    "PeftAdapter",
    "RegistryConfig",
    "RegistryStats",
    "Rule",
    "ValidationLimits",
    "read_adapter",
]
