"""Stop strings: across token boundaries, earliest wins, hold-back never emits a cut text."""

from __future__ import annotations

import random

import pytest

from loramux.engine.stop import StopStringMatcher, StopUpdate


def reference(text: str, stop: list[str], include: bool) -> tuple[str, bool]:
    """The output for the whole text at once: cut at the first stop to complete (earliest start
    among those completing at the same character)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            longest = max(done, key=len)
            return (text[:end] if include else text[: end - len(longest)]), True
    return text, False


def stream(pieces: list[str], stop: list[str], include: bool = False) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stop, include)
    out = []
    for piece in pieces:
        update = matcher.feed(piece)
        out.append(update.text)
        if update.stopped:
            return out, True
    return out, False


def test_stop_string_across_token_boundaries() -> None:
    out, stopped = stream(["Hel", "lo W", "orld!"], ["o W"])
    assert out == ["Hel", "l"] and stopped


def test_partial_stop_is_held_then_released_when_it_does_not_complete() -> None:
    matcher = StopStringMatcher(["</end>"])
    first = matcher.feed("foo </e")
    assert (first.text, first.stopped) == ("foo ", False)
    second = matcher.feed("x bar")
    assert (second.text, second.stopped) == ("</ex bar", False)
    assert matcher.text == "foo </ex bar"


def test_held_partial_is_cut_when_the_stop_completes() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("foo </e").text == "foo "
    last = matcher.feed("nd> bar")
    assert (last.text, last.stopped) == ("", True)
    assert matcher.text == "foo "
    assert matcher.feed("more").text == "" and matcher.stopped


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["world", "lo"], "hel"),
        (["lo", "world"], "hel"),
        (["o w", "ll"], "he"),
        (["xyz", "d"], "hello worl"),
    ],
)
def test_earliest_stop_wins_whatever_its_order(stop: list[str], expected: str) -> None:
    for pieces in (["hello world"], list("hello world"), ["hello w", "orld"]):
        out, stopped = stream(pieces, stop)
        assert "".join(out) == expected and stopped


def test_overlapping_stops_resolve_the_same_in_one_piece_or_many() -> None:
    # "bc" completes before "abcd" does, so it wins, whether the text comes at once or not.
    for pieces in (["abcd"], list("abcd"), ["ab", "cd"]):
        out, stopped = stream(pieces, ["abcd", "bc"])
        assert "".join(out) == "a" and stopped


def test_include_stop_str_in_output() -> None:
    out, stopped = stream(["Hello w", "orld and more"], ["wor"], include=True)
    assert "".join(out) == "Hello wor" and stopped
    assert out[0] == "Hello w"  # nothing held back: the stop would be sent anyway


def test_flush_releases_the_held_tail_when_the_sequence_ends_otherwise() -> None:
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("line\n").text == "line"
    assert matcher.flush() == "\n"
    assert matcher.text == "line\n" and not matcher.stopped


def test_can_stop_false_ignores_completed_stops() -> None:
    matcher = StopStringMatcher(["a"])
    assert matcher.feed("xa", can_stop=False) == StopUpdate("xa", False)
    last = matcher.feed("ya")
    assert (last.text, last.stopped) == ("y", True)
    assert matcher.text == "xay"


def test_no_stop_strings_pass_everything_through() -> None:
    out, stopped = stream(["a", "b\n", "c"], [])
    assert out == ["a", "b\n", "c"] and not stopped


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


@pytest.mark.parametrize("include", [False, True])
def test_streamed_text_is_always_a_prefix_of_the_final_output(include: bool) -> None:
    rng = random.Random(20240613)
    alphabet = "ab c"
    for _ in range(600):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stop = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        cuts = sorted(
            rng.sample(range(1, len(text)), max(0, min(len(text) - 1, rng.randint(0, 8))))
        )
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        final, should_stop = reference(text, stop, include)

        matcher = StopStringMatcher(stop, include)
        sent = ""
        stopped = False
        for piece in pieces:
            update = matcher.feed(piece)
            sent += update.text
            assert final.startswith(sent), (text, stop, pieces, sent)
            if update.stopped:
                stopped = True
                break
        if not stopped:
            sent += matcher.flush()
        assert (sent, stopped) == (final, should_stop), (text, stop, pieces)
        assert matcher.text == sent
