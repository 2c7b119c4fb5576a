"""gpu_check sections on the engine: decode-step time eager vs CUDA graphs, tokens/s end to
end, PEFT's mixed-adapter generate (bitsandbytes bases: gpu_quantized.py).

The base is a random-weight model of Llama-2-7B's widths with `LAYERS` of its 32 decoder
layers, made on the GPU in bf16 (gpu_models.random_model; no download, no tokenizer: prompts
are random token ids). Fewer layers keep model set-up, PEFT's adapter loading and the run
inside the time limit; every layer does the same work, so step times are also reported per
layer, and ratios (LoRA vs none, loramux vs PEFT, graphs vs eager) carry over to 32 layers
except for the embedding and lm_head, which weigh more here. Adapters are rank 16 on all
seven projections, written in PEFT's format and served by the registry as in the server.
On the CPU everything is the tiny shape, float32.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramux.loadtest.gpu_check import Context, check, judged

LAYERS = 8  # of Llama-2-7B's 32 (see the module docstring)
RANK = 16
LORA_OVERHEAD_TARGET = 0.9  # tokens/s with 32 adapters over tokens/s without, batch 32
PEFT_TARGET = 10.0
GRAPHS_TARGET = 1.5


@dataclass
class Plan:
    """Sizes of the engine sections in this mode."""

    shape: str
    layers: int
    dtype: torch.dtype
    adapters: int  # written and loaded
    batches: tuple[int, ...]
    adapter_counts: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    step_batch: int  # decode_step's batch
    init_std: float


GPU_PLAN = Plan("7b", LAYERS, torch.bfloat16, 32, (1, 8, 32, 64), (0, 1, 8, 32), 64, 32, 32,
                0.02)
# initializer_range 0.15 on the CPU: greedy choices far from ties, so float32 loramux and
# PEFT can be compared token for token (tests/engine_helpers.py).
CPU_PLAN = Plan("tiny", 2, torch.float32, 8, (1, 8), (0, 1, 8), 16, 8, 8, 0.15)


@dataclass
class Setup:
    """The shared base, its adapters on disk and in a running registry."""

    plan: Plan
    config: Any
    model: Any
    paths: dict[str, Path]
    registry: Any
    seconds: dict[str, float]

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def close(self) -> None:
        self.registry.close()


def plan_of(ctx: Context) -> Plan:
    return CPU_PLAN if ctx.cpu else GPU_PLAN


def setup(ctx: Context) -> Setup:
    """Build (once per run) the random base, write the adapters, start the registry."""
    if "setup" in ctx.shared:
        return ctx.shared["setup"]  # type: ignore[no-any-return]
    from loramux.adapters.config import RegistryConfig
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.types import BaseSpec
    from loramux.loadtest.gpu_models import llama_config, random_model, write_adapter

    plan = plan_of(ctx)
    seconds = {}
    t0 = time.perf_counter()
    config = llama_config(plan.shape, layers=plan.layers, initializer_range=plan.init_std)
    model = random_model(config, ctx.device, plan.dtype)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    seconds["model_init"] = time.perf_counter() - t0
    ctx.log(f"  base {plan.shape} x {plan.layers} layers ready in {seconds['model_init']:.1f} s")
    t0 = time.perf_counter()
    base = BaseSpec.from_hf_config(config)
    b_std = 0.15 if ctx.cpu else 0.01
    paths = {f"a{i}": write_adapter(ctx.scratch / "adapters" / f"a{i}", base, RANK, seed=i,
                                    b_std=b_std) for i in range(plan.adapters)}
    seconds["write_adapters"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    registry = AdapterRegistry(
        RegistryConfig(adapters=tuple(paths.items()), max_gpu_adapters=plan.adapters,
                       max_cpu_adapters=plan.adapters, max_lora_rank=RANK),
        base, ctx.device, plan.dtype)
    registry.start()
    for name in paths:  # page everything in: cold loads are the pagein section's business
        ref = registry.resolve(name)
        registry.acquire_wait(ref, timeout=120)
        registry.release(ref)
    seconds["load_adapters"] = time.perf_counter() - t0
    ctx.log(f"  {plan.adapters} adapters resident in "
            f"{seconds['write_adapters'] + seconds['load_adapters']:.1f} s")
    made = Setup(plan, config, model, paths, registry, seconds)
    ctx.shared["setup"] = made
    return made


def has_enforce_eager() -> bool:
    from loramux.engine.config import EngineConfig

    return any(f.name == "enforce_eager" for f in dataclasses.fields(EngineConfig))


def make_engine(s: Setup, max_seqs: int, eager: bool | None) -> Any:
    """An LLMEngine on the shared base and registry; eager None: the config's default."""
    from loramux.engine.config import EngineConfig
    from loramux.engine.engine import LLMEngine

    p = s.plan
    kwargs: dict[str, Any] = {}
    if eager is not None and has_enforce_eager():
        kwargs["enforce_eager"] = eager
    config = EngineConfig(max_num_seqs=max_seqs, max_num_batched_tokens=max(2048,
                          max_seqs * p.prompt_len), kv_cache_tokens=max_seqs *
                          (p.prompt_len + p.new_tokens + 48), **kwargs)
    engine = LLMEngine(s.model, config, adapters=s.registry)
    warm_up = getattr(engine, "warm_up", None)
    if callable(warm_up):
        warm_up()
    return engine


