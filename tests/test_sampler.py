"""Sampler: greedy, penalties, filters, distributions, seeds, min_tokens, logprobs, finish."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from loramux.engine.sampler import Sampler, SamplingState, apply_penalties
from loramux.engine.sampling_params import SamplingParams


def state(prompt: tuple[int, ...] = (), **kw: Any) -> SamplingState:
    return SamplingState(SamplingParams(**kw), list(prompt))


def rand_logits(rows: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab) * scale


def chi_square(tokens: list[int], probs: torch.Tensor) -> float:
    """Pearson statistic of observed token counts against expected probabilities."""
    counts = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    expected = probs.double() * len(tokens)
    live = expected > 0
    assert counts[~live].sum() == 0, "drew a token of probability zero"
    return float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())


# ---- greedy -------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "vocab"), [(1, 7), (5, 1000), (33, 4099)])
def test_greedy_is_argmax_and_leaves_logits_alone(rows: int, vocab: int) -> None:
    logits = rand_logits(rows, vocab)
    before = logits.clone()
    states = [state(temperature=0.0, max_tokens=4) for _ in range(rows)]
    sampler = Sampler(eos_token_ids=[0])
    assert sampler.process(logits, states) is logits  # the fast path: no copy, no softmax
    out = sampler.sample(logits, states)
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()
    assert torch.equal(out.token_tensor, torch.argmax(logits, dim=-1))
    assert torch.equal(logits, before)
    assert out.logprobs == [None] * rows and out.top_logprobs == [None] * rows


def test_greedy_rows_unaffected_by_random_neighbours() -> None:
    logits = rand_logits(12, 513)
    before = logits.clone()
    states = [
        state(temperature=0.0) if i % 3 == 0 else state(temperature=1.3, top_p=0.9, top_k=50)
        for i in range(12)
    ]
    out = Sampler(seed=1).sample(logits, states)
    greedy = torch.argmax(logits, dim=-1).tolist()
    assert [out.token_ids[i] for i in range(0, 12, 3)] == greedy[::3]
    assert torch.equal(logits, before)


def test_bfloat16_logits_give_the_same_greedy_tokens() -> None:
    logits = rand_logits(4, 300).bfloat16()
    out = Sampler().sample(logits, [state(temperature=0.0) for _ in range(4)])
    assert out.token_ids == torch.argmax(logits.float(), dim=-1).tolist()


# ---- penalties ----------------------------------------------------------------------------


def penalized_state() -> SamplingState:
    s = state(
        prompt=(1, 2, 1),
        temperature=0.0,
        repetition_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    for token in (2, 3, 3):
        s.append(token)
    return s


def test_penalties_match_hand_computed_example() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    # seen = prompt ∪ output = {1, 2, 3}; output counts: 2 -> 1, 3 -> 2
    # t1: -1 * 2 = -2                      (negative: multiplied; prompt only, so no f/p)
    # t2: 0.5 / 2 - 0.5 * 1 - 0.25 = -0.5
    # t3: 3.0 / 2 - 0.5 * 2 - 0.25 = 0.25
    expected = torch.tensor([[2.0, -2.0, -0.5, 0.25, -2.0, 1.0]])
    torch.testing.assert_close(apply_penalties(logits, [penalized_state()]), expected)

    # Inside a batch: only the penalised row changes, and greedy follows the penalised logits.
    batch = torch.cat([logits, logits])
    states = [penalized_state(), state(temperature=0.0)]
    processed = Sampler().process(batch, states)
    torch.testing.assert_close(processed, torch.cat([expected, logits]))
    out = Sampler().sample(batch, [penalized_state(), state(temperature=0.0)])
    assert out.token_ids == [0, 3]


def test_presence_and_frequency_ignore_the_prompt() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    s = state(prompt=(2, 2), frequency_penalty=2.0, presence_penalty=2.0)
    torch.testing.assert_close(apply_penalties(logits, [s]), logits)
    s.append(2)
    torch.testing.assert_close(apply_penalties(logits, [s]), torch.tensor([[1.0, 2.0, -1.0]]))


def test_repetition_penalty_below_one_favours_seen_tokens() -> None:
    logits = torch.tensor([[1.0, -1.0, 0.9]])
    s = state(prompt=(1, 2), repetition_penalty=0.5)
    torch.testing.assert_close(apply_penalties(logits, [s]), torch.tensor([[1.0, -0.5, 1.8]]))


def reference_penalties(
    row: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams
) -> torch.Tensor:
    """The formulas token by token, in float64."""
    x = row.double().clone()
    for t in set(prompt) | set(output):
        r = params.repetition_penalty
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t in set(output):
        x[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty
    return x


def test_penalties_per_row_in_a_mixed_batch_match_the_reference() -> None:
    rows, vocab = 7, 97
    logits = rand_logits(rows, vocab)
    penalties = {
        1: {"repetition_penalty": 1.3},
        2: {"frequency_penalty": 0.7, "presence_penalty": -0.4},
        4: {"repetition_penalty": 0.8, "frequency_penalty": -1.1, "presence_penalty": 1.5},
        5: {"presence_penalty": 2.0},
    }
    states, expected = [], []
    for i in range(rows):
        prompt = torch.randint(0, vocab, (40,)).tolist()
        output = torch.randint(0, vocab, (25,)).tolist()
        s = state(prompt=tuple(prompt), max_tokens=30, **penalties.get(i, {}))
        for t in output:
            s.append(t)
        states.append(s)
        expected.append(reference_penalties(logits[i], prompt, output, s.params))
    processed = Sampler().process(logits, states)
    torch.testing.assert_close(processed.double(), torch.stack(expected))


# ---- filters that must reduce to greedy ---------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"top_k": 1},
        {"top_p": 1e-6},
        {"top_p": 1e-300},  # 0 in float32: it cut every token and sampled token 0
        {"top_p": 5e-324},
        {"min_p": 1.0},
        {"top_k": 1, "top_p": 0.5, "min_p": 0.1},
    ],
    ids=["top_k=1", "top_p=tiny", "top_p=1e-300", "top_p=denormal", "min_p=1", "all"],
)
def test_filters_that_keep_one_token_equal_greedy(params: dict[str, Any]) -> None:
    logits = rand_logits(64, 777, scale=1.0)
    states = [state(temperature=1.7, seed=i if i % 2 else None, **params) for i in range(64)]
    out = Sampler(seed=0).sample(logits, states)
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_vanishing_temperatures_are_greedy_not_nan(temperature: float) -> None:
    """logits / 1e-40 overflows to inf and softmax to NaN: such rows must sample greedily."""
    logits = rand_logits(16, 333, scale=3.0)
    states = [state(temperature=temperature, seed=i) for i in range(16)]
    out = Sampler(seed=0).sample(logits, states)
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()


def test_seeds_outside_64_bits_are_refused_up_front() -> None:
    SamplingParams(seed=2**63 - 1)
    SamplingParams(seed=-(2**63))
    for seed in (2**63, 2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed"):
            SamplingParams(seed=seed)


# ---- distributions ------------------------------------------------------------------------

LOGITS = torch.tensor([1.5, 0.2, -0.7, 0.9, -2.0, 0.0])
DRAWS = 20_000
# chi-square, 5 degrees of freedom: P(X > 25) ~ 1.4e-4, and the seed is fixed anyway.
CRITICAL = 25.0


def draw_many(**kw: Any) -> list[int]:
    logits = LOGITS.expand(DRAWS, -1).contiguous()
    return Sampler(seed=1234).sample(logits, [state(**kw) for _ in range(DRAWS)]).token_ids


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.8])
def test_draws_follow_softmax_over_temperature(temperature: float) -> None:
    tokens = draw_many(temperature=temperature)
    assert chi_square(tokens, torch.softmax(LOGITS / temperature, dim=0)) < CRITICAL
    if temperature != 1.0:  # the temperature really changes the distribution
        assert chi_square(tokens, torch.softmax(LOGITS, dim=0)) > 10 * CRITICAL


def test_seeded_rows_follow_the_same_distribution() -> None:
    n = 5000
    logits = LOGITS.expand(n, -1).contiguous()
    states = [state(temperature=1.0, seed=s) for s in range(n)]
    tokens = Sampler().sample(logits, states).token_ids
    assert chi_square(tokens, torch.softmax(LOGITS, dim=0)) < CRITICAL


@pytest.mark.parametrize("ranking", ["topk", "full sort"])
def test_top_k_renormalises_over_the_k_best(ranking: str) -> None:
    # A neighbour without a top-k cut makes the sampler rank every row by a full sort.
    logits = LOGITS.expand(DRAWS, -1).contiguous()
    states = [
        state(top_p=0.5) if ranking == "full sort" and i % 2 else state(top_k=3)
        for i in range(DRAWS)
    ]
    out = Sampler(seed=99).sample(logits, states).token_ids
    tokens = out[::2] if ranking == "full sort" else out
    expected = torch.zeros(6)  # best three: 0 (1.5), 3 (0.9), 1 (0.2)
    expected[[0, 3, 1]] = torch.softmax(LOGITS[[0, 3, 1]], dim=0)
    assert chi_square(tokens, expected) < CRITICAL


def test_top_p_keeps_the_smallest_head_reaching_p() -> None:
    probs = torch.softmax(LOGITS, dim=0)  # sorted: 0 .41, 3 .23, 1 .11, 5 .09, 2 .05, 4 .01
    top_p = float(probs[0] + probs[3] + probs[1]) - 0.01  # needs exactly the first three
    tokens = draw_many(temperature=1.0, top_p=top_p)
    expected = torch.zeros(6)
    expected[[0, 3, 1]] = probs[[0, 3, 1]] / probs[[0, 3, 1]].sum()
    assert chi_square(tokens, expected) < CRITICAL


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    probs = torch.softmax(LOGITS, dim=0)
    min_p = 0.25  # keeps p >= 0.25 * p_max: tokens 0, 3, 1 (1 is at ~0.27 p_max)
    keep = probs >= min_p * probs.max()
    assert keep.tolist() == [True, True, False, True, False, False]
    tokens = draw_many(temperature=1.0, min_p=min_p)
    assert chi_square(tokens, torch.where(keep, probs, 0.0) / probs[keep].sum()) < CRITICAL


# ---- seeds --------------------------------------------------------------------------------

VOCAB = 301


def step_logits(step: int) -> torch.Tensor:
    """The target sequence's logits at each step: fixed, so only the draws can differ."""
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(VOCAB, generator=g)


