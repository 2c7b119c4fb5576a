"""The same workload, in process, on `peft.PeftModel`: the baseline loramux is compared with.

PEFT serves mixed-adapter batches with `generate(..., adapter_names=[...])` (one name per
row, `"__base__"` for the base model): every LoRA layer loops over the distinct adapters of
the batch. There is no continuous batching, so this runner batches statically, as a simple
PEFT server would:

    closed loop (concurrency C)  batches of C requests; each starts when the previous batch
                                 ends (its C clients were waiting on it), so a request's
                                 start is its batch's start
    open loop (rate)             Poisson arrivals in real time from the same arrival process
                                 as the HTTP generator; a batch takes up to `batch_size`
                                 requests that have arrived (waiting for the first if none
                                 has), and a request's start is its arrival, so queueing
                                 counts in its latency

Per-request times come from a logits processor that stamps each decoding step: the first
stamp (after prefill) is the first token, a request's end is the step of its own last token
(as if each row were streamed; rows of a batch generate until the batch's longest request
is done). Prompts are tokenized as loramux's server does (`tokenizer.encode` for
completions, the chat template for chat). Requests for a name that is neither an adapter nor
the base are recorded as HTTP-like 404 errors; requests cut off by the hard timeout as
`cancelled`; samples are the same `Sample`s as the HTTP generator's, so `report` treats both
alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from loramux.loadtest.generator import LoadShape, RequestSpec, RunResult, Sample, arrival_times

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names


class _StepClock:
    """A logits processor that records when each decoding step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.times.append(time.perf_counter())
        return scores


