"""One run that says whether loramux's GPU path is ready, and how far from its targets it is.

    python -m loramux.loadtest.gpu_check --out DIR          # a GPU machine: at most 8 min (H100)
    python -m loramux.loadtest.gpu_check --out DIR --cpu    # tiny shapes on the CPU (CI, ~20 s)

Run from the repository root of a checkout: `loramux/` there holds symlinks to the top-level
folders, so nothing needs installing beyond torch, transformers, peft and triton (with the
safetensors, regex and numpy they bring; docs/gpu.md). Nothing here imports the HTTP server
(fastapi, uvicorn, pydantic) or bitsandbytes (tried in its own section only).

Sections run in order (`_sections()`), each under its own time budget: a section checks its
budget between cases and stops early with `"truncated": true`; a watchdog ends the run at
--max-seconds, after writing what it has. DIR/gpu_check.json is rewritten after every
section, so a run killed from outside still leaves every finished section. Each section is
`{"status": ok | failed | error | skipped | timed_out, "seconds", "budget_s", "checks": {...},
...figures}`; a check is `{"value", "target", "kind": correctness | target, "passed"}`, and
a performance target measured on the CPU is recorded with `"passed": null` (not judged).
A section that raises is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1
GPU_MAX_SECONDS = 470.0  # under the 8 minutes an H100 run may take, start-up aside
CPU_MAX_SECONDS = 150.0


class SectionSkipped(Exception):
    """Raised by a section that cannot run here; the message is the reason."""


@dataclass
class Context:
    """What every section sees: the mode, where to write, its own deadline, shared objects."""

    cpu: bool
    out: Path
    scratch: Path  # for adapters and models written during the run
    report: Report
    deadline: float = 0.0  # monotonic time at which the running section should stop
    shared: dict[str, Any] = field(default_factory=dict)  # objects sections reuse (models)

    @property
    def device(self) -> Any:
        import torch

        return torch.device("cpu" if self.cpu else "cuda")

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def out_of_time(self, reserve: float = 0.0) -> bool:
        return self.time_left() < reserve

    def log(self, message: str) -> None:
        print(f"[{self.report.elapsed():6.1f}s] {message}", flush=True)


def check(value: Any, target: str, passed: bool | None, kind: str = "target") -> dict[str, Any]:
    """One check's record; `kind` is correctness (always judged) or target (GPU figures)."""
    return {"value": value, "target": target, "kind": kind, "passed": passed}


def judged(ctx: Context, passed: bool) -> bool | None:
    """A performance target's verdict: None on the CPU, where the figure means nothing."""
    return None if ctx.cpu else passed


class Report:
    """The JSON document, rewritten atomically after every change."""

    def __init__(self, path: Path, mode: str, argv: list[str]) -> None:
        self.path = path
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.doc: dict[str, Any] = {
            "schema": SCHEMA, "mode": mode, "argv": argv,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "finished": None, "complete": False, "seconds": 0.0, "sections": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def set(self, name: str, result: dict[str, Any]) -> None:
        with self.lock:
            self.doc["sections"][name] = result
            self._write()

    def finish(self, complete: bool) -> None:
        with self.lock:
            self.doc["complete"] = complete
            self.doc["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            self.doc["summary"] = summary(self.doc["sections"])
            self._write()

    def _write(self) -> None:
        self.doc["seconds"] = round(self.elapsed(), 2)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str))
        os.replace(tmp, self.path)


def summary(sections: dict[str, Any]) -> dict[str, Any]:
    """Every check by `section.check`, and the sections that did not run cleanly."""
    checks = {f"{name}.{key}": c for name, s in sections.items()
              for key, c in (s.get("checks") or {}).items()}
    return {
        "checks": {k: {"value": c["value"], "target": c["target"], "passed": c["passed"]}
                   for k, c in checks.items()},
        # None: not judged here (a GPU-only case on the CPU)
        "correctness_passed": all(c["passed"] is not False for c in checks.values()
                                  if c["kind"] == "correctness"),
        "targets_missed": sorted(k for k, c in checks.items()
                                 if c["kind"] == "target" and c["passed"] is False),
        "not_clean": {name: s["status"] for name, s in sections.items()
                      if s["status"] not in ("ok", "skipped")},
    }


@dataclass(frozen=True)
class Section:
    """A named step of the run: `run(ctx)` returns its figures and checks."""

    name: str
    run: Callable[[Context], dict[str, Any]]
    budget_s: float  # on a GPU; CPU mode scales it by CPU_BUDGET_SCALE
    gpu_only: str | None = None  # the reason it cannot run on the CPU, or None


CPU_BUDGET_SCALE = 0.5


def _sections() -> list[Section]:
    # Imported here: each module imports torch & co., which --help should not wait for.
    from loramux.loadtest import gpu_engine, gpu_kernels, gpu_quantized, gpu_system

    return [
        Section("versions", gpu_system.versions, 15),
        Section("copy_bandwidth", gpu_system.copy_bandwidth, 15),
        Section("kernels", gpu_kernels.correctness, 75),
        Section("lora_bandwidth", gpu_kernels.bandwidth, 35,
                gpu_only="bandwidth against the device's copy rate is a GPU figure"),
        Section("pagein", gpu_system.pagein, 40),
        Section("decode_step", gpu_engine.decode_step, 90),
        Section("end_to_end", gpu_engine.end_to_end, 100),
        Section("peft", gpu_engine.peft_mixed, 75),
        Section("quantized", gpu_quantized.quantized, 45),
    ]


