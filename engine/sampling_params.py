"""Per-request sampling parameters: OpenAI's, plus vLLM's extensions that benchmarks send."""

from __future__ import annotations

from dataclasses import dataclass

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. Checked once, at the edge.

    temperature 0 (below 1e-5) means greedy. top_k 0 (or -1) means no top-k cut. `seed` makes a request's
    output reproducible whatever else shares its batch. `logprobs` is the number of top
    alternatives to return beside the chosen token's log-probability (None: none at all).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 (off) or positive")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError("presence_penalty must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("frequency_penalty must be in [-2, 2]")
        if self.repetition_penalty <= 0.0:
            raise ValueError("repetition_penalty must be positive")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs must be in [0, 20]")
        if len(self.stop) > 16 or any(not s for s in self.stop):
            raise ValueError("stop must be at most 16 non-empty strings")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            # torch.Generator refuses larger seeds, and it would refuse them mid-step
            raise ValueError("seed must be a 64-bit signed integer")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows to inf and softmax to NaN (vLLM's bound).
        return self.temperature < GREEDY_BELOW
