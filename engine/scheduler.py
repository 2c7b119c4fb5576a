"""Iteration-level scheduler: which sequences run this step, with how many tokens each.

Policy (every step):
  1. Running sequences, oldest first, each get their next tokens: 1 for a decode, up to the
     rest of the token budget for an unfinished (chunked) prefill. When the KV cache has no
     block for one of them, the youngest running sequence is preempted (blocks freed, later
     recomputed) until it fits; if the youngest is that sequence itself, it is preempted.
  2. If nothing was preempted, waiting sequences are admitted oldest first (FCFS: age is the
     priority, and a preempted sequence keeps its original age, so it goes first), while
     max_num_seqs and the token budget allow. A prefill that does not fit the rest of the
     budget is chunked. A sequence whose adapter is still paging in (`acquire` returns None)
     is skipped and stays queued, so others run meanwhile; the registry pages waiters in
     oldest first and, once one has waited `fairness_wait_s`, closes hot adapters to new
     references until it fits, so no adapter starves. A sequence that does not fit the free
     KV blocks stops admission (strict FCFS), so a long prompt is not starved by short ones.
  3. The step's sequences are ordered by adapter slot (stable), so each adapter is one
     contiguous segment of the flat batch.

Adapter references: a sequence acquires its adapter when first admitted and releases it when
it finishes or is aborted. It keeps the reference while preempted (see request.Sequence).
Before each step, sequences holding an adapter that the registry closed for a starving waiter
(`yielding`) are *parked*: they give the reference back, keep their KV blocks and their age,
and are skipped until their adapter can be acquired again, so a waiter gets the room within a
step instead of after the whole run of the requests in its way. When more adapters are in use
than fit, they take turns on the device; each step serves every row whose adapter is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loramux.adapters.types import AdapterError, AdapterNotFound, AdapterSource, refused_rule
from loramux.engine.kv_cache import BlockAllocator, blocks_for
from loramux.engine.request import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: rows `num_tokens` new tokens from position `start`."""

    seq: Sequence
    start: int  # position of its first new token (== seq.num_computed at schedule time)
    num_tokens: int

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or self.start + self.num_tokens > self.seq.num_tokens:
            raise ValueError("a scheduled chunk must be non-empty and within the sequence")

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so its logits give a token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """A step's batch, in row order: sequences grouped by adapter slot (-1 first)."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # finished with an error this step

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    preemptions: int = 0
    adapter_waits: int = 0  # times a waiting sequence was skipped because its adapter paged in
    parks: int = 0  # sequences that gave their adapter back mid-run for a starving waiter


class Scheduler:
    """Continuous batching over a block allocator and an adapter source.

    Invariants: `running` holds RUNNING sequences in age order, each with the KV blocks for its
    computed tokens; `waiting` holds WAITING sequences in age order, with no blocks.
    """

    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, adapters: AdapterSource | None) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adapters = adapters
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    # ------------------------------------------------------------------ queue

    def add(self, seq: Sequence) -> None:
        self._insert_waiting(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and give back its blocks and adapter reference."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free_blocks(seq)
        self.release_adapter(seq)

    def release_adapter(self, seq: Sequence) -> None:
        if seq.holds_adapter:
            assert self.adapters is not None and seq.adapter is not None
            self.adapters.release(seq.adapter)
            seq.holds_adapter = False
            seq.slot = None
        elif seq.parked:
            assert self.adapters is not None and seq.adapter is not None
            self.adapters.unpark(seq.adapter)
            seq.parked = False

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        i = 0
        self._park_yielding()
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.parked and not self._acquire(seq, out):
                if seq in self.running:  # else it failed (its adapter is gone) and left
                    i += 1  # still parked: skipped this step, KV kept
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._make_room(seq, n, out):
                break  # seq itself was preempted: everything after it already was too
            scheduled.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
            i += 1
        if not out.preempted:
            budget = self._admit(scheduled, budget, out)
        scheduled.sort(key=lambda s: s.seq.slot_key)  # stable: age order within a slot
        out.scheduled = scheduled
        return out

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Grow seq's block table for n more tokens, preempting the youngest running sequences
        if needed. False if seq had to be preempted itself."""
        need = blocks_for(seq.num_computed + n, self.block_size) - len(seq.block_table)
        while not self.allocator.can_allocate(need):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        seq.block_table += self.allocator.allocate(max(need, 0))
        return True

    def _admit(self, scheduled: list[ScheduledSeq], budget: int, out: SchedulerOutput) -> int:
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            n = min(seq.num_tokens, budget)  # a waiting sequence has nothing cached
            if not self.allocator.can_allocate(blocks_for(n, self.block_size)):
                break
            if not self._acquire(seq, out):
                continue
            self.waiting.remove(seq)
            seq.block_table = self.allocator.allocate(blocks_for(n, self.block_size))
            seq.status = SeqStatus.RUNNING
            self._insert_running(seq)
            scheduled.append(ScheduledSeq(seq, 0, n))
            budget -= n
        return budget

    def _park_yielding(self) -> None:
        """Park every sequence holding an adapter the registry asks back (see the module
        docstring): running ones keep their KV blocks, preempted ones wait as before."""
        if self.adapters is None:
            return
        yielding = self.adapters.yielding()
        if not yielding:
            return
        for seq in (*self.running, *self.waiting):
            if seq.holds_adapter and seq.adapter in yielding:
                assert seq.adapter is not None
                self.adapters.park(seq.adapter)
                seq.holds_adapter, seq.parked, seq.slot = False, True, None
                self.stats.parks += 1

    def _acquire(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Take seq's adapter reference if it has none yet; False while the adapter pages in
        (or if it is gone, in which case seq is finished with an error)."""
        if seq.adapter is None or seq.holds_adapter:
            return True
        assert self.adapters is not None
        if seq.parked:
            return self._resume(seq, out)
        try:
            slot = self.adapters.acquire(seq.adapter)
        except (AdapterNotFound, AdapterError) as exc:
            # The version this request was given was reloaded (or its files changed) before
            # the request took its first reference. Nothing ran on it yet, so it takes the
            # name's current version, as a request arriving now would; gone: it fails.
            current = self.adapters.current(seq.adapter.name)
            if current is not None and current != seq.adapter:
                seq.adapter = current
                self.adapters.prefetch(current)
                self.stats.adapter_waits += 1
                return False
            self._fail_unavailable(seq, exc, out)
            return False
        if slot is None:
            self.stats.adapter_waits += 1
            return False
        seq.slot, seq.holds_adapter = slot, True
        return True

    def _resume(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Take a parked sequence's reference again; False while its adapter is away. If the
        adapter can no longer be paged in (its files changed on disk), the sequence fails:
        it already ran on that version, so unlike a new request it cannot move to another."""
        assert self.adapters is not None and seq.adapter is not None
        try:
            slot = self.adapters.acquire(seq.adapter, parked=True)
        except (AdapterNotFound, AdapterError) as exc:
            self._fail_unavailable(seq, exc, out)
            return False
        if slot is None:
            self.stats.adapter_waits += 1
            return False
        seq.slot, seq.holds_adapter, seq.parked = slot, True, False
        return True

    def _fail_unavailable(self, seq: Sequence, exc: Exception, out: SchedulerOutput) -> None:
        """seq's adapter cannot be acquired: it leaves the queues (blocks and any parked hold
        given back) and finishes with an error naming the rule that failed."""
        assert seq.adapter is not None
        self.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = "error"
        seq.error, seq.error_code = _unavailable(seq.adapter.name, exc), "adapter_unavailable"
        out.failed.append(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Back to WAITING, KV freed (recomputed later); the adapter reference is kept."""
        self.running.remove(seq)
        self._free_blocks(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        self._insert_waiting(seq)
        out.preempted.append(seq)

    # ------------------------------------------------------------------ after the step

    def finish(self, seq: Sequence) -> None:
        """A sequence finished: leave the running set, free its blocks and adapter."""
        seq.status = SeqStatus.FINISHED
        self.remove(seq)

    # ------------------------------------------------------------------ internals

    def _free_blocks(self, seq: Sequence) -> None:
        if seq.block_table:
            self.allocator.free(seq.block_table)
            seq.block_table = []

    def _insert_waiting(self, seq: Sequence) -> None:
        _insert_by_age(self.waiting, seq)

    def _insert_running(self, seq: Sequence) -> None:
        _insert_by_age(self.running, seq)


def _insert_by_age(queue: list[Sequence], seq: Sequence) -> None:
    """Insert keeping the queue sorted by arrival (new arrivals append in O(1))."""
    i = len(queue)
    while i > 0 and queue[i - 1].arrival > seq.arrival:
        i -= 1
    queue.insert(i, seq)


def _unavailable(name: str, exc: Exception) -> str:
    """What a client is told when its adapter cannot be acquired: the rule that failed
    (AdapterRefused's `rule`), never the refusal's detail, which names server paths and
    digests (the registry logs that)."""
    if isinstance(exc, AdapterNotFound):
        return f"The adapter `{name}` was unloaded before this request started."
    rule = refused_rule(exc)
    cause = f" ({rule})" if rule else ""
    return f"The adapter `{name}` cannot be served{cause}; the server's log has the details."