def run_seeded(seed: int, neighbours: int, position: int, shared_seed: int) -> list[int]:
    """Draw 12 tokens for one seeded sequence inside a batch of random, fresh neighbours."""
    params: dict[str, Any] = {"temperature": 0.9, "top_p": 0.95, "top_k": 200}
    target = state(prompt=(5, 6, 7), seed=seed, repetition_penalty=1.3, max_tokens=12, **params)
    others = [
        state(seed=None if i % 2 else 99 + i, temperature=1.0 + 0.1 * i) for i in range(neighbours)
    ]
    sampler = Sampler(seed=shared_seed)
    tokens = []
    for step in range(12):
        rows = others[:position] + [target] + others[position:]
        logits = torch.randn(len(rows), VOCAB) * 2
        logits[position] = step_logits(step)
        tokens.append(sampler.sample(logits, rows).token_ids[position])
        others = [
            state(seed=None if i % 2 else 99 + i, temperature=1.0 + 0.1 * i)
            for i in range(neighbours)
        ]
    return tokens


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    alone = run_seeded(seed=7, neighbours=0, position=0, shared_seed=1)
    assert run_seeded(seed=7, neighbours=5, position=3, shared_seed=2) == alone
    assert run_seeded(seed=7, neighbours=9, position=9, shared_seed=3) == alone
    assert run_seeded(seed=7, neighbours=2, position=0, shared_seed=4) == alone


