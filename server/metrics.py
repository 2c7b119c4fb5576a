"""Prometheus metrics of one app: its own CollectorRegistry, nothing at module level.

Two kinds of series:
- measured by the HTTP layer as requests run: latency histograms (time to first token, time
  per output token, end to end), token counters, requests by endpoint and status;
- read from the engine and registry at scrape time through `RuntimeStats` (one snapshot per
  scrape, so the series of one scrape agree with each other): queue depth, running requests,
  batch size, KV usage, adapters per tier, adapter loads/evictions/load latency, and the
  gauges inference routers read exactly as vLLM names them:

    vllm:num_requests_waiting, vllm:num_requests_running, vllm:kv_cache_usage_perc,
    vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}

`vllm:lora_requests_info`'s value is the unix time of the snapshot, its labels comma-joined
adapter names; a custom collector builds the family afresh on every scrape, so only the
current label set exists and routers never see a stale one.

The accelerator pool's size, for capacity planning: `loramux_adapter_pool_capacity{rank}`,
how many adapters of that rank on every projection it holds (ranks 8, 16 and --max-lora-rank),
and `loramux_adapter_pool_bytes{state="used"|"capacity"}`.

Where each adapter lives is one series per adapter and tier, not a comma-joined label:

    loramux_adapter_resident{adapter, tier}   versions of `adapter` whose furthest tier is `tier`
                                              (device, paging, or host only); adapters only on
                                              disk are not listed

Adapter names appear only there and in `vllm:lora_requests_info` (whose labels routers need),
both bounded by the host and accelerator capacities; request series carry no per-adapter
label, so cardinality stays bounded however many adapters come.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

TIERS = ("disk", "host", "paging", "device")

# Buckets from vLLM's histograms, so dashboards built for it read ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass(frozen=True)
class RuntimeStats:
    """One consistent snapshot of engine and registry state, taken at scrape time."""

    num_waiting: int = 0
    num_running: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    batch_size: int = 0  # sequences in the last step
    batch_tokens: int = 0  # tokens in the last step
    max_lora: int = 0  # adapters of --max-lora-rank the accelerator pool holds
    # rank -> adapters of that rank on every projection the accelerator pool holds
    adapter_pool_capacity: dict[int, int] = field(default_factory=dict)
    adapter_pool_bytes: dict[str, int] = field(default_factory=dict)  # "used", "capacity"
    running_adapters: Sequence[str] = ()  # resident on the accelerator
    waiting_adapters: Sequence[str] = ()  # wanted by waiting requests, not resident
    adapters_per_tier: dict[str, int] = field(default_factory=dict)
    # (adapter, furthest tier) -> versions, for the tiers in memory (host, paging, device)
    adapter_residency: dict[tuple[str, str], int] = field(default_factory=dict)
    adapter_loads: int = 0  # adapters accepted (disk -> registry)
    adapter_page_ins: int = 0  # host -> device copies
    adapter_parks: int = 0  # references given back mid-request for a starving waiter
    adapter_evictions: dict[str, int] = field(default_factory=dict)  # tier -> count
    adapter_load_seconds: tuple[int, float] = (0, 0.0)  # (count, sum)
    adapter_page_in_seconds: tuple[int, float] = (0, 0.0)  # (count, sum)
    adapter_references: int = 0  # references held by queued and running requests
    preemptions: int = 0  # sequences preempted (KV freed, recomputed later) so far
    timestamp: float = 0.0  # unix time the snapshot was taken


class _RuntimeCollector(Collector):
    """Builds the scrape-time families from a fresh `RuntimeStats`."""

    def __init__(self, snapshot: Callable[[], RuntimeStats], model_name: str) -> None:
        self._snapshot = snapshot
        self._model_name = model_name

    def describe(self) -> Iterable[Metric]:
        return []  # families are built per scrape; describing would take a snapshot

    def collect(self) -> Iterable[Metric]:
        s = self._snapshot()
        model = [self._model_name]

        def gauge(name: str, doc: str, value: float, vllm: bool = False) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model_name"] if vllm else None)
            if vllm:
                family.add_metric(model, value)
            else:
                family.add_metric([], value)
            return family

        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.",
                    s.num_waiting, vllm=True)
        yield gauge("vllm:num_requests_running", "Requests in the running batch.",
                    s.num_running, vllm=True)
        yield gauge("vllm:kv_cache_usage_perc", "KV cache usage (1 = 100%).",
                    s.kv_cache_usage, vllm=True)
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters; the value is the unix time of this update.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric(
            [str(s.max_lora), ",".join(s.running_adapters), ",".join(s.waiting_adapters)],
            s.timestamp,
        )
        yield info

        yield gauge("loramux_num_requests_waiting", "Queue depth: requests not yet scheduled.",
                    s.num_waiting)
        yield gauge("loramux_num_requests_running", "Requests in the running batch.",
                    s.num_running)
        yield gauge("loramux_batch_size", "Sequences in the last engine step.", s.batch_size)
        yield gauge("loramux_batch_tokens", "Tokens in the last engine step.", s.batch_tokens)
        yield gauge("loramux_kv_cache_usage_ratio", "Fraction of KV cache blocks in use.",
                    s.kv_cache_usage)
        yield gauge("loramux_max_lora", "Adapters of --max-lora-rank the accelerator pool "
                    "holds at once.", s.max_lora)
        capacity = GaugeMetricFamily(
            "loramux_adapter_pool_capacity",
            "Adapters of a rank on every projection that the accelerator pool holds (its "
            "bytes and slots both).", labels=["rank"])
        for rank, count in sorted(s.adapter_pool_capacity.items()):
            capacity.add_metric([str(rank)], count)
        yield capacity
        pool_bytes = GaugeMetricFamily("loramux_adapter_pool_bytes",
                                       "Accelerator adapter pool bytes, used and capacity.",
                                       labels=["state"])
        for state in ("used", "capacity"):
            pool_bytes.add_metric([state], s.adapter_pool_bytes.get(state, 0))
        yield pool_bytes
        # Both fall back to 0 when idle: a leak of either shows as a non-zero idle value.
        yield gauge("loramux_adapter_references",
                    "Adapter references held by running requests (0 when idle).",
                    s.adapter_references)
        preemptions = CounterMetricFamily(
            "loramux_num_preemptions",
            "Sequences preempted for lack of KV cache blocks (recomputed later).")
        preemptions.add_metric([], s.preemptions)
        yield preemptions

        tiers = GaugeMetricFamily("loramux_adapters", "Adapters per memory tier.",
                                  labels=["tier"])
        for tier in TIERS:
            tiers.add_metric([tier], s.adapters_per_tier.get(tier, 0))
        yield tiers
        resident = GaugeMetricFamily(
            "loramux_adapter_resident",
            "Versions of an adapter by the furthest memory tier they reached (host, paging, "
            "device).",
            labels=["adapter", "tier"])
        for (name, tier), versions in sorted(s.adapter_residency.items()):
            resident.add_metric([name, tier], versions)
        yield resident

        loads = CounterMetricFamily("loramux_adapter_loads", "Adapters loaded and validated.")
        loads.add_metric([], s.adapter_loads)
        yield loads
        page_ins = CounterMetricFamily("loramux_adapter_page_ins",
                                       "Adapter copies from host memory to the accelerator.")
        page_ins.add_metric([], s.adapter_page_ins)
        yield page_ins
        parks = CounterMetricFamily(
            "loramux_adapter_parks",
            "Adapter references given back mid-request so that a starving adapter gets the "
            "room (the requests keep their KV cache and resume when it is back).")
        parks.add_metric([], s.adapter_parks)
        yield parks
        evictions = CounterMetricFamily("loramux_adapter_evictions",
                                        "Adapters evicted from a tier.", labels=["tier"])
        for tier in ("host", "device"):
            evictions.add_metric([tier], s.adapter_evictions.get(tier, 0))
        yield evictions
        for name, doc, (count, total) in (
            ("loramux_adapter_load_seconds", "Time to read and validate an adapter.",
             s.adapter_load_seconds),
            ("loramux_adapter_page_in_seconds", "Time to copy an adapter to the accelerator.",
             s.adapter_page_in_seconds),
        ):
            summary = SummaryMetricFamily(name, doc)
            summary.add_metric([], count_value=count, sum_value=total)
            yield summary


class ServerMetrics:
    """The metrics of one app. Request-path calls are cheap (a few counter increments)."""

    def __init__(self, snapshot: Callable[[], RuntimeStats], model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram("loramux_time_to_first_token_seconds",
                              "Time from request arrival to its first output token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("loramux_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("loramux_e2e_request_latency_seconds",
                             "Time from request arrival to its last token.",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loramux_prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        self.generation_tokens = Counter("loramux_generation_tokens", "Tokens generated.",
                                         registry=r)
        self.requests = Counter("loramux_requests", "HTTP responses by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("loramux_request_finish", "Finished sequences by reason.",
                                ["reason"], registry=r)
        self.in_flight = Gauge("loramux_http_requests_in_flight",
                               "Generation requests admitted and not yet finished.", registry=r)
        r.register(_RuntimeCollector(snapshot, model_name))

    def count_response(self, method: str, path: str, status: int) -> None:
        """One finished HTTP response, labelled by a bounded endpoint name."""
        self.requests.labels(_endpoint(method, path), str(status)).inc()

    def observe_request(self, *, arrival: float, first_token: float | None, end: float,
                        prompt_tokens: int, output_tokens: int) -> None:
        """Record one finished generation request (times from time.monotonic())."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.e2e.observe(max(0.0, end - arrival))
        if first_token is not None:
            self.ttft.observe(max(0.0, first_token - arrival))
            if output_tokens > 1:
                self.tpot.observe(max(0.0, end - first_token) / (output_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter",
              "/v1/unload_lora_adapter", "/health", "/ready", "/metrics", "/admin/adapters"}


def _endpoint(method: str, path: str) -> str:
    """A fixed set of label values, whatever paths clients send."""
    if path in _ENDPOINTS:
        return path
    if path.startswith("/admin/adapters/"):
        return "/admin/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"
