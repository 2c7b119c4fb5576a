"""Greedy equivalence with PEFT, float32 on the CPU: every request of a mixed batch gives exactly
the tokens PeftModel.generate gives with that adapter alone (base requests: the base model).

Scenarios: all adapters and base requests in one batch (both LoRA backends); requests that
arrive while others decode, with chunked prefill; a KV budget so small that sequences are
preempted and recomputed; fewer adapter slots than adapters (requests wait for page-ins);
and the same on a bitsandbytes nf4 base (PEFT on the very same quantized modules).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_factory import base_spec
from engine_helpers import (
    ADAPTERS,
    ALL as ALL_MODULES,
    MAX_NEW,
    deep,
    greedy,
    make_adapters,
    peft_greedy,
    peft_model,
    prompts,
    tiny_config,
    tiny_model,
)
from loramux.adapters.config import RegistryConfig
from loramux.adapters.registry import AdapterRegistry
from loramux.adapters.types import MODULES
from loramux.engine.config import EngineConfig
from loramux.engine.engine import LLMEngine
from loramux.engine.request import RequestOutput
from loramux.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
NAMES: list[str | None] = [*ADAPTERS, None]

Case = tuple[list[int], str | None]  # (prompt, adapter)


def _cases(seed: int, per_adapter: int = 2, names: list[str | None] = NAMES) -> list[Case]:
    ps = prompts(per_adapter * len(names), seed=seed)
    return [(p, names[i % len(names)]) for i, p in enumerate(ps)]


def _registry(cfg: Any, paths: dict[str, Path], slots: int) -> AdapterRegistry:
    reg = AdapterRegistry(
        RegistryConfig(adapters=tuple(paths.items()), max_gpu_adapters=slots,
                       max_cpu_adapters=max(slots, len(paths)), max_lora_rank=64),
        base_spec(cfg), "cpu", torch.float32)
    reg.start()
    return reg


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cfg = tiny_config()
    base = tiny_model(cfg)
    paths = make_adapters(tmp_path_factory.mktemp("adapters"), cfg)
    pm = peft_model(deep(base), paths)
    reg = _registry(cfg, paths, slots=len(paths))
    refs: dict[tuple[tuple[int, ...], str | None], list[int]] = {}

    def reference(prompt: list[int], adapter: str | None) -> list[int]:
        key = (tuple(prompt), adapter)
        if key not in refs:
            refs[key] = peft_greedy(pm, adapter, prompt)
        return refs[key]

    yield {"cfg": cfg, "base": base, "paths": paths, "reg": reg, "ref": reference}
    reg.close()


def _check(outputs: dict[str, RequestOutput], cases: dict[str, Case], reference: Any) -> None:
    for rid, (prompt, adapter) in cases.items():
        assert outputs[rid].finished
        assert outputs[rid].token_ids == reference(prompt, adapter), (rid, adapter)


def _run(engine: LLMEngine, cases: dict[str, Case], arrivals: dict[int, list[str]] | None = None,
         ) -> dict[str, RequestOutput]:
    """Queue cases (all at once, or at the given step numbers) and step until all finish;
    the outputs of requests queued before the call are returned too."""
    pending = arrivals or {0: list(cases)}
    tokens: dict[str, list[int]] = {rid: [] for rid in [*engine.requests, *cases]}
    finals: dict[str, RequestOutput] = {}
    step, deadline = 0, time.monotonic() + 120
    while pending or engine.has_unfinished():
        for rid in pending.pop(step, []):
            engine.add_request(rid, cases[rid][0], GREEDY, cases[rid][1])
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finals[out.request_id] = out
        if engine.last_step_tokens == 0:
            time.sleep(0.002)  # everything queued waits for an adapter page-in
        step += 1
        assert time.monotonic() < deadline, "the engine stopped making progress"
    return {rid: dataclasses.replace(finals[rid], token_ids=tokens[rid]) for rid in tokens}


def test_every_adapter_changes_the_base_output(setup: dict[str, Any]) -> None:
    """Guard against a test that passes because adapters do nothing."""
    prompt = prompts(1, seed=3)[0]
    base = setup["ref"](prompt, None)
    assert all(setup["ref"](prompt, name) != base for name in ADAPTERS)


@pytest.mark.parametrize("backend", ["stacked", "kernels"])
def test_all_adapters_and_base_share_one_batch(setup: dict[str, Any], backend: str) -> None:
    engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=64, kv_cache_tokens=4096,
                                                   block_size=4),
                       adapters=setup["reg"], lora_backend=backend)
    cases = {f"r{i}": c for i, c in enumerate(_cases(seed=1))}
    _check(_run(engine, cases), cases, setup["ref"])
    assert engine.kv.allocator.num_used == 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available(),
                    reason="runs CUDA's kernels under TRITON_INTERPRET=1 on the CPU")
def test_the_cuda_kernels_interpreted_give_pefts_tokens(setup: dict[str, Any]) -> None:
    """What the engine runs on CUDA, interpreted on the CPU: Triton paged attention with
    split-KV decodes (as on a 132-SM device) and every projection's SGMV through the Triton
    launchers, decode steps padded to their buckets; the tokens are PEFT's."""
    from loramux.engine.lora import KernelLora
    from loramux.engine.triton_attention import PagedAttention
    from loramux.kernels.launch import SgmvLauncher

    max_num_seqs = 4  # the interpreter runs every program of a grid in turn: keep grids small
    engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=max_num_seqs,
                                                   kv_cache_tokens=1024, block_size=4),
                       adapters=setup["reg"], lora_backend="kernels")
    runner, tables = engine.runner, setup["reg"].tables
    sh = runner.shape
    runner.attention = attention = PagedAttention(
        max_num_seqs, sh.num_heads, sh.num_kv_heads, sh.head_dim, sh.max_model_len,
        torch.device("cpu"), sm_count=132, min_split_len=64)
    assert attention.num_splits(max_num_seqs, 1) == attention.num_splits(1, 1) == 4
    lora = runner.lora
    assert isinstance(lora, KernelLora)
    base = base_spec(setup["cfg"])
    lora.launchers = [SgmvLauncher(*base.shapes[m], tables.max_rank, torch.float32,
                                   tables.pool.dtype, torch.float32, torch.device("cpu"),
                                   max_rows=engine.config.max_num_batched_tokens,
                                   max_segments=max_num_seqs)
                      for m in MODULES]
    names: list[str | None] = ["r4-attn", "r16-all", None, "r8-mlp", "r16-all"]
    cases = {f"r{i}": c for i, c in enumerate(_cases(seed=4, per_adapter=1, names=names))}
    _check(_run(engine, cases), cases, setup["ref"])
    assert engine.kv.allocator.num_used == 0