def test_different_seeds_differ() -> None:
    a = run_seeded(seed=7, neighbours=0, position=0, shared_seed=1)
    b = run_seeded(seed=8, neighbours=0, position=0, shared_seed=1)
    assert a != b


def test_unseeded_rows_use_the_samplers_seed() -> None:
    logits = rand_logits(16, 100)
    runs = [Sampler(seed=s).sample(logits, [state() for _ in range(16)]) for s in (3, 3, 4)]
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids


# ---- min_tokens, eos, stop tokens, finish reasons -----------------------------------------


def test_min_tokens_blocks_eos_and_stop_token_ids() -> None:
    eos, stop = 0, 1
    logits = torch.tensor([[10.0, 9.0, 8.0, 0.0, 0.0]])
    sampler = Sampler(eos_token_ids=[eos])
    s = state(temperature=0.0, min_tokens=3, max_tokens=10, stop_token_ids=(stop,))
    steps = [sampler.sample(logits, [s]) for _ in range(4)]
    assert [o.token_ids[0] for o in steps] == [2, 2, 2, eos]
    assert [o.finish_reasons[0] for o in steps] == [None, None, None, "stop"]


def test_min_tokens_blocks_random_draws_too() -> None:
    logits = torch.tensor([3.0, 3.0, 0.0, 0.0]).expand(2000, -1).contiguous()
    states = [state(min_tokens=1, stop_token_ids=(1,)) for _ in range(2000)]
    out = Sampler(eos_token_ids=[0], seed=5).sample(logits, states)
    assert set(out.token_ids) <= {2, 3} and out.finish_reasons == [None] * 2000
    # Once min_tokens is reached, the stop tokens come back.
    again = Sampler(eos_token_ids=[0], seed=5).sample(logits, states)
    assert {0, 1} <= set(again.token_ids)
    assert all(
        (r == "stop") == (t in (0, 1)) for t, r in zip(again.token_ids, again.finish_reasons)
    )


