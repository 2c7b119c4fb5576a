"""`LocalEngineClient`: the server's EngineClient over loramux's AsyncEngine and registry.

The model loads in `start()` on a worker thread, so /health answers (and /ready says 503)
while it loads. Start-up order: load model and tokenizer, start the registry (loading
`--adapter` entries and the desired set), run one short warm-up generation so nothing
compiles on the first real request, start the step loop. Ready once that is done and every
pinned adapter is resident.

Everything that may block (registry loads, lazy resolution, validation) runs through
`asyncio.to_thread`; nothing here holds the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from loramux.adapters.peft import CONFIG_FILE, NAME_RE, read_adapter
from loramux.adapters.types import AdapterNotFound, AdapterRef
from loramux.engine.config import EngineConfig
from loramux.engine.default_model import DEFAULT_MODEL_NAME
from loramux.engine.sampling_params import SamplingParams
from loramux.server.engine_client import (
    AdapterRow,
    GenerationChunk,
    GenerationFailed,
    ModelInfo,
    TokenLogprob,
)
from loramux.server.metrics import RuntimeStats

log = logging.getLogger("loramux.server")


def model_name(config: EngineConfig) -> str:
    """The name clients use for the base: the model folder's name."""
    if config.model is None:
        return DEFAULT_MODEL_NAME
    return Path(config.model.rstrip("/")).name or config.model


