"""Page-in time of one adapter: disk -> host and host -> device.

The adapter is a random rank-16 LoRA on all seven projections of SmolLM2-135M (30 layers,
hidden 576, kv 192, intermediate 1536), written in PEFT's format (fp32 safetensors, PEFT keys)
to a temporary folder. Measured, median over --iters runs:

  disk -> host (cold)   read_adapter + pack with the file evicted from the page cache first
                        (posix_fadvise DONTNEED): sha256, parse, validate, pack into one
                        contiguous (pinned on CUDA) buffer in the serving dtype
  disk -> host (warm)   the same with the file in the page cache
  host -> device copy   DevicePool.write: ONE copy of the buffer plus the slot's table column
  host -> device wait   AdapterRegistry: acquire() returns None, the background thread evicts
                        the other adapter and pages this one in; wall time until acquire() gives
                        a slot (includes waking the thread)

Run:  .venv/bin/python -m loramux.loadtest.benchmark_pagein [--device cuda] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from loramux.adapters.config import RegistryConfig
from loramux.adapters.host_cache import HostAdapter, pack
from loramux.adapters.peft import ValidationLimits, read_adapter
from loramux.adapters.pool import DevicePool
from loramux.adapters.registry import AdapterRegistry
from loramux.adapters.types import MODULE_PARENTS, MODULES, BaseSpec

SMOLLM2_135M = SimpleNamespace(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                               intermediate_size=1536, num_hidden_layers=30, head_dim=64)


def write_adapter(path: Path, base: BaseSpec, rank: int, seed: int) -> Path:
    """A random PEFT LoRA adapter on every projection, as `save_pretrained` lays it out."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base.num_layers):
        for module in MODULES:
            n_in, n_out = base.shapes[module]
            key = f"base_model.model.model.layers.{layer}.{MODULE_PARENTS[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / n_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False,
              "target_modules": list(MODULES), "bias": "none", "use_dora": False,
              "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def _evict_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = BaseSpec.from_hf_config(SMOLLM2_135M)
    limits = ValidationLimits(max_lora_rank=max(64, args.rank))
    pin = device.type == "cuda"

    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_adapter(Path(tmp) / f"a{i}", base, args.rank, seed=i) for i in range(2)]
        weights = paths[0] / "adapter_model.safetensors"
        file_mib = weights.stat().st_size / 2**20

        def disk_to_host(cold: bool) -> tuple[float, HostAdapter]:
            if cold:
                _evict_page_cache(weights)
            start = time.perf_counter()
            host = pack(read_adapter(paths[0], base, limits, dtype=dtype), base, dtype, pin=pin)
            return time.perf_counter() - start, host

        disk_to_host(cold=False)  # first touch: imports, allocator warm-up
        cold = [disk_to_host(cold=True)[0] for _ in range(args.iters)]
        warm = [disk_to_host(cold=False)[0] for _ in range(args.iters)]
        _, host = disk_to_host(cold=False)

        numel = host.layout.numel
        pool = DevicePool(base, num_slots=1, capacity_elements=numel, max_rank=args.rank,
                          device=device, dtype=dtype)
        copies = []
        for i in range(args.iters + 1):
            resident = pool.place("a", numel, 0.0)
            start = time.perf_counter()
            pool.write(resident, host)
            if i:  # the first copy pays for CUDA context / stream set-up
                copies.append(time.perf_counter() - start)
            pool.evict("a")

        # Through the registry: one slot, two adapters, alternate -> every acquire pages in.
        config = RegistryConfig(max_gpu_adapters=1, max_cpu_adapters=2,
                                max_lora_rank=max(64, args.rank))
        waits = []
        with AdapterRegistry(config, base, device, dtype) as registry:
            refs = [registry.load(f"a{i}", p, trusted=True).ref for i, p in enumerate(paths)]
            for i in range(args.iters + 1):
                ref = refs[i % 2]
                start = time.perf_counter()
                assert registry.acquire(ref) is None
                registry.acquire_wait(ref, timeout=60)
                if i:
                    waits.append(time.perf_counter() - start)
                registry.release(ref)
            registry_copies = list(registry.stats.page_in_seconds)[1:]

    mib = host.nbytes / 2**20
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), dtype {args.dtype}, torch {torch.__version__}, "
          f"{args.iters} iterations, medians")
    print(f"adapter: rank {args.rank}, {len(MODULES)} modules x {base.num_layers} layers, "
          f"file {file_mib:.2f} MiB (fp32), packed {mib:.2f} MiB ({args.dtype})")
    print(f"disk -> host, cold page cache : {_median_ms(cold):8.2f} ms")
    print(f"disk -> host, warm page cache : {_median_ms(warm):8.2f} ms")
    copy_ms = _median_ms(copies)
    rate = mib / 1024 / (copy_ms / 1e3)
    print(f"host -> device, one copy      : {copy_ms:8.3f} ms  ({rate:.1f} GiB/s)")
    print(f"host -> device, registry copy : {_median_ms(registry_copies):8.3f} ms")
    print(f"host -> device, acquire wait  : {_median_ms(waits):8.3f} ms  (evict + page-in + wake)")


if __name__ == "__main__":
    main()
