"""loramux's HTTP benchmarks: `loramux serve` subprocesses loaded by the load generator.

    python -m loramux.loadtest.benchmarks --out DIR            # the documented run (~15 min)
    python -m loramux.loadtest.benchmarks --out DIR --quick    # a smoke run (~1-2 min)
    python -m loramux.loadtest.benchmarks --out DIR --residency  # issue 18's run (~15 min)

Four scenarios, every one a closed loop of `loramux loadtest run` (this file only chooses the
flags and collects what the runs wrote):

    vs-peft     N adapters, Zipf(1.0) and uniform popularity, loramux over HTTP and the same
                request plan in process on peft.PeftModel (mixed-adapter static batches)
    overhead    the same workload sent to the base model (no adapters) and to N adapters
    scaling     one adapter per request, round-robin over 1, 4, 16, 64 adapters, with as many
                clients as adapters at most (so a batch holds that many distinct adapters)
    slots       uniform over M adapters with every adapter resident (M device slots), and the
                same plan on a server with fewer device slots (M over S): requests wait for
                page-ins; page-ins and evictions are the server's /metrics counter deltas

Two servers, one after the other on a free loopback port: one with a slot per adapter (the
first three scenarios and the resident half of the fourth) and one with S slots. Adapters
(ranks 8 and 16 alternating, all seven projections, random non-zero B) are made once under
DIR/adapters, which is each server's --adapter-root, and loaded by path through the vLLM
endpoint before any measurement. Each run sends a few unrecorded warm-up requests first.

`--residency` runs two other scenarios, on servers started with loramux's default flags (no
slot count, no pool size given: the pool is sized from memory, adapters/sizing.py):

    defaults    N adapters, one per request (distinct), on the defaults, on the defaults with
                `--max-gpu-adapters N`, the same plan to the base model, and on PEFT
    pool        M adapters, one per request, on the defaults (all resident) and on a server
                whose `--adapter-pool-bytes` holds only S of them (S/2 of each rank)

Written to DIR: benchmarks.json (machine, plan, server commands, every scenario's summaries
and ratios), tables.md (the same figures as Markdown tables), vs-peft.png, overhead.png,
scaling.png, slots.png, server logs, and each run's own results.json and plots in a folder.
Run it from any folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from loramux.loadtest.__main__ import main as loadtest
from loramux.loadtest.adapters import (
    LLAMA_MODULES,
    AdapterRecipe,
    adapter_names,
    find_adapters,
    load_adapters,
    make_adapters,
)
from loramux.loadtest.report import LoadedResult, load_result, plot_compare, write_json

SCHEMA = "loramux.loadtest.benchmarks/v1"
PREFIX = "lt-"


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run; every run is a closed loop of `requests` requests."""

    adapters: int  # vs-peft and overhead
    scaling: tuple[int, ...]  # adapters per batch in the scaling sweep
    slot_adapters: int  # slots: adapters in use ...
    slots: int  # ... over this many device slots
    concurrency: int
    requests: int
    prompt_len: int
    output_len: int
    warmup: int
    ranks: tuple[int, ...] = (8, 16)
    run_plots: bool = True  # each run's own latency.png and throughput.png
    rounds: int = 1  # loramux runs that are compared are repeated, interleaved; best reported

    def __post_init__(self) -> None:
        if self.slots >= self.slot_adapters:
            raise ValueError("the slots scenario needs more adapters than slots")

    @property
    def made(self) -> int:
        """How many adapters the plan needs."""
        return max(self.adapters, self.slot_adapters, *self.scaling)


FULL = Plan(adapters=32, scaling=(1, 4, 16, 64), slot_adapters=64, slots=8, concurrency=32,
            requests=32, prompt_len=64, output_len=64, warmup=1, rounds=2)
QUICK = Plan(adapters=4, scaling=(1, 4), slot_adapters=4, slots=2, concurrency=4,
             requests=8, prompt_len=16, output_len=8, warmup=1, run_plots=False)
# --residency: 32 adapters on the defaults; 64 adapters (64 requests, 32 at a time) over a pool
# that holds 16. `scaling` is unused.
RESIDENCY = Plan(adapters=32, scaling=(1,), slot_adapters=64, slots=16, concurrency=32,
                 requests=32, prompt_len=64, output_len=64, warmup=1, rounds=2)
