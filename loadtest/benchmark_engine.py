"""Engine throughput with many adapters in one batch, against PEFT and against no adapters.

SmolLM2-135M (the embedded default model), CPU, float32. N concurrent requests, each with its
own adapter (ranks alternating over --ranks, every projection, random non-zero weights made by
tests/adapter_factory.py and cached on disk), M new tokens each (EOS held back, so every run
makes exactly N * M tokens). Three measurements on the same prompts:

  loramux-lora   the engine, N requests over N adapters
  loramux-base   the engine, the same requests without adapters
  peft           PeftModel.generate(..., adapter_names=[...]) on the same prompts, padded left

Each round runs the three once, loramux's two in alternating order, so that a machine shared
with other work slows them alike (each runs alone: interleaving their steps would evict each
other's weights from the cache and flatter the ratio). Reported: tokens/s of each (median over rounds; wall clock, and
process CPU time beside it) and the ratios loramux-lora / peft and loramux-lora /
loramux-base. Also how many requests gave the same greedy tokens in loramux and PEFT (PEFT's
left padding changes float rounding, so a near-tie can differ; most should match).

And a bound for loramux-lora / loramux-base on this machine: every step must read every
adapter in the batch once (their float32 copies, `adapter_bytes`), at best at the rate this
machine streams memory (`stream_gb_per_s`, a sum over a buffer of that size, the same
threads). With nothing else costing time, the LoRA run would take the base run's time plus
steps x adapter_bytes / rate: `lora_vs_base_bound` is the base time over that.

    python loadtest/benchmark_engine.py                 # the issue's setting
    python loadtest/benchmark_engine.py --rounds 1 --new-tokens 32 --skip-peft   # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TOPICS = [
    "a lighthouse keeper", "the history of tea", "how rainbows form", "a robot learning to paint",
    "the rules of chess", "a trip to Mars", "why cats purr", "the first bicycle",
    "a city under the sea", "how bees make honey", "a dragon who is afraid of fire",
    "the water cycle", "a detective in Venice", "how computers add numbers", "the moon landing",
    "a garden in winter", "the invention of paper", "a talking tree", "volcanoes",
    "a lost umbrella", "the speed of light", "a baker's first day", "how maps are made",
    "the smallest country", "a friendly ghost", "photosynthesis", "a library at night",
    "the Great Wall", "an owl who cannot sleep", "how bridges stand", "a snowstorm in April",
    "the oldest tree",
]


def _factory() -> Any:
    """tests/adapter_factory.py (makes real PEFT adapters through peft itself)."""
    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    import adapter_factory

    return adapter_factory


def make_adapters(config: Any, count: int, ranks: list[int], root: Path) -> dict[str, Path]:
    """count adapters (rank ranks[i % len], all projections, seed i), cached under root."""
    factory = None
    paths = {}
    for i in range(count):
        rank = ranks[i % len(ranks)]
        path = root / f"smollm2-135m-r{rank}-seed{i}"
        if not (path / "adapter_model.safetensors").is_file():
            factory = factory or _factory()
            print(f"  making adapter {path.name}", flush=True)
            factory.make_adapter(path, config, rank=rank, alpha=2 * rank, seed=i + 1,
                                 b_std=0.02)
        paths[f"bench-{i}"] = path
    return paths


def adapter_bytes(paths: dict[str, Path], itemsize: int) -> int:
    """Bytes of every adapter's A and B at the engine's dtype (what a step with all of them
    reads)."""
    from safetensors import safe_open

    total = 0
    for path in paths.values():
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total * itemsize


def stream_rate(num_bytes: int, reps: int = 7) -> float:
    """Bytes per second this machine reads a float32 buffer of num_bytes (median of reps)."""
    buf = torch.ones(num_bytes // 4)
    buf.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - start)
    return num_bytes / statistics.median(times)


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, float, list[list[int]]]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--ranks", default="8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from loramux.adapters.config import RegistryConfig
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.types import BaseSpec
    from loramux.engine.config import EngineConfig
    from loramux.engine.engine import LLMEngine
    from loramux.engine.sampling_params import SamplingParams
    from loramux.engine.default_model import cache_root, ensure_default_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n, new = args.requests, args.new_tokens
    ranks = [int(r) for r in args.ranks.split(",")]
    model_dir = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"adapters: {n} x rank {ranks}, all projections", flush=True)
    paths = make_adapters(model.config, n, ranks, cache_root() / "bench-adapters")
    names = list(paths)
    prompts = [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]
    prompt_ids = [tokenizer.encode(p) for p in prompts]

    registry = AdapterRegistry(
        RegistryConfig(adapters=tuple(paths.items()), max_gpu_adapters=n, max_cpu_adapters=n,
                       max_lora_rank=max(ranks)),
        BaseSpec.from_hf_config(model.config), "cpu", torch.float32)
    registry.start()
    for name in names:  # page everything in before timing (cold loads are not measured here)
        ref = registry.resolve(name)
        registry.acquire_wait(ref)
        registry.release(ref)
    kv_tokens = n * (max(len(p) for p in prompt_ids) + new + 16)
    config = EngineConfig(max_num_seqs=n, max_num_batched_tokens=4096, kv_cache_tokens=kv_tokens)
    engine = LLMEngine(model, config, tokenizer=tokenizer, adapters=registry)
    adapters: dict[str, list[str | None]] = {"loramux-lora": list(names),
                                             "loramux-base": [None] * n}
    # min_tokens = max_tokens holds EOS back like PEFT's min_new_tokens: exactly `new` tokens.
    params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0)

    def loramux(key: str) -> Callable[[], list[list[int]]]:
        return lambda: [o.token_ids for o in engine.generate(prompt_ids, params, adapters[key])]

    runs: dict[str, Callable[[], list[list[int]]]] = {k: loramux(k) for k in adapters}
    if not args.skip_peft:
        from peft import PeftModel

        print("loading the adapters into PEFT", flush=True)
        peft = PeftModel.from_pretrained(copy.deepcopy(model), str(paths[names[0]]),
                                         adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(str(paths[name]), adapter_name=name)
        peft.eval()
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(prompts, return_tensors="pt", padding=True)

        def run_peft() -> list[list[int]]:
            with torch.inference_mode():
                out = peft.generate(**batch, adapter_names=names, max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False)
            return out[:, batch["input_ids"].shape[1]:].tolist()

        runs["peft"] = run_peft

    print("warm-up", flush=True)
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for names_or_none in adapters.values():
        engine.generate(prompt_ids, short, names_or_none)

    results: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
    outputs: dict[str, list[list[int]]] = {}

    def record(r: int, name: str, wall: float, cpu: float, out: list[list[int]]) -> None:
        assert sum(len(o) for o in out) == n * new, f"{name} made the wrong token count"
        results[name].append((wall, cpu))
        outputs[name] = out
        print(f"  round {r + 1} {name:13s} {n * new / wall:8.1f} tok/s  "
              f"(wall {wall:6.1f} s, cpu {cpu:6.1f} s)", flush=True)

    for r in range(args.rounds):
        order = list(runs)
        if r % 2:
            order[0], order[1] = order[1], order[0]
        for name in order:
            record(r, name, *timed(runs[name]))
    registry.close()
    lora_bytes = adapter_bytes(paths, torch.finfo(torch.float32).bits // 8)
    rate = stream_rate(lora_bytes)

    tps = {k: n * new / statistics.median(w for w, _ in v) for k, v in results.items()}
    cpu_tps = {k: n * new / statistics.median(c for _, c in v) for k, v in results.items()}
    report: dict[str, Any] = {
        "model": "SmolLM2-135M (float32, CPU)", "requests": n, "new_tokens": new,
        "adapter_ranks": ranks, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "tokens_per_cpu_s": {k: round(v, 1) for k, v in cpu_tps.items()},
        "lora_vs_base": round(tps["loramux-lora"] / tps["loramux-base"], 3),
        "lora_vs_base_cpu": round(cpu_tps["loramux-lora"] / cpu_tps["loramux-base"], 3),
    }
    base_wall = statistics.median(w for w, _ in results["loramux-base"])
    report["adapter_bytes"] = lora_bytes
    report["stream_gb_per_s"] = round(rate / 1e9, 1)
    report["lora_vs_base_bound"] = round(base_wall / (base_wall + new * lora_bytes / rate), 3)
    if "peft" in tps:
        same = sum(a == b for a, b in zip(outputs["loramux-lora"], outputs["peft"]))
        report["lora_vs_peft"] = round(tps["loramux-lora"] / tps["peft"], 2)
        report["lora_vs_peft_cpu"] = round(cpu_tps["loramux-lora"] / cpu_tps["peft"], 2)
        report["same_tokens_as_peft"] = f"{same}/{n}"
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
