"""Server configuration: the engine's plus what only the HTTP layer needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loramux.engine.config import EngineConfig


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Path | None = None  # tenants file; None: open server
    admin_token: str | None = None  # None: admin API off

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