def prompts(plan: Plan, count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(plan.prompt_len)] for _ in range(count)]


def assign(names: list[str], batch: int, distinct: int) -> list[str | None]:
    """Adapter of each request: round-robin over `distinct` adapters (0: the base)."""
    return [names[i % distinct] if distinct else None for i in range(batch)]


def _release() -> None:
    """Give cached GPU memory back once an engine is gone (its KV cache, its graphs)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------- decode step


def _time_steps(engine: Any, s: Setup, batch: int, distinct: int, warm: int,
                timed: int) -> dict[str, float]:
    """Median wall and CPU time of one decode step with `batch` running requests."""
    from loramux.engine.sampling_params import SamplingParams

    total = warm + timed + 4
    params = SamplingParams(max_tokens=total, min_tokens=total, temperature=0.0)
    ids = [f"step-{i}" for i in range(batch)]
    for rid, prompt, name in zip(ids, prompts(s.plan, batch, s.config.vocab_size),
                                 assign(s.names, batch, distinct)):
        engine.add_request(rid, prompt, params, name)
    for _ in range(50):  # prefill (may take several steps), until every row decodes
        engine.step()
        if engine.last_step_tokens == batch:
            break
    walls, cpus = [], []
    for i in range(warm + timed):
        wall, cpu = time.perf_counter(), time.process_time()
        engine.step()  # returns sampled tokens on the host: the GPU work is done
        if i >= warm:
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        assert engine.last_step_tokens == batch, "a decode step ran fewer rows than asked"
    for rid in ids:
        engine.abort(rid)
    walls.sort()
    cpus.sort()
    return {"wall_ms": round(walls[len(walls) // 2] * 1e3, 3),
            "cpu_ms": round(cpus[len(cpus) // 2] * 1e3, 3)}


def decode_step(ctx: Context) -> dict[str, Any]:
    """Decode-step time at one batch, no adapters and all distinct, eager and with CUDA
    graphs (EngineConfig(enforce_eager=...)); cpu_ms is the process's CPU time per step."""
    s = setup(ctx)
    p = s.plan
    modes = ["eager"] if ctx.cpu else ["eager", "graphs"]
    results: list[dict[str, Any]] = []
    notes = []
    if ctx.cpu:
        notes.append("CUDA graphs need a GPU: eager only")
    elif not has_enforce_eager():
        notes.append("EngineConfig has no enforce_eager: this engine has no CUDA-graph mode")
        modes = ["eager"]
    for mode in modes:
        engine = make_engine(s, p.step_batch, eager=mode == "eager")
        for distinct in (0, min(p.adapters, p.step_batch)):
            if ctx.out_of_time(reserve=5):
                break
            figures = _time_steps(engine, s, p.step_batch, distinct, warm=3,
                                  timed=5 if ctx.cpu else 15)
            results.append({"mode": mode, "batch": p.step_batch, "adapters": distinct,
                            **figures, "wall_ms_per_layer": round(figures["wall_ms"] / p.layers,
                                                                  3)})
            ctx.log(f"  {mode:6s} batch {p.step_batch} adapters {distinct:2d}: "
                    f"{figures['wall_ms']:.2f} ms/step (cpu {figures['cpu_ms']:.2f} ms)")
        del engine  # before the next one is built
        _release()
    by = {(r["mode"], r["adapters"]): r["wall_ms"] for r in results}
    full = min(p.adapters, p.step_batch)
    checks = {}
    if not ctx.cpu:
        eager, graphs = by.get(("eager", full)), by.get(("graphs", full))
        speedup = round(eager / graphs, 3) if eager and graphs else None
        checks["graphs_vs_eager"] = check(
            speedup if speedup is not None else "no CUDA-graph mode measured",
            f">= {GRAPHS_TARGET}x (eager / replayed step time, batch {p.step_batch}, "
            f"{full} adapters)", speedup is not None and speedup >= GRAPHS_TARGET)
    return {"shape": p.shape, "layers": p.layers, "dtype": str(p.dtype), "notes": notes,
            "results": results, "checks": checks}


# ------------------------------------------------------------------------- end to end


def _generate(engine: Any, s: Setup, batch: int, distinct: int, new: int,
              seed: int = 0) -> tuple[float, list[list[int]]]:
    from loramux.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0)
    batch_prompts = prompts(s.plan, batch, s.config.vocab_size, seed)
    start = time.perf_counter()
    outputs = engine.generate(batch_prompts, params, assign(s.names, batch, distinct))
    wall = time.perf_counter() - start
    tokens = [o.token_ids for o in outputs]
    assert sum(len(t) for t in tokens) == batch * new, "wrong token count"
    return wall, tokens


