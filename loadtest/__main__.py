"""`python -m loramux.loadtest` (also `loramux loadtest`): load tests, adapters, baselines.

    run            load an OpenAI-compatible server (loramux, vLLM, ...) and report
    peft           the same workload in process on peft.PeftModel (mixed-adapter batches)
    make-adapters  write N random PEFT adapters for a base model (and optionally load them)
    load-adapters  load a folder of adapters into a server through its admin API
    compare        plot several results.json files side by side, or against an x value

A list of values for one of --rate, --concurrency or --num-adapters makes a sweep: one run
per value (OUT/<label>/), then OUT/sweep.json, OUT/sweep.png (throughput vs latency) and
OUT/scaling.png (metrics against the swept value).

Examples (server: `loramux serve --admin-token $TOKEN --adapter-root DIR`):

    # make 32 random adapters for the served model, upload them through the admin API
    python -m loramux.loadtest make-adapters --num 32 --out adapters \
        --url http://127.0.0.1:8000 --admin-token $TOKEN

    # 200 requests, Poisson at 4 req/s, Zipf(1.0) over every adapter the server lists
    python -m loramux.loadtest run --rate 4 --num-requests 200 --popularity zipf \
        --zipf-s 1.0 --slo-ttft 0.5 --slo-tpot 0.1 --out results/zipf

    # the same workload on PEFT too, in one command (OUT/peft/, OUT/compare.png)
    python -m loramux.loadtest run --concurrency 8 --num-requests 128 \
        --adapters-dir adapters --baseline peft --out results/vs-peft

    # rate sweep; closed loop for 60 s; distinct adapters per batch 1..64
    python -m loramux.loadtest run --rate 1,2,4,8 --num-requests 100 --out results/sweep
    python -m loramux.loadtest run --concurrency 16 --duration 60 --out results/closed
    python -m loramux.loadtest run --concurrency 64 --num-requests 256 \
        --popularity distinct --num-adapters 1,4,16,64 --out results/distinct

    python -m loramux.loadtest compare a/results.json b/results.json --labels a,b \
        --out compare.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loramux.loadtest.generator import (
    POPULARITIES,
    ClientConfig,
    LengthSpec,
    LoadShape,
    RunResult,
    Workload,
    counter_deltas,
    discover_models,
    parse_list,
    read_prompts,
    request_stream,
    run_load,
    scrape_counters,
)

DEFAULT_URL = "http://127.0.0.1:8000"


# ============================================================================ arguments

# Defaults read from the environment that --help must not echo: API keys and tokens.
_SECRET_DESTS = frozenset({"api_key", "admin_token"})
_ENV_TAG = re.compile(r"\s*(\[env [^\]]+\])$")
_ANY_ENV_TAG = re.compile(r"\[env [^\]]+\]")


class _HelpFormatter(argparse.HelpFormatter):
    """Adds each option's default, as `(default: X)` before its `[env ...]` tag, unless the
    text already says it in words, the default is unset (None, off, empty) or a secret; and
    wraps lines without splitting an `[env ...]` tag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0  # flags: their name says it
                or default is None or default is argparse.SUPPRESS or default in ([], {}, "")
                or action.dest in _SECRET_DESTS or "default" in text.lower()):
            return text
        values = default if isinstance(default, (list, tuple)) else [default]
        shown = ",".join(_fmt(v) if isinstance(v, float) else str(v) for v in values)
        # argparse %-formats help text: a literal % in a default must not start a placeholder.
        note = f"(default: {shown.replace('%', '%%')})"
        tag = _ENV_TAG.search(text)
        if tag:
            return f"{text[:tag.start()]} {note} {tag.group(1)}".strip()
        return f"{text} {note}".strip()

    def _split_lines(self, text: str, width: int) -> list[str]:
        # As argparse wraps, but a tag is one unbreakable word (a no-break space inside, and
        # no splitting of words longer than the line).
        text = re.sub(r"[ \t\n\r\f\v]+", " ", text).strip()
        glued = _ANY_ENV_TAG.sub(lambda m: m.group(0).replace(" ", "\xa0"), text)
        lines = textwrap.wrap(glued, width, break_long_words=False)
        return [line.replace("\xa0", " ") for line in lines]



