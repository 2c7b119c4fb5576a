"""The contract between the adapter registry and the engine.

The engine asks the registry for a reference to an adapter when a request arrives, acquires a
device slot before the request's first step, and releases it when the request ends. Each step it
reads the device tables below and hands them to `loramux.kernels` together with the step's
segment metadata. Nothing else crosses the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# Projection modules of the Llama family that an adapter may target, in table order (M axis).
MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
)
# Where each module sits inside a decoder layer (PEFT keys carry this path).
MODULE_PARENTS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}


class AdapterError(ValueError):
    """An adapter was refused; the message names the rule it broke."""


def refused_rule(exc: Exception) -> str:
    """The rule an adapter refusal names: AdapterRefused's `rule`, else the message's head
    (messages start with the rule); what clients are told instead of the detail."""
    return getattr(exc, "rule", None) or str(exc).split(":", 1)[0]


class AdapterNotFound(KeyError):
    """No adapter of that name (or the caller may not see it)."""


@dataclass(frozen=True)
class BaseSpec:
    """What adapters are validated against: the base's layers and each module's shape."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]  # module -> (in_features, out_features)

    @classmethod
    def from_hf_config(cls, config: object) -> BaseSpec:
        """Shapes of a Llama-family decoder from its transformers config."""
        hidden = int(config.hidden_size)  # type: ignore[attr-defined]
        heads = int(config.num_attention_heads)  # type: ignore[attr-defined]
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        inter = int(config.intermediate_size)  # type: ignore[attr-defined]
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        return cls(num_layers=int(config.num_hidden_layers), shapes=shapes)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class AdapterRef:
    """One version of one adapter. Anything keyed by adapter uses all three fields."""

    name: str
    version: int
    digest: str  # sha256 of the weights


@dataclass
class LoraTables:
    """Device-side tables the kernels read; refilled in place when slots change.

    pool holds every resident adapter's A and B blocks (model dtype, on the model's device).
    For layer l, module index m (into MODULES) and slot s:
      a_offsets[l, m, s], b_offsets[l, m, s]  element offsets of A [r, in] and B [out, r] in pool
      ranks[l, m, s]                          r, or 0 where the slot's adapter skips that module
      scales[l, m, s]                         alpha/r, or alpha/sqrt(r) with rsLoRA (per module)
    A slot with no adapter has rank 0 everywhere. `[l, m]` slices are contiguous [S] vectors,
    which is what `sgmv_shrink` / `sgmv_expand` take.
    """

    pool: torch.Tensor  # [P]
    a_offsets: torch.Tensor  # int64 [L, M, S]
    b_offsets: torch.Tensor  # int64 [L, M, S]
    ranks: torch.Tensor  # int32 [L, M, S]
    scales: torch.Tensor  # float32 [L, M, S]
    max_rank: int  # the largest rank any slot may hold (width of the shrink buffer)


class AdapterSource(Protocol):
    """What the engine needs from the registry. All calls are cheap and never block on I/O."""

    tables: LoraTables

    def resolve(self, name: str) -> AdapterRef:
        """The current version of `name`; raises AdapterNotFound (lazy names included)."""
        ...

    def current(self, name: str) -> AdapterRef | None:
        """The current version of a loaded name, or None; never loads anything."""
        ...

    def prefetch(self, ref: AdapterRef) -> None:
        """Start paging `ref` towards the device if it is not there; returns at once."""
        ...

    def acquire(self, ref: AdapterRef, *, parked: bool = False) -> int | None:
        """The device slot of `ref` with its reference count raised, or None while it pages in.

        A slot returned here is never evicted or reused until the matching `release`.
        `parked`: take back a reference given up with `park`.
        """
        ...

    def yielding(self) -> frozenset[AdapterRef]:
        """Referenced versions whose holders should `park` (a starving waiter needs the room)."""
        ...

    def park(self, ref: AdapterRef) -> None:
        """Give one reference back mid-request, keeping the version alive for the holder."""
        ...

    def unpark(self, ref: AdapterRef) -> None:
        """Drop a parked hold without taking the reference again."""
        ...

    def release(self, ref: AdapterRef) -> None:
        """Drop one reference taken by `acquire`."""
        ...
