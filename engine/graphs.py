"""Static step inputs, batch buckets, and CUDA graphs of decode steps.

Every per-step input of the forward lives in a buffer allocated once at its largest size and
refilled in place (`StepInputs`), so a CUDA graph captured over those buffers replays any later
step of its shape. Worked example, max_num_seqs 8, block_size 4, dummy block 9: a decode step
of three sequences (contexts 5, 2, 7; their last blocks 3, 1, 6) is padded to bucket 4:

    row            0     1     2     3 (padding)
    input_ids      a     b     c     0
    positions      4     1     6     0
    slot_mapping   12    5     26    36       (block * 4 + position % 4; padding: dummy row 0)
    context_lens   5     2     7     1        (the padding row attends to itself only)
    block_tables   [2,3] [1]   [5,6] [9]      (rows of the [8, max_blocks] table; stale
                                               entries past a context are never read)
    query_start_loc 0 1 2 3 4;  sample_rows 0 1 2 3 (logits of every row; rows 0..2 are used)
  LoRA (LoraMeta, same scheme): seg_starts [0, 2, 3, 4, 4], seg_slots [5, -1, -1, -1] when
  rows 0-1 use slot 5 and row 2 the base: a bucket always has `bucket` segments, padded with
  the padding rows' segment and empty ones, all slot -1, so the kernels' grids are fixed.

On CUDA the host side is pinned memory copied with non_blocking=True, and the next fill waits
for the last step's copies first (a pinned buffer must not change under a pending copy). The
block tables travel packed, [seqs, the step's longest table], and are spread into the
[max_seqs, max_blocks] table on the device, so a long context costs only what a step uses. On
the CPU the host buffer is the buffer: nothing is copied, and the padded step runs eagerly,
so the CPU tests run exactly the inputs a graph replays.

Decode steps of up to the largest bucket replay one graph per (bucket, LoRA on/off), captured
at start by `DecodeGraphs.capture`; prefill, mixed steps and larger batches run eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from loramux.engine.attention import AttentionMetadata, build_torch_plan, plan_to_device
from loramux.engine.scheduler import ScheduledSeq

log = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes graphs are captured for: 1, 2, 4, 8, then every 8, and max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += range(16, max_num_seqs, 8)
    return (*sizes, max_num_seqs)


def bucket_of(num_seqs: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding num_seqs rows, None past the largest."""
    for bucket in buckets:
        if bucket >= num_seqs:
            return bucket
    return None