def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _rates(text: str) -> list[float]:
    try:
        values = [math.inf if item.lower() in ("inf", "infinity") else float(item)
                  for item in parse_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates like 1,2,4 or inf, got {text!r}")
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in parse_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be at least 1")
    return values


def _length(text: str) -> LengthSpec:
    try:
        return LengthSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--model", help="the base model's name (default: from /v1/models, or the "
                   "model folder's name)")
    g.add_argument("--adapters", default="auto",
                   help="adapter names, comma-separated; 'auto' (default): every adapter the "
                   "server lists (or every folder under --adapters-dir); 'none': base only")
    g.add_argument("--adapter-prefix", help="with auto: only adapters starting with this")
    g.add_argument("--num-adapters", type=_ints,
                   help="use only the first N adapters (natural name order); several "
                   "(1,4,16,64) make a sweep")
    g.add_argument("--popularity", choices=POPULARITIES, default="uniform",
                   help="how requests pick adapters: uniform, zipf (--zipf-s), or distinct "
                   "(round-robin, one adapter per request)")
    g.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent: p_k ~ 1/k^s")
    g.add_argument("--base-fraction", type=float, default=0.0,
                   help="share of requests sent to the base model instead of an adapter")
    g.add_argument("--prompt-len", type=_length, default=LengthSpec(128, 128),
                   help="prompt tokens: N or LO-HI (uniform)")
    g.add_argument("--output-len", type=_length, default=LengthSpec(64, 64),
                   help="max_tokens per request: N or LO-HI (uniform)")
    g.add_argument("--prompts-file", type=Path,
                   help="draw prompts from a .jsonl (prompt/text/messages[, max_tokens]) or "
                   "text file (one per line) instead of synthetic ones")
    g.add_argument("--tokenizer", help="tokenizer folder for exact prompt lengths (default: "
                   "--model-dir if given, else about one token per word)")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="/v1/completions or /v1/chat/completions")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let the model stop at EOS (output lengths are then not controlled)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    g.add_argument("--seed", type=int, default=0, help="seed of the request plan")


