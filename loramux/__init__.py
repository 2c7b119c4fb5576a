"""loramux: a multi-tenant LoRA inference server (docs/design.md has the map).

The subpackages `loramux.server`, `loramux.engine`, `loramux.adapters`, `loramux.kernels` and
`loramux.loadtest` are the repository's top-level folders (symlinked here; docs/design.md says
why). The engine's entry points are re-exported lazily, so `import loramux` stays cheap and
imports neither torch nor transformers:

    from loramux import EngineConfig, LLMEngine, SamplingParams
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loramux.offline import forbid_hub_code

# First, before any subpackage imports huggingface_hub, transformers, kernels or bitsandbytes:
# most of their hub switches are read at import (loramux/offline.py).
forbid_hub_code()

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "AsyncEngine": "loramux.engine.async_engine",
    "EngineConfig": "loramux.engine.config",
    "LLMEngine": "loramux.engine.engine",
    "RequestOutput": "loramux.engine.request",
    "SamplingParams": "loramux.engine.sampling_params",
    "AdapterRegistry": "loramux.adapters.registry",
    "RegistryConfig": "loramux.adapters.config",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from loramux.adapters.config import RegistryConfig
    from loramux.adapters.registry import AdapterRegistry
    from loramux.engine.async_engine import AsyncEngine
    from loramux.engine.config import EngineConfig
    from loramux.engine.engine import LLMEngine
    from loramux.engine.request import RequestOutput
    from loramux.engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loramux' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
