"""LLMEngine: requests in, tokens out, one step at a time; AsyncEngine runs it in a thread.

    step = schedule -> make adapters resident -> run the model -> sample -> postprocess

`LLMEngine` is single-threaded: call `add_request`, `abort` and `step` from one thread.
`prepare_request` (validation, tokenization, adapter resolution) touches no engine state and
may run on any thread; `AsyncEngine` uses that to keep slow work off the step loop and the step
loop off the event loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from loramux.adapters.types import AdapterNotFound, AdapterRef, AdapterSource, BaseSpec
from loramux.engine.attention import paged_attention_torch
from loramux.engine.config import EngineConfig
from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.kv_cache import KVCache
from loramux.engine.lora import KernelLora, LoraBackend
from loramux.engine.lora_cpu import StackedLora
from loramux.engine.model import ModelRunner, check_supported, load_hf_model
from loramux.engine.request import RequestOutput, SeqStatus, Sequence
from loramux.engine.sampler import Sampler, SamplerOutput, SamplingState
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.scheduler import ScheduledSeq, Scheduler
from loramux.engine.stop import StopStringMatcher

log = logging.getLogger(__name__)

_CPU_KV_TOKENS = 65536


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and /ready."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    kv_cache_tokens: int
    num_preemptions: int
    prompt_tokens: int  # processed so far (recomputation excluded)
    generation_tokens: int


class LLMEngine:
    """Continuous-batching engine over one Llama-family model and an adapter source.

    Pass an already-loaded transformers model (tests) or use `from_config` (server). With
    `adapters=None` the engine serves the base model only and rejects adapter names.
    """

    def __init__(self, model: Any, config: EngineConfig | None = None, *, tokenizer: Any = None,
                 adapters: AdapterSource | None = None, lora_backend: str = "auto") -> None:
        self.config = config = config or EngineConfig()
        self.hf_model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        shape = check_supported(model.config)
        device = model.model.embed_tokens.weight.device
        dtype = model.model.embed_tokens.weight.dtype
        kv_tokens = config.kv_cache_tokens or _default_kv_tokens(shape.num_layers,
                                                                 shape.num_kv_heads,
                                                                 shape.head_dim, dtype, device)
        num_blocks = max(1, kv_tokens // config.block_size)
        self.kv = KVCache(shape.num_layers, num_blocks, config.block_size, shape.num_kv_heads,
                          shape.head_dim, dtype, device)
        max_rows = max(config.max_num_batched_tokens, config.max_num_seqs, 1)
        lora = _lora_backend(lora_backend, adapters, model.config, dtype, device,
                             max_rows=max_rows, max_segments=config.max_num_seqs)
        max_model_len = min(config.max_model_len or shape.max_model_len,
                            self.kv.capacity_tokens)
        self.runner = ModelRunner(
            model, self.kv, lora, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
            max_lora_rank=adapters.tables.max_rank if adapters is not None else 1,
            max_model_len=max_model_len,
            attention=_attention_backend(device, shape, config.max_num_seqs, max_model_len),
            enforce_eager=config.enforce_eager)
        # A sequence never outgrows the context length nor the whole KV cache, so the oldest
        # running sequence can always make progress (it may preempt all others).
        self.max_seq_len = self.runner.shape.max_model_len
        self.vocab = self.runner.shape.vocab
        self.scheduler = Scheduler(self.kv.allocator, config.block_size, config.max_num_seqs,
                                   config.max_num_batched_tokens, adapters)
        self.sampler = Sampler(eos_token_ids=_eos_ids(model))
        self.requests: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self.last_step_tokens = 0  # tokens the last step ran (0: nothing was schedulable)

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the model and tokenizer, start the adapter registry, build the engine."""
        from loramux.adapters.registry import AdapterRegistry

        model, tokenizer = load_hf_model(config)
        weight = model.model.embed_tokens.weight
        # Built before the engine sizes its KV cache: on CUDA the adapter pool takes its share
        # of the memory the weights left, and the cache's default is of what the pool left.
        registry = AdapterRegistry(config.registry, BaseSpec.from_hf_config(model.config),
                                   weight.device, weight.dtype,
                                   max_num_seqs=config.max_num_seqs)
        registry.start()
        return cls(model, config, tokenizer=tokenizer, adapters=registry)

    # ------------------------------------------------------------------ requests

    def resolve_adapter(self, name: str) -> AdapterRef:
        """The current version of adapter `name`; AdapterNotFound if there is none. May load a
        lazy adapter from disk, so call it off the step loop."""
        if self.adapters is None:
            raise AdapterNotFound(name)
        return self.adapters.resolve(name)

    def prepare_request(self, request_id: str, prompt: str | list[int],
                        params: SamplingParams | None = None,
                        adapter: str | AdapterRef | None = None) -> Sequence:
        """Validate a request and build its sequence without touching engine state.

        Raises ValueError for bad input and AdapterNotFound for an unknown adapter, so the
        caller can answer at once. Thread-safe.
        """
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids")
            token_ids = list(self.tokenizer.encode(prompt))
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in token_ids if not 0 <= t < self.vocab]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}")
        if len(token_ids) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; this engine serves at "
                             f"most {self.max_seq_len - 1} prompt tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        ref = self.resolve_adapter(adapter) if isinstance(adapter, str) else adapter
        detok = (IncrementalDetokenizer(self.tokenizer, token_ids)
                 if self.tokenizer is not None else None)
        stop = (StopStringMatcher(params.stop, params.include_stop_str_in_output)
                if params.stop else None)
        return Sequence(request_id=request_id, prompt_token_ids=token_ids, params=params,
                        adapter=ref, arrival=next(self._arrivals),
                        sampling=SamplingState(params, token_ids), detokenizer=detok, stop=stop)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a sequence from `prepare_request`; its adapter starts paging in now."""
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        if seq.adapter is not None:
            assert self.adapters is not None
            self.adapters.prefetch(seq.adapter)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None,
                    adapter: str | AdapterRef | None = None) -> None:
        """Validate and queue a request (prompt text or token ids, adapter name or None)."""
        self.add_sequence(self.prepare_request(request_id, prompt, params, adapter))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now: its KV blocks and adapter reference are freed at once.
        Returns its final output (finish_reason "abort"), or None if it is not running."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = "abort"
        return self._output(seq, [], "", None, None)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        """Run one iteration; outputs of every request that got a token or finished."""
        batch = self.scheduler.schedule()
        self.last_step_tokens = batch.num_tokens
        outputs = [self._fail(seq) for seq in batch.failed]
        if batch.empty:
            return outputs
        rows = self.runner.prepare_adapters(batch.scheduled)  # the batch in row order
        logits = self.runner.run(rows)  # [B, V]
        sampled = self.sampler.sample(logits, [s.seq.sampling for s in rows if s.samples])
        return outputs + self._postprocess(rows, sampled)

    def _postprocess(self, rows: list[ScheduledSeq], sampled: SamplerOutput
                     ) -> list[RequestOutput]:
        """Apply a step's tokens: `rows` in the order the logits' rows were computed."""
        outputs: list[RequestOutput] = []
        row = 0
        now = time.monotonic()
        for s in rows:
            seq = s.seq
            seq.num_computed = s.start + s.num_tokens
            if not s.samples:
                continue
            token = sampled.token_ids[row]
            reason = sampled.finish_reasons[row]
            logprob, top = sampled.logprobs[row], sampled.top_logprobs[row]
            row += 1
            if reason == "error":
                outputs.append(self._non_finite(seq))
                continue
            seq.token_ids.append(token)
            self._generation_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
                self._prompt_tokens += seq.num_prompt_tokens
            stop_token = reason == "stop" and token in seq.params.stop_token_ids
            if stop_token:
                seq.stop_reason = token
            if reason is None and seq.num_tokens >= self.max_seq_len:
                reason = "length"
            if stop_token and not seq.params.include_stop_str_in_output:
                text = ""  # a stop token's own text is not output (as in vLLM)
            else:
                text = self._detokenize(seq, token)
            if seq.stop is not None and seq.stop.stopped:
                reason = "stop"
            if reason is not None:
                seq.finish_reason = reason
                text += self._flush_text(seq)
                self.scheduler.finish(seq)
                del self.requests[seq.request_id]
            outputs.append(self._output(seq, [token], text, logprob, top))
        return outputs

    def _detokenize(self, seq: Sequence, token: int) -> str:
        if seq.detokenizer is None:
            return ""
        delta = seq.detokenizer.add(token)
        if seq.stop is None:
            return delta
        can_stop = seq.num_output_tokens >= seq.params.min_tokens
        update = seq.stop.feed(delta, can_stop=can_stop)
        if update.stopped:
            seq.stop_reason = seq.stop.matched
        return update.text

    def _flush_text(self, seq: Sequence) -> str:
        if seq.detokenizer is None:
            return ""
        tail = seq.detokenizer.flush()
        if seq.stop is None:
            return tail
        text = seq.stop.feed(tail).text if tail else ""
        return text + seq.stop.flush()

    def _non_finite(self, seq: Sequence) -> RequestOutput:
        """End a request whose logits were NaN or infinite; the rest of the batch goes on."""
        adapter = f"adapter {seq.adapter.name!r}" if seq.adapter is not None else "the base model"
        log.error("request %s: %s gave non-finite logits after %d output tokens",
                  seq.request_id, adapter, seq.num_output_tokens)
        seq.finish_reason = "error"
        seq.error_code = "non_finite_logits"
        seq.error = (f"The model's output for this request is not finite (NaN or infinite "
                     f"logits with {adapter}); nothing generated from it would mean anything.")
        self.scheduler.finish(seq)
        del self.requests[seq.request_id]
        return self._output(seq, [], "", None, None)

    def _fail(self, seq: Sequence) -> RequestOutput:
        self.requests.pop(seq.request_id, None)
        self.scheduler.remove(seq)
        return self._output(seq, [], "", None, None)

    @staticmethod
    def _output(seq: Sequence, tokens: list[int], text: str, logprob: float | None,
                top: Any) -> RequestOutput:
        want = seq.params.logprobs is not None and bool(tokens)
        return RequestOutput(
            request_id=seq.request_id, token_ids=tokens, text=text,
            logprobs=[logprob] if want else None, top_logprobs=[top] if want else None,
            finished=seq.finished, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            error=seq.error, error_code=seq.error_code)

    # ------------------------------------------------------------------ start-up

    def warm_up(self) -> None:
        """Run each kind of step a request can hit once, then capture the decode graphs (CUDA),
        so that nothing compiles on the first requests. Call once, before taking requests.

        Steps: prefills of one and of two sequences (an odd and a 16-multiple token count),
        base and with a LoRA segment, then a decode step per batch bucket, base and with
        LoRA (every bucket when decodes will run eagerly on CUDA; on the CPU, where nothing
        compiles, the smallest only; graph capture runs each bucket itself). The LoRA rows use
        slot 0 whatever it holds (a free slot has rank 0 everywhere): the warm-up's results
        are discarded. Its K/V go to the KV cache's dummy block, which no sequence reads, so
        no block is allocated and no adapter reference is taken.
        """
        started = time.monotonic()
        runner = self.runner
        tables = self.adapters.tables if self.adapters is not None else None
        slots = [-1] if tables is None or tables.ranks.shape[-1] == 0 else [-1, 0]
        budget = self.config.max_num_batched_tokens
        longest = max(1, min(budget // 2, self.max_seq_len - 1))
        for slot in slots:
            self._warm_step([(min(17, longest), slot)], decode=False)
            if self.config.max_num_seqs >= 2:  # a step never holds more than max_num_seqs
                self._warm_step([(min(16, longest), -1), (min(16, longest), slot)],
                                decode=False)
        eager_cuda = self.kv.k.device.type == "cuda" and not runner.can_capture
        for bucket in runner.buckets if eager_cuda else runner.buckets[:1]:
            for slot in slots:  # LoRA: every other row (base rows in between: two kinds)
                self._warm_step([(1, slot if i % 2 == 0 else -1) for i in range(bucket)],
                                decode=True)
        runner.capture_graphs()
        log.info("warm-up done in %.1f s%s", time.monotonic() - started,
                 " (decode steps replay CUDA graphs)" if runner.graphs is not None else "")

    def _warm_step(self, seqs: list[tuple[int, int]], *, decode: bool) -> None:
        """One runner step over throw-away sequences: (length, slot) each; a decode step
        decodes one token after `length` cached ones."""
        bs = self.config.block_size
        scheduled = []
        for i, (length, slot) in enumerate(seqs):
            total = length + 1 if decode else length
            params = SamplingParams(max_tokens=1, temperature=0.0)
            seq = Sequence(request_id=f"warm-up-{i}", prompt_token_ids=[0] * total,
                           params=params, adapter=None, arrival=-1,
                           sampling=SamplingState(params, [0] * total),
                           block_table=[self.kv.dummy_block] * -(-total // bs),
                           slot=slot if slot >= 0 else None)
            scheduled.append(ScheduledSeq(seq, length if decode else 0, 1 if decode else length))
        scheduled.sort(key=lambda s: s.seq.slot_key)  # grouped by slot, as the scheduler does
        self.runner.run(self.runner.prepare_adapters(scheduled))

    # ------------------------------------------------------------------ conveniences

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage, kv_cache_tokens=self.kv.capacity_tokens,
            num_preemptions=self.scheduler.stats.preemptions,
            prompt_tokens=self._prompt_tokens, generation_tokens=self._generation_tokens)

    def generate(self, prompts: Iterable[str | list[int]], params: SamplingParams | None = None,
                 adapters: Iterable[str | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion (all queued at once); one merged output per prompt."""
        prompts = list(prompts)
        names = list(adapters) if adapters is not None else [None] * len(prompts)
        ids = [f"generate-{next(self._arrivals)}" for _ in prompts]
        for rid, prompt, name in zip(ids, prompts, names):
            self.add_request(rid, prompt, params, name)
        merged: dict[str, list[RequestOutput]] = {rid: [] for rid in ids}
        while any(not m or not m[-1].finished for m in merged.values()):
            for out in self.step():
                merged[out.request_id].append(out)
            if self.last_step_tokens == 0:
                time.sleep(0.001)  # every queued request waits for an adapter page-in
        return [merge_outputs(merged[rid]) for rid in ids]


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """One output holding everything a request's stream of deltas said."""
    last = outputs[-1]
    want = any(o.logprobs is not None for o in outputs)
    return RequestOutput(
        request_id=last.request_id,
        token_ids=[t for o in outputs for t in o.token_ids],
        text="".join(o.text for o in outputs),
        logprobs=[lp for o in outputs for lp in (o.logprobs or [])] if want else None,
        top_logprobs=[t for o in outputs for t in (o.top_logprobs or [])] if want else None,
        finished=last.finished, finish_reason=last.finish_reason,
        stop_reason=last.stop_reason, num_prompt_tokens=last.num_prompt_tokens,
        num_output_tokens=last.num_output_tokens, error=last.error,
        error_code=last.error_code)