def _add_shape(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load shape (one of --rate / --concurrency)")
    loop = g.add_mutually_exclusive_group(required=True)
    loop.add_argument("--rate", "--rates", dest="rates", type=_rates,
                      help="open loop: Poisson arrivals at R requests/s ('inf': all at once);"
                      " several (1,2,4) make a sweep")
    loop.add_argument("--concurrency", dest="concurrencies", type=_ints,
                      help="closed loop: C clients; several (1,4,16) make a sweep")
    g.add_argument("--num-requests", type=int, help="requests per run")
    g.add_argument("--duration", type=_positive_float,
                   help="seconds after which no new request starts")
    g.add_argument("--timeout", type=_positive_float, default=3600.0,
                   help="hard bound on a run (drain included): the rest is cancelled")
    g.add_argument("--request-timeout", type=_positive_float, default=600.0,
                   help="seconds one request may take")
    g.add_argument("--warmup", type=int, default=0, help="unrecorded requests before each run")


def _add_report(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report")
    g.add_argument("--out", type=Path, default=Path("loadtest-results"),
                   help="folder for results.json and the PNG plots")
    g.add_argument("--label", help="name of this run in plots and JSON")
    g.add_argument("--slo-ttft", type=_positive_float, help="TTFT target in seconds")
    g.add_argument("--slo-tpot", type=_positive_float, help="TPOT target in seconds")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="draw no progress bars")
    g.add_argument("--fail-on-errors", action="store_true",
                   help="exit with status 1 when any request failed")


def _add_adapter_recipe(g: Any) -> None:
    g.add_argument("--rank", type=_ints, default=[8],
                   help="LoRA rank; several (8,16,32) cycle over the adapters")
    g.add_argument("--alpha", type=float, help="lora_alpha (default: 2 x rank)")
    g.add_argument("--targets", default="q_proj,v_proj",
                   help="target modules, comma-separated; 'all': every Llama projection")
    g.add_argument("--b-std", type=_positive_float, default=0.02,
                   help="std of the random lora_B (non-zero so adapters do something)")
    g.add_argument("--adapter-dtype", choices=("float32", "bfloat16", "float16"),
                   default="float32", help="dtype of the written tensors")
    g.add_argument("--adapter-seed", type=int, default=0, help="seed of the random weights")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m loramux.loadtest",
        description="Load tests and benchmarks for OpenAI-compatible LoRA servers.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="load a server over HTTP and report",
                              formatter_class=_HelpFormatter)
    run.add_argument("--url", default=os.environ.get("LORAMUX_URL", DEFAULT_URL),
                     help="the server's base URL [env LORAMUX_URL]")
    run.add_argument("--api-key", default=os.environ.get("LORAMUX_API_KEY")
                     or os.environ.get("OPENAI_API_KEY"),
                     help="Bearer key [env LORAMUX_API_KEY or OPENAI_API_KEY]")
    run.add_argument("--extra-body", type=json.loads, default={},
                     help="JSON object merged into every request body")
    run.add_argument("--no-scrape-metrics", dest="scrape_metrics", action="store_false",
                     help="do not diff the server's /metrics counters around each run")
    _add_workload(run)
    _add_shape(run)
    _add_report(run)
    g = run.add_argument_group("adapters made for this run (--make-adapters)")
    g.add_argument("--make-adapters", type=int, metavar="N",
                   help="make N random adapters for --model-dir and load them first")
    g.add_argument("--model-dir", help="the base model's folder (default: loramux's embedded "
                   "default model); also the tokenizer for exact prompt lengths")
    g.add_argument("--adapters-dir", type=Path,
                   help="where adapters are made / found (default: OUT/adapters)")
    g.add_argument("--admin-token", default=os.environ.get("LORAMUX_ADMIN_TOKEN"),
                   help="[env LORAMUX_ADMIN_TOKEN]")
    g.add_argument("--load-via", choices=("upload", "path"), default="upload",
                   help="upload the files, or send a path under the server's --adapter-root")
    g.add_argument("--adapter-name-prefix", default="lt-", help="names are PREFIX000, ...")
    _add_adapter_recipe(g)
    b = run.add_argument_group("baseline (--baseline peft)")
    b.add_argument("--baseline", choices=("peft",),
                   help="also run the same workload in process on peft.PeftModel")
    b.add_argument("--batch-size", type=int, help="PEFT batch size in open loop (default 8)")
    b.add_argument("--device", default="auto", help="PEFT device: auto, cpu, cuda")

    peft = commands.add_parser("peft", help="the workload in process on peft.PeftModel",
                               formatter_class=_HelpFormatter)
    peft.add_argument("--model-dir", help="base model folder (default: the embedded model)")
    peft.add_argument("--adapters-dir", type=Path, help="folder of adapter folders")
    peft.add_argument("--batch-size", type=int, help="batch size in open loop (default 8)")
    peft.add_argument("--device", default="auto", help="auto, cpu, cuda")
    peft.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16",
                                                          "float16"), help="the model's dtype")
    _add_workload(peft)
    _add_shape(peft)
    _add_report(peft)

    make = commands.add_parser("make-adapters", help="write N random PEFT adapters",
                               formatter_class=_HelpFormatter)
    make.add_argument("--model-dir", help="base model folder (default: the embedded model)")
    make.add_argument("--num", type=int, required=True, help="how many adapters")
    make.add_argument("--out", type=Path, required=True, help="folder to write them under")
    make.add_argument("--prefix", default="lt-", help="names are PREFIX000, PREFIX001, ...")
    _add_adapter_recipe(make)
    make.add_argument("--url", help="also load them into this server")
    make.add_argument("--admin-token", default=os.environ.get("LORAMUX_ADMIN_TOKEN"),
                      help="[env LORAMUX_ADMIN_TOKEN]")
    make.add_argument("--via", choices=("upload", "path"), default="upload",
                      help="upload the files, or send a path under the server's --adapter-root")
    make.add_argument("--no-progress", dest="progress", action="store_false",
                      help="draw no progress bar")

    load = commands.add_parser("load-adapters", help="load a folder of adapters into a server",
                               formatter_class=_HelpFormatter)
    load.add_argument("--url", default=os.environ.get("LORAMUX_URL", DEFAULT_URL),
                      help="the server's base URL [env LORAMUX_URL]")
    load.add_argument("--admin-token", default=os.environ.get("LORAMUX_ADMIN_TOKEN"),
                      help="[env LORAMUX_ADMIN_TOKEN]")
    load.add_argument("--dir", type=Path, required=True, help="folder of adapter folders")
    load.add_argument("--prefix", help="only folders starting with this")
    load.add_argument("--via", choices=("upload", "path"), default="upload",
                      help="upload the files, or send a path under the server's --adapter-root")
    load.add_argument("--concurrency", type=int, default=4, help="loads in flight at once")
    load.add_argument("--no-progress", dest="progress", action="store_false",
                      help="draw no progress bar")

    compare = commands.add_parser("compare", help="plot results.json files side by side",
                                  formatter_class=_HelpFormatter)
    compare.add_argument("results", nargs="+", type=Path)
    compare.add_argument("--labels", help="one label per file (default: each run's label)")
    compare.add_argument("--x", help="one number per file: plot against it (e.g. 1,4,16,64)")
    compare.add_argument("--x-label")
    compare.add_argument("--title")
    compare.add_argument("--out", type=Path, default=Path("compare.png"),
                         help="PNG path; the summaries go to the same name with .json")
    return parser


