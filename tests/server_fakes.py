"""A tiny fake EngineClient for tests of the HTTP edge only (errors, auth, limits, SSE shape).

Tokens are UTF-8 bytes; the "model" answers with a fixed text per adapter, one byte per step,
after an optional delay per token. Everything numeric is tested against the real engine in
tests/test_server_e2e.py; this fake exists so that edge behaviour is tested without a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramux.adapters.types import AdapterError, AdapterNotFound
from loramux.engine.sampling_params import SamplingParams
from loramux.server.engine_client import AdapterRow, GenerationChunk, ModelInfo, TokenLogprob
from loramux.server.metrics import RuntimeStats


@dataclass
class FakeEngine:
    name: str = "base"
    adapters: set[str] = field(default_factory=lambda: {"acme-a", "acme-b", "beta-x"})
    lazy: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)  # resolving these raises AdapterError
    root: Path | None = None
    answer: str = "hello world"
    delay: float = 0.0
    max_len: int = 128
    crash: bool = False  # generate raises a RuntimeError with a secret in its message
    ready: bool = True
    stats_value: RuntimeStats = field(default_factory=RuntimeStats)
    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    running: int = 0
    last_params: SamplingParams | None = None

    @property
    def model(self) -> ModelInfo:
        # like LocalEngineClient: the length is unknown until the model has loaded
        return ModelInfo(name=self.name, max_model_len=self.max_len if self.ready else None,
                         created=0)

    @property
    def adapter_root(self) -> Path | None:
        return self.root

    def is_ready(self) -> bool:
        return self.ready

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode("utf-8", errors="replace")

    def chat_prompt(self, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                    continue_final_message: bool, template_kwargs: dict[str, Any]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return self.encode(text + ("<assistant>" if add_generation_prompt else ""))

    async def resolve_adapter(self, name: str) -> Any:
        if name in self.broken:
            raise AdapterError(f"corrupt weights: /srv/adapters/{name}/adapter_model.safetensors")
        if name not in self.adapters and name not in self.lazy:
            raise AdapterNotFound(name)
        return name

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, adapter: Any | None
                       ) -> AsyncIterator[GenerationChunk]:
        self.started.append(request_id)
        self.last_params = params
        self.running += 1
        done = False
        try:
            if self.crash:
                raise RuntimeError("secret-internal-detail at /srv/model")
            text = f"{adapter or self.name}: {self.answer}"
            data = text.encode("utf-8")[: params.max_tokens]
            for i, byte in enumerate(data):
                if self.delay:
                    await asyncio.sleep(self.delay)
                last = i == len(data) - 1
                logprobs = None
                if params.logprobs is not None:
                    logprobs = (TokenLogprob(byte, chr(byte), -0.5,
                                             tuple((byte, chr(byte), -0.5)
                                                   for _ in range(min(1, params.logprobs)))),)
                yield GenerationChunk(
                    text=chr(byte), token_ids=(byte,), prompt_tokens=len(prompt_token_ids),
                    completion_tokens=i + 1,
                    finish_reason=("length" if len(data) == params.max_tokens else "stop")
                    if last else None,
                    logprobs=logprobs,
                )
            done = True
        finally:
            self.running -= 1
            (self.finished if done else self.aborted).append(request_id)

    def stats(self) -> RuntimeStats:
        return self.stats_value

    def adapter_names(self) -> list[str]:
        return sorted(self.adapters)

    def lazy_adapter_names(self) -> list[str]:
        return sorted(self.lazy - self.adapters)

    def _row(self, name: str) -> AdapterRow:
        return AdapterRow(name=name, version=1, digest="0" * 64, current=True, tier="host",
                          modules=("q_proj",), ranks=(4,), size_bytes=1024, refcount=0,
                          pinned=False, last_use=None, loaded_at=0.0, path=f"/x/{name}")

    def list_adapters(self) -> list[AdapterRow]:
        return [self._row(n) for n in sorted(self.adapters)]

    async def load_adapter(self, name: str, path: Path, *, pinned: bool = False) -> AdapterRow:
        self.adapters.add(name)
        return self._row(name)

    async def validate_adapter(self, path: Path) -> None:
        return None

    async def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterNotFound(name)
        self.adapters.discard(name)

    async def pin_adapter(self, name: str) -> AdapterRow:
        if name not in self.adapters:
            raise AdapterNotFound(name)
        return self._row(name)

    async def unpin_adapter(self, name: str) -> AdapterRow:
        return await self.pin_adapter(name)