def test_requests_arrive_while_others_decode_with_chunked_prefill(setup: dict[str, Any]) -> None:
    """New requests join every few steps; a 16-token budget chunks prompts and mixes chunks
    with decodes of other adapters in one step."""
    engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=8, max_num_batched_tokens=16,
                                                   kv_cache_tokens=4096, block_size=4),
                       adapters=setup["reg"])
    cases = {f"s{i}": c for i, c in enumerate(_cases(seed=2))}
    arrivals: dict[int, list[str]] = {}
    for i, rid in enumerate(cases):
        arrivals.setdefault(3 * (i // 2), []).append(rid)
    _check(_run(engine, cases, arrivals), cases, setup["ref"])


def test_small_kv_budget_preempts_and_recomputes(setup: dict[str, Any]) -> None:
    # 30 tokens each at most (prompt <= 20 + 12 new) in 64 tokens of KV: only two fit at once.
    engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=16, kv_cache_tokens=64,
                                                   block_size=4),
                       adapters=setup["reg"])
    cases = {f"p{i}": c for i, c in enumerate(_cases(seed=4, per_adapter=1))}
    _check(_run(engine, cases), cases, setup["ref"])
    assert engine.scheduler.stats.preemptions > 0
    assert engine.kv.allocator.num_used == 0
    assert all(info.refcount == 0 for info in setup["reg"].list())


def test_more_adapters_than_slots_wait_and_match(setup: dict[str, Any]) -> None:
    """Three device slots for ten adapters: requests wait for page-ins while others run."""
    reg = _registry(setup["cfg"], setup["paths"], slots=3)
    try:
        engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=32, kv_cache_tokens=4096,
                                                       block_size=4), adapters=reg)
        cases = {f"w{i}": c for i, c in enumerate(_cases(seed=5))}
        _check(_run(engine, cases), cases, setup["ref"])
        assert engine.scheduler.stats.adapter_waits > 0
        assert all(info.refcount == 0 for info in reg.list())
    finally:
        reg.close()