class _Cumulative:
    """Turns a bounded deque of latency samples plus its event counter into (count, sum)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0

    def update(self, counter: int, samples: deque[float]) -> tuple[int, float]:
        new = counter - self.count
        if new > 0:
            for _ in range(3):  # the registry appends from its threads; retry a torn copy
                try:
                    recent = list(samples)
                    break
                except RuntimeError:
                    continue
            else:
                recent = []
            taken = recent[-new:] if new <= len(recent) else recent
            # Samples the deque already dropped are counted at the mean of those we saw.
            mean = sum(taken) / len(taken) if taken else 0.0
            self.total += sum(taken) + mean * (new - len(taken))
            self.count = counter
        return self.count, self.total


class LocalEngineClient:
    """EngineClient for an in-process LLMEngine + AdapterRegistry."""

    def __init__(self, config: EngineConfig, *, engine: Any = None,
                 served_model_name: str | None = None, warmup: bool = True) -> None:
        """`engine`: an already-built LLMEngine (tests); else built from `config` in start()."""
        self.config = config
        self._name = served_model_name or model_name(config)
        self._engine = engine
        self._async: Any = None
        self._warmup = warmup
        self._created = int(time.time())
        self._ready = False
        self._load_latency = _Cumulative()
        self._page_in_latency = _Cumulative()

    # ------------------------------------------------------------------ life cycle

    @property
    def model(self) -> ModelInfo:
        if self._engine is None:
            # Unknown until the model is read: the config caps it, the model may lower it.
            return ModelInfo(name=self._name, max_model_len=None, created=self._created)
        return ModelInfo(name=self._name, max_model_len=int(self._engine.max_seq_len),
                         created=self._created, vocab_size=int(self._engine.vocab))

    @property
    def adapter_root(self) -> Path | None:
        return self.config.registry.adapter_root

    @property
    def registry(self) -> Any:
        return self._engine.adapters if self._engine is not None else None

    def is_ready(self) -> bool:
        if not self._ready:
            return False
        registry = self.registry
        return registry is None or bool(registry.ready())

    async def start(self) -> None:
        from loramux.engine.async_engine import AsyncEngine

        # The step thread builds (and warms up) the engine itself, so that no other thread
        # runs the model's torch ops and starts an OpenMP team of its own (see AsyncEngine).
        self._async = AsyncEngine(self._build)
        await asyncio.to_thread(self._async.start)
        self._ready = True

    def _build(self) -> Any:
        if self._engine is None:
            from loramux.engine.engine import LLMEngine

            started = time.monotonic()
            log.info("loading %s ...", self.config.model or DEFAULT_MODEL_NAME)
            self._engine = LLMEngine.from_config(self.config)
            log.info("model loaded in %.1f s (max_model_len %d)", time.monotonic() - started,
                     self._engine.max_seq_len)
        if self._warmup:
            # every step shape a request can hit compiles now (and CUDA graphs are captured),
            # before /ready says yes
            self._engine.warm_up()
        return self._engine

    async def shutdown(self) -> None:
        self._ready = False
        if self._async is not None:
            await asyncio.to_thread(self._async.shutdown)
        registry = self.registry
        if registry is not None and hasattr(registry, "close"):
            await asyncio.to_thread(registry.close)

    # ------------------------------------------------------------------ text

    @property
    def tokenizer(self) -> Any:
        tokenizer = self._engine.tokenizer if self._engine is not None else None
        if tokenizer is None:
            raise ValueError("this model has no tokenizer; send token ids")
        return tokenizer

    def encode(self, text: str) -> list[int]:
        tokenizer = self.tokenizer
        try:
            return list(tokenizer.encode(text))
        except Exception as exc:  # noqa: BLE001 - text the tokenizer refuses is bad input
            # (e.g. a character outside a vocabulary without an unknown token): a 400, not 500.
            raise ValueError(f"the tokenizer cannot encode this text: {exc}") from None

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids)))

    def chat_prompt(self, messages: list[dict[str, str]], *, add_generation_prompt: bool,
                    continue_final_message: bool, template_kwargs: dict[str, Any]) -> list[int]:
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; use /v1/completions")
        # Template variables only: a named argument of apply_chat_template ("chat_template"
        # above all, which would run a client's own Jinja on the server) is the operator's.
        if template_kwargs:
            named = inspect.signature(tokenizer.apply_chat_template).parameters
            reserved = sorted(k for k in template_kwargs if k in named)
            if reserved:
                raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}")
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **template_kwargs)
            # The template already placed BOS and other special tokens as text.
            return list(tokenizer.encode(str(text), add_special_tokens=False))
        except Exception as exc:  # noqa: BLE001 - jinja or tokenizer errors: bad messages
            raise ValueError(f"the chat template failed on these messages: {exc}") from None

    # ------------------------------------------------------------------ generation

    async def resolve_adapter(self, name: str) -> AdapterRef:
        return await asyncio.to_thread(self._engine.resolve_adapter, name)  # type: ignore[no-any-return]

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, adapter: Any | None
                       ) -> AsyncIterator[GenerationChunk]:
        stream = self._async.generate(prompt_token_ids, params, adapter, request_id=request_id)
        try:
            async for out in stream:
                if out.finish_reason == "error":
                    if adapter is not None and adapter.name not in self.adapter_names():
                        # Unloaded after this request resolved the name and before it ran
                        # (the soak found it answered 503 "overloaded"): the request gets what
                        # one arriving now would, the unknown-model 404.
                        raise AdapterNotFound(adapter.name)
                    raise GenerationFailed(out.error or "the request failed", out.error_code)
                logprobs = None
                if out.logprobs is not None:
                    logprobs = tuple(self._logprobs(out))
                yield GenerationChunk(
                    text=out.text, token_ids=tuple(out.token_ids),
                    prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=out.num_output_tokens,
                    finish_reason=out.finish_reason if out.finished else None,
                    logprobs=logprobs,
                )
        finally:
            await stream.aclose()  # aborts the request if it has not finished

    def _logprobs(self, out: Any) -> list[TokenLogprob]:
        rows: list[TokenLogprob] = []
        tops = out.top_logprobs or [None] * len(out.token_ids)
        for token_id, logprob, top in zip(out.token_ids, out.logprobs, tops):
            alternatives: tuple[tuple[int, str, float], ...] = ()
            if top is not None:
                alternatives = tuple((int(t), self._piece(int(t)), float(v))
                                     for t, v in zip(top.token_ids, top.logprobs))
            rows.append(TokenLogprob(token_id=int(token_id), token=self._piece(int(token_id)),
                                     logprob=float(logprob) if logprob is not None else 0.0,
                                     top=alternatives))
        return rows

    def _piece(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def stats(self) -> RuntimeStats:
        now = time.time()
        if self._engine is None:
            return RuntimeStats(max_lora=self.config.registry.max_gpu_adapters or 0,
                                timestamp=now)
        engine_stats = self._engine.stats()
        registry = self.registry
        tiers: dict[str, int] = {}
        residency: dict[tuple[str, str], int] = {}
        running: list[str] = []
        waiting: list[str] = []
        loads = page_ins = parks = 0
        evictions: dict[str, int] = {}
        load_latency = page_in_latency = (0, 0.0)
        max_lora = self.config.registry.max_gpu_adapters or 0
        pool_capacity: dict[int, int] = {}
        pool_bytes: dict[str, int] = {}
        references = 0
        if registry is not None:
            for row in registry.list():
                tiers[row.tier] = tiers.get(row.tier, 0) + 1
                references += row.refcount
                if row.tier != "disk":  # bounded by the host and accelerator capacities
                    key = (row.name, row.tier)
                    residency[key] = residency.get(key, 0) + 1
            running = _unique(ref.name for ref in registry.resident())
            resident = set(running)
            waiting = [n for n in _unique(ref.name for ref in registry.waiting())
                       if n not in resident]
            s = registry.stats
            loads, page_ins, parks = s.loads, s.page_ins, s.parks
            evictions = {"device": s.device_evictions, "host": s.host_evictions}
            load_latency = self._load_latency.update(s.loads, s.load_seconds)
            page_in_latency = self._page_in_latency.update(s.page_ins, s.page_in_seconds)
            # What a router may count on: adapters of the largest allowed rank that fit, slots
            # and bytes both (the slot count alone would promise ~200 on a default CPU pool).
            max_lora = int(registry.pool_capacity(self.config.registry.max_lora_rank))
            pool_capacity = {rank: int(registry.pool_capacity(rank))
                             for rank in _capacity_ranks(self.config.registry.max_lora_rank)}
            memory = registry.memory()
            pool_bytes = {"used": memory["device_used_bytes"],
                          "capacity": memory["device_capacity_bytes"]}
        return RuntimeStats(
            num_waiting=engine_stats.num_waiting, num_running=engine_stats.num_running,
            kv_cache_usage=float(engine_stats.kv_cache_usage),
            batch_size=engine_stats.num_running,
            batch_tokens=int(getattr(self._engine, "last_step_tokens", 0)),
            max_lora=max_lora, running_adapters=running, waiting_adapters=waiting,
            adapters_per_tier=tiers, adapter_residency=residency, adapter_loads=loads,
            adapter_page_ins=page_ins, adapter_parks=parks,
            adapter_evictions=evictions, adapter_load_seconds=load_latency,
            adapter_page_in_seconds=page_in_latency, adapter_references=references,
            adapter_pool_capacity=pool_capacity, adapter_pool_bytes=pool_bytes,
            preemptions=int(engine_stats.num_preemptions), timestamp=now,
        )

    # ------------------------------------------------------------------ adapters

    def adapter_names(self) -> list[str]:
        registry = self.registry
        return list(registry.names()) if registry is not None else []

    def lazy_adapter_names(self) -> list[str]:
        root = self.adapter_root
        if root is None or not root.is_dir():
            return []
        loaded = set(self.adapter_names())
        names = []
        try:
            for child in root.iterdir():
                if (NAME_RE.fullmatch(child.name) and ".." not in child.name
                        and child.name not in loaded and (child / CONFIG_FILE).is_file()):
                    names.append(child.name)
        except OSError as exc:
            log.warning("cannot list the adapter root %s: %s", root, exc)
        return sorted(names)

    def list_adapters(self) -> list[AdapterRow]:
        registry = self.registry
        return [_row(info) for info in registry.list()] if registry is not None else []

    def _current(self, name: str) -> AdapterRow:
        return _row(self.registry.get(name))

    async def load_adapter(self, name: str, path: Path, *, pinned: bool = False) -> AdapterRow:
        registry = self.registry
        result = await asyncio.to_thread(registry.load, name, path, pinned=pinned)
        try:  # the version this load made or kept, not whatever is current by now
            row = _row(registry.describe(result.ref))
        except AdapterNotFound:
            row = self._current(name)
        outcome = ("recovered" if result.recovered else "unchanged" if result.unchanged
                   else "new version")
        return dataclasses.replace(row, outcome=outcome)

    async def validate_adapter(self, path: Path) -> None:
        registry = self.registry
        await asyncio.to_thread(read_adapter, path, registry.base, registry.limits,
                                root=self.adapter_root, dtype=registry.dtype)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self.registry.unload, name)

    async def pin_adapter(self, name: str) -> AdapterRow:
        await asyncio.to_thread(self.registry.pin, name)
        return self._current(name)

    async def unpin_adapter(self, name: str) -> AdapterRow:
        await asyncio.to_thread(self.registry.unpin, name)
        return self._current(name)


def _capacity_ranks(max_rank: int) -> list[int]:
    """The ranks /metrics reports pool capacity at: 8, 16 and --max-lora-rank, at most it."""
    return sorted({r for r in (8, 16) if r < max_rank} | {max_rank})


def _unique(names: Any) -> list[str]:
    return list(dict.fromkeys(names))


def _row(info: Any) -> AdapterRow:
    return AdapterRow(
        name=info.name, version=info.version, digest=info.digest, current=info.current,
        tier=info.tier, modules=tuple(info.modules), ranks=tuple(info.ranks),
        size_bytes=info.size_bytes, refcount=info.refcount, pinned=info.pinned,
        last_use=info.last_use, loaded_at=info.loaded_at, path=str(info.path), slot=info.slot,
        load_seconds=info.load_seconds,
    )
