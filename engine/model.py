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
The inputs come from buffers allocated once and refilled each step (engine/graphs.py), so a
padded decode step can replay a CUDA graph.
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
from loramux.engine.attention import AttentionMetadata, paged_attention_torch, store_kv
from loramux.engine.config import EngineConfig
from loramux.engine.graphs import DecodeGraphs, StepInputs, bucket_of, decode_buckets
from loramux.engine.kv_cache import KVCache, blocks_for
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

    Every step's inputs go through buffers allocated once (`StepInputs`, `LoraMeta`). A decode
    step (every sequence one new token, each sampling) of at most `buckets[-1]` sequences is
    padded to its bucket, and replays that bucket's CUDA graph once `capture_graphs` ran (on
    the CPU, or without graphs, the same padded inputs run eagerly).
    """

    def __init__(self, hf_model: Any, kv: KVCache, lora: LoraBackend | None = None, *,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_lora_rank: int = 64, max_model_len: int | None = None,
                 attention: AttentionFn = paged_attention_torch,
                 enforce_eager: bool = False) -> None:
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
        self.scale = self.shape.head_dim ** -0.5
        self.dtype = self.embed.weight.dtype
        self.device = self.embed.weight.device
        self.buckets = decode_buckets(max_num_seqs)
        # a padded decode has buckets[-1] == max_num_seqs rows, which may pass the token budget
        max_rows = max(max_num_batched_tokens, max_num_seqs)
        self.inputs = StepInputs(max_num_seqs, max_rows,
                                 blocks_for(self.shape.max_model_len, kv.block_size),
                                 kv.block_size, kv.dummy_block, self.device,
                                 torch_plan=attention is paged_attention_torch)
        self.lora_meta = LoraMeta(max_num_seqs, max_rows, max_lora_rank,
                                  self.device) if lora is not None else None
        # graphs need CUDA, an attention that reads only device tensors (not the torch path)
        # and a LoRA backend that replays (not the stacked CPU one)
        self.can_capture = (self.device.type == "cuda" and not enforce_eager
                            and attention is not paged_attention_torch
                            and (lora is None or lora.graph_safe))
        self.graphs: DecodeGraphs | None = None
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

    # ------------------------------------------------------------------ a step

    def bucket_for(self, scheduled: list[ScheduledSeq]) -> int | None:
        """The batch bucket a decode step is padded to; None: the step runs as it is."""
        if not all(s.num_tokens == 1 and s.samples for s in scheduled):
            return None
        return bucket_of(len(scheduled), self.buckets)

    def prepare_adapters(self, scheduled: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """The step's sequences in row order, after the LoRA backend made their adapters
        usable and filled the segment metadata for that order.

        `scheduled` comes grouped by slot (the scheduler sorts it) and is not changed; the
        backend may reorder whole groups (StackedLora lays stacked groups out in the order of
        its stacks), so each slot stays one segment. Pass the returned list to `run`.
        """
        if self.lora is None or self.lora_meta is None:
            return scheduled
        groups: list[list[ScheduledSeq]] = []
        for s in scheduled:
            if groups and groups[-1][0].seq.slot_key == s.seq.slot_key:
                groups[-1].append(s)
            else:
                groups.append([s])
        order = self.lora.prepare(
            [SlotGroup(g[0].seq.slot_key, g[0].seq.adapter if g[0].seq.slot_key >= 0 else None,
                       sum(s.num_tokens for s in g)) for g in groups],
            self.lora_meta, self.bucket_for(scheduled))
        return [s for i in order for s in groups[i]]

    def run(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Forward the step's tokens (`scheduled` in row order, from `prepare_adapters`);
        float32 logits [B, V] of the sampling sequences, in order."""
        bucket = self.bucket_for(scheduled)
        num_tokens = sum(s.num_tokens for s in scheduled)
        rows, seqs = (bucket, bucket) if bucket is not None else (num_tokens, len(scheduled))
        num_samples = self.inputs.fill(scheduled, rows, seqs)
        lora = self.lora_meta is not None and self.lora_meta.active
        if bucket is not None:
            logits = self.graphs.replay(bucket, lora) if self.graphs is not None else None
            if logits is None:
                logits = self._decode(bucket, lora)
            return logits[:len(scheduled)]  # [B, V]; padding rows dropped
        attn = self.inputs.attention(rows, seqs, max(s.num_tokens for s in scheduled),
                                     max(s.start + s.num_tokens for s in scheduled))
        return self.forward(self.inputs.input_ids.dev[:rows], attn,
                            self.lora_meta if lora else None,
                            self.inputs.sample_rows.dev[:num_samples])

    def _decode(self, bucket: int, lora: bool) -> torch.Tensor:
        """The forward of a padded decode step over the static buffers: what a graph records.
        Logits [bucket, V] of every row."""
        attn = self.inputs.attention(bucket, bucket, 1, self.shape.max_model_len)
        return self.forward(self.inputs.input_ids.dev[:bucket], attn,
                            self.lora_meta if lora else None,
                            self.inputs.sample_rows.dev[:bucket])

    def capture_graphs(self) -> None:
        """Capture a CUDA graph of the padded decode step per bucket, LoRA on and off (CUDA
        without enforce_eager only; otherwise decode steps stay eager)."""
        if not self.can_capture or self.graphs is not None:
            return
        graphs = DecodeGraphs(self._decode, self.buckets, lora=self.lora_meta is not None)
        graphs.capture(self._fill_padding)
        self.graphs = graphs

    def _fill_padding(self, bucket: int) -> None:
        """A step of `bucket` padding rows in the static buffers (graph capture's inputs)."""
        self.inputs.fill([], bucket, bucket)
        if self.lora_meta is not None:
            self.lora_meta.fill([], bucket)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attn: AttentionMetadata, lora: LoraMeta | None,
                sample_rows: torch.Tensor) -> torch.Tensor:
        """Logits of the rows in `sample_rows`; LoRA applied iff `lora` is given.

        input_ids int64 [T] (positions in attn.positions); sample_rows int64 [B];
        returns float32 [B, V].
        """
        positions = attn.positions  # [T]
        num_tokens = input_ids.shape[0]
        sh = self.shape
        h = self.embed(input_ids)  # [T, H]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)  # [T, 1, D]
        for i, layer in enumerate(self.layers):
            residual = h
            x = layer.input_norm(h)  # [T, H]
            q = self._proj(layer, i, Q, x, lora).view(num_tokens, sh.num_heads, sh.head_dim)
            k = self._proj(layer, i, K, x, lora).view(num_tokens, sh.num_kv_heads, sh.head_dim)
            v = self._proj(layer, i, V, x, lora).view(num_tokens, sh.num_kv_heads, sh.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)  # RMSNorm over D, per head
            q = q * cos + _rotate_half(q) * sin  # [T, nH, D]
            k = k * cos + _rotate_half(k) * sin  # [T, nKV, D]
            k_cache, v_cache = self.kv.k[i], self.kv.v[i]  # [2 + NB, bs, nKV, D]
            store_kv(k, v, k_cache, v_cache, attn.slot_mapping)
            o = self.attention(q, k_cache, v_cache, attn, self.scale)  # [T, nH, D]
            h = residual + self._proj(layer, i, O, o.reshape(num_tokens, -1), lora)
            residual = h
            x = layer.post_norm(h)  # [T, H]
            gate = self._proj(layer, i, GATE, x, lora)  # [T, I]
            up = self._proj(layer, i, UP, x, lora)  # [T, I]
            h = residual + self._proj(layer, i, DOWN, layer.act(gate) * up, lora)  # [T, H]
        h = self.norm(h.index_select(0, sample_rows))  # [B, H] (RMSNorm is per row)
        return self.lm_head(h).float()  # [B, V]

    def _proj(self, layer: DecoderLayer, index: int, module: int, x: torch.Tensor,
              lora: LoraMeta | None) -> torch.Tensor:
        out = layer.proj[module](x)  # [T, out]
        if lora is not None:
            self.lora.apply(x, out, lora, index, module)  # type: ignore[union-attr]
        return out


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)  # type: ignore[no-any-return]


class _FirstOnly(logging.Filter):
    """Lets through the first record that starts with `prefix`, drops the later ones."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


def _warn_once(logger_name: str, prefix: str) -> None:
    """bitsandbytes' int8 matmul logs that it casts its input to float16 on every forward of
    every layer (a line per projection per step for any input that is not float16): say it
    once per process."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _FirstOnly) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_FirstOnly(prefix))


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
    if config.quantization == "int8":
        _warn_once("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
