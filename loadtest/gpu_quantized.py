"""gpu_check section on bitsandbytes bases: loramux's greedy tokens against PEFT's on the very
same nf4 / int8 modules (skipped where bitsandbytes does not import, as on the lent GPUs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loramux.loadtest.gpu_check import Context, SectionSkipped, check
from loramux.loadtest.gpu_engine import RANK, Setup, prompts, setup


def quantized(ctx: Context) -> dict[str, Any]:
    """nf4 and int8 bases (bitsandbytes, as `--quantization` loads them): loramux's greedy
    tokens against PEFT's on the very same quantized modules, a few mixed-adapter prompts."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise SectionSkipped(f"bitsandbytes does not import: {type(exc).__name__}: "
                             f"{str(exc)[:200]}") from None
    from loramux.adapters.config import RegistryConfig
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.types import BaseSpec
    from loramux.engine.config import EngineConfig
    from loramux.engine.engine import LLMEngine
    from loramux.engine.sampling_params import SamplingParams
    from loramux.loadtest.gpu_models import llama_config, random_model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    s = setup(ctx)
    p = s.plan
    layers = 2
    config = llama_config(p.shape, layers=layers, initializer_range=0.15 if ctx.cpu else 0.02)
    folder = ctx.scratch / "quantized-base"
    random_model(config, ctx.device, p.dtype, seed=1).save_pretrained(folder)
    names = s.names[:4]
    results: dict[str, Any] = {}
    checks = {}
    for quant in ("nf4", "int8"):
        if ctx.out_of_time(reserve=5):
            results[quant] = {"status": "skipped", "reason": "out of time"}
            continue
        try:
            qconfig = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=p.dtype)
                       if quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=p.dtype, device_map={"": ctx.device},
                quantization_config=qconfig).eval()
            if ctx.cpu:  # bitsandbytes' exact float32 path (tests/test_engine_peft.py)
                for module in model.modules():
                    if hasattr(module, "support_avx512bf16_for_cpu"):
                        module.support_avx512bf16_for_cpu = False
            # Layers of the quantized base only: the shared registry's adapters are for
            # another depth, so this section loads its own copies with layers cut.
            registry = AdapterRegistry(
                RegistryConfig(max_gpu_adapters=4, max_cpu_adapters=4, max_lora_rank=RANK),
                BaseSpec.from_hf_config(config), ctx.device, p.dtype)
            registry.start()
            paths = _cut_adapters(s, names, layers, ctx.scratch / f"q-{quant}")
            for adapter, path in paths.items():
                registry.load(adapter, path, trusted=True)
            engine = LLMEngine(model, EngineConfig(max_num_seqs=8, kv_cache_tokens=4096),
                               adapters=registry)
            # The engine first (it keeps references to the quantized modules), then PEFT
            # wraps the same modules before anything runs.
            peft = PeftModel.from_pretrained(model, str(paths[names[0]]), adapter_name=names[0])
            for adapter in names[1:]:
                peft.load_adapter(str(paths[adapter]), adapter_name=adapter)
            peft.eval()
            cases = prompts(p, len(names) + 1, config.vocab_size, seed=7)
            which: list[str | None] = [*names, None]
            params = SamplingParams(max_tokens=8, min_tokens=8, temperature=0.0)
            ours = [o.token_ids for o in engine.generate(cases, params, which)]
            theirs = []
            for prompt, name in zip(cases, which):
                ids = torch.tensor([prompt], device=ctx.device)
                with torch.inference_mode():
                    if name is None:
                        with peft.disable_adapter():
                            out = peft.generate(input_ids=ids, max_new_tokens=8,
                                                min_new_tokens=8, do_sample=False,
                                                pad_token_id=0)
                    else:
                        peft.set_adapter(name)
                        out = peft.generate(input_ids=ids, max_new_tokens=8,
                                            min_new_tokens=8, do_sample=False, pad_token_id=0)
                theirs.append(out[0, len(prompt):].tolist())
            same = sum(a == b for a, b in zip(ours, theirs))
            results[quant] = {"status": "ok", "same_greedy_tokens": f"{same}/{len(cases)}"}
            if quant == "nf4":  # int8 is reported only: bitsandbytes' int8 matmul rounds
                checks["nf4_same_tokens_as_peft"] = check(  # activations to float16
                    f"{same}/{len(cases)}", "every request's greedy tokens equal PEFT's",
                    same == len(cases))
            registry.close()
            del engine, peft, model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as exc:
            results[quant] = {"status": "error", "error": f"{type(exc).__name__}: "
                                                          f"{str(exc)[:300]}"}
    return {"layers": layers, "results": results, "checks": checks}


def _cut_adapters(s: Setup, names: list[str], layers: int, root: Path) -> dict[str, Path]:
    """Copies of the shared adapters keeping their first `layers` layers."""
    import json

    from safetensors.torch import load_file, save_file

    out = {}
    for name in names:
        src = s.paths[name]
        tensors = {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items()
                   if int(k.split(".layers.")[1].split(".")[0]) < layers}
        dst = root / name
        dst.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = json.loads((src / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(config))
        out[name] = dst
    return out
