"""The Llama-family model runner: our own forward over one flat batch of tokens.

transformers loads config, weights (plain or bitsandbytes-quantized) and the rotary embedding;
this module keeps references to the loaded modules and runs them over a flat token batch with
a paged KV cache, so any mix of prefill and decode rows of different requests is one forward.
Supported: llama (incl. SmolLM), mistral, qwen2 (qkv bias: the projection modules carry it),
qwen3 (q_norm / k_norm on each head). Everything else is refused at load.

Reading order of `forward` (gpt-fast style, shapes in comments):
    h = embed(ids)                                       [T, H]
    per layer:  h += o_proj(attn(rope(q_proj(norm h)), rope(k_proj(.)), v_proj(.)))
                h += down_proj(act(gate_proj(norm h)) * up_proj(norm h))
    logits = lm_head(norm(h)[sample_rows])               [B, V] float32
Each projection is `module(x)` then `lora.apply(x, out, ...)` when the step has adapters.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from loramux.adapters.types import MODULES
from loramux.engine.attention import (
    AttentionMetadata,
    build_metadata,
    paged_attention_torch,
    store_kv,
)
from loramux.engine.config import EngineConfig
from loramux.engine.kv_cache import KVCache
from loramux.engine.lora import LoraBackend, LoraMeta, SlotGroup
from loramux.engine.scheduler import ScheduledSeq
from torch import nn

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
Q, K, V, O, GATE, UP, DOWN = range(len(MODULES))

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float],
                       torch.Tensor]


class UnsupportedModel(ValueError):
    """The checkpoint is not a Llama-family decoder this runner can execute."""


@dataclass(frozen=True)
class ModelShape:
    """Sizes the engine needs, read once from the transformers config."""

    model_type: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    max_model_len: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(f"{self.num_heads} attention heads are not a multiple of "
                                   f"{self.num_kv_heads} key/value heads")


def check_supported(config: Any) -> ModelShape:
    """Refuse what the runner cannot execute, naming the reason; return the model's sizes.

    A sliding window is respected by capping the context length at the window (within it,
    windowed and full attention agree).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model type {model_type!r} is not supported; loramux runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-family decoders, SmolLM included)")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in _STATIC_ROPE_TYPES:
        raise UnsupportedModel(f"RoPE scaling type {rope_type!r} is not supported (supported: "
                               f"{', '.join(_STATIC_ROPE_TYPES)})")
    heads = int(config.num_attention_heads)
    max_len = int(config.max_position_embeddings)
    window: int | None = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    windowed = model_type == "mistral" or "sliding_attention" in layer_types
    if windowed and window is not None and window < max_len:
        log.warning("sliding window %d < max_position_embeddings %d: capping the context "
                    "length at the window", window, max_len)
        max_len = int(window)
    return ModelShape(
        model_type=model_type,
        num_layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        vocab=int(config.vocab_size),
        max_model_len=max_len,
    )