RESIDENCY_QUICK = Plan(adapters=4, scaling=(1,), slot_adapters=8, slots=2, concurrency=4,
                       requests=4, prompt_len=16, output_len=8, warmup=1, run_plots=False)


# ============================================================================ servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`with ServerProcess(argv, log, cwd) as server:` runs `loramux serve ...` until /ready
    (then `server.url` answers), and stops it (SIGTERM, then SIGKILL) on exit. Its output goes
    to `log`."""

    def __init__(self, serve_args: Sequence[str], log: Path, cwd: Path,
                 ready_timeout: float = 600.0) -> None:
        self.port = free_port()
        self.argv = [sys.executable, "-m", "loramux.server.cli", "serve", *serve_args,
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "--shutdown-grace-seconds", "5"]
        self.log = log
        self.cwd = cwd
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 - py310 has no typing.Self
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(self.argv, stdout=sink, stderr=subprocess.STDOUT,
                                            cwd=self.cwd)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"loramux serve exited with {self.process.returncode}:\n"
                                   + self.log_tail())
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("loramux serve was not ready in time:\n" + self.log_tail())
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads; Linux)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def serve_args(model_dir: str, adapter_root: Path, admin_token: str, slots: int,
               plan: Plan, device: str) -> list[str]:
    """`loramux serve` flags: `slots` device slots, room in host memory for every adapter."""
    return ["--model", model_dir, "--device", device, "--adapter-root", str(adapter_root),
            "--admin-token", admin_token, "--max-gpu-adapters", str(slots),
            "--max-cpu-adapters", str(max(slots, plan.made)),
            "--max-lora-rank", str(max(plan.ranks)),
            "--max-num-seqs", str(max(plan.concurrency, *plan.scaling))]


def default_serve_args(model_dir: str, adapter_root: Path, admin_token: str,
                       device: str) -> list[str]:
    """`loramux serve` as a new user starts it: only what names the model, the adapters'
    folder and the admin token (the load tester loads adapters through the admin API)."""
    return ["--model", model_dir, "--device", device, "--adapter-root", str(adapter_root),
            "--admin-token", admin_token]


def pool_bytes_for(model_dir: str, ranks: Sequence[int], count: int, dtype_bytes: int) -> int:
    """Bytes of a pool that holds `count` of the plan's adapters, as many of each rank (in
    the serving dtype's `dtype_bytes`): each takes its packed size (adapters/host_cache.py)."""
    from transformers import AutoConfig

    from loramux.adapters.host_cache import full_rank_numel
    from loramux.adapters.types import BaseSpec

    base = BaseSpec.from_hf_config(AutoConfig.from_pretrained(model_dir))
    per_rank, extra = divmod(count, len(ranks))
    return dtype_bytes * sum(full_rank_numel(base, r) * (per_rank + (i < extra))
                             for i, r in enumerate(ranks))


# ============================================================================ adapters


def cached_adapters(model_dir: str, root: Path, plan: Plan) -> dict[str, Path]:
    """The plan's adapters under `root`, made once; remade when the recipe or model changes."""
    recipe = AdapterRecipe(ranks=plan.ranks, target_modules=LLAMA_MODULES)
    stamp = json.loads(json.dumps(  # as read back: tuples become lists
        {"model_dir": str(Path(model_dir).resolve()), "recipe": asdict(recipe), "seed": 0}))
    stamp_file = root / "recipe.json"
    names = adapter_names(plan.made, PREFIX)
    found = find_adapters(root, PREFIX) if root.is_dir() else {}
    cached = stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp
    if not cached or any(n not in found for n in names):
        if root.is_dir():
            shutil.rmtree(root)
        print(f"making {plan.made} adapters under {root}", flush=True)
        found = make_adapters(model_dir, root, plan.made, recipe=recipe, prefix=PREFIX)
        write_json(stamp_file, stamp)
    return {n: found[n] for n in names}


def load_all(url: str, adapters: Mapping[str, Path], admin_token: str) -> None:
    outcomes = load_adapters(url, adapters, admin_token=admin_token, via="path")
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} adapters refused; first: {failed[0]}")


# ============================================================================ runs