class Staging:
    """Host twins of device buffers and the copies between them (see the module docstring).

    Invariant: between `wait` and `sent` only the host side is written; the device side of a
    buffer changes only by `Staged.send`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._done = torch.cuda.Event() if device.type == "cuda" else None

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> Staged:
        dev = torch.zeros(shape, dtype=dtype, device=self.device)
        host = dev if self._done is None else torch.zeros(shape, dtype=dtype, pin_memory=True)
        return Staged(dev, host, host.numpy())

    def wait(self) -> None:
        """Block until the last `sent` copies ran, so the host side may be written."""
        if self._done is not None:
            self._done.synchronize()

    def sent(self) -> None:
        """Mark the copies issued since `wait` (the next `wait` blocks on them)."""
        if self._done is not None:
            self._done.record()


@dataclass(frozen=True)
class Staged:
    """A device buffer, its host side (the same tensor on the CPU) and a numpy view of that."""

    dev: torch.Tensor
    host: torch.Tensor
    np: np.ndarray

    def send(self, n: int) -> None:
        """Copy the first n rows to the device, asynchronously from pinned memory."""
        if self.host is not self.dev:
            self.dev[:n].copy_(self.host[:n], non_blocking=True)


class StepInputs:
    """The forward's per-step inputs in buffers allocated once (layout: the module docstring).

    Invariants after `fill`: rows 0..rows-1 and sequences 0..seqs-1 are set, padding included;
    the device tensors never change identity (graphs read them by address).
    """

    def __init__(self, max_seqs: int, max_tokens: int, max_blocks: int, block_size: int,
                 dummy_block: int, device: torch.device, *, torch_plan: bool) -> None:
        self.staging = Staging(device)
        buf = self.staging.buffer
        self.input_ids = buf((max_tokens,), torch.int64)
        self.positions = buf((max_tokens,), torch.int64)
        self.slot_mapping = buf((max_tokens,), torch.int64)
        self.query_start_loc = buf((max_seqs + 1,), torch.int32)
        self.context_lens = buf((max_seqs,), torch.int32)
        # The table the forward reads is [max_seqs, max_blocks] (a graph records its stride),
        # but a step sends only its [seqs, width] part, packed (width: its longest table),
        # then spreads it on the device: a long context must not cost max_blocks per row.
        self.block_tables = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=device)
        self.packed_tables = buf((max_seqs * max_blocks,), torch.int32)
        self.sample_rows = buf((max_seqs,), torch.int64)
        self.block_size = block_size
        self.dummy_block = dummy_block
        self.device = device
        self.torch_plan = torch_plan  # the torch attention path also needs its CPU plan
        self._width = 1  # block table columns the last fill sent

    def fill(self, scheduled: list[ScheduledSeq], rows: int, seqs: int) -> int:
        """Load the step's sequences in row order, padded to `rows` rows and `seqs` sequences
        of one padding row each; returns the number of sampling rows (listed first in
        sample_rows, which a padded decode sets to every row)."""
        self.staging.wait()
        n = len(scheduled)
        ids = self.input_ids.np
        width = max((len(s.seq.block_table) for s in scheduled), default=1)
        tables = self.packed_tables.np[:seqs * width].reshape(seqs, width)  # [seqs, width]
        q_lens = np.fromiter((s.num_tokens for s in scheduled), np.int64, n)
        starts = np.fromiter((s.start for s in scheduled), np.int64, n)
        qsl = self.query_start_loc.np
        qsl[0] = 0
        np.cumsum(q_lens, out=qsl[1:n + 1])
        tokens = int(qsl[n])
        if tokens == n:  # decode rows only: one id each
            ids[:n] = [s.seq.token_ids[s.start] for s in scheduled]
        for b, s in enumerate(scheduled):
            if tokens != n:
                ids[qsl[b]:qsl[b + 1]] = s.seq.token_ids[s.start:s.start + s.num_tokens]
            table = s.seq.block_table
            tables[b, :len(table)] = table
        ctx = starts + q_lens
        self.context_lens.np[:n] = ctx
        # position of each new token, then its cache row through its block table
        seq_of_row = np.repeat(np.arange(n), q_lens)
        pos = np.arange(tokens) - qsl[:n][seq_of_row] + starts[seq_of_row]
        self.positions.np[:tokens] = pos
        bs = self.block_size
        self.slot_mapping.np[:tokens] = tables[seq_of_row, pos // bs] * bs + pos % bs
        # padding: token 0 at position 0, written to and read from the dummy block's row 0
        pad_rows, pad_seqs = rows - tokens, seqs - n
        assert pad_rows == pad_seqs and (pad_seqs == 0 or tokens == n), "only decodes pad"
        ids[tokens:rows] = 0
        self.positions.np[tokens:rows] = 0
        self.slot_mapping.np[tokens:rows] = self.dummy_block * bs
        qsl[n + 1:seqs + 1] = np.arange(tokens + 1, rows + 1)
        self.context_lens.np[n:seqs] = 1
        tables[n:seqs, 0] = self.dummy_block
        if pad_seqs:
            num_samples = rows
            self.sample_rows.np[:rows] = np.arange(rows)
        else:
            samples = [int(qsl[b + 1]) - 1 for b, s in enumerate(scheduled) if s.samples]
            num_samples = len(samples)
            self.sample_rows.np[:num_samples] = samples
        for staged, count in ((self.input_ids, rows), (self.positions, rows),
                              (self.slot_mapping, rows), (self.query_start_loc, seqs + 1),
                              (self.context_lens, seqs), (self.packed_tables, seqs * width),
                              (self.sample_rows, num_samples)):
            staged.send(count)
        self.staging.sent()
        packed = self.packed_tables.dev[:seqs * width].view(seqs, width)
        self.block_tables[:seqs, :width].copy_(packed)  # on the device, in stream order
        self._width = width
        return num_samples

    def attention(self, rows: int, seqs: int, max_query_len: int,
                  max_context_len: int) -> AttentionMetadata:
        """Metadata over the first rows / seqs of the buffers (views: what a graph reads).

        With the torch plan (the torch attention path) the host side must hold that step.
        """
        plan = None
        if self.torch_plan:
            ctx = self.context_lens.host[:seqs]
            qsl = self.query_start_loc.host[:seqs + 1]
            plan = plan_to_device(build_torch_plan(
                (qsl[1:] - qsl[:-1]).tolist(), ctx.tolist(),
                self.packed_tables.host[:seqs * self._width].view(seqs, self._width),
                ctx, self.block_size), self.device)
        return AttentionMetadata(
            positions=self.positions.dev[:rows],
            slot_mapping=self.slot_mapping.dev[:rows],
            query_start_loc=self.query_start_loc.dev[:seqs + 1],
            context_lens=self.context_lens.dev[:seqs],
            block_tables=self.block_tables[:seqs],
            max_query_len=max_query_len,
            max_context_len=max_context_len,
            plan=plan,
        )


# What a decode graph runs: the forward over a bucket's static inputs, LoRA on or off.
StepFn = Callable[[int, bool], torch.Tensor]


class DecodeGraphs:
    """One CUDA graph per (bucket, LoRA on/off) over the static inputs, sharing one pool.

    `step(bucket, lora)` runs the forward eagerly over the first `bucket` rows of the static
    buffers and returns its logits [bucket, V]. Captured largest bucket first, so the smaller
    graphs' memory comes out of the same pool.
    """

    def __init__(self, step: StepFn, buckets: Sequence[int], lora: bool) -> None:
        self.step = step
        self.buckets = tuple(buckets)
        self.lora_modes = (False, True) if lora else (False,)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture(self, fill_padding: Callable[[int], None]) -> None:
        """Capture every graph; `fill_padding(bucket)` loads a bucket of padding rows first
        (any values the kernels accept: the graph records addresses, not values)."""
        started = time.monotonic()
        free_before, _ = torch.cuda.mem_get_info()
        pool = None
        for bucket in sorted(self.buckets, reverse=True):
            for lora in self.lora_modes:
                fill_padding(bucket)
                self.step(bucket, lora)  # compiles, and allocates outside the graph's pool
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                # thread_local: the registry's page-in thread may copy adapter weights into the
                # pool meanwhile (on its own, uncaptured work); "global" would fail its calls
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    logits = self.step(bucket, lora)  # [bucket, V], the graph's output
                pool = graph.pool() if pool is None else pool
                self.graphs[bucket, lora] = (graph, logits)
        torch.cuda.synchronize()
        free_after, _ = torch.cuda.mem_get_info()
        log.info("captured %d CUDA graphs (buckets %s, LoRA %s) in %.1f s, %.0f MiB",
                 len(self.graphs), ",".join(map(str, self.buckets)),
                 "on and off" if len(self.lora_modes) == 2 else "off",
                 time.monotonic() - started, (free_before - free_after) / 2**20)

    def replay(self, bucket: int, lora: bool) -> torch.Tensor | None:
        """The logits [bucket, V] of the step loaded in the static buffers; None: no graph."""
        entry = self.graphs.get((bucket, lora))
        if entry is None:
            return None
        graph, logits = entry
        graph.replay()
        return logits