def run_section(ctx: Context, section: Section, hard_deadline: float) -> None:
    """Run one section within its budget and the run's; record whatever happens."""
    budget = section.budget_s * (CPU_BUDGET_SCALE if ctx.cpu else 1.0)
    left = hard_deadline - time.monotonic()
    result: dict[str, Any] = {"status": "running", "budget_s": budget}
    if ctx.cpu and section.gpu_only:
        result.update(status="skipped", reason=f"GPU only: {section.gpu_only}")
        ctx.report.set(section.name, result)
        ctx.log(f"{section.name}: skipped ({section.gpu_only})")
        return
    if left < 1:
        result.update(status="skipped", reason="the run's time limit left no time for it")
        ctx.report.set(section.name, result)
        return
    ctx.deadline = time.monotonic() + min(budget, max(left - 1, 0.5))
    ctx.report.set(section.name, dict(result))
    ctx.log(f"{section.name}: start (budget {budget:.0f} s)")
    start = time.monotonic()
    try:
        figures = section.run(ctx)
    except SectionSkipped as exc:
        result.update(status="skipped", reason=str(exc))
    except Exception as exc:  # a broken section is recorded; the run goes on
        result.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=-8).splitlines()[-20:])
    else:
        result.update(figures)
        checks = result.get("checks") or {}
        failed = [k for k, c in checks.items() if c["passed"] is False]
        result["status"] = "failed" if failed else "ok"
        if failed:
            result["failed_checks"] = failed
    result["seconds"] = round(time.monotonic() - start, 2)
    ctx.report.set(section.name, result)
    ctx.log(f"{section.name}: {result['status']} in {result['seconds']:.1f} s"
            + (f" ({result.get('reason') or result.get('error')})"
               if result["status"] in ("skipped", "error") else ""))


def _watchdog(report: Report, current: list[str], limit: float) -> None:
    """End the process at the run's time limit, leaving the JSON with what was done."""
    time.sleep(max(0.0, limit - report.elapsed()))
    name = current[0] if current else None
    if name is not None:
        with report.lock:
            section = report.doc["sections"].get(name, {})
        section.update(status="timed_out",
                       reason=f"the run reached its limit of {limit:.0f} s in this section")
        report.set(name, section)
    report.finish(complete=False)
    print(f"gpu_check: time limit {limit:.0f} s reached in {name}; wrote {report.path}",
          flush=True)
    os._exit(124)


def print_table(doc: dict[str, Any]) -> None:
    print(f"\n{'section':16} {'status':10} {'s':>6}  checks")
    for name, s in doc["sections"].items():
        checks = s.get("checks") or {}
        marks = ", ".join(
            f"{k}={'?' if c['passed'] is None else ('ok' if c['passed'] else 'MISS')}"
            for k, c in checks.items())
        print(f"{name:16} {s['status']:10} {s.get('seconds', 0):6.1f}  {marks}")
    summ = doc.get("summary", {})
    print(f"correctness passed: {summ.get('correctness_passed')}; targets missed: "
          f"{', '.join(summ.get('targets_missed', [])) or 'none'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--cpu", action="store_true",
                        help="tiny shapes on the CPU (automatic when CUDA is not available)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help=f"stop the whole run here (default {GPU_MAX_SECONDS:.0f} on a "
                             f"GPU, {CPU_MAX_SECONDS:.0f} on the CPU)")
    parser.add_argument("--only", nargs="+", metavar="SECTION",
                        help="run only these sections (versions always runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cpu = args.cpu
    if not cpu:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu:
        # Before anything imports triton: @triton.jit reads it when a kernel is decorated.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if "OMP_NUM_THREADS" not in os.environ:
            # CPU figures mean nothing here; one thread keeps a shared CI machine's OpenMP
            # teams from spinning against each other (docs/benchmarks.md, Noise).
            import torch

            torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu_check.json", "cpu" if cpu else "gpu",
                    sys.argv if argv is None else ["gpu_check", *argv])
    limit = args.max_seconds or (CPU_MAX_SECONDS if cpu else GPU_MAX_SECONDS)
    current: list[str] = []
    threading.Thread(target=_watchdog, args=(report, current, limit), daemon=True,
                     name="gpu-check-watchdog").start()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        ctx = Context(cpu=cpu, out=args.out, scratch=Path(scratch), report=report)
        ctx.log(f"gpu_check ({report.doc['mode']} mode, {platform.node()}), limit {limit:.0f} s, "
                f"writing {report.path}")
        hard_deadline = report.started + limit - 1  # the watchdog fires at the limit
        for section in _sections():
            if args.only and section.name != "versions" and section.name not in args.only:
                continue
            current[:] = [section.name]
            run_section(ctx, section, hard_deadline)
        current.clear()
        for shared in ctx.shared.values():  # e.g. the engine sections' adapter registry
            close = getattr(shared, "close", None)
            if callable(close):
                close()
        ctx.shared.clear()
    report.finish(complete=True)
    print_table(report.doc)
    print(f"wrote {report.path} ({report.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: the sections import
    # loramux.loadtest.gpu_check, and SectionSkipped must be one class for both.
    from loramux.loadtest.gpu_check import main as _main

    sys.exit(_main())
