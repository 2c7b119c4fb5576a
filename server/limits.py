"""Admission control: per-tenant rate and concurrency limits, and one bounded global queue.

Everything here runs on the event loop thread, between two awaits, so a check and the
charge that follows it cannot interleave with another request's: no locks.

Rates are token buckets refilled continuously: a bucket of `per_minute` holds at most one
minute's worth and refills at `per_minute / 60` per second, so a tenant may burst up to its
minute's budget and then gets its rate. A request is charged its tokens up front
(prompt + max_tokens x n, as OpenAI counts it) and refunded what it did not use when it ends.
A request larger than a whole minute's budget is admitted when the bucket is full and drives
it into debt, instead of never being admitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loramux.server.errors import APIError, bad_request, overloaded, rate_limited
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

    def admit(self, tenant: Tenant, tokens: int, sequences: int = 1) -> Admission:
        """Admit a request of `sequences` sequences costing up to `tokens`, or raise APIError.

        429 (with Retry-After) when the tenant is over a limit, 503 when the server is full.
        Nothing is charged when the request is refused.
        """
        now = self.clock()
        state = self._state(tenant, now)
        limits = tenant.limits
        if limits.max_concurrent is not None and state.running >= limits.max_concurrent:
            raise rate_limited(
                f"Too many concurrent requests for this key (limit {limits.max_concurrent}).",
                retry_after=1.0,
            )
        if state.requests is not None:
            wait = state.requests.wait_for(1, now)
            if wait > 0:
                raise rate_limited(
                    f"Rate limit reached: {limits.requests_per_minute} requests per minute.",
                    retry_after=wait,
                )
        if state.tokens is not None:
            wait = state.tokens.wait_for(tokens, now)
            if wait > 0:
                raise rate_limited(
                    f"Rate limit reached: {limits.tokens_per_minute} tokens per minute "
                    f"(this request may use {tokens}).",
                    retry_after=wait,
                )
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
        raise APIError(503, "The server is shutting down.", code="shutting_down",
                       retry_after=1.0)
