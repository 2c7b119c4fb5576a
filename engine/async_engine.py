"""AsyncEngine: the step loop in its own thread, streams of outputs for asyncio callers.

Threads and what they own:
  - the step thread owns the LLMEngine: only it calls add_sequence, abort and step. Callers
    hand it commands through an inbox (a deque; append/popleft are atomic) and wake it;
  - `prepare_request` (tokenizing, validation, adapter resolution, which may load a lazy
    adapter from disk) runs in a worker thread through asyncio.to_thread, so neither the event
    loop nor the step loop waits on it, and errors reach the caller before anything is queued;
  - outputs go back to each request's asyncio.Queue via loop.call_soon_threadsafe.
A consumer that stops iterating (client disconnect, task cancelled) aborts its request, which
frees its KV blocks and adapter reference at the next step boundary.

Keep torch's parallel work on one thread. libgomp (PyTorch's OpenMP on Linux) gives every
thread that runs a parallel op its own team of worker threads, and once the process holds more
OpenMP threads than CPUs it stops letting workers spin between parallel regions: every small
op then waits for futex wake-ups. On a 2-core machine that made decode steps 2-3x slower. So
pass a factory (`AsyncEngine(lambda: LLMEngine.from_config(config))`): the model is then
loaded by the step thread itself, and no other thread ever starts a team.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from loramux.adapters.types import AdapterRef
from loramux.engine.engine import EngineStats, LLMEngine
from loramux.engine.request import RequestOutput, Sequence
from loramux.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_Stream = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[RequestOutput | BaseException]"]


class AsyncEngine:
    """Runs `engine.step()` in a background thread while there is work.

    `idle_wait_s`: how long the loop sleeps when every queued request waits for an adapter to
    page in (nothing could be scheduled), before it tries again.
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine],
                 idle_wait_s: float = 0.002) -> None:
        # With a factory, `engine` is set by the step thread before start() returns.
        self._factory = None if isinstance(engine, LLMEngine) else engine
        self.engine: LLMEngine = engine if isinstance(engine, LLMEngine) else None  # type: ignore[assignment]
        self.idle_wait_s = idle_wait_s
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="loramux-engine", daemon=True)

    def start(self, timeout: float | None = None) -> None:
        """Start the step thread; with a factory, return once it has built the engine (and
        raise what the factory raised)."""
        self._thread.start()
        self._started.wait(timeout)
        if self._start_error is not None:
            raise self._start_error

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (requests still queued are aborted)."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       adapter: str | AdapterRef | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (deltas); the last one has finished=True.

        Raises ValueError (bad input) or AdapterNotFound (unknown adapter) before the first
        output. Closing or cancelling the iterator aborts the request.
        """
        rid = request_id or uuid.uuid4().hex
        seq = await asyncio.to_thread(self.engine.prepare_request, rid, prompt, params, adapter)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        with self._streams_lock:
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._send("add", seq)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its stream gets nothing more."""
        with self._streams_lock:
            self._streams.pop(request_id, None)
        self._send("abort", request_id)

    # ------------------------------------------------------------------ step thread

    def _send(self, command: str, arg: Any) -> None:
        self._inbox.append((command, arg))
        self._wake.set()

    def _loop(self) -> None:
        try:
            if self._factory is not None:
                self.engine = self._factory()
        except BaseException as exc:  # noqa: BLE001 - handed to start()'s caller
            self._start_error = exc
            return
        finally:
            self._started.set()
        while not self._stopping:
            self._wake.clear()  # before draining: a command sent after this wakes the wait
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug or a device error: fail all requests, keep serving
                log.exception("engine step failed; failing all running requests")
                self._fail_all(exc)
                continue
            for out in outputs:
                self._deliver(out)
            if self.engine.last_step_tokens == 0:
                self._wake.wait(self.idle_wait_s)  # all queued requests wait for adapters
        for rid in list(self.engine.requests):
            self.engine.abort(rid)

    def _drain_inbox(self) -> None:
        while self._inbox:
            command, arg = self._inbox.popleft()
            if command == "add":
                seq: Sequence = arg
                try:
                    self.engine.add_sequence(seq)
                except ValueError as exc:  # a request id already in use
                    self._deliver_error(seq.request_id, exc)
            else:
                self.engine.abort(arg)

    def _deliver(self, out: RequestOutput) -> None:
        with self._streams_lock:
            stream = (self._streams.pop(out.request_id, None) if out.finished
                      else self._streams.get(out.request_id))
        if stream is not None:
            _put(stream, out)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._streams_lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            _put(stream, exc)

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._deliver_error(rid, RuntimeError(f"engine step failed: {exc}"))


def _put(stream: _Stream, item: RequestOutput | BaseException) -> None:
    loop, queue = stream
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed: nobody is listening
        pass
