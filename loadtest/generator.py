"""Load generator for any OpenAI-compatible server: a workload, an arrival process, samples.

A run is three independent choices:

    workload   which requests: model per request (adapter popularity: uniform, Zipf(s), one
               distinct adapter per request round-robin, optionally a share for the base),
               prompt length and output length (fixed `128`, uniform `64-256`, or prompts
               drawn from a JSONL / text file), all from one seed
    shape      when they are sent: open loop (Poisson arrivals at `rate` requests/s, sent
               whether or not earlier ones finished) or closed loop (`concurrency` clients,
               each sending its next request when its previous one ends); bounded by a request
               count and/or a duration (no new request starts after it), plus a hard timeout
               that cancels whatever is still running
    client     how one request is sent: /v1/completions or /v1/chat/completions, streamed as
               SSE with `stream_options.include_usage`, `ignore_eos` + `max_tokens` so output
               lengths are what the workload asked for

Every request that was sent leaves exactly one `Sample` (so sent = ok + errors, always):
times are seconds since the run started, measured with `time.perf_counter`.

    ttft   first chunk that carries generated text (chat's role-only opening chunk is not one;
           when no token decodes to text, the chunk with the finish reason)
    e2e    the `[DONE]` line (or the end of the stream)
    tpot   (e2e - ttft) / (output_tokens - 1), for requests with at least two output tokens
    output_tokens   `usage.completion_tokens` from the final chunk; servers that send no usage
                    fall back to the number of text chunks (`tokens_from_usage` says which)

The request plan does not depend on the shape: the same seed gives the same requests in the
same order for every rate of a sweep and for the in-process PEFT baseline.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

POPULARITIES = ("uniform", "zipf", "distinct")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# Common English words: most BPE vocabularies hold " word" as one token, so a prompt of n
# words is close to n tokens without a tokenizer (pass one to make it exact).
_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has",
    "would", "when", "if", "so", "no", "will", "more", "can", "out", "who", "about", "other",
    "into", "time", "some", "what", "only", "could", "new", "these", "two", "may", "first", "then",
    "do", "any", "like", "my", "now", "over", "such", "our", "man", "me", "even", "most", "made",
    "after", "also", "did", "many", "before", "must", "through", "back", "years", "where", "much",
    "your", "way", "well", "down", "should", "because", "each", "just", "those", "people", "how",
    "too", "little", "state", "good", "very", "make", "world", "still", "own", "see", "men",
    "work", "long", "get", "here", "between", "both", "life", "being", "under", "never", "day",
    "same", "another", "know", "while", "last",
)


# ============================================================================ workload


@dataclass(frozen=True)
class LengthSpec:
    """A length distribution: `lo == hi` is fixed, else uniform over lo..hi inclusive."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ValueError(f"need 1 <= lo <= hi, got {self.lo}-{self.hi}")

    @classmethod
    def parse(cls, text: str | int) -> LengthSpec:
        """`"128"` (fixed) or `"64-256"` / `"64:256"` (uniform, inclusive)."""
        parts = re.split(r"[-:]", str(text).strip())
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"a length is N or LO-HI, got {text!r}") from None
        if len(values) == 1:
            return cls(values[0], values[0])
        if len(values) == 2:
            return cls(values[0], values[1])
        raise ValueError(f"a length is N or LO-HI, got {text!r}")

    def sample(self, rng: np.random.Generator) -> int:
        return self.lo if self.lo == self.hi else int(rng.integers(self.lo, self.hi + 1))

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt from a file: text, or chat messages; an optional output length of its own."""

    text: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None
    max_tokens: int | None = None


def read_prompts(path: Path) -> list[PromptRecord]:
    """Prompts from a `.jsonl` file (one JSON value per line: a string, or an object with
    `prompt`/`text` or `messages`, optionally `max_tokens`/`output_len`) or from a text file
    (one prompt per non-empty line)."""
    records: list[PromptRecord] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        records = [PromptRecord(text=line) for line in lines if line.strip()]
    else:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
            records.append(_record(value, f"{path}:{number}"))
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def _record(value: Any, where: str) -> PromptRecord:
    if isinstance(value, str):
        return PromptRecord(text=value)
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a string or an object")  # noqa: TRY004 (bad file)
    limit = value.get("max_tokens", value.get("output_len"))
    max_tokens = int(limit) if limit is not None else None
    if "messages" in value:
        messages = tuple({"role": str(m["role"]), "content": str(m["content"])}
                         for m in value["messages"])
        return PromptRecord(messages=messages, max_tokens=max_tokens)
    text = value.get("prompt", value.get("text"))
    if not isinstance(text, str):
        raise ValueError(f"{where}: needs 'prompt', 'text' or 'messages'")  # noqa: TRY004
    return PromptRecord(text=text, max_tokens=max_tokens)


def popularity_weights(count: int, popularity: str, zipf_s: float = 1.0) -> np.ndarray:
    """Probability of each of `count` adapters: uniform, or bounded Zipf p_k ~ 1 / k^s
    (k = 1..count, the first adapter most popular). `distinct` is round-robin, not random:
    its weights are uniform."""
    if count < 1:
        raise ValueError("need at least one model")
    if popularity == "zipf":
        if zipf_s < 0:
            raise ValueError("the Zipf exponent must be >= 0")
        weights = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** zipf_s
        return weights / weights.sum()  # type: ignore[no-any-return]
    if popularity in ("uniform", "distinct"):
        return np.full(count, 1.0 / count)
    raise ValueError(f"popularity must be one of {POPULARITIES}, got {popularity!r}")


@dataclass(frozen=True)
class RequestSpec:
    """One request of the plan. `model` is an adapter name or the base model's name."""

    index: int
    model: str
    max_tokens: int
    prompt: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None

    def chat_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def prompt_text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        return "\n".join(m["content"] for m in self.messages or ())


