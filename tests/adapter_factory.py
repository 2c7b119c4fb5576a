"""Tiny random Llama bases and real PEFT adapters on disk, for tests and benchmarks.

Everything here goes through transformers and peft themselves, so an adapter made here is
byte-for-byte what a user's `save_pretrained` writes. PEFT initialises lora_B to zero, which
makes every fresh adapter a no-op; `make_adapter` overwrites A and B with seeded random values
so that applying the wrong adapter, scale or slot shows up in the numbers.

Typical use:

    cfg = tiny_llama_config()                      # hidden 64, 2 layers
    spec = base_spec(cfg)                          # what the registry validates against
    path = make_adapter(tmp_path / "a", cfg, rank=4, target_modules=("q_proj", "v_proj"))
    peft_model = load_peft_model(tiny_base(cfg), path)   # PEFT's own view, for reference

Helpers that break an adapter on purpose (`edit_config`, `rewrite_tensors`) live here too, so
the validation tests and the engine tests make malformed adapters the same way.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loramux.adapters.types import MODULE_PARENTS, MODULES, BaseSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def tiny_llama_config(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    max_positions: int = 256,
) -> Any:
    """A LlamaConfig small enough that a forward pass takes milliseconds on a CPU."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def base_spec(config: Any) -> BaseSpec:
    """The registry's view of a base with this transformers config."""
    return BaseSpec.from_hf_config(config)


def tiny_base(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A randomly initialised LlamaForCausalLM (eval mode) for `config`, same weights per seed."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


_BASES: dict[tuple[str, int], Any] = {}


def _shared_base(config: Any) -> Any:
    """One pristine base per config, deep-copied per adapter: building models is the slow part."""
    key = (config.to_json_string(), 0)
    if key not in _BASES:
        _BASES[key] = tiny_base(config)
    return copy.deepcopy(_BASES[key])


def make_adapter(
    path: Path,
    config: Any,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: Iterable[str] | str = MODULES,
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    layers_to_transform: list[int] | None = None,
    seed: int = 0,
    a_std: float | None = None,
    b_std: float = 0.05,
    **lora_config: Any,
) -> Path:
    """Write a real PEFT LoRA adapter for a base of `config` to `path` and return `path`.

    The adapter is made with `peft.get_peft_model` + `save_pretrained`, so keys, config fields
    and dtypes are exactly PEFT's. A is drawn from N(0, a_std) (default 1/sqrt(in)) and B from
    N(0, b_std), both from `seed`, so two adapters with different seeds differ everywhere.
    Extra keyword arguments go to `LoraConfig` unchanged (for example `use_dora=True` to make
    an adapter the registry must refuse).
    """
    from peft import LoraConfig, get_peft_model

    targets: list[str] | str = (
        target_modules if isinstance(target_modules, str) else list(target_modules)
    )
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=targets,
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        layers_to_transform=layers_to_transform,
        **{"lora_dropout": 0.0, **lora_config},
    )
    model = get_peft_model(_shared_base(config), lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                std = a_std if a_std is not None else 1.0 / math.sqrt(param.shape[1])
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    return path


def load_peft_model(base: Any, path: Path) -> Any:
    """PEFT's own model for the adapter at `path` on a copy of `base` (the numeric reference)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def _peft_layer(peft_model: Any, layer: int, module: str) -> Any:
    decoder = peft_model.base_model.model.model.layers[layer]
    return getattr(getattr(decoder, MODULE_PARENTS[module]), module)


def peft_scaling(peft_model: Any, layer: int, module: str) -> float:
    """The scaling PEFT computed for one (layer, module), e.g. alpha/sqrt(r) under rsLoRA."""
    return float(_peft_layer(peft_model, layer, module).scaling["default"])


def peft_weights(peft_model: Any, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A [r, in], lora_B [out, r]) for one (layer, module), detached copies."""
    target = _peft_layer(peft_model, layer, module)
    return (
        target.lora_A["default"].weight.detach().clone(),
        target.lora_B["default"].weight.detach().clone(),
    )


def read_config(path: Path) -> dict[str, Any]:
    """The adapter's adapter_config.json as a dict."""
    return json.loads((path / CONFIG_FILE).read_text())


def edit_config(path: Path, **changes: Any) -> Path:
    """Overwrite fields of adapter_config.json (e.g. `use_dora=True`); returns `path`."""
    config = read_config(path)
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return path


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their PEFT key."""
    return load_file(str(path / WEIGHTS_FILE))


def rewrite_tensors(
    path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None]
) -> Path:
    """Apply `edit` to the adapter's tensors (in place or by returning a new dict) and save."""
    tensors = read_tensors(path)
    result = edit(tensors)
    save_file(result if result is not None else tensors, str(path / WEIGHTS_FILE),
              metadata={"format": "pt"})
    return path


def copy_adapter(src: Path, dst: Path) -> Path:
    """A copy of the two PEFT files of `src` under `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst
