"""Incremental detokenization: text deltas that concatenate to the decoded output.

Decoding each new token alone is wrong for SentencePiece/BPE tokenizers (leading spaces,
multi-byte characters split across tokens). As vLLM does, we decode a short window that starts
a few tokens back (`prefix_offset`) and emit only what the window adds beyond the text of the
already-read tokens; a window ending in an incomplete UTF-8 character ("\\ufffd") waits for
the next token.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 5  # prompt tokens kept as left context, enough for any merge rule we know of


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Invariant: the concatenation of every `add` result and `flush` equals
    tokenizer.decode(output ids) for tokenizers whose decoding is prefix-stable.
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int],
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def add(self, token_id: int) -> str:
        """The text this token adds (possibly "" while a character is incomplete)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix = self._read
        self._read = len(self._ids)
        if self._prefix > 8 * _CONTEXT:  # ids before the window are never decoded again
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta
