"""What the HTTP layer needs from the engine and the adapter registry, in one interface.

`EngineClient` is the only thing `server/app.py` and `server/admin.py` talk to. The real
implementation (`LocalEngineClient`, in server/local_engine.py) wraps loramux's AsyncEngine
and AdapterRegistry; tests of the HTTP edge use a small fake. Keeping this seam thin means the
server never reaches into engine or registry internals, and anything the server wishes those
packages offered is visible here in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loramux.engine.sampling_params import SamplingParams
from loramux.server.metrics import RuntimeStats


class GenerationFailed(RuntimeError):
    """The engine ended a request with an error (e.g. its adapter was unloaded before it
    started); the message is meant for the client, `code` is the engine's error_code
    ("adapter_unavailable", "non_finite_logits", or None for anything else)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the top alternatives (id, text, logprob)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class GenerationChunk:
    """What one engine step added to one sequence.

    `text` is the new text since the previous chunk (stop strings already cut), `token_ids`
    the new tokens; counts are cumulative. `finish_reason` is set on the last chunk: "stop",
    "length" or "abort".
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True)
class AdapterRow:
    """One adapter version as the admin API lists it."""

    name: str
    version: int
    digest: str
    current: bool
    tier: str  # "device", "paging", "host" or "disk"
    modules: tuple[str, ...]
    ranks: tuple[int, ...]
    size_bytes: int
    refcount: int
    pinned: bool
    last_use: float | None
    loaded_at: float
    path: str
    slot: int | None = None
    load_seconds: float = 0.0
    # What the load that returned this row did: "new version", "unchanged" (same weights and
    # config as the current version) or "recovered" (unchanged, and a remembered failure to
    # read its files cleared); None in listings.
    outcome: str | None = None

    @property
    def rank(self) -> int:
        return max(self.ranks) if self.ranks else 0

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "digest": self.digest,
            "current": self.current, "tier": self.tier, "slot": self.slot,
            "rank": self.rank, "ranks": list(self.ranks), "modules": list(self.modules),
            "size_bytes": self.size_bytes, "refcount": self.refcount, "pinned": self.pinned,
            "last_use": self.last_use, "loaded_at": self.loaded_at,
            "load_seconds": self.load_seconds, "path": self.path,
            **({"outcome": self.outcome} if self.outcome is not None else {}),
        }


@dataclass(frozen=True)
class ModelInfo:
    """The served base model."""

    name: str
    max_model_len: int | None  # prompt + output tokens of one sequence; None while loading
    created: int
    vocab_size: int | None = None  # None: unknown (token-id prompts are checked by the engine)


class EngineClient(Protocol):
    """The engine and registry as the server sees them.

    Calls that may touch the disk or wait for the engine are `async`; the implementation runs
    blocking work off the event loop. Errors: AdapterNotFound for unknown names, AdapterError
    (AdapterRefused) for refused adapters, ValueError for a request the engine refuses.
    """

    @property
    def model(self) -> ModelInfo: ...

    @property
    def adapter_root(self) -> Path | None: ...

    def is_ready(self) -> bool:
        """Model loaded, warmed up and pinned adapters resident."""
        ...

    async def start(self) -> None:
        """Load the model (if not yet) and start the step loop; returns when ready."""
        ...

    async def shutdown(self) -> None: ...

    # -- text
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def chat_prompt(self, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                    continue_final_message: bool, template_kwargs: dict[str, Any]) -> list[int]:
        """Token ids of the conversation through the tokenizer's chat template."""
        ...

    # -- generation
    async def resolve_adapter(self, name: str) -> Any:
        """A handle pinning the adapter's current version (loads lazy names)."""
        ...

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: Any | None) -> AsyncIterator[GenerationChunk]:
        """Stream one sequence; closing or cancelling the iterator aborts it in the engine."""
        ...

    def stats(self) -> RuntimeStats: ...

    # -- adapters
    def adapter_names(self) -> list[str]:
        """Names of loaded adapters (current versions)."""
        ...

    def lazy_adapter_names(self) -> list[str]:
        """Names resolvable under the adapter root that are not loaded yet."""
        ...

    def list_adapters(self) -> list[AdapterRow]: ...

    async def load_adapter(self, name: str, path: Path, *, pinned: bool = False) -> AdapterRow:
        """Validate and register `path` (confined to the adapter root) as `name`."""
        ...

    async def validate_adapter(self, path: Path) -> None:
        """Validate without registering (uploads, before they are moved into place)."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    async def pin_adapter(self, name: str) -> AdapterRow: ...

    async def unpin_adapter(self, name: str) -> AdapterRow: ...
