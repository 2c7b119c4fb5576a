"""The default model's conversion shows one progress bar that advances over its stages.

A tiny Llama GGUF file, written here with the `gguf` package (a byte-level vocabulary, two
layers of float32 tensors), converts in a few seconds; the real 135M conversion is tested once,
in test_default_model.py.
"""

from __future__ import annotations

import io
import os
import re
import select
from pathlib import Path

import numpy as np
import pytest
import torch

from loramux.engine import default_model

LAYERS = 2
HIDDEN, HEADS, KV_HEADS, FFN = 64, 4, 2, 128
TENSORS = 1 + 9 * LAYERS + 1  # embeddings, 9 per layer, the final norm (tied output)


def write_tiny_gguf(path: Path) -> Path:
    """A Llama GGUF file transformers loads: config keys, a GPT-2 style tokenizer, tensors."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer = gguf.GGUFWriter(str(path), "llama")
    tokens = [*bytes_to_unicode().values(), "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])  # 3: control tokens
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", len(tokens), HIDDEN)
    kv = KV_HEADS * HIDDEN // HEADS
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", kv, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", kv, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q0.gguf")


def _percents(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"converting:\s+(\d+)%", text)]


def test_bar_advances_over_every_stage(tiny_gguf: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Not a terminal (a CI log): one line per step, rising to 100%, every tensor reported,
    and transformers' own bars silent; the hooks are undone afterwards."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    reader, loader_tqdm = gguf.GGUFReader, loader.tqdm
    reported: list[tuple[int, int]] = []
    tensor_done = default_model._Progress.tensor_done

    def spy(self: default_model._Progress, done: int, total: int) -> None:
        reported.append((done, total))
        tensor_done(self, done, total)

    monkeypatch.setattr(default_model._Progress, "tensor_done", spy)
    log = io.StringIO()
    target = default_model.convert_gguf(tiny_gguf, tmp_path / "out", stream=log)

    lines = log.getvalue().splitlines()
    percents = _percents(log.getvalue())
    assert len(lines) == len(percents) >= 8, lines  # no carriage-return redraws in a log
    assert percents == sorted(percents) and percents[-1] == 100
    assert len(set(percents)) >= 7, lines
    for stage in ("importing transformers", "parsing the GGUF metadata",
                  "building the tokenizer", "mapping tensor names", "dequantizing tensors",
                  "writing safetensors", "done"):
        assert any(line.endswith(stage) for line in lines), (stage, lines)
    assert reported == [(i, TENSORS) for i in range(1, TENSORS + 1)]
    err = capsys.readouterr().err
    for theirs in ("Converting and de-quantizing", "Loading weights", "Writing model shards"):
        assert theirs not in err
    assert gguf.GGUFReader is reader and loader.tqdm is loader_tqdm
    assert (target / "model.safetensors").is_file() and default_model.is_converted(target)


def test_converted_model_is_what_transformers_loads(tiny_gguf: Path, tmp_path: Path) -> None:
    """The hooks only watch: the saved weights equal a plain, un-hooked GGUF load."""
    from transformers import AutoModelForCausalLM

    target = default_model.convert_gguf(tiny_gguf, tmp_path / "out", progress=False)
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(target)
    assert getattr(converted.config, "quantization_config", None) is None
    expected, got = direct.state_dict(), converted.state_dict()
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


def test_no_progress_writes_nothing(tiny_gguf: Path, tmp_path: Path) -> None:
    log = io.StringIO()
    default_model.convert_gguf(tiny_gguf, tmp_path / "out", progress=False, stream=log)
    assert log.getvalue() == ""


def test_bar_shows_on_a_terminal_without_a_size() -> None:
    """A fresh pseudo-terminal reports 0 x 0, where tqdm hides its bars and prints only
    empty lines (the blank first `make serve`): ours is drawn, on 80 columns."""
    try:
        master, slave = os.openpty()
    except OSError as exc:  # a sandbox without pseudo-terminals
        pytest.skip(f"no pseudo-terminal: {exc}")
    try:
        with os.fdopen(os.dup(slave), "w") as stream:
            bar = default_model._Progress("converting", enabled=True, stream=stream)
            bar.reach(40.0, "loading the model")
            bar.close()
        text = b""
        while select.select([master], [], [], 0.5)[0]:
            text += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    shown = text.decode()
    assert "\r" in shown  # redrawn in place, as on any terminal
    assert " 40%|" in shown and "loading the model" in shown
    assert max(len(line) for line in shown.replace("\r", "\n").splitlines()) <= 80