@dataclass(frozen=True)
class Workload:
    """What to send. `adapters` empty means every request goes to `base`."""

    base: str
    adapters: tuple[str, ...] = ()
    popularity: str = "uniform"
    zipf_s: float = 1.0
    base_fraction: float = 0.0  # share of requests sent to the base among adapter requests
    prompt_len: LengthSpec = LengthSpec(128, 128)
    output_len: LengthSpec = LengthSpec(64, 64)
    prompts: tuple[PromptRecord, ...] = ()  # from a file; overrides prompt_len
    seed: int = 0

    def __post_init__(self) -> None:
        if self.popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {POPULARITIES}")
        if not 0.0 <= self.base_fraction <= 1.0:
            raise ValueError("base_fraction must be in [0, 1]")

    def describe(self) -> dict[str, Any]:
        return {
            "base": self.base, "adapters": len(self.adapters), "popularity": self.popularity,
            "zipf_s": self.zipf_s if self.popularity == "zipf" else None,
            "base_fraction": self.base_fraction, "prompt_len": str(self.prompt_len),
            "output_len": str(self.output_len), "prompts_from_file": len(self.prompts),
            "seed": self.seed,
        }


class PromptMaker:
    """Synthetic prompts of a given length: random common words, trimmed to exactly n tokens
    when a tokenizer is given (else n words, about n tokens)."""

    def __init__(self, rng: np.random.Generator, tokenizer: Any = None) -> None:
        self.rng = rng
        self.tokenizer = tokenizer

    def make(self, tokens: int) -> str:
        # Random from the first word on, so no two prompts share a prefix (prefix caches).
        words = [_WORDS[i] for i in self.rng.integers(0, len(_WORDS), size=tokens + 8)]
        text = " ".join(words)
        if self.tokenizer is None:
            return " ".join(words[:tokens])
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        while len(ids) < tokens:  # tokenizers that merge words: add more
            text += " " + " ".join(_WORDS[i] for i in self.rng.integers(0, len(_WORDS), 64))
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        return str(self.tokenizer.decode(ids[:tokens]))


def request_stream(workload: Workload, tokenizer: Any = None) -> Iterator[RequestSpec]:
    """The endless, deterministic request plan of `workload` (take as many as needed)."""
    rng = np.random.default_rng(workload.seed)
    maker = PromptMaker(np.random.default_rng([workload.seed, 1]), tokenizer)
    models = workload.adapters or (workload.base,)
    weights = popularity_weights(len(models), workload.popularity, workload.zipf_s)
    order = rng.permutation(len(workload.prompts)) if workload.prompts else None
    distinct = 0
    index = 0
    while True:
        if workload.adapters and workload.base_fraction and rng.random() < workload.base_fraction:
            model = workload.base
        elif workload.popularity == "distinct":
            model = models[distinct % len(models)]
            distinct += 1
        else:
            model = models[int(rng.choice(len(models), p=weights))]
        max_tokens = workload.output_len.sample(rng)
        if order is not None:
            record = workload.prompts[int(order[index % len(order)])]
            yield RequestSpec(index=index, model=model,
                              max_tokens=record.max_tokens or max_tokens,
                              prompt=record.text, messages=record.messages)
        else:
            yield RequestSpec(index=index, model=model, max_tokens=max_tokens,
                              prompt=maker.make(workload.prompt_len.sample(rng)))
        index += 1


