"""A tiny random Llama saved as a model folder with a character tokenizer and a chat template.

The tokenizer maps each printable ASCII character (plus newline and tab) to one token and has
ChatML special tokens, so any token sequence decodes to text that is exactly the concatenation
of its tokens' texts: outputs compared as text are compared token for token. Built offline
with `tokenizers`, in milliseconds.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from adapter_factory import tiny_base, tiny_llama_config

SPECIALS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\r\x0b\x0c"))
    vocab = {ch: i for i, ch in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", eos_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(path: Path, *, max_positions: int = 1024) -> tuple[Path, Any, Any]:
    """Write the model folder; returns (path, transformers config, tokenizer)."""
    tokenizer = char_tokenizer()
    config = tiny_llama_config(vocab=len(tokenizer), max_positions=max_positions)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = tiny_base(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path, config, tokenizer


@torch.no_grad()
def greedy_reference(model: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by a transformers/PEFT model with its own KV cache, never stopping
    at EOS (the server is asked for `ignore_eos`)."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    ids = [int(torch.argmax(out.logits[0, -1]))]
    for _ in range(max_tokens - 1):
        out = model(torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values,
                    use_cache=True)
        ids.append(int(torch.argmax(out.logits[0, -1])))
    return ids