# ============================================================================ helpers


def _default_model_dir() -> str:
    from loramux.engine.default_model import ensure_default_model

    return str(ensure_default_model())


def _recipe(args: argparse.Namespace) -> Any:
    from loramux.loadtest.adapters import AdapterRecipe, parse_targets

    return AdapterRecipe(ranks=tuple(args.rank), target_modules=parse_targets(args.targets),
                         alpha=args.alpha, b_std=args.b_std, dtype=args.adapter_dtype)


def _tokenizer(args: argparse.Namespace) -> Any:
    source = args.tokenizer or getattr(args, "model_dir", None)
    if not source or args.prompts_file:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _names(args: argparse.Namespace, available: Sequence[str]) -> tuple[str, ...]:
    """Adapter names from --adapters: none, auto (`available`), or an explicit list."""
    if args.adapters == "none":
        return ()
    if args.adapters == "auto":
        return tuple(available)
    return tuple(parse_list(args.adapters))


def _workload(args: argparse.Namespace, base: str, adapters: Sequence[str]) -> Workload:
    prompts = tuple(read_prompts(args.prompts_file)) if args.prompts_file else ()
    return Workload(base=base, adapters=tuple(adapters), popularity=args.popularity,
                    zipf_s=args.zipf_s, base_fraction=args.base_fraction,
                    prompt_len=args.prompt_len, output_len=args.output_len, prompts=prompts,
                    seed=args.seed)


@dataclass(frozen=True)
class Point:
    """One run of a command: a shape and a workload; several make a sweep over `x`."""

    label: str
    x: float
    shape: LoadShape
    workload: Workload


SWEEP_AXES = {"rate": "offered rate (req/s)", "concurrency": "concurrency (clients)",
              "adapters": "adapters in use"}


