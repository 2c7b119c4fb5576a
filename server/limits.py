"""Admission control: per-tenant rate and concurrency limits, and one bounded global queue.

Everything here runs on the event loop thread, between two awaits, so a check and the
charge that follows it cannot interleave with another request's: no locks.

Rates are token buckets refilled continuously: a bucket of `per_minute` holds at most one
minute's worth and refills at `per_minute / 60` per second, so a tenant may burst up to its
minute's budget and then gets its rate. A request is charged its tokens up front
(prompt + max_tokens x n, as OpenAI counts it) and refunded what it did not use when it ends.
A request larger than a whole minute's budget is admitted when the bucket is full and drives
it into debt, instead of never being admitted. `Limiter.check` asks the same questions without
charging, so the app can refuse a tenant over its limits before it tokenizes anything.

Also the bounds below the app, which uvicorn lacks or leaves off: `BoundedH11Protocol` (a
request-head timeout and a connection cap) and `RepeatedLogFilter` (a bounded log rate for
repeated warnings and errors).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from loramux.server.errors import APIError, bad_request, overloaded, rate_limited, shutting_down
from loramux.server.tenants import Tenant

Clock = Callable[[], float]


@dataclass
class TokenBucket:
    """`capacity` units per minute; `level` may go negative (debt) after an oversized charge."""

    capacity: float
    level: float
    updated: float

    @classmethod
    def full(cls, per_minute: int, now: float) -> TokenBucket:
        return cls(capacity=float(per_minute), level=float(per_minute), updated=now)

    @property
    def rate(self) -> float:
        return self.capacity / 60.0

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` could be taken (0 when it can be now)."""
        self._refill(now)
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def refund(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + max(0.0, amount))


@dataclass
class _TenantState:
    requests: TokenBucket | None
    tokens: TokenBucket | None
    running: int = 0


@dataclass
class Admission:
    """A request's place: hold it while the request runs, `release` it exactly once."""

    limiter: Limiter
    tenant: str
    sequences: int
    charged_tokens: int
    released: bool = False

    def release(self, used_tokens: int | None = None) -> None:
        """Give back the concurrency slot, the queue places and the unused tokens."""
        if self.released:
            return
        self.released = True
        self.limiter._release(self, self.charged_tokens if used_tokens is None else used_tokens)


@dataclass
class Limiter:
    """Per-tenant limits plus a global bound of `capacity` sequences in flight.

    `capacity` is the engine's max_num_seqs plus the queue length the operator allows; past
    it a request gets 503 with Retry-After rather than waiting without bound.
    """

    capacity: int
    clock: Clock = time.monotonic
    in_flight: int = 0
    _tenants: dict[str, _TenantState] = field(default_factory=dict)

    def _state(self, tenant: Tenant, now: float) -> _TenantState:
        state = self._tenants.get(tenant.name)
        if state is None:
            limits = tenant.limits
            state = _TenantState(
                requests=(TokenBucket.full(limits.requests_per_minute, now)
                          if limits.requests_per_minute else None),
                tokens=(TokenBucket.full(limits.tokens_per_minute, now)
                        if limits.tokens_per_minute else None),
            )
            self._tenants[tenant.name] = state
        return state

    def running(self, tenant: Tenant) -> int:
        state = self._tenants.get(tenant.name)
        return state.running if state else 0

    def _refusal(self, tenant: Tenant, state: _TenantState, tokens: int, now: float,
                 at_least: bool = False) -> APIError | None:
        """The 429 for a tenant over a limit with a request of `tokens`, or None."""
        limits = tenant.limits
        if limits.max_concurrent is not None and state.running >= limits.max_concurrent:
            return rate_limited(
                f"Too many concurrent requests for this key (limit {limits.max_concurrent}).",
                retry_after=1.0,
            )
        if state.requests is not None:
            wait = state.requests.wait_for(1, now)
            if wait > 0:
                return rate_limited(
                    f"Rate limit reached: {limits.requests_per_minute} requests per minute.",
                    retry_after=wait,
                )
        if state.tokens is not None:
            wait = state.tokens.wait_for(tokens, now)
            if wait > 0:
                return rate_limited(
                    f"Rate limit reached: {limits.tokens_per_minute} tokens per minute "
                    f"(this request may use {'at least ' if at_least else ''}{tokens}).",
                    retry_after=wait,
                )
        return None

    def check(self, tenant: Tenant, tokens: int = 1) -> None:
        """Raise the 429 `admit` would give a request of at least `tokens`; charge nothing.

        The cheap question first: the app asks it before it resolves the model or tokenizes,
        with a lower bound of the request's tokens, and `admit`s the exact count after.
        """
        now = self.clock()
        refusal = self._refusal(tenant, self._state(tenant, now), tokens, now, at_least=True)
        if refusal is not None:
            raise refusal

    def admit(self, tenant: Tenant, tokens: int, sequences: int = 1) -> Admission:
        """Admit a request of `sequences` sequences costing up to `tokens`, or raise APIError.

        429 (with Retry-After) when the tenant is over a limit, 503 when the server is full.
        Nothing is charged when the request is refused.
        """
        now = self.clock()
        state = self._state(tenant, now)
        refusal = self._refusal(tenant, state, tokens, now)
        if refusal is not None:
            raise refusal
        if sequences > self.capacity:  # would never fit: refuse it rather than let it in alone
            raise bad_request(f"This request asks for {sequences} sequences (prompts times n); "
                              f"this server runs at most {self.capacity} at once.", "n")
        if self.in_flight + sequences > self.capacity and self.in_flight > 0:
            raise overloaded("The server is overloaded; retry shortly.", retry_after=1.0)
        if state.requests is not None:
            state.requests.take(1, now)
        if state.tokens is not None:
            state.tokens.take(tokens, now)
        state.running += 1
        self.in_flight += sequences
        return Admission(self, tenant.name, sequences, tokens)

    def _release(self, admission: Admission, used_tokens: int) -> None:
        state = self._tenants[admission.tenant]
        state.running -= 1
        self.in_flight -= admission.sequences
        if state.tokens is not None and used_tokens < admission.charged_tokens:
            state.tokens.refund(admission.charged_tokens - used_tokens, self.clock())