class _Deadline:
    """A stopping criterion that ends generation at the hard timeout."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.hit = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.hit = time.perf_counter() >= self.deadline
        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool,
                          device=input_ids.device)


class PeftRunner:
    """A PeftModel with every adapter loaded, generating static mixed-adapter batches."""

    def __init__(self, model_dir: str | Path, adapters: Mapping[str, Path], base_name: str, *,
                 endpoint: str = "completions", ignore_eos: bool = True,
                 temperature: float = 0.0, device: str = "auto", dtype: str = "auto",
                 progress: bool = True) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.dtype = dtype
        self.base_name = base_name
        self.endpoint = endpoint
        self.ignore_eos = ignore_eos
        self.temperature = temperature
        self.tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                          dtype=getattr(torch, dtype))
        self.adapter_set = set(adapters)
        if adapters:
            from peft import PeftModel
            from tqdm.auto import tqdm

            items = list(adapters.items())
            name, path = items[0]
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
            for name, path in tqdm(items[1:], desc="PEFT: loading adapters", unit="adapter",
                                   disable=None if progress else True):
                model.load_adapter(str(path), adapter_name=name)
        self.model = model.to(self.device).eval()
        eos = self.tokenizer.eos_token_id
        self.eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos])
                        if e is not None}

    def describe(self) -> dict[str, Any]:
        import peft
        import torch
        import transformers

        return {"engine": "peft", "device": str(self.device), "dtype": self.dtype,
                "adapters": len(self.adapter_set), "peft": peft.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads()}

    def encode(self, spec: RequestSpec) -> list[int]:
        if self.endpoint == "chat":
            # As loramux's server does: render the template, then encode without specials.
            text = self.tokenizer.apply_chat_template(spec.chat_messages(), tokenize=False,
                                                      add_generation_prompt=True)
            return [int(t) for t in self.tokenizer.encode(str(text), add_special_tokens=False)]
        return [int(t) for t in self.tokenizer.encode(spec.prompt_text())]

    def adapter_for(self, spec: RequestSpec) -> str | None:
        """PEFT's adapter name for a request; None when the server would say 404."""
        if spec.model in self.adapter_set:
            return spec.model
        if spec.model == self.base_name:
            return BASE_ADAPTER
        return None

    def generate(self, batch: list[tuple[RequestSpec, Sample]], t0: float,
                 deadline: float) -> None:
        """Run one static batch and fill its samples (start already set)."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        rows = []
        for spec, sample in batch:
            name = self.adapter_for(spec)
            if name is None:
                sample.status, sample.error_kind = 404, "http"
                sample.error = f"The model '{spec.model}' does not exist."
                sample.e2e = time.perf_counter() - t0 - sample.start
                continue
            rows.append((spec, sample, name, self.encode(spec)))
        if not rows:
            return
        longest = max(len(ids) for *_, ids in rows)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for *_, ids in rows],
                                 device=self.device)
        mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for *_, ids in rows],
                            device=self.device)
        new_tokens = max(spec.max_tokens for spec, *_ in rows)
        clock, stop = _StepClock(), _Deadline(deadline)
        kwargs: dict[str, Any] = {}
        if self.adapter_set:
            kwargs["adapter_names"] = [name for _, _, name, _ in rows]
        if self.ignore_eos:
            kwargs["min_new_tokens"] = new_tokens
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                pad_token_id=pad, logits_processor=LogitsProcessorList([clock]),
                stopping_criteria=StoppingCriteriaList([stop]), **kwargs)
        generated = out[:, longest:].tolist()
        for (spec, sample, _, ids), tokens in zip(rows, generated):
            sample.status = 200
            sample.prompt_tokens = len(ids)
            count = spec.max_tokens
            if not self.ignore_eos:
                ends = [i for i, t in enumerate(tokens[:count]) if t in self.eos_ids]
                count = ends[0] + 1 if ends else count
            if len(clock.times) < count:  # stopped at the hard timeout
                sample.error_kind = "cancelled"
                sample.error = "cut off at the hard timeout"
                sample.e2e = time.perf_counter() - t0 - sample.start
                continue
            sample.output_tokens = count
            sample.tokens_from_usage = True
            sample.finish_reason = "length" if count == spec.max_tokens else "stop"
            sample.ttft = clock.times[0] - t0 - sample.start
            sample.e2e = clock.times[count - 1] - t0 - sample.start
            if count > 1:
                sample.tpot = (sample.e2e - sample.ttft) / (count - 1)


def run_peft(runner: PeftRunner, shape: LoadShape, requests: Iterator[RequestSpec], *,
             batch_size: int | None = None, progress: bool = True,
             warmup_requests: Iterator[RequestSpec] | None = None) -> RunResult:
    """Serve `requests` with `shape` on the PEFT runner; one Sample per request taken."""
    from tqdm.auto import tqdm

    size = shape.concurrency if shape.concurrency is not None else (batch_size or 8)
    if shape.warmup and warmup_requests is not None:
        warm = [next(warmup_requests) for _ in range(min(shape.warmup, size))]
        runner.generate([(s, Sample(s.index, s.model, 0.0)) for s in warm],
                        time.perf_counter(), float("inf"))
    samples: list[Sample] = []
    bar = tqdm(total=shape.num_requests, desc="PEFT baseline", unit="req",
               disable=None if progress else True)
    wall_start = time.time()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    deadline = t0 + shape.timeout
    arrivals = arrival_times(shape.rate, shape.seed) if shape.rate is not None else None
    pending: list[tuple[RequestSpec, float]] = []  # open loop: taken from the plan, not started
    sent = 0
    timed_out = False

    def exhausted(at: float) -> bool:
        return (shape.num_requests is not None and sent >= shape.num_requests) or \
            (shape.duration is not None and at >= shape.duration)

    try:
        while True:
            now = time.perf_counter() - t0
            if t0 + now >= deadline:
                timed_out = True
                break
            batch: list[tuple[RequestSpec, Sample]] = []
            if arrivals is None:  # closed loop
                while len(batch) < size and not exhausted(now):
                    spec = next(requests)
                    batch.append((spec, Sample(spec.index, spec.model, now,
                                               max_tokens=spec.max_tokens)))
                    sent += 1
            else:
                while not pending or pending[-1][1] <= now:
                    at = next(arrivals)
                    if exhausted(at):
                        break
                    pending.append((next(requests), at))
                    sent += 1
                if not pending:
                    break
                if pending[0][1] > now:  # nothing has arrived: wait for the next arrival
                    time.sleep(min(pending[0][1] - now, deadline - t0 - now))
                    continue
                ready = [p for p in pending if p[1] <= now][:size]
                pending = pending[len(ready):]
                batch = [(spec, Sample(spec.index, spec.model, at, scheduled=at,
                                       max_tokens=spec.max_tokens)) for spec, at in ready]
            if not batch:
                break
            samples.extend(sample for _, sample in batch)
            runner.generate(batch, t0, deadline)
            bar.update(len(batch))
            bar.set_postfix(errors=sum(not s.ok for s in samples), refresh=False)
    finally:
        bar.close()
    for spec, at in pending:  # arrived before the hard timeout but never served
        if at < time.perf_counter() - t0:
            samples.append(Sample(spec.index, spec.model, at, scheduled=at,
                                  max_tokens=spec.max_tokens, error_kind="cancelled",
                                  error="never served before the hard timeout"))
    return RunResult(samples=samples, wall_start=wall_start,
                     elapsed=time.perf_counter() - t0, timed_out=timed_out,
                     config={"baseline": runner.describe(), "shape": shape.describe(),
                             # CPU time of this process (PEFT's threads) over the measured run
                             "process_cpu_s": time.process_time() - cpu0,
                             "batch_size": size, "endpoint": runner.endpoint,
                             "ignore_eos": runner.ignore_eos,
                             "temperature": runner.temperature})


__all__ = ["BASE_ADAPTER", "PeftRunner", "run_peft"]