def _eos_ids(model: Any) -> list[int]:
    """End-of-sequence ids from the generation config, else the model config."""
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def _default_kv_tokens(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """CPU: 64k tokens. CUDA: 85% of the memory that is free now."""
    if device.type != "cuda":
        return _CPU_KV_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.85) // KVCache.bytes_per_token(layers, kv_heads, head_dim, dtype)


def _lora_backend(name: str, adapters: AdapterSource | None, hf_config: Any,
                  dtype: torch.dtype, device: torch.device, *, max_rows: int,
                  max_segments: int) -> LoraBackend | None:
    """Chosen once: stacked adapters (BGMV) + kernels on CPU, the Triton kernels on CUDA;
    max_rows / max_segments: the most rows and segments (sequences) of any step."""
    if adapters is None:
        return None
    if name == "auto":
        name = "stacked" if device.type == "cpu" else "kernels"
    base = BaseSpec.from_hf_config(hf_config)
    if name == "stacked":
        return StackedLora(adapters.tables, base, max_rows=max_rows, max_segments=max_segments)
    if name == "kernels":
        return KernelLora(adapters.tables, base, dtype, device, max_rows=max_rows,
                          max_segments=max_segments)
    raise ValueError(f"lora_backend must be 'auto', 'stacked' or 'kernels', got {name!r}")


def _attention_backend(device: torch.device, shape: Any, max_num_seqs: int,
                       max_model_len: int) -> Any:
    """On CUDA the Triton paged attention with split-KV decodes, its scratch allocated here
    once; elsewhere (or without triton) the torch path."""
    if device.type == "cuda":
        try:
            from loramux.engine.triton_attention import PagedAttention
        except ImportError as e:  # triton is a CUDA dependency; a CPU wheel may lack it
            log.warning("cannot import triton (%s): torch attention on CUDA", e)
        else:
            return PagedAttention(max_num_seqs, shape.num_heads, shape.num_kv_heads,
                                  shape.head_dim, max_model_len, device)
    return paged_attention_torch
