"""Batched next-token sampler, called once per engine step on the rows that produce a token.

Per step, for each row (one sequence) in this order, as vLLM does:

    x = logits                                   # [B, V] raw model logits
    x[stop ids] = -inf   while num_output < min_tokens          (min_tokens)
    x = apply_penalties(x)                       # repetition, then frequency and presence
    greedy row:  token = argmax(x)               # exactly torch.argmax: matches HF/PEFT greedy
    other rows:  x = x / temperature; min_p; top_k; top_p
                 token = argmax(softmax(x) / q), q ~ Exp(1)     (an exact draw from softmax(x))
    logprobs = log_softmax(logits)               # rows that ask: the RAW logits, as vLLM
                                                 # returns by default (no min_tokens mask,
                                                 # penalties, temperature or filters)

Fast path: with no penalties and no active min_tokens the logits are not even copied, and an
all-greedy batch without logprobs costs one argmax over [B, V], no softmax.

Penalty history: each request owns a `SamplingState` made once from its prompt. It keeps the
prompt's distinct ids (only if repetition_penalty != 1) and its output ids in a buffer sized
max_tokens (only if some penalty is set), both as CPU int64 tensors, so a step never converts
Python lists. Penalties then touch only the (row, token) pairs of those histories: one
`torch.cat`, one host-to-device copy, two `torch.unique` and gather/scatters, O(history) and
never an [B, V] temporary; rows without penalties cost nothing. The same state holds the
request's own generator when it is seeded, and counts its outputs for min_tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from loramux.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


def _penalized(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


class SamplingState:
    """What the sampler needs about one sequence across steps; its request owns it.

    Invariant: `num_output` is the number of tokens drawn so far (the sampler appends each one),
    never more than `params.max_tokens`.
    """

    __slots__ = ("_generator", "_output", "_prompt", "num_output", "params")

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] | torch.Tensor = ()):
        self.params = params
        self.num_output = 0
        self._prompt: torch.Tensor | None = None  # [n] distinct prompt ids, CPU int64
        self._output: torch.Tensor | None = None  # [max_tokens] output ids, CPU int64
        self._generator: torch.Generator | None = None
        if params.repetition_penalty != 1.0:
            self._prompt = torch.unique(torch.as_tensor(prompt_ids, dtype=torch.int64).cpu())
        if _penalized(params):
            self._output = torch.empty(params.max_tokens, dtype=torch.int64)

    def append(self, token_id: int) -> None:
        """Record a drawn token (the sampler calls this)."""
        if self.num_output >= self.params.max_tokens:
            raise RuntimeError("sequence already has max_tokens output tokens")
        if self._output is not None:
            self._output[self.num_output] = token_id
        self.num_output += 1

    @property
    def prompt_ids(self) -> torch.Tensor:
        """[n] distinct prompt ids; empty unless repetition_penalty != 1."""
        return self._prompt if self._prompt is not None else torch.empty(0, dtype=torch.int64)

    @property
    def output_ids(self) -> torch.Tensor:
        """[num_output] output ids so far; empty unless some penalty is set."""
        if self._output is None:
            return torch.empty(0, dtype=torch.int64)
        return self._output[: self.num_output]

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own generator, seeded with params.seed on first use; None if unseeded."""
        if self.params.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.params.seed)
        return self._generator


