"""Engine configuration, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from loramux.adapters.config import RegistryConfig

QUANTIZATIONS = ("none", "nf4", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    """What model to run, where, and how large each step and the KV cache may be."""

    model: str | None = None  # a model directory; None: the embedded default model
    quantization: str = "none"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_cache_tokens: int | None = None  # None: sized from free memory (CUDA) or 64k (CPU)
    block_size: int = 16
    # CUDA: decode steps replay CUDA graphs captured by LLMEngine.warm_up; True keeps every
    # step eager (as vLLM's --enforce-eager). The CPU always runs eagerly.
    enforce_eager: bool = False
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.block_size < 1:
            raise ValueError("block_size must be positive")