# ============================================================================ shape


@dataclass(frozen=True)
class LoadShape:
    """When requests are sent and when the run ends.

    Exactly one of `rate` (open loop; `math.inf` sends every request at t=0) and
    `concurrency` (closed loop). At least one of `num_requests` and `duration`. `timeout` is
    the hard bound on the whole run, drain included: requests still running then are
    cancelled and recorded as errors.
    """

    rate: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    duration: float | None = None
    timeout: float = 3600.0
    request_timeout: float = 600.0
    warmup: int = 0
    seed: int = 0  # of the arrival process, separate from the workload's

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) and concurrency (closed)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be positive")
        if self.rate is not None and math.isinf(self.rate) and self.num_requests is None:
            raise ValueError("an infinite rate needs num_requests (a duration never passes)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.num_requests is None and self.duration is None:
            raise ValueError("bound the run with num_requests and/or duration")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError("num_requests must be at least 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError("duration must be positive")
        if not self.timeout > 0 or not self.request_timeout > 0:
            raise ValueError("timeouts must be positive")

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["mode"] = self.mode
        if self.rate is not None and math.isinf(self.rate):
            data["rate"] = "inf"
        return data


def arrival_times(rate: float, seed: int) -> Iterator[float]:
    """Poisson arrivals: cumulative sums of exponential gaps with mean 1/rate (all 0 at inf)."""
    rng = np.random.default_rng([seed, 2])
    t = 0.0
    while True:
        if not math.isinf(rate):
            t += float(rng.exponential(1.0 / rate))
        yield t


# ============================================================================ samples


@dataclass
class Sample:
    """What happened to one request; times in seconds since the run started."""

    index: int
    model: str
    start: float  # when it was sent
    scheduled: float | None = None  # open loop: when the arrival process wanted it sent
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int = 0
    max_tokens: int = 0
    status: int = 0  # HTTP status; 0 when no response arrived
    error: str | None = None  # None: success
    error_kind: str | None = None  # http | stream | timeout | connection | incomplete | cancelled
    finish_reason: str | None = None
    chunks: int = 0
    tokens_from_usage: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def end(self) -> float | None:
        return None if self.e2e is None else self.start + self.e2e

    @property
    def error_key(self) -> str:
        """How errors are grouped: the HTTP status for HTTP errors, else the kind."""
        if self.error_kind == "http":
            return str(self.status)
        return self.error_kind or "unknown"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sample:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class RunResult:
    """All samples of one run plus what is needed to read them."""

    samples: list[Sample]
    wall_start: float  # time.time() when the run started
    elapsed: float  # seconds from start until the last request ended or was cancelled
    timed_out: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    server_metrics: dict[str, float] | None = None  # counter deltas scraped from /metrics


# ============================================================================ client


@dataclass(frozen=True)
class ClientConfig:
    """How each request is sent."""

    url: str
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINTS)}")

    @property
    def path(self) -> str:
        return ENDPOINTS[self.endpoint]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": spec.model, "max_tokens": spec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": self.temperature,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = spec.chat_messages()
        else:
            body["prompt"] = spec.prompt_text()
        body.update(self.extra_body)
        return body

    def describe(self) -> dict[str, Any]:
        data = asdict(self)
        data["api_key"] = "set" if self.api_key else None  # never write keys to results
        return data


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        message = body["error"]["message"] if isinstance(body.get("error"), dict) \
            else body.get("detail") or body.get("error")
    except (ValueError, KeyError, TypeError, AttributeError):
        message = raw.decode("utf-8", "replace")
    return str(message)[:300]