@dataclass(frozen=True)
class TopLogprobs:
    """A row's best alternatives, best first: len == params.logprobs."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass(frozen=True)
class SamplerOutput:
    """One step's draws; every list has one entry per row of the logits, in row order.

    finish_reasons: "stop" when the token is a stop token (eos unless ignore_eos, or one of
    stop_token_ids), "length" when it is the max_tokens-th output, "error" (token -1, nothing
    appended to the state) when the row's logits hold NaN or +inf, else None. Stop strings and
    the model's context length are the engine's to check.
    """

    token_ids: list[int]  # [B]
    token_tensor: torch.Tensor  # [B] int64 on the logits' device, the same ids
    logprobs: list[float | None]  # [B] chosen token's raw logprob; None where logprobs is None
    top_logprobs: list[TopLogprobs | None]  # [B] None where logprobs is None
    finish_reasons: list[str | None]  # [B]

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if not (len(self.logprobs) == len(self.top_logprobs) == len(self.finish_reasons) == n):
            raise ValueError("SamplerOutput lists must have one entry per row")


def _keys(rows: Sequence[int], ids: Sequence[torch.Tensor], vocab: int) -> torch.Tensor:
    """Flat indices row * V + id into a [B, V] tensor, one per id; ids outside [0, V) dropped."""
    lengths = torch.tensor([len(t) for t in ids], dtype=torch.int64)
    flat = torch.cat(list(ids))  # [sum(lengths)], CPU int64
    row_of = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    keep = (flat >= 0) & (flat < vocab)
    return row_of[keep] * vocab + flat[keep]


def _per_row(
    values: Sequence[float], rows: Sequence[int], num_rows: int, fill: float, device: torch.device
) -> torch.Tensor:
    """[B] float32: values at rows, fill elsewhere."""
    out = torch.full((num_rows,), fill, dtype=torch.float32)
    out[torch.tensor(rows, dtype=torch.int64)] = torch.tensor(values, dtype=torch.float32)
    return out.to(device)


def _penalize_(x: torch.Tensor, rows: Sequence[int], states: Sequence[SamplingState]) -> None:
    """In place on rows of x [B, V] (contiguous), states[j] for row rows[j]; touches only the
    (row, token) pairs in each history, so it costs O(history), not O(rows * V)."""
    num_rows, vocab = x.shape
    dev = x.device
    flat = x.view(-1)  # [B * V]
    out_keys = _keys(rows, [s.output_ids for s in states], vocab).to(dev)
    prompt_keys = _keys(rows, [s.prompt_ids for s in states], vocab).to(dev)

    rep = _per_row([s.params.repetition_penalty for s in states], rows, num_rows, 1.0, dev)
    seen = torch.unique(torch.cat([prompt_keys, out_keys]))  # [n] prompt ∪ output pairs
    r = rep[seen // vocab]
    v = flat[seen]
    flat[seen] = torch.where(v > 0, v / r, v * r)

    freq = _per_row([s.params.frequency_penalty for s in states], rows, num_rows, 0.0, dev)
    pres = _per_row([s.params.presence_penalty for s in states], rows, num_rows, 0.0, dev)
    keys, counts = torch.unique(out_keys, return_counts=True)  # [m] output pairs, their counts
    row_of = keys // vocab
    flat[keys] -= freq[row_of] * counts.float() + pres[row_of]


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Penalised copy of logits [P, V] float32, one state per row (HF/vLLM, then OpenAI):

    x[t] = x[t] / r if x[t] > 0 else x[t] * r     for t in prompt ∪ output   (repetition r)
    x[t] -= f * count_out[t] + p * (count_out[t] > 0)                        (frequency, presence)
    """
    x = logits.float().clone().contiguous()
    _penalize_(x, range(len(states)), states)
    return x