def _points(args: argparse.Namespace, base: str, names: Sequence[str]
            ) -> tuple[str | None, list[Point]]:
    """(swept dimension or None, points): at most one of --rate, --concurrency and
    --num-adapters may list several values."""
    if args.num_requests is None and args.duration is None:
        raise SystemExit("bound the run with --num-requests and/or --duration")
    common: dict[str, Any] = {
        "num_requests": args.num_requests, "duration": args.duration, "timeout": args.timeout,
        "request_timeout": args.request_timeout, "warmup": args.warmup, "seed": args.seed}
    counts = args.num_adapters or [len(names)]
    if max(counts) > len(names):
        raise SystemExit(f"--num-adapters {max(counts)}: only {len(names)} adapters available")
    loads = args.rates or args.concurrencies
    if len(loads) > 1 and len(counts) > 1:
        raise SystemExit("sweep one thing at a time: several loads or several --num-adapters")
    points = []
    for load in loads:
        shape = LoadShape(rate=load, **common) if args.rates else \
            LoadShape(concurrency=int(load), **common)
        for count in counts:
            workload = _workload(args, base, names[:count])
            if len(counts) > 1:
                label, x = f"adapters-{count}", float(count)
            elif args.rates:
                label, x = f"rate-{_fmt(load)}", float(load)
            else:
                label, x = f"concurrency-{load}", float(load)
            points.append(Point(label, x, shape, workload))
    if len(points) == 1:
        return None, points
    return ("adapters" if len(counts) > 1 else "rate" if args.rates else "concurrency"), points


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def _warmup_plan(workload: Workload, tokenizer: Any) -> Any:
    """Warm-up requests from another seed, so the measured plan is the same with or without."""
    return request_stream(replace(workload, seed=workload.seed + 7919), tokenizer)


def _finish(result: RunResult, point: Point, out: Path, args: argparse.Namespace,
            label: str) -> dict[str, Any]:
    from loramux.loadtest.report import format_summary, write_run

    result.config["workload"] = point.workload.describe()
    result.config["point"] = {"label": point.label, "x": _json_x(point.x)}
    summary = write_run(result, out, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot,
                        plots=args.plots, label=label)
    print(format_summary(summary, f"{label}  ->  {out}"), flush=True)
    return summary


def _write_sweep(dimension: str, points: Sequence[Point], summaries: Sequence[dict[str, Any]],
                 out: Path, args: argparse.Namespace, engine: str) -> None:
    """sweep.json, sweep.png (throughput vs latency) and scaling.png (metrics vs the swept
    value) for the points of one engine."""
    from loramux.loadtest.report import (
        SWEEP_SCHEMA,
        LoadedResult,
        plot_compare,
        plot_sweep,
        write_json,
    )

    write_json(out / "sweep.json", {"schema": SWEEP_SCHEMA, "engine": engine,
                                    "dimension": dimension, "points": [
        {"label": p.label, "x": _json_x(p.x), "summary": s} for p, s in zip(points, summaries)]})
    if not args.plots:
        return
    labelled = [(p.label, s) for p, s in zip(points, summaries)]
    plot_sweep(labelled, out / "sweep.png", title=f"{engine}: throughput vs latency")
    if all(math.isfinite(p.x) for p in points):
        plot_compare([LoadedResult(out, engine, s, []) for s in summaries], out / "scaling.png",
                     x=[p.x for p in points], x_label=SWEEP_AXES[dimension],
                     title=f"{engine}: by {SWEEP_AXES[dimension]}")


