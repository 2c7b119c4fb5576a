"""The engine's Python API: sampling parameters reach the sampler (seeded sampling is the same
whatever shares the batch), logprobs, stop tokens and strings, abort frees KV blocks and the
adapter reference, errors for unknown adapters and bad input, the async wrapper, and the
other supported architectures against transformers."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from adapter_factory import base_spec
from engine_helpers import ToyTokenizer, greedy, make_adapters, prompts, tiny_config, tiny_model
from loramux.adapters.config import RegistryConfig
from loramux.adapters.registry import AdapterRegistry
from loramux.adapters.types import AdapterNotFound
from loramux.engine.async_engine import AsyncEngine
from loramux.engine.config import EngineConfig
from loramux.engine.engine import LLMEngine, merge_outputs
from loramux.engine.model import UnsupportedModel
from loramux.engine.request import RequestOutput
from loramux.engine.sampling_params import SamplingParams

NAMES = ["r4-attn", "r16-all", "r8-rslora"]
CONFIG = EngineConfig(max_num_seqs=16, kv_cache_tokens=2048, block_size=4)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    cfg = tiny_config()
    base = tiny_model(cfg)
    paths = make_adapters(tmp_path_factory.mktemp("adapters"), cfg, NAMES)
    reg = AdapterRegistry(RegistryConfig(adapters=tuple(paths.items()), max_gpu_adapters=4,
                                         max_cpu_adapters=4, max_lora_rank=16),
                          base_spec(cfg), "cpu", torch.float32)
    reg.start()
    yield {"cfg": cfg, "base": base, "reg": reg}
    reg.close()


def _engine(env: dict[str, Any], config: EngineConfig = CONFIG, **kwargs: Any) -> LLMEngine:
    return LLMEngine(env["base"], config, adapters=env["reg"], **kwargs)


# ---------------------------------------------------------------------- sampling


def test_seeded_sampling_is_reproducible_across_batch_compositions(env: dict[str, Any]) -> None:
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    prompt = prompts(1, seed=7)[0]
    alone = _engine(env).generate([prompt], seeded, ["r16-all"])[0].token_ids
    others = prompts(6, seed=8)
    mixed_params = [SamplingParams(max_tokens=14, temperature=1.0),
                    SamplingParams(max_tokens=6, temperature=0.0),
                    SamplingParams(max_tokens=9, temperature=0.7, seed=5)]
    engine = _engine(env)
    for i, p in enumerate(others):
        engine.add_request(f"o{i}", p, mixed_params[i % 3], [None, *NAMES][i % 4])
    engine.step()  # the others are decoding when the seeded request joins
    engine.add_request("seeded", prompt, seeded, "r16-all")
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == "seeded" for t in o.token_ids]
    assert tokens == alone
    # Under preemption too (the generator state lives with the request).
    tight = _engine(env, EngineConfig(max_num_seqs=16, kv_cache_tokens=48, block_size=4))
    outs = tight.generate([*others, prompt], seeded, ["r4-attn"] * 6 + ["r16-all"])
    assert outs[-1].token_ids == alone and tight.scheduler.stats.preemptions > 0
    other_seed = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=99)
    assert _engine(env).generate([prompt], other_seed, ["r16-all"])[0].token_ids != alone


def test_logprobs_are_those_of_the_model(env: dict[str, Any]) -> None:
    prompt = prompts(1, seed=9)[0]
    out = _engine(env).generate([prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                         logprobs=3))[0]
    assert out.logprobs is not None and out.top_logprobs is not None
    assert len(out.logprobs) == len(out.top_logprobs) == 6
    with torch.inference_mode():
        logits = env["base"](torch.tensor([prompt + out.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)  # [6, V]
    for i, (token, lp, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
        assert top is not None and len(top.token_ids) == 3 and top.token_ids[0] == token
        assert lp == pytest.approx(float(expected[i, token]), abs=1e-4)
        assert top.logprobs == pytest.approx(expected[i].topk(3).values.tolist(), abs=1e-4)


def test_stop_token_ids_and_max_tokens(env: dict[str, Any]) -> None:
    prompt = prompts(1, seed=10)[0]
    ref = greedy(env["base"], prompt)
    i = next(k for k in range(2, len(ref)) if ref[k] not in ref[:k])
    out = _engine(env).generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                         stop_token_ids=(ref[i],)))[0]
    assert out.token_ids == ref[:i + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", ref[i])
    # The stop token's text is left out unless asked for, as in vLLM.
    tok = ToyTokenizer()
    with_text = _engine(env, tokenizer=tok)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(ref[i],))
    assert with_text.generate([prompt], params)[0].text == tok.decode(ref[:i])
    params = dataclasses.replace(params, include_stop_str_in_output=True)
    assert with_text.generate([prompt], params)[0].text == tok.decode(ref[:i + 1])
    out = _engine(env).generate([prompt], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert out.token_ids == ref[:5] and out.finish_reason == "length"
    assert out.usage == {"prompt_tokens": len(prompt), "completion_tokens": 5,
                         "total_tokens": len(prompt) + 5}


def test_text_deltas_and_stop_strings(env: dict[str, Any]) -> None:
    tok = ToyTokenizer()
    engine = _engine(env, tokenizer=tok)
    prompt = prompts(1, seed=11)[0]
    full = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))[0]
    assert full.text == tok.decode(full.token_ids)
    stop = full.text[5:7]
    cut = full.text.index(stop)
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                   stop=(stop,)))[0]
    assert out.text == full.text[:cut] and out.finish_reason == "stop"
    assert out.stop_reason == stop
    keep = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop=(stop,),
                                                    include_stop_str_in_output=True))[0]
    assert keep.text == full.text[:cut + len(stop)]
    for start, end in ((1, 6), (0, 3), (2, 9)):  # stops longer than the text so far too
        stop = full.text[start:end]
        out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                       stop=(stop, "never-seen-stop")))[0]
        assert (out.text, out.stop_reason) == (full.text[:full.text.index(stop)], stop)
    text_prompt = engine.generate([tok.decode(prompt)], SamplingParams(max_tokens=3,
                                                                       temperature=0.0))[0]
    assert text_prompt.num_prompt_tokens == len(prompt)


# ---------------------------------------------------------------------- abort and errors


def test_abort_frees_kv_blocks_and_the_adapter_reference(env: dict[str, Any]) -> None:
    engine = _engine(env)
    reg = env["reg"]
    engine.add_request("a", prompts(1, seed=12)[0], SamplingParams(max_tokens=50), "r8-rslora")
    engine.add_request("b", prompts(1, seed=13)[0], SamplingParams(max_tokens=50), "r8-rslora")
    for _ in range(3):
        engine.step()
    assert reg.get("r8-rslora").refcount == 2 and engine.kv.allocator.num_used > 0
    final = engine.abort("a")
    assert final is not None and final.finished and final.finish_reason == "abort"
    assert reg.get("r8-rslora").refcount == 1
    engine.abort("b")
    assert reg.get("r8-rslora").refcount == 0 and engine.kv.allocator.num_used == 0
    assert engine.abort("a") is None and not engine.has_unfinished()
    # Aborting a request that never ran releases nothing it did not take.
    engine.add_request("c", [5, 6, 7], SamplingParams(max_tokens=4), "r4-attn")
    engine.abort("c")
    assert reg.get("r4-attn").refcount == 0


def test_unknown_adapter_is_an_error_at_once(env: dict[str, Any]) -> None:
    engine = _engine(env)
    with pytest.raises(AdapterNotFound):
        engine.add_request("x", [5, 6], SamplingParams(), "no-such-adapter")
    assert not engine.has_unfinished()
    with pytest.raises(AdapterNotFound):
        LLMEngine(env["base"], CONFIG).add_request("x", [5, 6], SamplingParams(), "r4-attn")


def test_bad_requests_are_refused(env: dict[str, Any]) -> None:
    engine = _engine(env)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("v", [5, 10_000], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("l", [5] * 300, SamplingParams())  # max_position_embeddings 256
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("t", "text", SamplingParams())
    with pytest.raises(ValueError, match="stop strings"):
        engine.add_request("s", [5], SamplingParams(stop=("x",)))
    engine.add_request("d", [5], SamplingParams())
    with pytest.raises(ValueError, match="already"):
        engine.add_request("d", [6], SamplingParams())


def test_stats(env: dict[str, Any]) -> None:
    engine = _engine(env)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 1 and stats.num_waiting == 0 and stats.kv_cache_usage > 0
    assert stats.prompt_tokens == 3 and stats.generation_tokens == 1


# ---------------------------------------------------------------------- async


def test_async_engine_streams_and_cancellation_aborts(env: dict[str, Any]) -> None:
    engine = _engine(env)
    reg = env["reg"]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    ps = prompts(3, seed=14)
    expected = _engine(env).generate(ps[:2], params, ["r4-attn", None])

    async def collect(prompt: list[int], adapter: str | None) -> RequestOutput:
        return merge_outputs([o async for o in runner.generate(prompt, params, adapter)])

    async def cancelled() -> int:
        seen = 0
        async for _ in runner.generate(ps[2], SamplingParams(max_tokens=200), "r16-all"):
            seen += 1
            if seen == 2:
                break  # closing the stream aborts the request
        return seen

    async def main() -> tuple[list[RequestOutput], int]:
        outs = await asyncio.gather(collect(ps[0], "r4-attn"), collect(ps[1], None))
        seen = await cancelled()
        with pytest.raises(AdapterNotFound):
            async for _ in runner.generate([5], params, "missing"):
                pass
        return list(outs), seen

    runner = AsyncEngine(lambda: engine)  # a factory: the step thread owns the engine
    runner.start()
    try:
        outs, seen = asyncio.run(main())
        for _ in range(200):  # the abort is applied at the next step boundary
            if not engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.01))
    finally:
        runner.shutdown()
    assert runner.engine is engine
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    assert all(o.finished for o in outs) and seen == 2
    assert not engine.has_unfinished() and engine.kv.allocator.num_used == 0
    assert reg.get("r16-all").refcount == 0


def test_async_engine_reports_a_failing_factory() -> None:
    def broken() -> LLMEngine:
        raise RuntimeError("no model here")

    with pytest.raises(RuntimeError, match="no model here"):
        AsyncEngine(broken).start(timeout=10)


# ---------------------------------------------------------------------- architectures


def _arch_model(kind: str) -> Any:
    import transformers as tf

    common: dict[str, Any] = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
                                  "max_position_embeddings": 256, "initializer_range": 0.15,
                                  "tie_word_embeddings": False}
    config = {
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "llama3-rope": lambda: tf.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "yarn-rope": lambda: tf.LlamaConfig(**common, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        "linear-rope": lambda: tf.LlamaConfig(**common, rope_scaling={
            "rope_type": "linear", "factor": 2.0}),
    }[kind]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases and norm weights are 0 / 1 at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "llama3-rope", "yarn-rope",
                                  "linear-rope"])
def test_other_architectures_match_transformers(kind: str) -> None:
    model = _arch_model(kind)
    ps = prompts(4, seed=15, low=3, high=60)
    engine = LLMEngine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=32,
                                           kv_cache_tokens=1024, block_size=8))
    outs = engine.generate(ps, SamplingParams(max_tokens=10, temperature=0.0))
    assert [o.token_ids for o in outs] == [greedy(model, p, 10) for p in ps]


def test_unsupported_architectures_are_refused() -> None:
    import transformers as tf

    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="'gpt2' is not supported"):
        LLMEngine(gpt2, CONFIG)
    dynamic = tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        vocab_size=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(UnsupportedModel, match="dynamic"):
        LLMEngine(dynamic, CONFIG)