@dataclass(frozen=True)
class Bench:
    """What every run of one benchmark shares."""

    out: Path
    plan: Plan
    model_dir: str
    device: str  # PEFT's, the same as the servers'
    progress: bool
    timeout: float = 900.0  # per run, drain included: a stuck run ends as cancelled requests
    load: dict[str, float] = field(default_factory=dict)  # 1-min load average after each run

    def _argv(self, command: str, name: str, args: Sequence[str], sizes: Mapping[str, int]
              ) -> list[str]:
        size = {**asdict(self.plan), **sizes}
        argv = [command, "--model-dir", self.model_dir, "--adapter-prefix", PREFIX,
                "--concurrency", str(size["concurrency"]),
                "--num-requests", str(size["requests"]),
                "--prompt-len", str(size["prompt_len"]), "--output-len", str(size["output_len"]),
                "--warmup", str(size["warmup"]), "--timeout", str(self.timeout),
                "--device", self.device, "--out", str(self.out / name), *args]
        return argv + ([] if self.progress else ["--no-progress"]) + \
            ([] if self.plan.run_plots else ["--no-plots"])

    def _loadtest(self, argv: list[str], name: str) -> None:
        code = loadtest(argv)
        if code != 0:
            raise RuntimeError(f"loadtest {' '.join(argv)} exited with {code}")
        self.load[name] = os.getloadavg()[0]

    def run(self, server: ServerProcess, name: str, *args: str, label: str | None = None,
            **sizes: int) -> LoadedResult:
        """One `loadtest run` against `server` into OUT/name; `sizes` override the plan's
        concurrency, requests, prompt_len, output_len or warmup. The summary gains the
        server process's CPU seconds over the run (warm-up included)."""
        cpu = server.cpu_seconds()
        self._loadtest([*self._argv("run", name, args, sizes), "--url", server.url], name)
        return _with_cpu(_result(self.out / name, label or name), server.cpu_seconds() - cpu)

    def peft(self, name: str, *args: str, label: str | None = None,
             **sizes: int) -> LoadedResult:
        """The same plan in process on PEFT (`loadtest peft`) into OUT/name; the summary gains
        this process's CPU seconds over the measured run."""
        self._loadtest(self._argv("peft", name, [*args, "--adapters-dir",
                                                 str(self.out / "adapters")], sizes), name)
        result = _result(self.out / name, label or name)
        config = json.loads((self.out / name / "results.json").read_text())["config"]
        return _with_cpu(result, config["process_cpu_s"])

    def prime(self, server: ServerProcess, count: int, prefix: str) -> None:
        """One short request to each of the first `count` adapters and to the base, so that
        the measured runs start with those adapters resident and the server warm."""
        print(f"\n## priming: one request to each of {count} adapters", flush=True)
        for name, args in ((f"{prefix}-base", ("--adapters", "none")),
                           (f"{prefix}-adapters", ("--num-adapters", str(count), "--popularity",
                                                   "distinct"))):
            self.run(server, name, *args, concurrency=count, requests=count, prompt_len=8,
                     output_len=2, warmup=0)


    def measure(self, variants: Sequence[Variant],
                after_first_round: Callable[[], None] | None = None) -> list[LoadedResult]:
        """Each variant `plan.rounds` times, interleaved (A B A B ...) so that a machine
        shared with other work slows each alike; the best round of each (see `best_of`).
        `after_first_round` runs once between the first round and the next (PEFT's run)."""
        rounds: list[list[LoadedResult]] = [[] for _ in variants]
        for r in range(self.plan.rounds):
            for runs, (server, name, label, args, sizes) in zip(rounds, variants):
                runs.append(self.run(server, self.folder(name, r), *args, label=label,
                                     **sizes))
            if r == 0 and after_first_round is not None:
                after_first_round()
        return [best_of(runs) for runs in rounds]

    def folder(self, name: str, round_index: int) -> str:
        return name if self.plan.rounds == 1 else f"{name}/round-{round_index + 1}"


# (server, folder name, label, `loadtest run` arguments, sizes that override the plan)
Variant = tuple[ServerProcess, str, str, Sequence[str], Mapping[str, int]]


class _PeftRun:
    """PEFT's run of a plan as `Bench.measure`'s between-rounds step: called once, it runs
    `loadtest peft` (one unrecorded batch first) and keeps the result."""

    def __init__(self, bench: Bench, name: str, args: Sequence[str], label: str) -> None:
        self.bench, self.name, self.args, self.label = bench, name, args, label
        self._result: LoadedResult | None = None

    def __call__(self) -> None:
        self._result = self.bench.peft(self.name, *self.args, label=self.label,
                                       warmup=max(1, self.bench.plan.warmup))

    @property
    def result(self) -> LoadedResult:
        assert self._result is not None, "PEFT runs after the first round"
        return self._result


