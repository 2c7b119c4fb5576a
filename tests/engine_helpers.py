"""Shared set-up of the engine tests: tiny Llama-family models whose greedy outputs are not
near ties, a varied set of real PEFT adapters, PEFT/HF greedy references, a toy tokenizer.

Weights are drawn with initializer_range 0.15 (transformers' default 0.02 gives logits so flat
that float rounding could flip a greedy choice); adapters get B ~ N(0, 0.15) so that every one
of them changes the greedy output of the base.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from adapter_factory import make_adapter, tiny_base, tiny_llama_config

VOCAB = 512
INIT_STD = 0.15
MAX_NEW = 12

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + MLP

# name -> make_adapter keywords: ranks 4..64, attention-only / MLP-only / all projections,
# rsLoRA, rank_pattern, alpha_pattern, layers_to_transform.
ADAPTERS: dict[str, dict[str, Any]] = {
    "r4-attn": {"rank": 4, "alpha": 8, "target_modules": ATTN},
    "r8-mlp": {"rank": 8, "alpha": 16, "target_modules": MLP},
    "r16-all": {"rank": 16, "alpha": 16, "target_modules": ALL},
    "r64-all": {"rank": 64, "alpha": 32, "target_modules": ALL, "b_std": 0.05},
    "r8-rslora": {"rank": 8, "alpha": 8, "target_modules": ALL, "use_rslora": True},
    "r32-qv-rslora": {"rank": 32, "alpha": 16, "target_modules": ("q_proj", "v_proj"),
                          "use_rslora": True},
    "r8-rank-pattern": {"rank": 8, "alpha": 16, "target_modules": ALL,
                            "rank_pattern": {"layers.1.self_attn.q_proj": 24, "down_proj": 4}},
    "r16-alpha-pattern": {"rank": 16, "alpha": 16, "target_modules": ALL,
                              "alpha_pattern": {"o_proj": 64, "layers.0.mlp.up_proj": 2}},
    "r12-both-patterns": {"rank": 12, "alpha": 24, "target_modules": ("k_proj", "v_proj", "up_proj"),
                              "use_rslora": True, "rank_pattern": {"v_proj": 6},
                              "alpha_pattern": {"up_proj": 40}},
    "r8-layer1-only": {"rank": 8, "alpha": 16, "target_modules": ALL, "layers_to_transform": [1]},
}


def tiny_config(layers: int = 2) -> Any:
    """hidden 64, 4 heads over 2 KV heads (GQA), vocab 512."""
    cfg = tiny_llama_config(layers=layers, vocab=VOCAB, max_positions=256)
    cfg.initializer_range = INIT_STD
    return cfg


def tiny_model(cfg: Any, seed: int = 0) -> Any:
    return tiny_base(cfg, seed=seed)


def make_adapters(root: Path, cfg: Any, names: list[str] | None = None) -> dict[str, Path]:
    paths = {}
    for i, name in enumerate(names or list(ADAPTERS)):
        kwargs = {"b_std": 0.15, **ADAPTERS[name]}
        paths[name] = make_adapter(root / name, cfg, seed=100 + i, **kwargs)
    return paths


def peft_model(base: Any, paths: dict[str, Path]) -> Any:
    """One PeftModel holding every adapter (set_adapter picks one; each runs alone)."""
    from peft import PeftModel

    names = list(paths)
    model = PeftModel.from_pretrained(base, str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    return model.eval()


def greedy(model: Any, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy generate of one unpadded prompt: the new tokens."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=max_new,
                             do_sample=False, attention_mask=torch.ones(1, len(prompt),
                                                                        dtype=torch.long))
    return [int(t) for t in out[0, len(prompt):]]


def peft_greedy(pm: Any, adapter: str | None, prompt: list[int],
                max_new: int = MAX_NEW) -> list[int]:
    """PEFT's greedy tokens with `adapter` alone (None: adapters disabled, the base)."""
    if adapter is None:
        with pm.disable_adapter():
            return greedy(pm, prompt, max_new)
    pm.set_adapter(adapter)
    return greedy(pm, prompt, max_new)


def prompts(n: int, seed: int = 0, low: int = 3, high: int = 20) -> list[list[int]]:
    """n random prompts of random lengths in [low, high] (ids 3.. avoid bos/eos)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, VOCAB, (k,), generator=gen).tolist() for k in lengths]


def deep(model: Any) -> Any:
    return copy.deepcopy(model)


class ToyTokenizer:
    """Each id is one character (a printable letter cycle); enough for stop-string tests."""

    eos_token_id = 2
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,"

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("" if skip_special_tokens and i == self.eos_token_id
                       else self.alphabet[i % len(self.alphabet)] for i in ids)

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(c) + 3 * len(self.alphabet) for c in text]
