"""Random-weight Llama models and PEFT adapters of real shapes, made on the spot.

No download and no tokenizer: a benchmark on a bare GPU machine builds the base from a
transformers `LlamaConfig` with the sizes of a real checkpoint (random init directly on the
target device, in the serving dtype) and writes adapters in PEFT's file format with random
A and B, so every adapter changes the output.

    config = llama_config("7b", layers=8)            # Llama-2-7B widths, 8 of its 32 layers
    model = random_model(config, "cuda", torch.bfloat16)
    write_adapter(tmp / "a0", BaseSpec.from_hf_config(config), rank=16, seed=0)

Shapes (`SHAPES`): 7b is Llama-2-7B (hidden 4096, intermediate 11008, 32 heads, no GQA,
vocab 32000), 8b is Llama-3-8B (hidden 4096, intermediate 14336, 8 KV heads: k/v 1024 wide,
vocab 128256), smollm2 is SmolLM2-135M, tiny is a CPU-test size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from loramux.adapters.types import MODULE_PARENTS, MODULES, BaseSpec

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
             "max_position_embeddings": 512},
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "vocab_size": 49152, "max_position_embeddings": 8192,
                "tie_word_embeddings": True},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
           "max_position_embeddings": 4096},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "max_position_embeddings": 8192, "rope_theta": 500000.0},
}


def llama_config(shape: str, *, layers: int | None = None,
                 initializer_range: float | None = None) -> Any:
    """The transformers LlamaConfig of `shape`, with `layers` decoder layers if given."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    kwargs = dict(SHAPES[shape])
    kwargs.setdefault("tie_word_embeddings", False)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if initializer_range is not None:
        kwargs["initializer_range"] = initializer_range
    return LlamaConfig(**kwargs)


def random_model(config: Any, device: torch.device | str, dtype: torch.dtype, *,
                 seed: int = 0) -> Any:
    """A LlamaForCausalLM for `config` with random weights, made on `device` in `dtype` (eval).

    Made under `torch.device(device)`, so the weights are drawn where they live: a 7B base
    in bf16 on a GPU takes about a second, no host copy of it ever exists.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def base_spec(config: Any) -> BaseSpec:
    """The registry's view of a base with this config."""
    return BaseSpec.from_hf_config(config)


def write_adapter(path: Path, base: BaseSpec, rank: int, seed: int, *,
                  modules: tuple[str, ...] = MODULES, b_std: float = 0.01) -> Path:
    """A random PEFT LoRA adapter on `modules` of every layer, as `save_pretrained` lays it out
    (float32 safetensors, PEFT's keys and config). A ~ N(0, 1/in), B ~ N(0, b_std)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base.num_layers):
        for module in modules:
            n_in, n_out = base.shapes[module]
            key = f"base_model.model.model.layers.{layer}.{MODULE_PARENTS[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / n_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * b_std
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False,
              "target_modules": list(modules), "bias": "none", "use_dora": False,
              "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def adapter_numel(base: BaseSpec, rank: int, modules: tuple[str, ...] = MODULES) -> int:
    """Elements of A and B of one adapter of `rank` on `modules` of every layer."""
    return base.num_layers * sum(rank * sum(base.shapes[m]) for m in modules)


__all__ = ["SHAPES", "adapter_numel", "base_spec", "llama_config", "random_model",
           "write_adapter"]