def best_of(runs: Sequence[LoadedResult]) -> LoadedResult:
    """The round with the highest output tokens/s: on a machine shared with other work the
    fastest round is the one least disturbed. Its summary lists every round's figures."""
    best = max(runs, key=lambda r: r.summary["output_tokens_per_s"])
    best.summary["rounds"] = [
        {"path": str(r.path), "output_tokens_per_s": r.summary["output_tokens_per_s"],
         "output_tokens_per_cpu_s": r.summary["output_tokens_per_cpu_s"]} for r in runs]
    return best


def _result(folder: Path, label: str) -> LoadedResult:
    return load_result(folder / "results.json", label)


def _with_cpu(result: LoadedResult, cpu_s: float) -> LoadedResult:
    tokens = result.summary["output_tokens"]
    result.summary.update(cpu_s=cpu_s, output_tokens_per_cpu_s=tokens / cpu_s if cpu_s else 0.0)
    return result


def ratios(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, float | None]:
    """a over b in output tokens per second (wall clock) and per CPU second."""
    return {key: a[key] / b[key] if b[key] else None
            for key in ("output_tokens_per_s", "output_tokens_per_cpu_s")}


def _counter(summary: Mapping[str, Any], name: str) -> float:
    """Sum of one server counter's deltas over all its label sets."""
    counters = summary.get("server_adapter_counters") or {}
    return sum(v for k, v in counters.items() if k.split("{", 1)[0] == name)


def scenario_vs_peft(bench: Bench, server: ServerProcess) -> dict[str, Any]:
    plan = bench.plan
    found: dict[str, Any] = {}
    results = []
    for popularity in ("zipf", "uniform"):
        print(f"\n## vs-peft: {plan.adapters} adapters, {popularity}: loramux, then PEFT",
              flush=True)
        args = ("--num-adapters", str(plan.adapters), "--popularity", popularity, "--zipf-s",
                "1.0")
        # The server is warm (primed); PEFT gets one unrecorded batch of its own. PEFT runs
        # once, between loramux's first and second rounds.
        name = f"vs-peft-{popularity}"
        run_peft = _PeftRun(bench, f"{name}/peft", args, f"PEFT {popularity}")
        (served,) = bench.measure(
            [(server, name, f"loramux {popularity}", args, {"warmup": 0})], run_peft)
        peft = run_peft.result
        results += [served, peft]
        found[popularity] = {"loramux": served.summary, "peft": peft.summary,
                             "loramux_over_peft": ratios(served.summary, peft.summary)}
    plot_compare(results, bench.out / "vs-peft.png",
                 title=f"loramux (HTTP) vs PEFT (in process), {plan.adapters} adapters")
    return found


def scenario_overhead(bench: Bench, server: ServerProcess) -> dict[str, Any]:
    plan = bench.plan
    print("\n## overhead: the same plan to the base model, then to "
          f"{plan.adapters} adapters (uniform)", flush=True)
    base, lora = bench.measure([
        (server, "overhead-base", "no adapters", ("--adapters", "none"), {}),
        (server, "overhead-lora", f"{plan.adapters} adapters",
         ("--num-adapters", str(plan.adapters), "--popularity", "uniform"), {})])
    plot_compare([base, lora], bench.out / "overhead.png",
                 title=f"LoRA overhead: no adapters vs {plan.adapters} adapters (uniform)")
    return {"base": base.summary, "lora": lora.summary,
            "lora_over_base": ratios(lora.summary, base.summary)}


def scenario_scaling(bench: Bench, server: ServerProcess) -> dict[str, Any]:
    plan = bench.plan
    clients = max(plan.scaling)
    print(f"\n## scaling: {clients} clients, one adapter per request round-robin over "
          f"{', '.join(map(str, plan.scaling))} adapters", flush=True)
    results = bench.measure([
        (server, f"scaling/adapters-{count}", f"{count} adapters",
         ("--num-adapters", str(count), "--popularity", "distinct"),
         {"concurrency": clients, "requests": clients}) for count in plan.scaling])
    points = [{"adapters": count, "summary": result.summary}
              for count, result in zip(plan.scaling, results)]
    plot_compare([LoadedResult(bench.out, "loramux", p["summary"], []) for p in points],
                 bench.out / "scaling.png", x=[p["adapters"] for p in points],
                 x_label="distinct adapters per batch",
                 title=f"{clients} clients, one adapter per request round-robin")
    for point in points:
        point["over_one_adapter"] = ratios(point["summary"], points[0]["summary"])
    return {"concurrency": clients, "points": points}


