"""Incremental stop-string detection over one sequence's detokenized text, safe to stream.

The text arrives in pieces (one detokenized delta per step). `StopStringMatcher.feed` returns
the part that may be sent now and whether a stop string completed. It holds back the longest
tail that is still a proper prefix of some stop string, so a stream never sends text that a
later stop would cut; `flush` releases that tail when the sequence ends for another reason.

Which stop wins: the first to complete in the text; among those completing at the same
character, the one starting earliest. For stop strings that do not overlap this is simply the
earliest occurrence, and in every case the result is the same wherever token boundaries fall.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopUpdate:
    """What one delta produced."""

    text: str  # new text that may be sent now; never retracted later
    stopped: bool  # a stop string completed: the sequence is finished, nothing more comes


class StopStringMatcher:
    """Finds the first stop string to complete in a text fed in pieces.

    Invariant: the concatenation of every returned text is a prefix of the final output, which
    is the text before the winning stop string (through its end if include_stop_str_in_output).
    Memory is bounded by the longest stop string, whatever the output's length.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._context = max((len(s) for s in self.stop), default=1) - 1
        self._buf = ""  # the last `_context` emitted chars, then the held chars
        self._held = 0  # held chars at the end of _buf (always 0 when the stop is included)
        self._pieces: list[str] = []
        self._stopped = False
        self.matched: str | None = None  # the stop string that ended the text, once stopped

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._pieces)

    def feed(self, delta: str, can_stop: bool = True) -> StopUpdate:
        """Take the next piece of text. can_stop False (before min_tokens) ignores stops that
        complete in this piece, as vLLM does, but still holds back a possible stop's start."""
        if self._stopped:
            return StopUpdate("", True)
        if not self.stop:
            self._pieces.append(delta)
            return StopUpdate(delta, False)
        buf = self._buf + delta
        new_from = len(self._buf)  # buf[new_from:] is delta
        emit_from = new_from - self._held
        match = self._first_completed(buf, new_from) if can_stop else None
        if match is not None:
            start, end = match
            cut = max(end if self.include_stop_str_in_output else start, emit_from)
            self._stopped = True
            self.matched = buf[start:end]
            return self._emit(buf[emit_from:cut], stopped=True)
        hold = 0 if self.include_stop_str_in_output else self._hold(buf, len(buf) - emit_from)
        self._held = hold
        self._buf = buf[max(len(buf) - hold - self._context, 0) :]
        return self._emit(buf[emit_from : len(buf) - hold], stopped=False)

    def flush(self) -> str:
        """The held-back text, to send when the sequence ends otherwise (eos, length, abort)."""
        if self._stopped or not self._held:
            return ""
        tail = self._buf[len(self._buf) - self._held :]
        self._held = 0
        self._pieces.append(tail)
        return tail

    def _emit(self, text: str, stopped: bool) -> StopUpdate:
        self._pieces.append(text)
        return StopUpdate(text, stopped)

    def _first_completed(self, buf: str, new_from: int) -> tuple[int, int] | None:
        """(start, end) of the stop occurrence ending first after new_from, earliest start on
        a tie; occurrences ending at or before new_from were already judged."""
        best: tuple[int, int] | None = None
        for s in self.stop:
            i = buf.find(s, max(0, new_from - len(s) + 1))
            if i >= 0 and (best is None or (i + len(s), i) < (best[1], best[0])):
                best = (i, i + len(s))
        return best

    def _hold(self, buf: str, limit: int) -> int:
        """Length of the longest suffix of buf (at most limit chars) that is a proper prefix of
        some stop string."""
        for n in range(min(limit, self._context), 0, -1):
            tail = buf[len(buf) - n :]
            if any(len(s) > n and s.startswith(tail) for s in self.stop):
                return n
        return 0