def test_ignore_eos_neither_stops_nor_blocks_eos() -> None:
    logits = torch.tensor([[10.0, 9.0, 8.0]])
    s = state(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=(1,))
    out = Sampler(eos_token_ids=[0]).sample(logits, [s])
    assert out.token_ids == [0] and out.finish_reasons == [None]


def test_length_finish_on_the_max_tokens_th_token() -> None:
    logits = torch.tensor([[0.0, 5.0]])
    s = state(temperature=0.0, max_tokens=2)
    sampler = Sampler(eos_token_ids=[0])
    assert [sampler.sample(logits, [s]).finish_reasons[0] for _ in range(2)] == [None, "length"]
    assert s.num_output == 2
    with pytest.raises(RuntimeError):
        sampler.sample(logits, [s])


# ---- logprobs -----------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_and_top_n_sorted() -> None:
    logits = rand_logits(6, 1031)
    raw = torch.log_softmax(logits.double(), dim=-1)
    states = [
        state(logprobs=None),
        state(temperature=0.0, logprobs=0),
        state(temperature=0.7, logprobs=1, top_k=20),
        state(temperature=0.0, logprobs=5, repetition_penalty=1.5, prompt=(1, 2, 3)),
        state(temperature=1.2, logprobs=20, presence_penalty=1.0, seed=3),
        state(temperature=0.0),
    ]
    out = Sampler(seed=0).sample(logits, states)
    for i, s in enumerate(states):
        k = s.params.logprobs
        chosen, top = out.logprobs[i], out.top_logprobs[i]
        if k is None:
            assert chosen is None and top is None
            continue
        assert chosen == pytest.approx(float(raw[i, out.token_ids[i]]), abs=1e-5)
        assert top is not None and len(top.token_ids) == len(top.logprobs) == k
        assert top.logprobs == sorted(top.logprobs, reverse=True)
        ref_values, ref_ids = raw[i].topk(k) if k else (raw[i, :0], raw[i, :0].long())
        assert top.token_ids == ref_ids.tolist()
        assert top.logprobs == pytest.approx(ref_values.tolist(), abs=1e-5)


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError):
        Sampler().sample(rand_logits(3, 10), [state(), state()])