class _Client:
    """Sends one request and fills its Sample; never raises except on cancellation."""

    def __init__(self, config: ClientConfig, http: httpx.AsyncClient, t0: float) -> None:
        self.config = config
        self.http = http
        self.t0 = t0
        self.url = config.url.rstrip("/") + config.path
        self.headers = config.headers()

    async def send(self, spec: RequestSpec, sample: Sample, request_timeout: float) -> None:
        try:
            await asyncio.wait_for(self._stream(spec, sample), request_timeout)
        except asyncio.TimeoutError:
            self._fail(sample, "timeout", f"no answer within {request_timeout:g} s")
        except httpx.TimeoutException as exc:
            self._fail(sample, "timeout", f"{type(exc).__name__}: {exc}")
        except httpx.HTTPError as exc:
            self._fail(sample, "connection", f"{type(exc).__name__}: {exc}")
        except (ValueError, KeyError, TypeError) as exc:  # a malformed event
            self._fail(sample, "stream", f"unreadable event: {exc}")

    def _fail(self, sample: Sample, kind: str, message: str) -> None:
        if sample.error is None:
            sample.error_kind, sample.error = kind, message
            sample.e2e = time.perf_counter() - self.t0 - sample.start

    async def _stream(self, spec: RequestSpec, sample: Sample) -> None:
        chat = self.config.endpoint == "chat"
        first: float | None = None  # first chunk with text
        finished: float | None = None  # first chunk with a finish_reason
        done = False
        async with self.http.stream("POST", self.url, json=self.config.body(spec),
                                    headers=self.headers) as response:
            sample.status = response.status_code
            if response.status_code != 200:
                self._fail(sample, "http", _error_message(await response.aread()))
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    message = error.get("message", error) if isinstance(error, dict) else error
                    self._fail(sample, "stream", str(message)[:300])
                    continue
                usage = event.get("usage")
                if usage:
                    sample.prompt_tokens = usage.get("prompt_tokens")
                    if usage.get("completion_tokens") is not None:
                        sample.output_tokens = int(usage["completion_tokens"])
                        sample.tokens_from_usage = True
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat \
                        else choice.get("text")
                    if text:
                        sample.chunks += 1
                        if first is None:
                            first = now
                    if choice.get("finish_reason"):
                        sample.finish_reason = choice["finish_reason"]
                        finished = finished or now
        end = time.perf_counter()
        if sample.error is not None:
            return
        if not done:
            self._fail(sample, "incomplete", "the stream ended without [DONE]")
            return
        if not sample.tokens_from_usage:
            sample.output_tokens = sample.chunks
        sample.e2e = end - self.t0 - sample.start
        first = first or finished  # every token decoded to no text (special tokens)
        if first is not None:
            sample.ttft = first - self.t0 - sample.start
            if sample.output_tokens > 1:
                sample.tpot = (sample.e2e - sample.ttft) / (sample.output_tokens - 1)


# ============================================================================ runner