def test_forty_adapters_over_eight_slots_with_a_reload_mid_run(
        setup: dict[str, Any], tmp_path: Path) -> None:
    """40 adapters, device room for 8 and host room for 12, requests arriving while others
    decode; halfway through, "c00" is reloaded with other weights. Every request gives PEFT's
    tokens for the version it was given: requests added before the reload the old weights,
    after it the new, so no request ran on an evicted slot's new tenant or on a wrong
    version. Page-ins, evictions and disk re-reads all happened; nothing is left referenced."""
    import shutil

    from adapter_factory import WEIGHTS_FILE, make_adapter

    cfg = setup["cfg"]
    targets = [("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"), ALL_MODULES]
    paths = {f"c{i:02d}": make_adapter(tmp_path / f"c{i:02d}", cfg, rank=(4, 8, 16)[i % 3],
                                       alpha=16, target_modules=targets[i // 3 % 3],
                                       seed=500 + i, b_std=0.15)
             for i in range(40)}
    new_weights = make_adapter(tmp_path / "c00-new", cfg, rank=8, alpha=16,
                               target_modules=ALL_MODULES, seed=999, b_std=0.15)
    pm = peft_model(deep(setup["base"]), {**paths, "c00-new": new_weights})
    reg = AdapterRegistry(
        RegistryConfig(adapters=tuple(paths.items()), max_gpu_adapters=8, max_cpu_adapters=12,
                       max_lora_rank=16),
        base_spec(cfg), "cpu", torch.float32)
    reg.start()
    try:
        engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=12, kv_cache_tokens=4096,
                                                       block_size=4), adapters=reg)
        names = [*paths, None]
        ps = prompts(88, seed=11)
        cases = {f"m{i}": (p, names[(i * 7) % len(names)]) for i, p in enumerate(ps)}
        cases["late-c00"] = (ps[0], "c00")
        assert peft_greedy(pm, "c00-new", ps[0]) != peft_greedy(pm, "c00", ps[0])
        weights: dict[str, str | None] = {}  # request -> the PEFT adapter it must match

        order = [rid for rid in cases if rid != "late-c00"]
        order_all = list(order)
        tokens: dict[str, list[int]] = {rid: [] for rid in cases}
        step, deadline, reloaded = 0, time.monotonic() + 180, False
        while order or engine.has_unfinished():
            for rid in order[:4]:  # four arrivals per step while others decode
                engine.add_request(rid, cases[rid][0], GREEDY, cases[rid][1])
                weights[rid] = "c00-new" if reloaded and cases[rid][1] == "c00" else cases[rid][1]
            del order[:4]
            if not reloaded and step == 10:  # old c00 requests are queued or running
                shutil.copy(new_weights / WEIGHTS_FILE, paths["c00"] / WEIGHTS_FILE)
                shutil.copy(new_weights / "adapter_config.json", paths["c00"])
                reg.load("c00", paths["c00"], trusted=True)
                engine.add_request("late-c00", ps[0], GREEDY, "c00")
                weights["late-c00"] = "c00-new"
                reloaded = True
                in_flight_old = [rid for rid, name in weights.items() if name == "c00"
                                 and rid in engine.requests]
                for rid in in_flight_old:  # not started yet: it may take the new version
                    if not engine.requests[rid].holds_adapter:
                        weights[rid] = "either"
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
            if engine.last_step_tokens == 0:
                time.sleep(0.002)
            step += 1
            assert time.monotonic() < deadline, "the engine stopped making progress"
        def matches(rid: str) -> bool:
            options = ["c00", "c00-new"] if weights[rid] == "either" else [weights[rid]]
            return any(tokens[rid] == peft_greedy(pm, w, cases[rid][0]) for w in options)

        wrong = {rid: weights[rid] for rid in cases if not matches(rid)}
        assert not wrong, wrong
        assert any(weights[rid] == "c00" for rid in in_flight_old) and "c00-new" in {weights[r] for r in order_all if r != "late-c00"}
        stats = reg.stats
        assert stats.page_ins > 40 and stats.device_evictions > 0, stats
        assert stats.host_evictions > 0 and stats.disk_reads > 0, stats
        assert engine.scheduler.stats.adapter_waits > 0
        assert all(info.refcount == 0 for info in reg.list())
        assert len(reg.resident()) <= 8 and engine.kv.allocator.num_used == 0
    finally:
        reg.close()


