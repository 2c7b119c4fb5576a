"""Metrics, JSON results and PNG plots from the samples of a run.

Every number is computed from the recorded per-request samples (never from server metrics):

    duration          run start until the last request ended or was cancelled (`elapsed`)
    requests_per_s    successful requests / duration
    output_tokens_per_s   output tokens of successful requests / duration
    ttft, tpot, e2e   over successful requests (tpot: those with >= 2 output tokens);
                      p50/p90/p99 by `numpy.percentile(..., method="linear")`, i.e. linear
                      interpolation between order statistics (Hyndman & Fan type 7, numpy's
                      default): with n sorted values v, p = v[h0] + (h - h0) (v[h0+1] - v[h0])
                      where h = (n - 1) q / 100 and h0 = floor(h)
    server_adapter_counters   deltas of the server's /metrics counters whose name mentions
                      adapters (loads from disk, page-ins, evictions), when scraped
    errors_by_status  failed requests grouped by HTTP status ("404", "429", ...) or, when no
                      error status arrived, by kind ("stream", "timeout", "connection",
                      "incomplete", "cancelled")
    slo               share of *sent* requests that succeeded with ttft <= --slo-ttft and
                      tpot <= --slo-tpot (a failure misses), and that count per second
                      (goodput); a one-token answer has no tpot and meets that target

Plots (matplotlib, Agg backend, no display needed): latency CDFs, throughput over time (output
tokens of each request spread evenly from its first token to its end), the throughput-latency
curve of a sweep, and comparisons of several result files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from loramux.loadtest.generator import RunResult, Sample

SCHEMA = "loramux.loadtest.result/v1"
SWEEP_SCHEMA = "loramux.loadtest.sweep/v1"
PERCENTILES = (50, 90, 99)
PERCENTILE_METHOD: Final = "linear"
METRICS = ("ttft", "tpot", "e2e")
_TITLES = {"ttft": "time to first token", "tpot": "time per output token",
           "e2e": "end-to-end latency"}


# ============================================================================ numbers


def distribution(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, min, max and the PERCENTILES of `values` (None where there are none)."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    out: dict[str, float | int | None] = {"count": int(data.size)}
    if data.size == 0:
        out.update({"mean": None, "min": None, "max": None})
        out.update({f"p{q}": None for q in PERCENTILES})
        return out
    out.update({"mean": float(data.mean()), "min": float(data.min()), "max": float(data.max())})
    points = np.percentile(data, list(PERCENTILES), method=PERCENTILE_METHOD)
    out.update({f"p{q}": float(v) for q, v in zip(PERCENTILES, points)})
    return out


def summarize(result: RunResult, *, slo_ttft: float | None = None,
              slo_tpot: float | None = None) -> dict[str, Any]:
    """The report of one run; see the module docstring for every definition."""
    samples = result.samples
    ok = [s for s in samples if s.ok]
    failed = [s for s in samples if not s.ok]
    duration = result.elapsed
    errors: dict[str, int] = {}
    for s in failed:
        errors[s.error_key] = errors.get(s.error_key, 0) + 1
    output_tokens = sum(s.output_tokens for s in ok)
    prompt_tokens = sum(s.prompt_tokens or 0 for s in ok)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    summary: dict[str, Any] = {
        "sent": len(samples),
        "ok": len(ok),
        "errors": len(failed),
        "errors_by_status": dict(sorted(errors.items())),
        "timed_out": result.timed_out,
        "duration_s": duration,
        "requests_per_s": per_second(len(ok)),
        "output_tokens_per_s": per_second(output_tokens),
        "prompt_tokens_per_s": per_second(prompt_tokens),
        "output_tokens": output_tokens,
        "prompt_tokens": prompt_tokens,
        "short_outputs": sum(1 for s in ok if s.max_tokens and s.output_tokens < s.max_tokens),
        "percentile_method": f"numpy.percentile(method={PERCENTILE_METHOD!r})",
        "ttft_s": distribution([s.ttft for s in ok if s.ttft is not None]),
        "tpot_s": distribution([s.tpot for s in ok if s.tpot is not None]),
        "e2e_s": distribution([s.e2e for s in ok if s.e2e is not None]),
    }
    lags = [s.start - s.scheduled for s in samples if s.scheduled is not None]
    if lags:  # how late the client sent open-loop requests: large means the client was the limit
        summary["client_lag_s"] = distribution(lags)
    summary["slo"] = slo_attainment(samples, slo_ttft, slo_tpot, duration)
    if result.server_metrics is not None:  # e.g. cold adapter loads, page-ins, evictions
        summary["server_adapter_counters"] = {
            k: v for k, v in result.server_metrics.items() if "adapter" in k}
    return summary


def slo_attainment(samples: Sequence[Sample], slo_ttft: float | None, slo_tpot: float | None,
                   duration: float) -> dict[str, Any] | None:
    """Share of sent requests that succeeded within the given targets, and goodput."""
    if slo_ttft is None and slo_tpot is None:
        return None
    sent = len(samples)

    def meets_ttft(s: Sample) -> bool:
        return slo_ttft is None or (s.ttft is not None and s.ttft <= slo_ttft)

    def meets_tpot(s: Sample) -> bool:
        return slo_tpot is None or s.tpot is None or s.tpot <= slo_tpot

    ok = [s for s in samples if s.ok]
    both = sum(1 for s in ok if meets_ttft(s) and meets_tpot(s))
    share = (lambda n: n / sent) if sent else (lambda n: 0.0)
    return {
        "ttft_target_s": slo_ttft,
        "tpot_target_s": slo_tpot,
        "ttft_attainment": share(sum(1 for s in ok if meets_ttft(s))),
        "tpot_attainment": share(sum(1 for s in ok if meets_tpot(s))),
        "attainment": share(both),
        "goodput_rps": both / duration if duration > 0 else 0.0,
    }


def timeline(samples: Sequence[Sample], duration: float, bin_s: float | None = None
             ) -> dict[str, Any]:
    """Output tokens/s, completed requests/s and requests in flight per time bin.

    A request's first token counts at its TTFT, the others evenly between then and its end,
    since the stream's chunks may carry several tokens each.
    """
    duration = max(duration, max((s.end or 0.0 for s in samples), default=0.0), 1e-6)
    bin_s = bin_s or max(duration / 40, 0.05)
    bins = max(1, math.ceil(duration / bin_s))
    edges = np.arange(bins + 1) * bin_s
    tokens = np.zeros(bins)
    done = np.zeros(bins)
    for s in samples:
        if not s.ok or s.end is None:
            continue
        done[min(int(s.end / bin_s), bins - 1)] += 1
        if s.ttft is None or s.output_tokens == 0:
            continue
        first = s.start + s.ttft
        tokens[min(int(first / bin_s), bins - 1)] += 1
        rest = s.output_tokens - 1
        if rest <= 0:
            continue
        if s.end <= first:
            tokens[min(int(first / bin_s), bins - 1)] += rest
            continue
        overlap = np.clip(np.minimum(edges[1:], s.end) - np.maximum(edges[:-1], first), 0, None)
        tokens += rest * overlap / (s.end - first)
    centers = edges[:-1] + bin_s / 2
    in_flight = [sum(1 for s in samples if s.start <= t < (s.end if s.end is not None
                                                            else duration)) for t in centers]
    return {
        "bin_s": bin_s,
        "t": [float(t) for t in edges[:-1]],
        "output_tokens_per_s": [float(v) for v in tokens / bin_s],
        "requests_per_s": [float(v) for v in done / bin_s],
        "in_flight": in_flight,
    }


# ============================================================================ JSON


def result_document(result: RunResult, summary: Mapping[str, Any], *,
                    label: str | None = None, extra: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The JSON document of one run: config, summary, timeline and every sample."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "label": label,
        "started_at": result.wall_start,
        "config": result.config,
        "summary": dict(summary),
        "timeline": timeline(result.samples, result.elapsed),
        "server_metrics": result.server_metrics,
        "samples": [s.as_json() for s in result.samples],
    }
    if extra:
        doc.update(extra)
    return doc


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, allow_nan=False, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass(frozen=True)
class LoadedResult:
    """A result file read back, for comparisons."""

    path: Path
    label: str
    summary: dict[str, Any]
    samples: list[Sample]


def load_result(path: Path, label: str | None = None) -> LoadedResult:
    doc = json.loads(path.read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a loadtest result (schema {doc.get('schema')!r})")
    samples = [Sample.from_json(s) for s in doc.get("samples", [])]
    return LoadedResult(path, label or doc.get("label") or path.stem, doc["summary"], samples)


def write_run(result: RunResult, out_dir: Path, *, slo_ttft: float | None = None,
              slo_tpot: float | None = None, plots: bool = True, label: str | None = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """results.json (+ latency.png, throughput.png) under `out_dir`; returns the summary."""
    summary = summarize(result, slo_ttft=slo_ttft, slo_tpot=slo_tpot)
    doc = result_document(result, summary, label=label, extra=extra)
    write_json(out_dir / "results.json", doc)
    if plots:
        plot_latency(result.samples, summary, out_dir / "latency.png", title=label)
        plot_throughput(doc["timeline"], out_dir / "throughput.png", title=label)
    return summary


def format_summary(summary: Mapping[str, Any], title: str | None = None) -> str:
    """A short human-readable table of a summary."""
    lines = [f"== {title}" if title else "== results"]
    lines.append(f"requests: {summary['sent']} sent, {summary['ok']} ok, "
                 f"{summary['errors']} errors {summary['errors_by_status'] or ''}".rstrip())
    lines.append(f"duration {summary['duration_s']:.2f} s, "
                 f"{summary['requests_per_s']:.3f} req/s, "
                 f"{summary['output_tokens_per_s']:.1f} output tok/s")
    for metric in METRICS:
        d = summary[f"{metric}_s"]
        if d["count"]:
            lines.append(f"{metric:>5} ms  p50 {d['p50'] * 1e3:9.1f}  p90 {d['p90'] * 1e3:9.1f}  "
                         f"p99 {d['p99'] * 1e3:9.1f}  mean {d['mean'] * 1e3:9.1f}")
    slo = summary.get("slo")
    if slo:
        lines.append(f"SLO attainment {slo['attainment']:.1%} (ttft {slo['ttft_attainment']:.1%},"
                     f" tpot {slo['tpot_attainment']:.1%}), goodput {slo['goodput_rps']:.3f}"
                     " req/s")
    counters = summary.get("server_adapter_counters")
    if counters:
        lines.append("server: " + ", ".join(f"{k} +{v:g}" for k, v in counters.items()
                                             if not k.endswith(("_sum", "_count"))))
    return "\n".join(lines)


# ============================================================================ plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _cdf(ax: Any, values: Sequence[float], label: str | None = None) -> None:
    data = np.sort(np.asarray(values, dtype=np.float64))
    if data.size:
        ax.step(data, np.arange(1, data.size + 1) / data.size, where="post", label=label)


def plot_latency(samples: Sequence[Sample], summary: Mapping[str, Any], path: Path,
                 title: str | None = None) -> Path:
    """CDFs of TTFT, TPOT and e2e with p50/p90/p99 and the SLO targets marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ok = [s for s in samples if s.ok]
    slo = summary.get("slo") or {}
    targets = {"ttft": slo.get("ttft_target_s"), "tpot": slo.get("tpot_target_s")}
    for ax, metric in zip(axes, METRICS):
        values = [getattr(s, metric) * 1e3 for s in ok if getattr(s, metric) is not None]
        _cdf(ax, values)
        dist = summary[f"{metric}_s"]
        for q, style in zip(PERCENTILES, (":", "--", "-.")):
            point = _ms(dist[f"p{q}"])
            if not math.isnan(point):
                ax.axvline(point, color="grey", linestyle=style, linewidth=1,
                           label=f"p{q} {point:.1f}")
        target = targets.get(metric)
        if target:
            ax.axvline(target * 1e3, color="red", linewidth=1.2, label="SLO")
        ax.set_xlabel(f"{_TITLES[metric]} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if values:
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
    fig.suptitle(title or f"latency of {summary['ok']} successful requests")
    return _save(fig, path)


def plot_throughput(series: Mapping[str, Any], path: Path, title: str | None = None) -> Path:
    """Output tokens/s, completed requests/s and requests in flight over the run."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    t = series["t"]
    axes[0].plot(t, series["output_tokens_per_s"], drawstyle="steps-post")
    axes[0].set_ylabel("output tokens/s")
    axes[1].plot(t, series["requests_per_s"], drawstyle="steps-post", color="tab:green")
    axes[1].set_ylabel("completed req/s")
    axes[2].plot(t, series["in_flight"], drawstyle="steps-post", color="tab:orange")
    axes[2].set_ylabel("in flight")
    axes[2].set_xlabel(f"time since start (s), bins of {series['bin_s']:.2g} s")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle(title or "throughput over time")
    return _save(fig, path)


def plot_sweep(points: Sequence[tuple[str, Mapping[str, Any]]], path: Path,
               title: str | None = None) -> Path:
    """Throughput-latency curve: achieved output tokens/s against p50 and p99 of each metric,
    one point per offered load (labelled)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = [summary["output_tokens_per_s"] for _, summary in points]
    for ax, metric in zip(axes, METRICS):
        for q, marker in ((50, "o"), (99, "s")):
            y = [_ms(summary[f"{metric}_s"][f"p{q}"]) for _, summary in points]
            ax.plot(x, y, marker=marker, label=f"p{q}")
        for (label, summary), xi in zip(points, x):
            y50 = _ms(summary[f"{metric}_s"]["p50"])
            if not math.isnan(y50):
                ax.annotate(label, (xi, y50), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        ax.set_xlabel("achieved output tokens/s")
        ax.set_ylabel(f"{_TITLES[metric]} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "throughput vs latency")
    return _save(fig, path)


def _ms(value: float | None) -> float:
    return float("nan") if value is None else value * 1e3


def plot_compare(results: Sequence[LoadedResult], path: Path, *,
                 x: Sequence[float] | None = None, x_label: str | None = None,
                 title: str | None = None) -> Path:
    """Several runs side by side. With `x` (one value per result), results sharing a label
    form a series plotted against x (e.g. distinct adapters per batch); without it, bars per
    result plus the e2e CDFs."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax_tok, ax_req, ax_e2e, ax_last = axes.flat
    if x is not None:
        if len(x) != len(results):
            raise ValueError("give one x value per result")
        series: dict[str, list[tuple[float, Mapping[str, Any]]]] = {}
        for xi, r in zip(x, results):
            series.setdefault(r.label, []).append((xi, r.summary))
        panels = ((ax_tok, "output tokens/s", lambda s: s["output_tokens_per_s"]),
                  (ax_req, "requests/s", lambda s: s["requests_per_s"]),
                  (ax_e2e, "e2e p50 / p99 (ms)", None),
                  (ax_last, "TPOT p50 / p99 (ms)", None))
        for name, pts in series.items():
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ax_tok.plot(xs, [p[1]["output_tokens_per_s"] for p in pts], marker="o", label=name)
            ax_req.plot(xs, [p[1]["requests_per_s"] for p in pts], marker="o", label=name)
            for ax, metric in ((ax_e2e, "e2e_s"), (ax_last, "tpot_s")):
                line = ax.plot(xs, [_ms(p[1][metric]["p50"]) for p in pts], marker="o",
                               label=f"{name} p50")[0]
                ax.plot(xs, [_ms(p[1][metric]["p99"]) for p in pts], marker="s",
                        linestyle="--", color=line.get_color(), label=f"{name} p99")
        for ax, ylabel, _ in panels:
            ax.set_xlabel(x_label or "x")
            ax.set_ylabel(ylabel)
            if len({p for pts in series.values() for p, _ in pts}) > 2 and min(x) > 0:
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.set_ylim(bottom=0)
    else:
        labels = [r.label for r in results]
        pos = np.arange(len(results))
        ax_tok.bar(pos, [r.summary["output_tokens_per_s"] for r in results])
        ax_tok.set_ylabel("output tokens/s")
        ax_req.bar(pos, [r.summary["requests_per_s"] for r in results], color="tab:green")
        ax_req.set_ylabel("requests/s")
        width = 0.38
        for offset, q in ((-width / 2, 50), (width / 2, 99)):
            ax_e2e.bar(pos + offset, [_ms(r.summary["e2e_s"][f"p{q}"]) for r in results],
                       width, label=f"p{q}")
        ax_e2e.set_ylabel("e2e latency (ms)")
        ax_e2e.legend(fontsize=7)
        for ax in (ax_tok, ax_req, ax_e2e):
            ax.set_xticks(pos, labels, rotation=20, ha="right", fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        for r in results:
            _cdf(ax_last, [s.e2e * 1e3 for s in r.samples if s.ok and s.e2e is not None],
                 label=r.label)
        ax_last.set_xlabel("e2e latency (ms)")
        ax_last.set_ylabel("fraction of requests")
        ax_last.grid(alpha=0.3)
        ax_last.legend(fontsize=7)
    fig.suptitle(title or "comparison")
    return _save(fig, path)


__all__ = [
    "METRICS", "PERCENTILES", "PERCENTILE_METHOD", "SCHEMA", "SWEEP_SCHEMA", "LoadedResult",
    "distribution", "format_summary", "load_result", "plot_compare", "plot_latency",
    "plot_sweep", "plot_throughput", "result_document", "slo_attainment", "summarize",
    "timeline", "write_json", "write_run",
]