def _json_x(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def _exit_code(args: argparse.Namespace, summaries: Sequence[dict[str, Any]]) -> int:
    if args.fail_on_errors and any(s["errors"] for s in summaries):
        return 1
    return 0


# ============================================================================ commands


def cmd_run(args: argparse.Namespace) -> int:
    made: dict[str, Path] = {}
    adapters_dir = args.adapters_dir or args.out / "adapters"
    if args.make_adapters or args.baseline:
        args.model_dir = args.model_dir or _default_model_dir()
    if args.make_adapters:
        made = _make_and_load(args, adapters_dir)
    listed: list[str] = []
    server_base = args.model
    if args.model is None or args.adapters == "auto":
        server_base, listed = discover_models(args.url, args.api_key, args.adapter_prefix)
    base = args.model or server_base
    names = _names(args, list(made) or listed)
    if not names and args.adapters == "auto":
        print("note: no adapters listed by the server: every request goes to the base model",
              file=sys.stderr)
    tokenizer = _tokenizer(args)
    client = ClientConfig(url=args.url, endpoint=args.endpoint, api_key=args.api_key,
                          ignore_eos=args.ignore_eos, temperature=args.temperature,
                          extra_body=args.extra_body)
    dimension, points = _points(args, base, names)
    summaries: list[dict[str, Any]] = []
    for point in points:
        before = scrape_counters(args.url) if args.scrape_metrics else {}
        result = asyncio.run(run_load(
            client, point.shape, request_stream(point.workload, tokenizer),
            progress=args.progress, desc=point.label,
            warmup_requests=_warmup_plan(point.workload, tokenizer)))
        if args.scrape_metrics:
            result.server_metrics = counter_deltas(before, scrape_counters(args.url))
        result.config["url"] = args.url
        out = args.out / point.label if dimension else args.out
        label = point.label if dimension else (args.label or "loramux")
        summaries.append(_finish(result, point, out, args, label))
    if dimension:
        _write_sweep(dimension, points, summaries, args.out, args, args.label or "loramux")
    if args.baseline == "peft":
        _baseline(args, tokenizer, dimension, points, summaries, adapters_dir)
    return _exit_code(args, summaries)


def _make_and_load(args: argparse.Namespace, adapters_dir: Path) -> dict[str, Path]:
    from loramux.loadtest.adapters import load_adapters, make_adapters

    made = make_adapters(args.model_dir, adapters_dir, args.make_adapters,
                         recipe=_recipe(args), prefix=args.adapter_name_prefix,
                         seed=args.adapter_seed, progress=args.progress)
    outcomes = load_adapters(args.url, made, admin_token=args.admin_token, via=args.load_via,
                             progress=args.progress)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(outcomes)} adapters were refused; first: "
                         f"{failed[0].name}: {failed[0].status} {failed[0].message}")
    return made


def _run_peft_points(args: argparse.Namespace, runner: Any, tokenizer: Any,
                     dimension: str | None, points: Sequence[Point], out: Path,
                     label: str) -> list[dict[str, Any]]:
    from loramux.loadtest.peft_baseline import run_peft

    summaries = []
    for point in points:
        result = run_peft(runner, point.shape, request_stream(point.workload, tokenizer),
                          batch_size=args.batch_size, progress=args.progress,
                          warmup_requests=_warmup_plan(point.workload, tokenizer))
        summaries.append(_finish(result, point, out / point.label if dimension else out, args,
                                 point.label if dimension else label))
    if dimension:
        _write_sweep(dimension, points, summaries, out, args, label)
    return summaries


def _peft_runner(args: argparse.Namespace, base: str, names: Sequence[str],
                 adapters_dir: Path | None) -> Any:
    from loramux.loadtest.adapters import find_adapters
    from loramux.loadtest.peft_baseline import PeftRunner

    found = find_adapters(adapters_dir) if adapters_dir and adapters_dir.is_dir() else {}
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"PEFT needs every adapter's files under {adapters_dir} "
                         f"(--adapters-dir); missing {missing[:5]}")
    return PeftRunner(args.model_dir, {n: found[n] for n in names}, base,
                      endpoint=args.endpoint, ignore_eos=args.ignore_eos,
                      temperature=args.temperature, device=args.device,
                      dtype=getattr(args, "dtype", "auto"), progress=args.progress)


def _baseline(args: argparse.Namespace, tokenizer: Any, dimension: str | None,
              points: Sequence[Point], served: Sequence[dict[str, Any]],
              adapters_dir: Path) -> None:
    """The same plans and shapes on PEFT (under OUT/peft), then compare.json/compare.png."""
    from loramux.loadtest.report import LoadedResult, load_result, plot_compare, write_json

    widest = max(points, key=lambda p: len(p.workload.adapters)).workload
    runner = _peft_runner(args, widest.base, widest.adapters, adapters_dir)
    peft = _run_peft_points(args, runner, tokenizer, dimension, points, args.out / "peft",
                            "peft")
    write_json(args.out / "compare.json", {
        "dimension": dimension,
        "points": [{"label": p.label, "x": _json_x(p.x), "loramux": a, "peft": b}
                   for p, a, b in zip(points, served, peft)]})
    if not args.plots:
        return
    if dimension is None:
        results = [load_result(args.out / "results.json", "loramux"),
                   load_result(args.out / "peft" / "results.json", "peft")]
        plot_compare(results, args.out / "compare.png", title="loramux vs PEFT")
    elif all(math.isfinite(p.x) for p in points):
        pairs = [LoadedResult(args.out, engine, s, [])
                 for engine, summaries in (("loramux", served), ("peft", peft))
                 for s in summaries]
        plot_compare(pairs, args.out / "compare.png", x=[p.x for p in points] * 2,
                     x_label=SWEEP_AXES[dimension], title="loramux vs PEFT")
    else:
        pairs = [LoadedResult(args.out, f"{engine} {p.label}", s, [])
                 for engine, summaries in (("loramux", served), ("peft", peft))
                 for p, s in zip(points, summaries)]
        plot_compare(pairs, args.out / "compare.png", title="loramux vs PEFT")