def _tqdm(total: int | None, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    # disable=None: off when stderr is not a terminal (CI logs, tests).
    return tqdm(total=total, unit="req", desc=desc, disable=None if enabled else True,
                dynamic_ncols=True)


async def run_load(client: ClientConfig, shape: LoadShape, requests: Iterator[RequestSpec],
                   *, progress: bool = True, desc: str = "loadtest",
                   warmup_requests: Iterator[RequestSpec] | None = None) -> RunResult:
    """Send `requests` to the server with `shape`; one Sample per request sent."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(shape.request_timeout, connect=client.connect_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        if shape.warmup and warmup_requests is not None:
            await _warmup(client, http, shape, warmup_requests)
        wall_start = time.time()
        t0 = time.perf_counter()
        sender = _Client(client, http, t0)
        samples: list[Sample] = []
        bar = _tqdm(shape.num_requests, progress, desc)
        runner = _OpenLoop(shape, sender, samples, bar) if shape.mode == "open" \
            else _ClosedLoop(shape, sender, samples, bar)
        timed_out = False
        try:
            await asyncio.wait_for(runner.run(requests, t0), shape.timeout)
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
    for sample in samples:  # cancelled at the hard timeout: still counted, as errors
        if sample.error is None and sample.e2e is None:
            sample.error_kind = "cancelled"
            sample.error = f"cancelled at the hard timeout of {shape.timeout:g} s"
    return RunResult(samples=samples, wall_start=wall_start, elapsed=elapsed,
                     timed_out=timed_out,
                     config={"client": client.describe(), "shape": shape.describe()})


async def _warmup(client: ClientConfig, http: httpx.AsyncClient, shape: LoadShape,
                  requests: Iterator[RequestSpec]) -> None:
    """Unrecorded requests before the run (first-request compilation, lazy adapter loads)."""
    sender = _Client(client, http, time.perf_counter())
    specs = [next(requests) for _ in range(shape.warmup)]
    width = min(len(specs), shape.concurrency or 8)
    for i in range(0, len(specs), width):
        await asyncio.gather(*(sender.send(s, Sample(s.index, s.model, 0.0),
                                           shape.request_timeout) for s in specs[i:i + width]))


class _Loop:
    def __init__(self, shape: LoadShape, sender: _Client, samples: list[Sample],
                 bar: Any) -> None:
        self.shape = shape
        self.sender = sender
        self.samples = samples
        self.bar = bar
        self.errors = 0

    def exhausted(self, sent: int, now: float) -> bool:
        shape = self.shape
        return (shape.num_requests is not None and sent >= shape.num_requests) or \
            (shape.duration is not None and now >= shape.duration)

    async def one(self, spec: RequestSpec, start: float, scheduled: float | None) -> None:
        sample = Sample(index=spec.index, model=spec.model, start=start, scheduled=scheduled,
                        max_tokens=spec.max_tokens)
        self.samples.append(sample)  # before the await: a cancelled request still counts
        await self.sender.send(spec, sample, self.shape.request_timeout)
        self.errors += not sample.ok
        self.bar.update(1)
        self.bar.set_postfix(errors=self.errors, refresh=False)


class _OpenLoop(_Loop):
    """Poisson arrivals: each request starts at its arrival time, independent of the others."""

    async def run(self, requests: Iterator[RequestSpec], t0: float) -> None:
        assert self.shape.rate is not None
        tasks: set[asyncio.Task[None]] = set()
        arrivals = arrival_times(self.shape.rate, self.shape.seed)
        try:
            for sent, (spec, at) in enumerate(zip(requests, arrivals)):
                if self.exhausted(sent, at):
                    break
                # Sleep even when late (0 s): started requests must get to send their bytes.
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                task = asyncio.create_task(self.one(spec, time.perf_counter() - t0, at))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks))
        finally:
            await _cancel(tasks)


class _ClosedLoop(_Loop):
    """`concurrency` clients, each sending its next request as soon as its last one ended."""

    async def run(self, requests: Iterator[RequestSpec], t0: float) -> None:
        assert self.shape.concurrency is not None
        sent = 0

        async def client() -> None:
            nonlocal sent
            while True:
                now = time.perf_counter() - t0
                if self.exhausted(sent, now):
                    return
                sent += 1  # claimed before the await: the count bound is exact
                await self.one(next(requests), now, None)

        tasks = {asyncio.create_task(client()) for _ in range(self.shape.concurrency)}
        try:
            await asyncio.gather(*tasks)
        finally:
            await _cancel(tasks)


async def _cancel(tasks: set[asyncio.Task[None]]) -> None:
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


# ============================================================================ server helpers


def list_models(url: str, api_key: str | None = None, timeout: float = 30.0
                ) -> list[dict[str, Any]]:
    """The server's `/v1/models` entries."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout)
    response.raise_for_status()
    return list(response.json()["data"])


def natural_key(name: str) -> list[Any]:
    """Sort key that puts lt-2 before lt-10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def discover_models(url: str, api_key: str | None = None, prefix: str | None = None
                    ) -> tuple[str, list[str]]:
    """(base name, adapter names) from `/v1/models`: adapters are the entries with a
    `parent`, the base is the first entry without one."""
    models = list_models(url, api_key)
    bases = [m["id"] for m in models if not m.get("parent")]
    adapters = sorted((m["id"] for m in models if m.get("parent")), key=natural_key)
    if prefix:
        adapters = [a for a in adapters if a.startswith(prefix)]
    if not bases:
        raise ValueError(f"{url}/v1/models lists no base model (an entry without a parent)")
    return bases[0], adapters


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def scrape_counters(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Cumulative series (`*_total`, `*_count`, `*_sum`) from the server's `/metrics`,
    keyed by name with labels; empty when the server has no /metrics."""
    try:
        response = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        match = _METRIC_LINE.match(line)
        if not match:
            continue
        name = match.group(1).split("{", 1)[0]
        if name.endswith(("_total", "_count", "_sum")):
            try:
                values[match.group(1)] = float(match.group(2))
            except ValueError:
                continue
    return values


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """after - before for every series that changed (new series count from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items())
            if v - before.get(k, 0.0) != 0}


def take(stream: Iterator[RequestSpec], count: int) -> list[RequestSpec]:
    """The first `count` requests of a plan."""
    return [next(stream) for _ in range(count)]


def parse_list(text: str | None) -> list[str]:
    """`a,b,,c` -> [a, b, c]."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def parse_numbers(text: str, kind: Callable[[str], Any] = float) -> list[Any]:
    """`1,2,4` -> [1.0, 2.0, 4.0] (`inf` allowed for floats)."""
    return [kind(item) for item in parse_list(text)]


__all__ = [
    "ClientConfig", "LengthSpec", "LoadShape", "PromptRecord", "RequestSpec", "RunResult",
    "Sample", "Workload", "arrival_times", "counter_deltas", "discover_models", "list_models",
    "parse_list", "parse_numbers", "popularity_weights", "read_prompts", "request_stream",
    "run_load", "scrape_counters", "take",
]