def scenario_slots(bench: Bench, every: ServerProcess, fewer: ServerProcess) -> dict[str, Any]:
    """The same plan on a server with a slot per adapter and on one with fewer slots, both
    running, rounds alternating between them."""
    plan = bench.plan
    print(f"\n## slots: {plan.slot_adapters} adapters (uniform) over {plan.slot_adapters} "
          f"and over {plan.slots} device slots", flush=True)
    args = ("--num-adapters", str(plan.slot_adapters), "--popularity", "uniform")
    resident, overcommitted = bench.measure([
        (every, "slots-resident", f"{plan.slot_adapters} slots (all resident)", args, {}),
        (fewer, "slots-fewer", f"{plan.slots} slots", args, {})])
    page_ins = _counter(overcommitted.summary, "loramux_adapter_page_ins_total")
    evictions = _counter(overcommitted.summary, "loramux_adapter_evictions_total")
    plot_compare([resident, overcommitted], bench.out / "slots.png",
                 title=f"{plan.slot_adapters} adapters (uniform) over {plan.slot_adapters} vs "
                 f"{plan.slots} device slots: {page_ins:g} page-ins, {evictions:g} evictions")
    return {"resident": resident.summary, "overcommitted": overcommitted.summary,
            "page_ins": page_ins, "evictions": evictions,
            "resident_page_ins": _counter(resident.summary, "loramux_adapter_page_ins_total"),
            "overcommitted_over_resident": ratios(overcommitted.summary, resident.summary)}


def scenario_defaults(bench: Bench, default: ServerProcess, capped: ServerProcess
                      ) -> dict[str, Any]:
    """N adapters, one per request, on the defaults and with --max-gpu-adapters N; the base
    model on the defaults; PEFT in process once, between loramux's rounds."""
    plan = bench.plan
    n = plan.adapters
    print(f"\n## defaults: {n} adapters, one per request: defaults, --max-gpu-adapters {n}, "
          "no adapters, PEFT", flush=True)
    args = ("--num-adapters", str(n), "--popularity", "distinct")
    run_peft = _PeftRun(bench, "defaults-peft", args, f"PEFT, {n} adapters")
    lora, capped_run, base = bench.measure([
        (default, "defaults-lora", f"{n} adapters, defaults", args, {}),
        (capped, "defaults-capped", f"{n} adapters, --max-gpu-adapters {n}", args, {}),
        (default, "defaults-base", "no adapters", ("--adapters", "none"), {})], run_peft)
    peft = run_peft.result
    plot_compare([base, lora, capped_run, peft], bench.out / "residency-defaults.png",
                 title=f"{n} adapters, one per request: loramux defaults vs "
                 f"--max-gpu-adapters {n}, no adapters and PEFT")
    return {"lora": lora.summary, "capped": capped_run.summary, "base": base.summary,
            "peft": peft.summary,
            "lora_over_base": ratios(lora.summary, base.summary),
            "capped_over_base": ratios(capped_run.summary, base.summary),
            "lora_over_peft": ratios(lora.summary, peft.summary),
            "capped_over_peft": ratios(capped_run.summary, peft.summary)}


def scenario_pool(bench: Bench, every: ServerProcess, small: ServerProcess,
                  pool_bytes: int) -> dict[str, Any]:
    """M adapters, one per request (2 x concurrency requests, so every one of the M is used),
    on the defaults (all resident) and over a pool that holds S of them."""
    plan = bench.plan
    m, s = plan.slot_adapters, plan.slots
    print(f"\n## pool: {m} adapters, one per request, all resident vs a pool that holds {s} "
          f"({pool_bytes / 2**20:.1f} MiB)", flush=True)
    args = ("--num-adapters", str(m), "--popularity", "distinct")
    sizes = {"requests": m}
    resident, over = bench.measure([
        (every, "pool-resident", f"{m} adapters, all resident", args, sizes),
        (small, "pool-small", f"{m} adapters, pool holds {s}", args, sizes)])
    page_ins = _counter(over.summary, "loramux_adapter_page_ins_total")
    plot_compare([resident, over], bench.out / "residency-pool.png",
                 title=f"{m} adapters, one per request: all resident vs a pool that holds {s} "
                 f"({page_ins:g} page-ins)")
    ttft = {k: (over.summary["ttft_s"][k] / resident.summary["ttft_s"][k]
                if resident.summary["ttft_s"][k] else None) for k in ("p50", "p99")}
    return {"resident": resident.summary, "small": over.summary, "pool_bytes": pool_bytes,
            "page_ins": page_ins,
            "evictions": _counter(over.summary, "loramux_adapter_evictions_total"),
            "parks": _counter(over.summary, "loramux_adapter_parks_total"),
            "resident_page_ins": _counter(resident.summary, "loramux_adapter_page_ins_total"),
            "small_over_resident": ratios(over.summary, resident.summary),
            "small_over_resident_ttft": ttft}