def check_not_draining(draining: bool) -> None:
    if draining:
        raise shutting_down()


# ============================================================================ connections

log = logging.getLogger("loramux.server")


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the two bounds uvicorn (0.55) lacks.

    - A request-head timeout. uvicorn times out idle keep-alive connections only after a
      response, and cancels that timer at the first byte of the next request, so a client
      that connects and sends nothing, or half a request line, holds its connection (and a
      file descriptor) forever. Here a connection whose request head is not complete
      `header_timeout_s` after it opened, or after its previous response, is closed.
    - A connection cap. Past `max_connections` open connections a new one is closed as soon
      as it is accepted, so slow clients cannot take every descriptor the process has (then
      /health, adapter reads and the log itself fail with "Too many open files").

    uvicorn builds one protocol object per connection from a class: `bounded_protocol` makes
    the subclass that carries one server's settings.
    """

    header_timeout_s: float = 10.0
    max_connections: int | None = None
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            log.warning("connection cap (%d) reached: closing a new connection at once",
                        self.max_connections)
            transport.close()
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or refused)
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined head may already be complete; else the next one has the same time.
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection without a complete request head after %.0f s",
                      self.header_timeout_s)
            self.transport.close()


def bounded_protocol(header_timeout_s: float,
                     max_connections: int | None) -> type[BoundedH11Protocol]:
    """The protocol class for uvicorn's `http=` with these bounds."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})


def default_max_connections() -> int | None:
    """The descriptor limit less a reserve (model and adapter files, the log, the listener,
    pipes, asyncio's batch of accepts); None when descriptors are unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - max(64, soft // 8))


# ============================================================================ the log


_VERDICT = "_loramux_repeat"  # the attribute a record's verdict is kept in


class RepeatedLogFilter(logging.Filter):
    """At most `burst` records of one message per `interval_s`, for WARNING and above.

    A message is (logger, level, text): records that differ in any argument (a request id)
    are different messages, while a flood of one error ("Too many open files" at each
    accept, uvicorn's "Exception in ASGI application") is one. Records past the burst are
    dropped and counted (a traceback goes with its record); the first one let through after
    the interval ends with how many were dropped. INFO and below always pass: the access log
    is one line per request by design.

    Meant for handlers (a logger's filter misses records propagated from its children), and
    so called from any thread: a lock guards the counts. A record's verdict is kept on it, so
    several handlers with this filter agree.
    """

    def __init__(self, burst: int = 10, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1024) -> None:
        super().__init__()
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self.max_keys = max_keys
        self._windows: dict[tuple[str, int, str], list[Any]] = {}  # [start, passed, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        verdict = getattr(record, _VERDICT, None)
        if verdict is not None:
            return bool(verdict)
        text = record.getMessage()
        key = (record.name, record.levelno, text)
        now = self.clock()
        note = ""
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.interval_s:
                if window is not None and window[2]:
                    note = (f" ({window[2]} similar messages suppressed in the "
                            f"{self.interval_s:.0f} s before)")
                if window is None and len(self._windows) >= self.max_keys:
                    self._forget(now)
                self._windows[key] = [now, 1, 0]
            elif window[1] < self.burst:
                window[1] += 1
                if window[1] == self.burst:
                    note = (f" (repeated {self.burst} times; more are suppressed for up to "
                            f"{self.interval_s:.0f} s)")
            else:
                window[2] += 1
                setattr(record, _VERDICT, False)
                return False
        if note:
            record.msg, record.args = text + note, ()
        setattr(record, _VERDICT, True)
        return True

    def _forget(self, now: float) -> None:
        """Drop the windows that have ended, or else the oldest half."""
        ended = [k for k, w in self._windows.items() if now - w[0] >= self.interval_s]
        if not ended:
            ended = sorted(self._windows, key=lambda k: self._windows[k][0])
            ended = ended[: len(ended) // 2 + 1]
        for k in ended:
            del self._windows[k]
