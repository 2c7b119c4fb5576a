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

On a bare GPU machine (no default-model package, no download): --shape 7b / 8b / tiny builds
a random-weight base of that shape (loadtest/gpu_models.py) directly on --device in --dtype
(default: cuda and bfloat16 when CUDA is there), --layers of its decoder layers (default
all), prompts of random token ids, adapters written in PEFT's format with random weights:

    python -m loramux.loadtest.benchmark_engine --shape 7b --layers 8 --rounds 1
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


def make_random_adapters(config: Any, count: int, ranks: list[int],
                         root: Path) -> dict[str, Path]:
    """count adapters for a random-weight base (gpu_models.write_adapter: no PEFT model of
    the base is built, which a 7B base would make slow), rank ranks[i % len], seed i."""
    from loramux.adapters.types import BaseSpec
    from loramux.loadtest.gpu_models import write_adapter

    base = BaseSpec.from_hf_config(config)
    return {f"bench-{i}": write_adapter(root / f"r{ranks[i % len(ranks)]}-seed{i}", base,
                                        ranks[i % len(ranks)], seed=i + 1, b_std=0.02)
            for i in range(count)}


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


def stream_rate(num_bytes: int, reps: int = 7, device: str | torch.device = "cpu") -> float:
    """Bytes per second `device` reads a float32 buffer of num_bytes (median of reps)."""
    device = torch.device(device)
    buf = torch.ones(num_bytes // 4, device=device)
    buf.sum()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        buf.sum().item()  # .item(): the read is complete when the clock stops
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
    parser.add_argument("--shape", default="default",
                        choices=("default", "tiny", "smollm2", "7b", "8b"),
                        help="default: the embedded SmolLM2-135M; otherwise a random-weight "
                             "base of that shape (no download)")
    parser.add_argument("--layers", type=int, help="decoder layers of a --shape base")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cpu for the default model, cuda (if any) for a --shape")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        default="auto", help="auto: float32 on the CPU, bfloat16 on CUDA")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from loramux.adapters.config import RegistryConfig
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.types import BaseSpec
    from loramux.engine.config import EngineConfig
    from loramux.engine.engine import LLMEngine
    from loramux.engine.sampling_params import SamplingParams

    n, new = args.requests, args.new_tokens
    ranks = [int(r) for r in args.ranks.split(",")]
    device = torch.device("cuda" if args.device == "auto" and args.shape != "default"
                          and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = (getattr(torch, args.dtype) if args.dtype != "auto" else
             torch.bfloat16 if device.type == "cuda" else torch.float32)
    tmp = None
    if args.shape == "default":
        from loramux.engine.default_model import cache_root, ensure_default_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = ensure_default_model()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = model.to(device).eval()  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model_name = f"SmolLM2-135M ({str(dtype).removeprefix('torch.')}, {device.type.upper()})"
        print(f"adapters: {n} x rank {ranks}, all projections", flush=True)
        paths = make_adapters(model.config, n, ranks, cache_root() / "bench-adapters")
        prompts = [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]
        prompt_ids = [tokenizer.encode(p) for p in prompts]
    else:
        import random
        import tempfile

        from loramux.loadtest.gpu_models import llama_config, random_model

        config = llama_config(args.shape, layers=args.layers)
        model = random_model(config, device, dtype)
        tokenizer = None
        model_name = (f"random {args.shape}, {config.num_hidden_layers} layers "
                      f"({str(dtype).removeprefix('torch.')}, {device.type})")
        tmp = tempfile.TemporaryDirectory(prefix="bench-adapters-")
        print(f"adapters: {n} x rank {ranks}, all projections, random", flush=True)
        paths = make_random_adapters(config, n, ranks, Path(tmp.name))
        rng = random.Random(0)  # equal lengths: PEFT's batch needs no padding
        prompt_ids = [[rng.randrange(3, config.vocab_size) for _ in range(24)]
                      for _ in range(n)]
    names = list(paths)

    registry = AdapterRegistry(
        RegistryConfig(adapters=tuple(paths.items()), max_gpu_adapters=n, max_cpu_adapters=n,
                       max_lora_rank=max(ranks)),
        BaseSpec.from_hf_config(model.config), device, dtype)
    registry.start()
    for name in names:  # page everything in before timing (cold loads are not measured here)
        ref = registry.resolve(name)
        registry.acquire_wait(ref)
        registry.release(ref)
    kv_tokens = n * (max(len(p) for p in prompt_ids) + new + 16)
    config = EngineConfig(max_num_seqs=n, max_num_batched_tokens=4096, kv_cache_tokens=kv_tokens)
    engine = LLMEngine(model, config, tokenizer=tokenizer, adapters=registry)
    warm_up = getattr(engine, "warm_up", None)
    if callable(warm_up):  # compiles kernels and captures the decode graphs (CUDA)
        warm_up()
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
        # On CUDA PEFT wraps the engine's model in place (no second copy of the base in GPU
        # memory): the engine keeps its own references to the unwrapped modules.
        base = model if device.type == "cuda" else copy.deepcopy(model)
        peft = PeftModel.from_pretrained(base, str(paths[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(str(paths[name]), adapter_name=name)
        peft.eval()
        if tokenizer is not None:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            batch = tokenizer(prompts, return_tensors="pt", padding=True)
        else:
            ids = torch.tensor(prompt_ids)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch = {k: v.to(device) for k, v in batch.items()}

        def run_peft() -> list[list[int]]:
            with torch.inference_mode():
                out = peft.generate(**batch, adapter_names=names, max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False, pad_token_id=0)
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
    lora_bytes = adapter_bytes(paths, torch.finfo(dtype).bits // 8)
    rate = stream_rate(lora_bytes, device=device)
    if tmp is not None:
        tmp.cleanup()

    tps = {k: n * new / statistics.median(w for w, _ in v) for k, v in results.items()}
    cpu_tps = {k: n * new / statistics.median(c for _, c in v) for k, v in results.items()}
    report: dict[str, Any] = {
        "model": model_name, "requests": n, "new_tokens": new,
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