def _min_p_(x: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: drop tokens whose probability is below min_p times the row's top one."""
    probs = x.softmax(dim=-1)  # [R, V]
    floor = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    x.masked_fill_(probs < floor, _NEG_INF)


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Keep each row's top_k largest, then its smallest head of probability mass >= top_p.

    top_k == V and top_p > 1 mean off for that row; the largest token is always kept. When
    every row has a top-k cut, only the k_max best are ranked (topk, not a full sort).
    """
    dev = x.device
    k_max = max(top_k)
    if k_max < x.shape[-1]:
        ranked, order = x.topk(k_max, dim=-1)  # [R, k_max], descending
    else:
        ranked, order = x.sort(dim=-1, descending=True)  # [R, V]
    rank = torch.arange(ranked.shape[-1], device=dev)
    ranked.masked_fill_(rank[None, :] >= torch.tensor(top_k, device=dev)[:, None], _NEG_INF)
    if min(top_p) < 1.0:
        probs = ranked.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly better tokens
        # rank > 0: the best token is never cut, even where top_p rounds to 0 in float32
        # (top_p=1e-300 cut every token, and the row then sampled token 0).
        cut = (mass_before >= torch.tensor(top_p, device=dev)[:, None]) & (rank[None, :] > 0)
        ranked.masked_fill_(cut, _NEG_INF)
    return torch.full_like(x, _NEG_INF).scatter_(-1, order, ranked)


class Sampler:
    """Draws one token per row of a step's logits; holds no per-request state.

    eos_token_ids: the model's end-of-sequence ids (stop tokens unless ignore_eos).
    seed: seeds the one generator shared by unseeded rows (None: a random seed).
    """

    def __init__(self, eos_token_ids: Iterable[int] = (), seed: int | None = None) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self._seed = seed
        self._generator: torch.Generator | None = None

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        """One token per row of logits [B, V] (cast to float32, never modified); appends it to
        the row's state. A seeded row's token depends only on its seed, params, history and
        logits row, never on the other rows or its position.
        """
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} need one row per state ({len(states)})")
        logits = logits.float()
        num_rows = logits.shape[0]
        x = self.process(logits, states)  # [B, V]
        drawn = [i for i, s in enumerate(states) if not s.params.greedy]
        if not drawn:
            tokens = x.argmax(dim=-1)  # [B]
        elif len(drawn) == num_rows:
            tokens = self._draw(x, states)
        else:
            tokens = x.argmax(dim=-1)
            idx = torch.tensor(drawn, device=x.device)
            tokens[idx] = self._draw(x[idx], [states[i] for i in drawn])
        logprobs, top = _logprobs(logits, tokens, states)
        # A row whose max is not finite holds a NaN or +inf (or is all -inf): nothing drawn from
        # it means anything. It gets token -1 and finish reason "error" (the engine fails that
        # request alone); folding the check into the ids keeps one device-to-host copy a step.
        tokens = torch.where(torch.isfinite(logits.amax(dim=-1)), tokens, -1)
        token_ids: list[int] = tokens.tolist()
        finish: list[str | None] = []
        for i, (state, token) in enumerate(zip(states, token_ids)):
            if token < 0:
                finish.append("error")
                logprobs[i], top[i] = None, None
                continue
            state.append(token)
            finish.append(self._finish_reason(state, token))
        return SamplerOutput(token_ids, tokens, logprobs, top, finish)

    def process(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """min_tokens masking and penalties; `logits` itself (no copy) when no row needs them."""
        vocab = logits.shape[1]
        blocked_rows: list[int] = []
        blocked_ids: list[int] = []
        for i, s in enumerate(states):
            if s.num_output < s.params.min_tokens:
                ids = [t for t in self.stop_token_ids(s.params) if 0 <= t < vocab]
                blocked_rows += [i] * len(ids)
                blocked_ids += ids
        penalized = [i for i, s in enumerate(states) if _penalized(s.params)]
        if not blocked_ids and not penalized:
            return logits
        x = logits.clone(memory_format=torch.contiguous_format)
        if blocked_ids:
            rows = torch.tensor(blocked_rows, device=x.device)
            x[rows, torch.tensor(blocked_ids, device=x.device)] = _NEG_INF
        if penalized:
            _penalize_(x, penalized, [states[i] for i in penalized])
        return x

    def stop_token_ids(self, params: SamplingParams) -> frozenset[int]:
        """Tokens that end a sequence with these params (and that min_tokens holds back)."""
        stops = frozenset(params.stop_token_ids)
        return stops if params.ignore_eos else stops | self.eos_token_ids

    def _finish_reason(self, state: SamplingState, token: int) -> str | None:
        params = state.params
        if token in params.stop_token_ids or (
            token in self.eos_token_ids and not params.ignore_eos
        ):
            return "stop"
        return "length" if state.num_output >= params.max_tokens else None

    def _draw(self, x: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Random tokens [R] from processed logits x [R, V] (not modified) via the exponential
        race argmax(p / q), q ~ Exp(1): an exact draw from p. A seeded row fills its q from its
        own generator, so its draw is independent of its neighbours."""
        num_rows, vocab = x.shape
        dev = x.device
        params = [s.params for s in states]
        x = x / torch.tensor([p.temperature for p in params], device=dev)[:, None]  # new tensor
        if any(p.min_p > 0.0 for p in params):
            _min_p_(x, torch.tensor([p.min_p for p in params], device=dev))
        top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
        top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]  # 2.0: off, cumsum rounding
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            x = _top_k_top_p(x, top_k, top_p)
        probs = x.softmax(dim=-1)  # [R, V]
        q = torch.empty_like(probs)
        unseeded: list[int] = []
        for i, s in enumerate(states):
            gen = s.generator(dev)
            if gen is None:
                unseeded.append(i)
            else:
                q[i].exponential_(generator=gen)
        if len(unseeded) == num_rows:
            q.exponential_(generator=self._shared_generator(dev))
        elif unseeded:
            fill = torch.empty(len(unseeded), vocab, device=dev)
            q[torch.tensor(unseeded, device=dev)] = fill.exponential_(
                generator=self._shared_generator(dev)
            )
        return probs.div_(q).argmax(dim=-1)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            if self._seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self._seed)
        return self._generator


def _logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, states: Sequence[SamplingState]
) -> tuple[list[float | None], list[TopLogprobs | None]]:
    """Chosen-token and top-n logprobs of the raw logits, for the rows whose logprobs is set."""
    chosen: list[float | None] = [None] * len(states)
    top: list[TopLogprobs | None] = [None] * len(states)
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not rows:
        return chosen, top
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits[idx], dim=-1)  # [n, V]
    picked = lp.gather(1, tokens[idx][:, None])[:, 0].tolist()
    k_max = max(states[i].params.logprobs or 0 for i in rows)
    values, ids = lp.topk(k_max, dim=-1) if k_max else (lp[:, :0], lp[:, :0].long())
    values_l, ids_l = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        k = states[i].params.logprobs or 0
        chosen[i] = picked[j]
        top[i] = TopLogprobs(token_ids=ids_l[j][:k], logprobs=values_l[j][:k])
    return chosen, top