def test_a_request_queued_before_a_reload_gets_the_new_version(
        setup: dict[str, Any], tmp_path: Path) -> None:
    """"x" is reloaded with other weights after a request for it was queued but before it
    ran: its first version drains at once (nobody holds it), and the request must neither
    fail nor run on freed memory; it runs on the new version, like one that arrives now."""
    import shutil

    from adapter_factory import WEIGHTS_FILE

    paths = setup["paths"]
    x = shutil.copytree(paths["r4-attn"], tmp_path / "x")
    reg = _registry(setup["cfg"], {"x": x}, slots=1)
    try:
        engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=4, kv_cache_tokens=1024,
                                                       block_size=4), adapters=reg)
        prompt = prompts(1, seed=21)[0]
        engine.add_request("before", prompt, GREEDY, "x")
        for name in (WEIGHTS_FILE, "adapter_config.json"):
            shutil.copy(paths["r16-all"] / name, x / name)
        reg.load("x", x, trusted=True)
        engine.add_request("after", prompt, GREEDY, "x")
        outputs = _run(engine, {})
        for rid in ("before", "after"):
            assert outputs[rid].finish_reason == "length", outputs[rid]
            assert outputs[rid].token_ids == setup["ref"](prompt, "r16-all"), rid
        assert [info.version for info in reg.list()] == [2]
        assert all(info.refcount == 0 for info in reg.list())
    finally:
        reg.close()


def test_dropout_never_runs_at_inference(setup: dict[str, Any], tmp_path: Path) -> None:
    """An adapter trained with lora_dropout 0.5 serves exactly like the same weights saved
    with 0 (PEFT #3753): greedy outputs equal PEFT's in eval mode, and repeat exactly."""
    from adapter_factory import make_adapter

    cfg = setup["cfg"]
    paths = {f"d{p}": make_adapter(tmp_path / f"d{p}", cfg, rank=8, target_modules=ALL_MODULES,
                                   seed=77, b_std=0.15, lora_dropout=p) for p in (0.0, 0.5)}
    reg = _registry(cfg, paths, slots=2)
    try:
        engine = LLMEngine(setup["base"], EngineConfig(max_num_seqs=8, kv_cache_tokens=1024,
                                                       block_size=4), adapters=reg)
        ps = prompts(3, seed=31)
        first = _run(engine, {f"{name}-{rid}": (p, name) for rid, p in enumerate(ps)
                              for name in paths})
        again = _run(engine, {f"again-{rid}": (p, "d0.5") for rid, p in enumerate(ps)})
        pm = peft_model(deep(setup["base"]), {"dropout": paths["d0.5"]})
        for rid, p in enumerate(ps):
            expected = peft_greedy(pm, "dropout", p)
            assert first[f"d0.5-{rid}"].token_ids == first[f"d0.0-{rid}"].token_ids == expected
            assert again[f"again-{rid}"].token_ids == expected
    finally:
        reg.close()


# ---------------------------------------------------------------------- nf4 base

NF4_ADAPTERS = ["r4-attn", "r8-mlp", "r64-all", "r8-rslora", "r8-rank-pattern",
                "r16-alpha-pattern"]
NEAR_TIE = 0.05  # logit gap below which bf16 activation rounding may flip a greedy choice