# ============================================================================ the benchmark


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            # OpenMP settings matter on a shared CPU (docs/benchmarks.md); servers inherit them
            "env": {k: v for k, v in sorted(os.environ.items())
                    if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))}}


def source() -> dict[str, Any]:
    """The loramux commit measured, and whether its code folders had uncommitted changes."""
    import loramux

    root = Path(loramux.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()

    try:
        changed = git("status", "--porcelain", "--", "engine", "adapters", "kernels", "server",
                      "loadtest")
        return {"commit": git("rev-parse", "HEAD") or None,
                "uncommitted_changes": changed.splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted_changes": None}


class _Session:
    """One benchmark invocation: its folder, the plan's adapters (made once), the admin token,
    the servers it started (their commands, redacted) and the document it writes."""

    def __init__(self, out: Path, plan: Plan, model_dir: str, device: str,
                 progress: bool) -> None:
        self.out = out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
        self.plan, self.model_dir, self.device = plan, model_dir, device
        self.bench = Bench(self.out, plan, model_dir, device, progress)
        self.adapters = cached_adapters(model_dir, self.out / "adapters", plan)
        self.token = secrets.token_hex(16)
        self.servers: dict[str, list[str]] = {}

    @contextmanager
    def server(self, name: str, argv: list[str], prime: int, title: str
               ) -> Iterator[ServerProcess]:
        """`loramux serve argv` with every adapter loaded and the first `prime` primed."""
        self.servers[name] = _redact(argv, self.token)
        print(f"\n# {title}: loramux serve {' '.join(self.servers[name])}", flush=True)
        with ServerProcess(argv, self.out / f"server-{name}.log", self.out) as process:
            load_all(process.url, self.adapters, self.token)
            self.bench.prime(process, prime, f"prime-{name}")
            yield process

    def finish(self, scenarios: dict[str, Any], plots: list[str],
               tables_of: Callable[[Mapping[str, Any]], str], **extra: Any) -> dict[str, Any]:
        """Write OUT/benchmarks.json and OUT/tables.md, print the tables, return the doc."""
        doc = {"schema": SCHEMA, **extra, "started_at": _utc(self.started),
               "finished_at": _utc(time.time()), "elapsed_s": time.time() - self.started,
               "command": sys.argv, "machine": machine(), "source": source(),
               "plan": asdict(self.plan), "model_dir": self.model_dir, "servers": self.servers,
               "scenarios": scenarios, "load_average_after_run": self.bench.load,
               "plots": plots}
        write_json(self.out / "benchmarks.json", doc)
        (self.out / "tables.md").write_text(tables_of(doc))
        print("\n" + tables_of(doc), flush=True)
        return doc


def run_benchmarks(out: Path, plan: Plan, model_dir: str, *, device: str = "auto",
                   progress: bool = True) -> dict[str, Any]:
    """Every scenario; writes OUT/benchmarks.json, OUT/tables.md and the plots."""
    run = _Session(out, plan, model_dir, device, progress)
    bench = run.bench
    scenarios: dict[str, Any] = {}

    def server(name: str, slots: int) -> contextlib.AbstractContextManager[ServerProcess]:
        """A server with `slots` device slots, every adapter loaded, `slots` of them primed."""
        argv = serve_args(model_dir, run.out / "adapters", run.token, slots, plan, device)
        return run.server(name, argv, slots, f"server with {slots} device slots")

    with server("resident", plan.made) as process:
        scenarios["vs_peft"] = scenario_vs_peft(bench, process)
        scenarios["overhead"] = scenario_overhead(bench, process)
        scenarios["scaling"] = scenario_scaling(bench, process)
        with server("fewer_slots", plan.slots) as fewer:
            scenarios["slots"] = scenario_slots(bench, process, fewer)
    return run.finish(scenarios, ["vs-peft.png", "overhead.png", "scaling.png", "slots.png"],
                      tables)


def run_residency(out: Path, plan: Plan, model_dir: str, *, device: str = "auto",
                  progress: bool = True, only: str | None = None) -> dict[str, Any]:
    """The `defaults` and `pool` scenarios (or `only` one); writes OUT/benchmarks.json,
    OUT/tables.md and the plots. The servers run side by side so that rounds interleave."""
    import torch

    from loramux.engine.config import EngineConfig
    from loramux.engine.model import resolve_device, resolve_dtype

    run = _Session(out, plan, model_dir, device, progress)
    bench = run.bench
    scenarios: dict[str, Any] = {}
    engine = EngineConfig(device=device)  # the servers' serving dtype is the pool's
    element = torch.empty((), dtype=resolve_dtype(engine, resolve_device(engine))).element_size()
    pool_bytes = pool_bytes_for(model_dir, plan.ranks, plan.slots, element)

    def server(name: str, extra: Sequence[str], prime: int
               ) -> contextlib.AbstractContextManager[ServerProcess]:
        argv = [*default_serve_args(model_dir, run.out / "adapters", run.token, device), *extra]
        return run.server(name, argv, prime, f"server {name}")

    with server("defaults", [], plan.made) as default:
        if only in (None, "defaults"):
            with server("capped", ["--max-gpu-adapters", str(plan.adapters)],
                        plan.adapters) as capped:
                scenarios["defaults"] = scenario_defaults(bench, default, capped)
        if only in (None, "pool"):
            with server("small_pool", ["--adapter-pool-bytes", str(pool_bytes)],
                        plan.slots) as small:
                scenarios["pool"] = scenario_pool(bench, default, small, pool_bytes)
    return run.finish(scenarios, [f"residency-{k}.png" for k in scenarios], residency_tables,
                      suite="residency")


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _redact(argv: Sequence[str], token: str) -> list[str]:
    return ["$ADMIN_TOKEN" if a == token else a for a in argv]


# ============================================================================ tables


def _row(label: str, s: Mapping[str, Any], ratio: Mapping[str, float | None] | None = None
         ) -> str:
    def ms(metric: str, q: str) -> str:
        value = s[f"{metric}_s"][q]
        return "-" if value is None else f"{value * 1e3:.0f}"

    def times(key: str) -> str:
        value = (ratio or {}).get(key)
        return "" if value is None else f"{value:.2f}x"

    rounds = ", ".join(f"{r['output_tokens_per_s']:.1f}" for r in s.get("rounds", ()))
    cells = [label, f"{s['ok']}/{s['sent']}", f"{s['output_tokens_per_s']:.1f}", rounds,
             f"{s['output_tokens_per_cpu_s']:.1f}", ms("ttft", "p50"), ms("ttft", "p99"),
             ms("tpot", "p50"), ms("tpot", "p99"), ms("e2e", "p50"), ms("e2e", "p99"),
             times("output_tokens_per_s"), times("output_tokens_per_cpu_s")]
    return "| " + " | ".join(cells) + " |"


def _head(reference: str) -> str:
    return ("| run | ok/sent | output tok/s | tok/s of each round | output tok per CPU-s "
            "| TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | e2e p50 ms | e2e p99 ms "
            f"| tok/s vs {reference} | tok per CPU-s vs {reference} |\n|" + "---|" * 13)


def tables(doc: Mapping[str, Any]) -> str:
    """The figures of a benchmarks.json as Markdown tables, one per scenario."""
    sc = doc["scenarios"]
    plan = doc["plan"]
    parts = [f"### loramux vs PEFT, {plan['adapters']} adapters\n", _head("PEFT")]
    for popularity, pair in sc["vs_peft"].items():
        parts.append(_row(f"loramux, {popularity}", pair["loramux"], pair["loramux_over_peft"]))
        parts.append(_row(f"PEFT, {popularity}", pair["peft"]))
    over = sc["overhead"]
    parts += [f"\n### LoRA overhead: no adapters vs {plan['adapters']} adapters (uniform)\n",
              _head("no adapters"), _row("no adapters", over["base"]),
              _row(f"{plan['adapters']} adapters", over["lora"], over["lora_over_base"])]
    scaling = sc["scaling"]
    parts += [f"\n### Distinct adapters per batch ({scaling['concurrency']} clients, one "
              "adapter per request round-robin)\n", _head("1 adapter")]
    parts += [_row(f"{p['adapters']} adapter{'s' if p['adapters'] > 1 else ''}",
                   p["summary"], p["over_one_adapter"]) for p in scaling["points"]]
    slots = sc["slots"]
    parts += [f"\n### {plan['slot_adapters']} adapters (uniform) over fewer device slots\n",
              _head("all resident"),
              _row(f"{plan['slot_adapters']} slots, all resident", slots["resident"]),
              _row(f"{plan['slots']} slots", slots["overcommitted"],
                   slots["overcommitted_over_resident"]),
              f"\nWith {plan['slots']} slots: {slots['page_ins']:g} page-ins (host -> device) "
              f"and {slots['evictions']:g} evictions during the measured run "
              f"({slots['resident_page_ins']:g} page-ins with every adapter resident)."]
    return "\n".join(parts) + "\n"


def residency_tables(doc: Mapping[str, Any]) -> str:
    """The figures of a --residency benchmarks.json as Markdown tables."""
    sc, plan = doc["scenarios"], doc["plan"]
    n, m, s = plan["adapters"], plan["slot_adapters"], plan["slots"]
    parts: list[str] = []
    if "defaults" in sc:
        parts += _defaults_table(sc["defaults"], n)
    if "pool" in sc:
        parts += _pool_table(sc["pool"], m, s)
    return "\n".join(parts) + "\n"


def _defaults_table(d: Mapping[str, Any], n: int) -> list[str]:
    return [f"### {n} adapters, one per request, on the defaults\n", _head("no adapters"),
            _row("no adapters", d["base"]),
             _row(f"{n} adapters, defaults", d["lora"], d["lora_over_base"]),
             _row(f"{n} adapters, --max-gpu-adapters {n}", d["capped"], d["capped_over_base"]),
             _row(f"PEFT, {n} adapters", d["peft"]),
             f"\nvs PEFT (output tok/s): defaults "
             f"{d['lora_over_peft']['output_tokens_per_s']:.2f}x, --max-gpu-adapters {n} "
             f"{d['capped_over_peft']['output_tokens_per_s']:.2f}x."]


def _pool_table(p: Mapping[str, Any], m: int, s: int) -> list[str]:
    ttft = p["small_over_resident_ttft"]
    return [f"\n### {m} adapters, one per request, over a pool that holds {s}\n",
            _head("all resident"), _row(f"{m} adapters, all resident", p["resident"]),
            _row(f"pool holds {s}", p["small"], p["small_over_resident"]),
            f"\nPool of {p['pool_bytes'] / 2**20:.1f} MiB: {p['page_ins']:g} page-ins, "
            f"{p['evictions']:g} evictions and {p.get('parks', 0):g} parks in the measured run "
            f"({p['resident_page_ins']:g} page-ins with all resident); TTFT vs all resident: "
            f"p50 {ttft['p50']:.2f}x, p99 {ttft['p99']:.2f}x."]


# ============================================================================ command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loramux.loadtest.benchmarks", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="results folder (adapters are cached in OUT/adapters)")
    parser.add_argument("--quick", action="store_true", help="a small plan (~1-2 min)")
    parser.add_argument("--residency", action="store_true",
                        help="the defaults and pool scenarios instead (servers on default "
                        "flags; docs/benchmarks.md#residency)")
    parser.add_argument("--model-dir", help="base model folder (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="the servers' --device (PEFT uses the same: auto picks cuda if "
                        "there is one)")
    parser.add_argument("--requests", type=int, help="requests per run (overrides the plan)")
    parser.add_argument("--output-len", type=int, help="output tokens per request (overrides)")
    parser.add_argument("--only", choices=("defaults", "pool"),
                        help="with --residency: run one of its two scenarios")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    if args.residency:
        plan = RESIDENCY_QUICK if args.quick else RESIDENCY
    else:
        plan = QUICK if args.quick else FULL
    if args.requests:
        plan = replace(plan, requests=args.requests)
    if args.output_len:
        plan = replace(plan, output_len=args.output_len)
    if args.model_dir is None:
        from loramux.engine.default_model import ensure_default_model

        args.model_dir = str(ensure_default_model())
    if args.residency:
        run_residency(args.out, plan, args.model_dir, device=args.device,
                      progress=args.progress, only=args.only)
    else:
        run_benchmarks(args.out, plan, args.model_dir, device=args.device,
                       progress=args.progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
