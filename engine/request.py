"""Request state inside the engine: one `Sequence` per request, and what a step reports.

A sequence's life: WAITING (queued, or preempted) -> RUNNING (has KV blocks, is scheduled each
step) -> FINISHED. Preemption sends a RUNNING sequence back to WAITING with its KV blocks freed
and `num_computed` reset to 0; its tokens so far are kept and recomputed as one long prefill
when it runs again, so a preempted request loses nothing.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from loramux.adapters.types import AdapterRef
from loramux.engine.detokenizer import IncrementalDetokenizer
from loramux.engine.sampler import SamplingState, TopLogprobs
from loramux.engine.sampling_params import SamplingParams
from loramux.engine.stop import StopStringMatcher


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens, KV blocks, adapter reference and output state.

    Invariants (checked where they can break):
      - token_ids = prompt + outputs; 0 <= num_computed <= len(token_ids);
      - len(block_table) * block_size >= num_computed (the KV of computed tokens has rows);
      - holds_adapter <=> this sequence owns one `acquire` of `adapter` not yet released, and
        then `slot` is that acquire's slot. The reference is taken at the first schedule and
        kept until the sequence finishes or is aborted, *including while it is preempted*, so a
        preempted request never waits for its adapter to page in again and the registry never
        evicts an adapter that queued work still needs;
      - parked <=> the sequence gave its reference back mid-run because the registry asked
        (`AdapterSource.park`, for a starving waiter): it keeps its KV blocks and its place,
        holds no slot, and is scheduled again once `acquire(adapter, parked=True)` succeeds;
        never both holds_adapter and parked;
      - a WAITING sequence has no KV blocks.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    arrival: int  # admission order: FCFS key, so older requests (and preempted ones) go first
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer | None = None
    stop: StopStringMatcher | None = None
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    slot: int | None = None
    holds_adapter: bool = False
    parked: bool = False
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    error_code: str | None = None  # machine-readable cause of finish_reason "error"
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def slot_key(self) -> int:
        """Batch grouping key: the adapter slot, -1 for the base model."""
        return self.slot if self.slot is not None else -1


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: deltas since the previous output.

    Concatenating `token_ids` (and `text`) over a request's outputs gives all of its output;
    the last output has finished=True. finish_reason: "stop" (eos, a stop token id or a stop
    string; stop_reason says which, None for eos), "length" (max_tokens or the context length),
    "abort" (aborted by the caller), "error" (error says why, e.g. the adapter was unloaded
    before the request started, and error_code names the cause: "adapter_unavailable" when its
    adapter could not be acquired, "non_finite_logits" when the model's logits for it were NaN
    or infinite). An error is the request's own: the other rows of its steps go on.
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float | None] | None  # chosen-token logprob per new token, if asked
    top_logprobs: list[TopLogprobs | None] | None
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_output_tokens: int  # all output tokens so far, not just this delta
    error: str | None = None
    error_code: str | None = None

    @property
    def usage(self) -> dict[str, int]:
        """OpenAI-style token counts."""
        return {"prompt_tokens": self.num_prompt_tokens,
                "completion_tokens": self.num_output_tokens,
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens}
