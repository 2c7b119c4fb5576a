"""Server configuration: the engine's plus what only the HTTP layer needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loramux.engine.config import EngineConfig


# A bound on the average characters per token of a prompt. Tokens are a few characters long;
# the longest are runs of spaces or repeated punctuation (SmolLM2's longest has 81). Text with
# more characters than this times the context cannot fit in it, so it is refused without
# being tokenized (15 MB of text is some 20 s of a tokenizer's time).
PROMPT_CHARS_PER_TOKEN = 128


@dataclass(frozen=True)
class ServerConfig:
    """Everything `loramux serve` needs, validated once at start-up.

    `max_queue` bounds the sequences admitted beyond the engine's `max_num_seqs`: past
    `max_num_seqs + max_queue` in flight, new requests get 503 with Retry-After instead of
    waiting without bound. `shutdown_grace_seconds` is how long running requests may take to
    finish after SIGTERM before they are cut off.
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Path | None = None  # tenants file; None: open server
    admin_token: str | None = None  # None: admin API off
    # /metrics names every tenant's adapters (vllm:lora_requests_info): with a token it
    # answers only to it (or the admin token), never to a tenant's API key; None: open, as
    # vLLM's is, for routers on a network tenants cannot reach.
    metrics_token: str | None = None
    served_model_name: str | None = None  # None: the model directory's name
    max_queue: int = 256
    shutdown_grace_seconds: float = 30.0
    max_upload_bytes: int | None = None  # None: the registry's max_adapter_bytes (+ config)
    log_prompts: bool = False  # prompts and outputs in the log (DEBUG level); off by default
    # A connection whose request head is not complete this long after it opened (or after
    # its previous response) is closed: slow or idle clients cannot hold descriptors forever.
    header_timeout_seconds: float = 10.0
    max_connections: int | None = None  # open HTTP connections; None: from the fd limit
    # Prompt text longer than this is refused before it is tokenized; None:
    # PROMPT_CHARS_PER_TOKEN characters per token of the context.
    max_prompt_chars: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.shutdown_grace_seconds < 0:
            raise ValueError("shutdown_grace_seconds must be >= 0")
        if self.max_upload_bytes is not None and self.max_upload_bytes < 1:
            raise ValueError("max_upload_bytes must be positive")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("admin_token must not be empty (leave it unset to turn admin off)")
        if self.metrics_token is not None and not self.metrics_token.strip():
            raise ValueError("metrics_token must not be empty (leave it unset for open metrics)")
        if not self.header_timeout_seconds > 0:
            raise ValueError("header_timeout_seconds must be > 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1")

    def prompt_char_limit(self, context_tokens: int) -> int:
        """Characters of prompt text tokenized at most, for a context of `context_tokens`."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return PROMPT_CHARS_PER_TOKEN * context_tokens

    @property
    def upload_limit(self) -> int:
        """Largest accepted admin upload body: the weights limit plus room for the config."""
        if self.max_upload_bytes is not None:
            return self.max_upload_bytes
        return self.engine.registry.max_adapter_bytes + (2 << 20)
