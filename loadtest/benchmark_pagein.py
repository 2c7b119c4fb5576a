"""Page-in time of one adapter: disk -> host and host -> device.

The adapter is a random rank-16 LoRA on all seven projections of the base chosen by --shape
(smollm2: SmolLM2-135M, 30 layers, hidden 576, the default; 7b: Llama-2-7B; 8b: Llama-3-8B;
tiny: a CPU-test size), written in PEFT's format (fp32 safetensors, PEFT keys) to a temporary
folder. Only the base's shape matters here: no model is loaded. Measured, median over
--iters runs:

  disk -> host (cold)   read_adapter + pack with the file evicted from the page cache first
                        (posix_fadvise DONTNEED): sha256, parse, validate, pack into one
                        contiguous (pinned on CUDA) buffer in the serving dtype
  disk -> host (warm)   the same with the file in the page cache
  host -> device copy   DevicePool.write: ONE copy of the buffer plus the slot's table column
  host -> device wait   AdapterRegistry: acquire() returns None, the background thread evicts
                        the other adapter and pages this one in; wall time until acquire() gives
                        a slot (includes waking the thread)

Run:  .venv/bin/python -m loramux.loadtest.benchmark_pagein [--shape 7b] [--device cuda]
      [--iters 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from loramux.adapters.config import RegistryConfig
from loramux.adapters.host_cache import HostAdapter, pack
from loramux.adapters.peft import ValidationLimits, read_adapter
from loramux.adapters.pool import DevicePool
from loramux.adapters.registry import AdapterRegistry
from loramux.adapters.types import MODULES, BaseSpec
from loramux.loadtest.gpu_models import SHAPES, llama_config, write_adapter

__all__ = ["measure", "write_adapter"]


def _evict_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(base: BaseSpec, device: torch.device, dtype: torch.dtype, *, rank: int = 16,
            iters: int = 20, tmp: Path | None = None) -> dict[str, Any]:
    """Every figure of the module docstring for a rank-`rank` adapter on `base`, in ms."""
    limits = ValidationLimits(max_lora_rank=max(64, rank))
    pin = device.type == "cuda"
    with tempfile.TemporaryDirectory(dir=tmp) as folder:
        paths = [write_adapter(Path(folder) / f"a{i}", base, rank, seed=i) for i in range(2)]
        weights = paths[0] / "adapter_model.safetensors"
        file_mib = weights.stat().st_size / 2**20

        def disk_to_host(cold: bool) -> tuple[float, HostAdapter]:
            if cold:
                _evict_page_cache(weights)
            start = time.perf_counter()
            host = pack(read_adapter(paths[0], base, limits, dtype=dtype), base, dtype, pin=pin)
            return time.perf_counter() - start, host

        disk_to_host(cold=False)  # first touch: imports, allocator warm-up
        cold = [disk_to_host(cold=True)[0] for _ in range(iters)]
        warm = [disk_to_host(cold=False)[0] for _ in range(iters)]
        _, host = disk_to_host(cold=False)

        numel = host.layout.numel
        pool = DevicePool(base, num_slots=1, capacity_elements=numel, max_rank=rank,
                          device=device, dtype=dtype)
        copies = []
        for i in range(iters + 1):
            resident = pool.place("a", numel, 0.0)
            _sync(device)
            start = time.perf_counter()
            pool.write(resident, host)  # returns once the copy is complete
            if i:  # the first copy pays for CUDA context / stream set-up
                copies.append(time.perf_counter() - start)
            pool.evict("a")

        # Through the registry: one slot, two adapters, alternate -> every acquire pages in.
        config = RegistryConfig(max_gpu_adapters=1, max_cpu_adapters=2,
                                max_lora_rank=max(64, rank))
        waits = []
        with AdapterRegistry(config, base, device, dtype) as registry:
            refs = [registry.load(f"a{i}", p, trusted=True).ref for i, p in enumerate(paths)]
            for i in range(iters + 1):
                ref = refs[i % 2]
                start = time.perf_counter()
                assert registry.acquire(ref) is None
                registry.acquire_wait(ref, timeout=60)
                if i:
                    waits.append(time.perf_counter() - start)
                registry.release(ref)
            registry_copies = list(registry.stats.page_in_seconds)[1:]

    mib = host.nbytes / 2**20
    copy_ms = _median_ms(copies)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "iters": iters, "rank": rank, "modules": len(MODULES), "layers": base.num_layers,
        "pinned_host_buffer": pin, "file_mib": round(file_mib, 2), "packed_mib": round(mib, 2),
        "disk_to_host_cold_ms": round(_median_ms(cold), 3),
        "disk_to_host_warm_ms": round(_median_ms(warm), 3),
        "host_to_device_copy_ms": round(copy_ms, 3),
        "host_to_device_gib_per_s": round(mib / 1024 / (copy_ms / 1e3), 2),
        "host_to_device_registry_copy_ms": round(_median_ms(registry_copies), 3),
        "acquire_wait_ms": round(_median_ms(waits), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2",
                        help="the base whose adapter is paged (smollm2: SmolLM2-135M)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    base = BaseSpec.from_hf_config(llama_config(args.shape))
    r = measure(base, torch.device(args.device), getattr(torch, args.dtype), rank=args.rank,
                iters=args.iters)
    print(f"device {r['device']} ({r['device_name']}), dtype {r['dtype']}, torch {r['torch']}, "
          f"{r['iters']} iterations, medians")
    print(f"adapter: {args.shape}, rank {r['rank']}, {r['modules']} modules x {r['layers']} "
          f"layers, file {r['file_mib']:.2f} MiB (fp32), packed {r['packed_mib']:.2f} MiB "
          f"({r['dtype']})")
    print(f"disk -> host, cold page cache : {r['disk_to_host_cold_ms']:8.2f} ms")
    print(f"disk -> host, warm page cache : {r['disk_to_host_warm_ms']:8.2f} ms")
    print(f"host -> device, one copy      : {r['host_to_device_copy_ms']:8.3f} ms  "
          f"({r['host_to_device_gib_per_s']:.1f} GiB/s)")
    print(f"host -> device, registry copy : {r['host_to_device_registry_copy_ms']:8.3f} ms")
    print(f"host -> device, acquire wait  : {r['acquire_wait_ms']:8.3f} ms  "
          "(evict + page-in + wake)")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, **r}, indent=2))


if __name__ == "__main__":
    main()