@dataclass(frozen=True)
class DecoderLayer:
    """References to one loaded decoder layer's modules; projections in MODULES order."""

    input_norm: nn.Module
    post_norm: nn.Module
    proj: tuple[nn.Module, ...]  # q, k, v, o, gate, up, down (plain or bitsandbytes Linear)
    act: Callable[[torch.Tensor], torch.Tensor]
    q_norm: nn.Module | None  # qwen3 only
    k_norm: nn.Module | None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Runs a loaded transformers Llama-family model over flat token batches.

    The HF module tree is read once here; later changes to it (e.g. PEFT injecting layers into
    the same object) do not affect the runner. `lora` is None for a base-only engine.
    """

    def __init__(self, hf_model: Any, kv: KVCache, lora: LoraBackend | None = None, *,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_lora_rank: int = 64, max_model_len: int | None = None,
                 attention: AttentionFn = paged_attention_torch) -> None:
        self.shape = check_supported(hf_model.config)
        if max_model_len is not None:
            self.shape = dataclasses.replace(
                self.shape, max_model_len=min(max_model_len, self.shape.max_model_len))
        inner = hf_model.model
        self.embed: nn.Module = inner.embed_tokens
        self.norm: nn.Module = inner.norm
        self.lm_head: nn.Module = hf_model.lm_head
        self.layers = [self._layer(layer) for layer in inner.layers]
        self.kv = kv
        self.lora = lora
        self.attention = attention
        self.torch_attention = attention is paged_attention_torch  # needs the per-step plan
        self.lora_meta = LoraMeta(max_num_seqs, max_num_batched_tokens, max_lora_rank,
                                  inner.embed_tokens.weight.device) if lora is not None else None
        self.scale = self.shape.head_dim ** -0.5
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        # cos/sin for every position, computed once by the model's own rotary embedding (so
        # linear / llama3 / yarn scaling and attention_scaling are exactly transformers').
        positions = torch.arange(self.shape.max_model_len, device=self.device)[None]
        dummy = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = inner.rotary_emb(dummy, positions)
        self.cos = cos[0]  # [max_len, D]
        self.sin = sin[0]  # [max_len, D]

    def _layer(self, layer: Any) -> DecoderLayer:
        attn, mlp = layer.self_attn, layer.mlp
        projs = tuple(getattr(attn if i < GATE else mlp, name) for i, name in enumerate(MODULES))
        qwen3 = self.shape.model_type == "qwen3"
        return DecoderLayer(
            input_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm,
            proj=projs, act=mlp.act_fn,
            q_norm=attn.q_norm if qwen3 else None, k_norm=attn.k_norm if qwen3 else None)

    def prepare_adapters(self, scheduled: list[ScheduledSeq]) -> None:
        """Let the LoRA backend make the step's adapters usable and order the slot groups.

        `scheduled` comes grouped by slot (the scheduler sorts it); the backend may reorder
        whole groups (GatherLora lays stacked groups out in the order of its stacks), and
        `scheduled` is rearranged in place to match, so each slot stays one segment.
        """
        if self.lora is None or self.lora_meta is None:
            return
        groups: list[list[ScheduledSeq]] = []
        for s in scheduled:
            if groups and groups[-1][0].seq.slot_key == s.seq.slot_key:
                groups[-1].append(s)
            else:
                groups.append([s])
        order = self.lora.prepare(
            [SlotGroup(g[0].seq.slot_key, g[0].seq.adapter if g[0].seq.slot_key >= 0 else None,
                       sum(s.num_tokens for s in g)) for g in groups],
            self.lora_meta)
        scheduled[:] = [s for i in order for s in groups[i]]

    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Forward the step's tokens; float32 logits [B, V] of the sampling sequences, in order."""
        ids: list[int] = []
        sample_rows: list[int] = []
        for s in scheduled:
            ids += s.seq.token_ids[s.start:s.start + s.num_tokens]
            if s.samples:
                sample_rows.append(len(ids) - 1)
        attn = build_metadata(
            query_lens=[s.num_tokens for s in scheduled],
            context_lens=[s.start + s.num_tokens for s in scheduled],
            block_tables=[s.seq.block_table for s in scheduled],
            block_size=self.kv.block_size, device=self.device,
            torch_plan=self.torch_attention)
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)  # [T]
        rows = torch.tensor(sample_rows, dtype=torch.int64, device=self.device)  # [B]
        return self.forward(input_ids, attn, self.lora_meta, rows)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attn: AttentionMetadata, lora: LoraMeta | None,
                sample_rows: torch.Tensor) -> torch.Tensor:
        """Logits of the rows in `sample_rows`.

        input_ids int64 [T] (positions in attn.positions); sample_rows int64 [B];
        returns float32 [B, V].
        """
        positions = attn.positions  # [T]
        num_tokens = input_ids.shape[0]
        sh = self.shape
        use_lora = lora if lora is not None and lora.active else None
        h = self.embed(input_ids)  # [T, H]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)  # [T, 1, D]
        for i, layer in enumerate(self.layers):
            residual = h
            x = layer.input_norm(h)  # [T, H]
            q = self._proj(layer, i, Q, x, use_lora).view(num_tokens, sh.num_heads, sh.head_dim)
            k = self._proj(layer, i, K, x, use_lora).view(num_tokens, sh.num_kv_heads,
                                                         sh.head_dim)
            v = self._proj(layer, i, V, x, use_lora).view(num_tokens, sh.num_kv_heads,
                                                         sh.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)  # RMSNorm over D, per head
            q = q * cos + _rotate_half(q) * sin  # [T, nH, D]
            k = k * cos + _rotate_half(k) * sin  # [T, nKV, D]
            k_cache, v_cache = self.kv.k[i], self.kv.v[i]  # [NB, bs, nKV, D]
            store_kv(k, v, k_cache, v_cache, attn.slot_mapping)
            o = self.attention(q, k_cache, v_cache, attn, self.scale)  # [T, nH, D]
            h = residual + self._proj(layer, i, O, o.reshape(num_tokens, -1), use_lora)
            residual = h
            x = layer.post_norm(h)  # [T, H]
            gate = self._proj(layer, i, GATE, x, use_lora)  # [T, I]
            up = self._proj(layer, i, UP, x, use_lora)  # [T, I]
            h = residual + self._proj(layer, i, DOWN, layer.act(gate) * up, use_lora)  # [T, H]
        h = self.norm(h.index_select(0, sample_rows))  # [B, H] (RMSNorm is per row)
        return self.lm_head(h).float()  # [B, V]

    def _proj(self, layer: DecoderLayer, index: int, module: int, x: torch.Tensor,
              lora: LoraMeta | None) -> torch.Tensor:
        out = layer.proj[module](x)  # [T, out]
        if lora is not None:
            assert self.lora is not None
            self.lora.apply(x, out, lora, index, module)
        return out


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)  # type: ignore[no-any-return]


def load_hf_model(config: EngineConfig) -> tuple[Any, Any]:
    """(model, tokenizer) for config.model (None: the embedded default model), on the
    configured device and dtype, quantized with bitsandbytes if asked. The architecture is
    checked before any weight is read."""
    from loramux.engine.default_model import ensure_default_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = config.model if config.model is not None else str(ensure_default_model())
    if not Path(path).is_dir():
        # transformers reads anything else as a hub name; with the hub off (loramux.offline)
        # that fails with a repo-id or "couldn't connect to huggingface.co" message instead.
        raise FileNotFoundError(f"no model directory at {path!r}: loramux loads the base "
                                "model from a local folder only, never from a hub")
    check_supported(AutoConfig.from_pretrained(path))
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config.quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=dtype)
            if config.quantization == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config.quantization == "none":
        model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