def cmd_peft(args: argparse.Namespace) -> int:
    from loramux.loadtest.adapters import find_adapters

    args.model_dir = args.model_dir or _default_model_dir()
    found = find_adapters(args.adapters_dir, args.adapter_prefix) if args.adapters_dir else {}
    names = _names(args, list(found))
    base = args.model or Path(args.model_dir.rstrip("/")).name
    dimension, points = _points(args, base, names)
    runner = _peft_runner(args, base, names, args.adapters_dir)
    summaries = _run_peft_points(args, runner, _tokenizer(args), dimension, points, args.out,
                                 args.label or "peft")
    return _exit_code(args, summaries)


def cmd_make_adapters(args: argparse.Namespace) -> int:
    from loramux.loadtest.adapters import load_adapters, make_adapters

    model_dir = args.model_dir or _default_model_dir()
    made = make_adapters(model_dir, args.out, args.num, recipe=_recipe(args),
                         prefix=args.prefix, seed=args.adapter_seed, progress=args.progress)
    print(f"made {len(made)} adapters under {args.out}")
    if args.url:
        outcomes = load_adapters(args.url, made, admin_token=args.admin_token, via=args.via,
                                 progress=args.progress)
        return _print_outcomes(outcomes)
    return 0


def cmd_load_adapters(args: argparse.Namespace) -> int:
    from loramux.loadtest.adapters import find_adapters, load_adapters

    found = find_adapters(args.dir, args.prefix)
    if not found:
        print(f"no adapter folders under {args.dir}", file=sys.stderr)
        return 1
    outcomes = load_adapters(args.url, found, admin_token=args.admin_token, via=args.via,
                             concurrency=args.concurrency, progress=args.progress)
    return _print_outcomes(outcomes)


def _print_outcomes(outcomes: Sequence[Any]) -> int:
    failed = [o for o in outcomes if not o.ok]
    seconds = sorted(o.seconds for o in outcomes)
    print(f"loaded {len(outcomes) - len(failed)} of {len(outcomes)} adapters; median "
          f"{seconds[len(seconds) // 2] * 1e3:.0f} ms per load")
    for o in failed:
        print(f"  {o.name}: {o.status} {o.message}", file=sys.stderr)
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from loramux.loadtest.report import load_result, plot_compare, write_json

    labels = parse_list(args.labels) if args.labels else [None] * len(args.results)
    if len(labels) != len(args.results):
        raise SystemExit("give one label per results file")
    results = [load_result(path, label) for path, label in zip(args.results, labels)]
    x = [float(v) for v in parse_list(args.x)] if args.x else None
    plot_compare(results, args.out, x=x, x_label=args.x_label, title=args.title)
    write_json(args.out.with_suffix(".json"), {"results": [
        {"label": r.label, "path": str(r.path), "x": x[i] if x else None, "summary": r.summary}
        for i, r in enumerate(results)]})
    print(f"wrote {args.out}")
    return 0


COMMANDS = {"run": cmd_run, "peft": cmd_peft, "make-adapters": cmd_make_adapters,
            "load-adapters": cmd_load_adapters, "compare": cmd_compare}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of `python -m loramux.loadtest` and `loramux loadtest`."""
    args = build_parser(prog).parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
