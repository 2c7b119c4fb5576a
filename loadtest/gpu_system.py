"""gpu_check sections about the machine: versions and device, copy bandwidth, page-in time."""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from loramux.loadtest.gpu_check import Context, check, judged

REPO = Path(__file__).resolve().parents[1]
# Packages the check itself needs, then the project's other hard dependencies (pyproject.toml)
# and test tools, whose absence is recorded but does not stop the check.
NEEDED = ("torch", "transformers", "peft", "triton", "safetensors", "regex", "numpy")
OTHERS = ("bitsandbytes", "prometheus_client", "fastapi", "uvicorn", "pydantic", "httpx", "yaml",
          "gguf", "tqdm", "matplotlib", "multipart", "hypothesis", "pytest")
PAGEIN_TARGET_MS = 10.0


def _version(name: str) -> str | None:
    """The installed version of a module, found without importing it (bitsandbytes' import
    probes hardware and the hub); None if absent."""
    if importlib.util.find_spec(name) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    dist = {"yaml": "pyyaml", "multipart": "python-multipart",
            "prometheus_client": "prometheus-client"}.get(name, name)
    try:
        return version(dist)
    except PackageNotFoundError:
        return "present (no metadata)"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _apis() -> dict[str, bool]:
    """Which APIs of the engine and kernel work this run uses are there (issue 16)."""
    from dataclasses import fields

    from loramux.engine.config import EngineConfig
    from loramux.engine.engine import LLMEngine

    found = {"EngineConfig.enforce_eager": any(f.name == "enforce_eager"
                                               for f in fields(EngineConfig)),
             "LLMEngine.warm_up": hasattr(LLMEngine, "warm_up")}
    for module in ("loramux.kernels.sgmv_config", "loramux.engine.graphs"):
        found[module] = importlib.util.find_spec(module) is not None
    return found


def versions(ctx: Context) -> dict[str, Any]:
    """Python, packages, device, environment; which optional parts are missing."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "executable": sys.executable, "cwd": os.getcwd(), "git_commit": _git_commit(),
        "loramux_from": str(Path(importlib.import_module("loramux").__file__ or "").parent),
        "packages": {name: _version(name) for name in NEEDED + OTHERS},
        "env": {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR",
                                               "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
                                               "HF_HUB_OFFLINE", "OMP_NUM_THREADS")},
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "apis": _apis(),
    }
    if not ctx.cpu:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "sms": props.multi_processor_count,
                          "memory_gib": round(total / 2**30, 1),
                          "free_gib": round(free / 2**30, 1),
                          "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1)}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,"
                                  "clocks.mem,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"not run: {exc}"
    missing = [n for n in NEEDED if info["packages"][n] is None]
    return {**info, "missing_needed": missing,
            "checks": {"needed_packages": check(missing or "all present",
                                                "torch, transformers, peft, triton, regex, "
                                                "safetensors, numpy",
                                                not missing, "correctness")}}


def _copy_gb_per_s(nbytes: int, device: torch.device, reps: int) -> float:
    """Bytes read + written per second by one large copy (median of reps)."""
    src = torch.randn(nbytes // 4, device=device)  # random, not zeros (METHOD.md)
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            samples.append(time.perf_counter() - t0)
    assert torch.equal(dst, src)
    return 2 * src.numel() * 4 / statistics.median(samples) / 1e9


def copy_bandwidth(ctx: Context) -> dict[str, Any]:
    """The device's copy rate (bytes read plus written), the ceiling the LoRA kernels are
    compared with: a 1 GiB device-to-device copy on a GPU, 64 MiB in host memory on the CPU."""
    nbytes = (64 if ctx.cpu else 1024) * 2**20
    rate = _copy_gb_per_s(nbytes, ctx.device, reps=5 if ctx.cpu else 20)
    ctx.shared["copy_gb_per_s"] = rate
    return {"buffer_mib": nbytes >> 20, "gb_per_s": round(rate, 1),
            "counts": "bytes read + bytes written, median"}


def pagein(ctx: Context) -> dict[str, Any]:
    """Host -> device page-in of one rank-16 all-projection adapter of the 7B base (tiny on
    the CPU), through DevicePool.write and the registry (loadtest/benchmark_pagein.py)."""
    from loramux.adapters.types import BaseSpec
    from loramux.loadtest.benchmark_pagein import measure
    from loramux.loadtest.gpu_models import llama_config

    shape = "tiny" if ctx.cpu else "7b"
    base = BaseSpec.from_hf_config(llama_config(shape))
    figures = measure(base, ctx.device, torch.bfloat16, rank=16, iters=5 if ctx.cpu else 8,
                      tmp=ctx.scratch)
    wait = figures["acquire_wait_ms"]
    return {"shape": shape, **figures, "checks": {
        "host_to_device_copy_ms": check(figures["host_to_device_copy_ms"],
                                        f"< {PAGEIN_TARGET_MS} ms",
                                        judged(ctx, figures["host_to_device_copy_ms"]
                                               < PAGEIN_TARGET_MS)),
        "acquire_wait_ms": check(wait, f"< {PAGEIN_TARGET_MS} ms (evict + page-in + wake)",
                                 judged(ctx, wait < PAGEIN_TARGET_MS)),
    }}