def end_to_end(ctx: Context) -> dict[str, Any]:
    """Output tokens/s of engine.generate (prefill included) for every batch x distinct
    adapters pair of the plan, one run each after a warm-up, the engine's default mode."""
    s = setup(ctx)
    p = s.plan
    engine = make_engine(s, max(p.batches), eager=None)
    mode = ("default config" + (f" (enforce_eager={engine.config.enforce_eager})"
                                if has_enforce_eager() else " (no CUDA-graph mode)"))
    for distinct in p.adapter_counts:  # compile every kernel variant before timing
        _generate(engine, s, max(p.batches), distinct, 2, seed=99)
        _generate(engine, s, 1, min(distinct, 1), 2, seed=98)
    results, truncated = [], False
    outputs: dict[tuple[int, int], list[list[int]]] = {}
    for batch in p.batches:
        for distinct in p.adapter_counts:
            if distinct > batch:
                continue
            if ctx.out_of_time(reserve=5):
                truncated = True
                continue
            wall, tokens = _generate(engine, s, batch, distinct, p.new_tokens)
            outputs[(batch, distinct)] = tokens
            tps = batch * p.new_tokens / wall
            results.append({"batch": batch, "adapters": distinct, "seconds": round(wall, 3),
                            "tokens_per_s": round(tps, 1)})
            ctx.log(f"  batch {batch:2d} adapters {distinct:2d}: {tps:9.1f} tok/s")
    del engine
    _release()
    ctx.shared["e2e_outputs"] = outputs
    rates = {(r["batch"], r["adapters"]): r["tokens_per_s"] for r in results}
    ctx.shared["e2e_tps"] = rates
    batch, full = (32, 32) if not ctx.cpu else (max(p.batches), p.adapters)
    checks = {}
    if (batch, full) in rates and (batch, 0) in rates:
        ratio = round(rates[(batch, full)] / rates[(batch, 0)], 3)
        checks["lora_overhead"] = check(
            ratio, f">= {LORA_OVERHEAD_TARGET} (tok/s with {full} adapters / without, "
                   f"batch {batch})", judged(ctx, ratio >= LORA_OVERHEAD_TARGET))
    return {"shape": p.shape, "layers": p.layers, "full_model_layers": 32 if not ctx.cpu else
            p.layers, "dtype": str(p.dtype), "prompt_tokens": p.prompt_len,
            "new_tokens": p.new_tokens, "rank": RANK, "engine_mode": mode,
            "setup_seconds": {k: round(v, 2) for k, v in s.seconds.items()},
            "truncated": truncated, "results": results, "checks": checks}


# ------------------------------------------------------------------------- PEFT


def peft_mixed(ctx: Context) -> dict[str, Any]:
    """PEFT's generate(adapter_names=[...]) on the same base, prompts and adapters (one name
    per row, as loadtest/peft_baseline.py runs it; prompts of equal length, so no padding),
    against the engine's tokens/s for the same batch from the end_to_end section."""
    from peft import PeftModel

    s = setup(ctx)
    p = s.plan
    batch = 32 if not ctx.cpu else max(p.batches)
    distinct = min(p.adapters, batch)
    names = assign(s.names, batch, distinct)
    t0 = time.perf_counter()
    # PEFT wraps the base's modules in place; the engine keeps its own references to the
    # unwrapped ones (engine/model.py), so later engine runs are unaffected.
    peft = PeftModel.from_pretrained(s.model, str(s.paths[s.names[0]]),
                                     adapter_name=s.names[0])
    for name in s.names[1:distinct]:
        peft.load_adapter(str(s.paths[name]), adapter_name=name)
    peft.eval()
    load_s = time.perf_counter() - t0
    ctx.log(f"  PEFT: {distinct} adapters loaded in {load_s:.1f} s")
    ids = torch.tensor(prompts(p, batch, s.config.vocab_size), device=ctx.device)

    def generate(new: int) -> list[list[int]]:
        with torch.inference_mode():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                adapter_names=names, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, temperature=None, top_p=None, top_k=None,
                                pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()  # type: ignore[no-any-return]

    generate(2)  # warm-up
    start = time.perf_counter()
    tokens = generate(p.new_tokens)
    wall = time.perf_counter() - start
    peft_tps = batch * p.new_tokens / wall
    engine_tps = ctx.shared.get("e2e_tps", {}).get((batch, distinct))
    ours = ctx.shared.get("e2e_outputs", {}).get((batch, distinct))
    same = f"{sum(a == b for a, b in zip(ours, tokens))}/{batch}" if ours else None
    checks = {}
    ratio = round(engine_tps / peft_tps, 2) if engine_tps else None
    checks["loramux_vs_peft"] = check(
        ratio if ratio is not None else "no end_to_end figure for this batch",
        f">= {PEFT_TARGET}x (tok/s, batch {batch}, {distinct} adapters)",
        judged(ctx, ratio is not None and ratio >= PEFT_TARGET))
    return {"batch": batch, "adapters": distinct, "new_tokens": p.new_tokens,
            "load_seconds": round(load_s, 2), "peft_seconds": round(wall, 3),
            "peft_tokens_per_s": round(peft_tps, 1), "loramux_tokens_per_s": engine_tps,
            "same_tokens_as_loramux": same, "checks": checks}