def _quantize(folder: Path, packed: bool) -> Any:
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)).eval()
    if not packed:
        for module in model.modules():
            if isinstance(module, Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module", params=["dequant", "packed"])
def nf4(request: pytest.FixtureRequest, setup: dict[str, Any],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One nf4 quantization of the tiny base, shared by loramux and PEFT.

    "dequant": bitsandbytes dequantizes nf4 to float32 and multiplies in float32 (exact
    comparison). "packed": its default on CPUs with AVX512-BF16, which repacks the weights at
    the first forward and multiplies with activations rounded to bfloat16; a 1e-7 difference
    in an activation can then move a logit by ~1e-3, so PEFT's own incremental and full
    forwards disagree at near-ties, and so may we.

    The engine is built first (it keeps references to the Linear4bit modules), then PEFT wraps
    the same modules before anything runs (PEFT wrapping an already repacked Linear4bit breaks
    it).
    """
    from peft import PeftModel

    folder = tmp_path_factory.mktemp("nf4-base")
    setup["base"].save_pretrained(folder)
    quantized = _quantize(folder, packed=request.param == "packed")
    paths = {name: setup["paths"][name] for name in NF4_ADAPTERS}
    reg = _registry(setup["cfg"], paths, slots=len(paths))
    engine_kv = {"max_num_seqs": 32, "block_size": 4}
    engines = {
        "batch": LLMEngine(quantized, EngineConfig(kv_cache_tokens=4096, **engine_kv),
                           adapters=reg),
        "preempt": LLMEngine(quantized, EngineConfig(kv_cache_tokens=64, **engine_kv),
                             adapters=reg),
    }
    pm = PeftModel.from_pretrained(quantized, str(paths[NF4_ADAPTERS[0]]),
                                   adapter_name=NF4_ADAPTERS[0])
    for name in NF4_ADAPTERS[1:]:
        pm.load_adapter(str(paths[name]), adapter_name=name)
    pm.eval()
    yield {"mode": request.param, "engines": engines, "pm": pm, "fp32": setup["ref"]}
    reg.close()


def _first_near_tie(pm: Any, adapter: str | None, prompt: list[int], ref: list[int]) -> int:
    """Index of the first generated token where PEFT's own top-2 logit gap < NEAR_TIE."""
    ids = torch.tensor([prompt + ref])
    with torch.inference_mode():
        if adapter is None:
            with pm.disable_adapter():
                logits = pm(input_ids=ids).logits[0]
        else:
            pm.set_adapter(adapter)
            logits = pm(input_ids=ids).logits[0]
    top = logits[len(prompt) - 1: len(prompt) - 1 + len(ref)].topk(2, dim=-1).values
    gaps = (top[:, 0] - top[:, 1]).tolist()
    return next((i for i, gap in enumerate(gaps) if gap < NEAR_TIE), len(ref))


@pytest.mark.parametrize("scenario", ["batch", "preempt"])
def test_nf4_base_matches_peft_on_the_same_nf4_base(nf4: dict[str, Any], scenario: str) -> None:
    engine = nf4["engines"][scenario]
    names: list[str | None] = [*NF4_ADAPTERS, None]
    cases = {f"q{i}": c for i, c in enumerate(_cases(seed=6, names=names))}
    outputs = _run(engine, cases)
    exact = 0
    for rid, (prompt, adapter) in cases.items():
        ref = peft_greedy(nf4["pm"], adapter, prompt)
        got = outputs[rid].token_ids
        if nf4["mode"] == "dequant":
            assert got == ref, (rid, adapter)
        else:  # equal up to PEFT's own first near-tie
            n = _first_near_tie(nf4["pm"], adapter, prompt, ref)
            assert got[:n] == ref[:n], (rid, adapter)
        exact += got == ref
    assert exact >= 0.75 * len(cases)
    if scenario == "preempt":
        assert engine.scheduler.stats.preemptions > 0
    assert engine.kv.allocator.num_used == 0


def test_nf4_is_really_quantized(nf4: dict[str, Any]) -> None:
    """The nf4 path must not silently be the float32 one: outputs differ somewhere."""
    cases = _cases(seed=6, names=[None])
    with nf4["pm"].disable_adapter():
        quantized = [greedy(nf4["pm"], p) for p, _ in cases]
    assert any(q != nf4["fp32"](p, None) for q, (p, _) in zip(quantized, cases))


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantization_flag_quantizes_as_the_equivalence_tests_do(
        quantization: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`--quantization` (EngineConfig.quantization -> load_hf_model) gives the same bitsandbytes
    model as loading it with BitsAndBytesConfig by hand, the way the PEFT tests above do: the
    same layers quantized, the same quantized weights, the same greedy tokens."""
    import bitsandbytes as bnb
    from loramux.engine.model import load_hf_model
    from server_model import make_model_dir
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder, _, _ = make_model_dir(tmp_path / "base")
    config = EngineConfig(model=str(folder), device="cpu", dtype="float32",
                          quantization=quantization, kv_cache_tokens=512)
    model, _ = load_hf_model(config)
    by_hand = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32)
        if quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True)).eval()
    kind = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    names = {n for n, m in model.named_modules() if isinstance(m, kind)}
    assert names == {n for n, m in by_hand.named_modules() if isinstance(m, kind)}
    assert len(names) == 7 * model.config.num_hidden_layers  # every projection, not lm_head
    for name in names:
        mine, theirs = model.get_submodule(name).weight, by_hand.get_submodule(name).weight
        assert mine.dtype == theirs.dtype != torch.float32 and torch.equal(mine, theirs), name
    prompt = [5, 9, 13, 2, 7]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = LLMEngine.from_config(config)  # also starts an adapter registry: close it
    try:
        with caplog.at_level(logging.WARNING):
            (ours,) = engine.generate([prompt], params)
    finally:
        engine.adapters.close()
    (ref,) = LLMEngine(by_hand, config).generate([prompt], params)
    assert ours.token_ids == ref.token_ids
    # int8's cast-to-float16 warning, logged by bitsandbytes on every forward, is said once.
    casts = [r for r in caplog.records if "MatMul8bitLt" in r.getMessage()]
    assert len(casts) <= 1
