"""The adapter registry: names -> versions, tiers disk -> host -> device, references, fairness.

`AdapterRegistry` implements the engine's `AdapterSource`. What it guarantees:

  - Loading validates fully (adapters/peft.py) before any state changes, so a refused or failed
    load leaves the registry exactly as it was, including the previous version serving.
    Loads of one name are serialised; loads of different names run in parallel.
  - Loading a name that exists makes a new version (a new `AdapterRef`); `resolve` returns it
    from then on. An older version stays acquirable while it still has references and is freed
    (device region, slot, host buffer) when the last one is released. `unload` works the same
    way: the name disappears at once, memory goes with the last release. Loading the same
    weights and config again under a name is a no-op that returns the current version.
  - A slot returned by `acquire` is never evicted or reused until its `release`; pinned
    adapters are never evicted. Page-ins run on two background threads (disk -> host,
    host -> device); no engine-facing call waits for I/O or a copy, except `resolve`, which
    loads a lazy name and stats the files of a version that failed (call it off the step loop).
  - A failure is remembered with the folder it read (its resolved path and own device and
    inode; its files' names, sizes, mtimes, ctimes, inodes), so nothing is re-read per request
    while they stay the same: a lazy folder that failed validation, and a version whose re-read
    from disk failed. `resolve` retries as soon as the folder differs (a restored file serves
    again without a reload), and also after a backoff while it stays the same (1 s, doubling per
    consecutive failure up to 60 s), since a failure need not come from the files (EMFILE, a
    time budget hit under load): a transient failure heals within seconds, a broken adapter
    costs one re-read a minute. A reload of the same content clears the failure too.
    Refusals a tenant can see name files by their name in the folder, never a server path or
    a digest (the log has both).
  - With `state_file`, every runtime load, reload, pin, unpin and unload (after `start`) is
    written to it atomically, and `start` applies it after the configured start-up set, so a
    restart, even after SIGKILL, serves what was served before. Lazy loads are not recorded:
    their folders load again on demand.

Fairness (the rule the scheduler can rely on). Every adapter version that a request wants
(`prefetch` or an `acquire` that returned None) but that is not resident is a *waiter*, aged
from its first want:
  1. The page-in thread serves waiters oldest first. A waiter is placed if a slot and region
     are free or can be freed by evicting ready, unreferenced, unpinned adapters, least recently
     used first, that no older waiter wants. A younger waiter that fits may overtake an older
     one that does not (the device stays busy).
  2. A waiter that has waited `fairness_wait_s` is *starving*. If it is in host memory (its
     disk read done) and cannot be placed, no younger waiter is placed, and the least recently
     used referenced adapters whose room it needs are *closed*: `acquire` on them returns None
     (new requests for them wait and age like any other) while their running requests finish.
     On their last release they are evicted and the starving waiter gets the room; closures
     are recomputed on every pass.
  3. The engine does not wait for those requests to finish: every step it `park`s the running
     requests of closed adapters (`yielding`), which give their reference back and keep their
     KV cache. A parked reference keeps its version alive (an unload frees it only when the
     parked requests end too) and wants it back like any waiter; `acquire(ref, parked=True)`
     takes it again. Adapters thus take turns on the device when more are in use than fit.
     A want of parked requests only (they have their first token) starves after
     `parked_wait_s` rather than `fairness_wait_s`, so turns last several steps: new requests
     get the room quickly, running ones are not swapped out every few steps.
So no adapter waits much longer than `fairness_wait_s` plus a step and a page-in per older
starving waiter, however hot the others are. A waiter that even evicting every
unpinned adapter could not place (pins fill the pool) is skipped rather than blocking others.
A want lapses if neither `prefetch` nor `acquire` touches it for `want_ttl_s`.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from loramux.adapters.config import RegistryConfig
from loramux.adapters.host_cache import HostAdapter, HostCache, pack
from loramux.adapters.peft import (
    CONFIG_FILE,
    NAME_RE,
    AdapterRefused,
    PeftAdapter,
    Rule,
    ValidationLimits,
    check_name,
    read_adapter,
)
from loramux.adapters.pool import DevicePool, Resident
from loramux.adapters.sizing import size_pool
from loramux.adapters.types import (
    MODULES,
    AdapterError,
    AdapterNotFound,
    AdapterRef,
    BaseSpec,
    LoraTables,
)

log = logging.getLogger(__name__)

_TICK_S = 0.05  # how often idle workers re-check ageing and want expiry
_SAMPLES = 1024  # latency samples kept per series
_T = TypeVar("_T")
_STATE_FORMAT = 1
_DIGESTS = re.compile(r" has sha256 [0-9a-f]{64}, expected [0-9a-f]{64}")
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\",:/]+/)*([^\s'\",:/]+)")
# A remembered failure whose folder did not change is retried this long after it (registry
# clock), doubling per consecutive failure up to _RETRY_MAX_S (read at use: tests patch them).
_RETRY_FIRST_S = 1.0
_RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class LoadResult:
    """What a load did: the version it made and what the adapter changes."""

    ref: AdapterRef
    path: Path  # adapter directory, symlinks resolved
    applied: tuple[tuple[int, str], ...]  # (layer, module) pairs the adapter changes
    modules: tuple[str, ...]  # distinct modules, in MODULES order
    ranks: tuple[int, ...]  # distinct ranks, ascending
    size_bytes: int  # packed size: what it takes in host memory and in the device pool
    file_bytes: int
    load_seconds: float
    replaced: AdapterRef | None = None  # the version it superseded (now draining)
    unchanged: bool = False  # same weights and config as the current version: no new version
    recovered: bool = False  # unchanged, and the files read back fine: a remembered failure cleared

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def version(self) -> int:
        return self.ref.version

    @property
    def digest(self) -> str:
        return self.ref.digest


@dataclass(frozen=True)
class AdapterInfo:
    """One row of the registry's listing (admin API, /v1/models, metrics)."""

    name: str
    version: int
    digest: str
    current: bool  # False: superseded or unloaded, draining its last references
    tier: str  # "device", "paging" (copy or disk read in flight), "host" or "disk"
    slot: int | None
    modules: tuple[str, ...]
    ranks: tuple[int, ...]
    size_bytes: int
    refcount: int
    pinned: bool
    last_use: float | None  # wall-clock time of the last acquire
    loaded_at: float  # wall-clock time the version was registered
    load_seconds: float
    path: Path


@dataclass
class RegistryStats:
    """Counters as plain attributes; the server exports them (no Prometheus import here)."""

    loads: int = 0
    load_failures: int = 0
    lazy_loads: int = 0
    unloads: int = 0
    disk_reads: int = 0  # re-reads disk -> host after a host eviction
    disk_read_failures: int = 0
    page_ins: int = 0  # host -> device
    page_in_failures: int = 0
    state_write_failures: int = 0  # runtime changes that could not be written to state_file
    device_evictions: int = 0  # LRU evictions (frees of drained versions are not counted)
    host_evictions: int = 0
    parks: int = 0  # references given back mid-request for a starving waiter (`park`)
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    disk_read_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    page_in_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))
    wait_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=_SAMPLES))


@dataclass
class _Version:
    ref: AdapterRef
    result: LoadResult
    config_digest: str
    numel: int
    root: Path | None  # confinement root for re-reads (None: operator-trusted path)
    loaded_at: float
    pinned: bool = False
    retired: bool = False
    error: AdapterError | None = None  # set when it can no longer be paged in
    error_files: tuple[Any, ...] | None = None  # _signature of the folder whose read failed
    error_at: float = 0.0  # registry clock at that failure
    error_count: int = 0  # consecutive failed re-reads (0 after a good one or a reload)
    last_use: float | None = None
    parked: int = 0  # references given back mid-request (`park`) and not yet taken again

    @property
    def serving(self) -> bool:
        """Whether requests may still page it in: not retired, or retired with requests
        parked mid-run that will take it again (an unload waits for them)."""
        return not self.retired or self.parked > 0


@dataclass(frozen=True)
class _LazyFailure:
    signature: tuple[Any, ...]  # _signature of the folder, taken before the read
    error: AdapterError
    at: float  # registry clock at the failure
    count: int  # consecutive failures of this name


@dataclass
class _Want:
    since: float  # first want: the age the fairness rule uses
    touched: float
    pinned: bool = False  # pins never lapse
    parked: bool = False  # wanted back by requests parked mid-run: starves after parked_wait_s


@dataclass
class _NameLock:
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0  # holders and waiters


@dataclass
class _PageIn:
    ref: AdapterRef
    resident: Resident
    host: HostAdapter
    since: float


class AdapterRegistry:
    """Validated PEFT adapters by name and version, paged disk -> host -> device on demand.

    The engine uses `tables`, `resolve`, `prefetch`, `acquire`, `release` (the AdapterSource
    protocol); the server uses `load`, `unload`, `pin`, `unpin`, `list`, `stats`. Call `start`
    once to load the configured start-up set, and `close` (or use it as a context manager) to
    stop the background threads.
    """

    def __init__(
        self,
        config: RegistryConfig,
        base: BaseSpec,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_num_seqs: int = 1,
    ) -> None:
        """`max_num_seqs`: the engine's sequences per step; without a --max-gpu-adapters cap
        the pool has at least that many slots, so every row of a step may have its own
        adapter (adapters/sizing.py)."""
        self.config = config
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        self.limits = ValidationLimits(max_lora_rank=config.max_lora_rank,
                                       max_adapter_bytes=config.max_adapter_bytes,
                                       allow_pickle=config.allow_pickle)
        self.pool_size = size_pool(config, base, dtype, self.device, max_num_seqs=max_num_seqs)
        self._element = torch.empty((), dtype=dtype).element_size()
        self._pool = DevicePool(base, num_slots=self.pool_size.num_slots,
                                capacity_elements=self.pool_size.capacity_bytes // self._element,
                                max_rank=config.max_lora_rank, device=self.device, dtype=dtype)
        self._log_pool()
        self.tables: LoraTables = self._pool.tables
        self._pin_host = self.device.type == "cuda" and torch.cuda.is_available()
        # Pinned buffers are rounded up to a power of two by torch's host allocator: the
        # host tier's budget counts what is really held.
        self._host = HostCache(config.max_cpu_adapters, config.cpu_cache_bytes,
                               pinned=self._pin_host)
        self._clock = clock
        self.stats = RegistryStats()
        # The engine may set its compute stream so page-in copies wait for its kernels.
        self.compute_stream: torch.cuda.Stream | None = None

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._names: dict[str, AdapterRef] = {}
        self._versions: dict[AdapterRef, _Version] = {}
        self._next_version: dict[str, int] = {}  # never reset, so refs are never reused
        self._name_locks: dict[str, _NameLock] = {}
        self._wants: dict[AdapterRef, _Want] = {}
        self._reading: set[AdapterRef] = set()
        self._closed: set[AdapterRef] = set()  # fairness: no new references for now
        self._lazy_failures: dict[str, _LazyFailure] = {}
        # Runtime changes by name (None: unloaded) as written to config.state_file.
        self._state_lock = threading.Lock()
        self._overrides: dict[str, dict[str, Any] | None] = {}
        self._startup_names: set[str] = set()
        self._recording = False  # from the end of start(): changes are runtime changes
        self._closing = False
        self._threads = [
            threading.Thread(target=self._disk_loop, name="loramux-adapter-disk", daemon=True),
            threading.Thread(target=self._device_loop, name="loramux-adapter-pagein",
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # ================================================================== start-up and shutdown

    def start(self) -> list[str]:
        """Load `--adapter` entries (raising on the first failure), reconcile the desired set,
        pin `config.pinned`, then apply the runtime changes kept in `config.state_file`;
        returns the errors of desired-set, pin and state entries. Changes made from now on
        are written to the state file."""
        for name, path in self.config.adapters:
            self.load(name, path, trusted=True)
        errors: list[str] = []
        if self.config.desired_set is not None:
            errors += self.reconcile(self.config.desired_set)
        for name in self.config.pinned:
            try:
                self.pin(name)
            except (AdapterError, AdapterNotFound) as exc:
                errors.append(f"pin {name}: {exc}")
        self._startup_names = set(self.names())
        if self.config.state_file is not None:
            errors += self._restore_state(self.config.state_file)
        else:
            log.warning("runtime adapter changes (admin loads, reloads, uploads, pins, "
                        "unloads) are not persisted: a restart serves the --adapter, "
                        "--adapter-desired-set and --pin-adapter set again; start with "
                        "--adapter-state FILE to keep them")
        self._recording = True
        for error in errors:
            log.error("adapter start-up: %s", error)
        return errors

    def reconcile(self, desired_set: Path) -> list[str]:
        """Load every entry of a desired-set file (YAML or JSON: a list, or {"adapters": list},
        of {name, path, pinned}); relative paths are under the file's folder. Entries already
        loaded with the same weights are left alone. Returns one error string per failed entry.
        """
        import yaml

        try:
            document = yaml.safe_load(Path(desired_set).read_text())
        except (OSError, yaml.YAMLError) as exc:
            return [f"desired set {desired_set}: {exc}"]
        entries = document.get("adapters") if isinstance(document, dict) else document
        if not isinstance(entries, list):
            return [f"desired set {desired_set}: expected a list of {{name, path, pinned}}"]
        errors: list[str] = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not {"name", "path"} <= entry.keys():
                errors.append(f"desired set entry {index}: needs name and path")
                continue
            path = Path(str(entry["path"]))
            if not path.is_absolute():
                path = Path(desired_set).parent / path
            try:
                self.load(str(entry["name"]), path, pinned=bool(entry.get("pinned", False)),
                          trusted=True)
            except AdapterError as exc:
                errors.append(f"desired set entry {entry['name']!r}: {exc}")
        return errors

    def close(self) -> None:
        """Stop the background threads (a page-in in progress finishes first)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> AdapterRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ================================================================== runtime state file

    def _restore_state(self, state: Path) -> list[str]:
        """Apply the runtime changes kept in `state` (start-up, after the configured set)."""
        entries: dict[str, Any] = {}
        try:
            document = json.loads(state.read_text())
            entries = document["adapters"]
            if document.get("format") != _STATE_FORMAT or not isinstance(entries, dict):
                raise ValueError(f"not a format-{_STATE_FORMAT} adapter state")
        except FileNotFoundError:
            pass  # a first start: written below
        except OSError as exc:
            return [f"adapter state {state}: {exc}"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = state.with_name(f"{state.name}.unreadable")
            try:
                state.replace(aside)
            except OSError:
                aside = state
            return [f"adapter state {state}: unreadable ({exc}); kept as {aside}, runtime "
                    "changes start afresh"]
        errors: list[str] = []
        for name, entry in entries.items():
            try:
                if entry is None:
                    if name in self.names():
                        self.unload(name)
                    continue
                result = self.load(name, entry["path"], trusted=not entry["confined"])
                if result.digest != entry["digest"]:
                    log.warning("adapter state: the weights of %s under %s changed while the "
                                "server was down; serving them as they are now", name,
                                entry["path"])
                (self.pin if entry["pinned"] else self.unpin)(name)
            except (AdapterError, AdapterNotFound, KeyError, TypeError) as exc:
                errors.append(f"adapter state entry {name!r}: {type(exc).__name__}: {exc}")
        with self._state_lock:
            self._overrides = dict(entries)
            if not self._write_state():  # now, so that an unwritable file shows at start
                errors.append(f"adapter state {state} cannot be written: runtime changes "
                              "will not survive a restart")
        log.info("runtime adapter changes are persisted to %s: %d restored", state,
                 len(entries) - len(errors))
        return errors

    def _record(self, name: str) -> None:
        """Write `name`'s state now to the state file, if this change is a runtime one."""
        state = self.config.state_file
        if state is None or not self._recording:
            return
        with self._state_lock:
            with self._lock:
                ref = self._names.get(name)
                if ref is not None:
                    version = self._versions[ref]
                    self._overrides[name] = {
                        "path": str(version.result.path), "pinned": version.pinned,
                        "confined": version.root is not None, "digest": ref.digest}
                elif name in self._startup_names:
                    self._overrides[name] = None  # the start-up set would load it again
                else:
                    self._overrides.pop(name, None)
            if not self._write_state():
                log.error("the change to %s will not survive a restart", name)

    def _write_state(self) -> bool:
        """Under the state lock: write the overrides to the state file; False if it failed."""
        state = self.config.state_file
        assert state is not None
        document = {"format": _STATE_FORMAT, "adapters": self._overrides}
        try:
            _write_atomically(state, json.dumps(document, indent=1) + "\n")
        except OSError as exc:
            with self._lock:
                self.stats.state_write_failures += 1
            log.error("could not write the adapter state %s: %s", state, exc)
            return False
        return True

    # ================================================================== engine side

    def resolve(self, name: str) -> AdapterRef:
        """The current version of `name`. An unknown name that is a folder under adapter_root
        is loaded now (the only I/O any engine-facing call does); raises AdapterNotFound, or
        AdapterError when that folder holds an adapter that fails validation. A current
        version whose re-read failed is made acquirable again if its folder changed since or
        its backoff ran out."""
        with self._lock:
            ref = self._names.get(name)
            version = self._versions.get(ref) if ref is not None else None
        if ref is None:
            return self._resolve_lazy(name)
        if version is not None and version.error_files is not None:
            self._retry_if_due(version)
        return ref

    def current(self, name: str) -> AdapterRef | None:
        """The current version of a loaded name, or None; never loads anything."""
        with self._lock:
            return self._names.get(name)

    def prefetch(self, ref: AdapterRef) -> None:
        """Start paging `ref` towards the device if it is not there; returns at once."""
        with self._cond:
            version = self._versions.get(ref)
            if version is None or version.retired or version.error is not None:
                return
            resident = self._pool.get(ref)
            if resident is None or not resident.ready:
                self._want(ref)
                self._cond.notify_all()

    def acquire(self, ref: AdapterRef, *, parked: bool = False) -> int | None:
        """The device slot of `ref` with its reference count raised, or None while it pages in.

        A slot returned here is never evicted or reused until the matching `release`.
        `parked`: the caller gave its reference back with `park` and takes it again (allowed
        for an unloaded version that is still draining; on success the parked hold becomes
        the reference). Raises
        AdapterNotFound for a version that was superseded or unloaded and has drained (the
        engine moves a request that has not started to `current(name)`, or fails it if the
        name is gone), and AdapterError for a version that can no longer be paged in (its
        files changed or vanished on disk; `resolve` retries once they change again).
        """
        with self._cond:
            version = self._versions.get(ref)
            if version is None:
                raise AdapterNotFound(f"{ref.name} version {ref.version} is no longer loaded")
            if version.error is not None:
                raise version.error
            if parked and version.parked <= 0:
                raise ValueError(f"acquire(parked=True) of {ref} without a matching park")
            resident = self._pool.get(ref)
            if resident is not None and resident.ready and ref not in self._closed:
                resident.refcount += 1
                resident.last_use = self._clock()
                version.last_use = time.time()
                if parked:  # the parked hold becomes this reference
                    version.parked -= 1
                self._wants.pop(ref, None)
                return resident.slot
            if version.retired and not parked:
                raise AdapterNotFound(f"{ref.name} version {ref.version} is draining")
            self._want(ref)
            if not parked:  # a new request waits: the adapter gets the new request's patience
                self._wants[ref].parked = False
            self._cond.notify_all()
            return None

    def release(self, ref: AdapterRef) -> None:
        """Drop one reference taken by `acquire` (the last one of a drained version frees it)."""
        with self._cond:
            resident = self._pool.get(ref)
            if resident is None or resident.refcount <= 0:
                raise ValueError(f"release of {ref} without a matching acquire")
            resident.refcount -= 1
            if resident.refcount == 0:
                version = self._versions.get(ref)
                if version is not None and version.retired:
                    self._free_if_drained(version)
                self._cond.notify_all()  # the room may be what a waiter needs

    def yielding(self) -> frozenset[AdapterRef]:
        """Referenced versions the fairness rule has closed for a starving waiter: holders
        that can give their reference back mid-request (`park`) should do so."""
        with self._lock:
            return frozenset(self._closed)

    def park(self, ref: AdapterRef) -> None:
        """Give back one reference taken by `acquire`, keeping the version for the caller:
        the device may evict it, nothing frees it, and it is wanted back (a waiter aged from
        now). Take it again with `acquire(ref, parked=True)`, or drop it with `unpark`."""
        with self._cond:
            resident = self._pool.get(ref)
            version = self._versions.get(ref)
            if resident is None or resident.refcount <= 0 or version is None:
                raise ValueError(f"park of {ref} without a matching acquire")
            resident.refcount -= 1
            version.parked += 1
            self.stats.parks += 1
            fresh = ref not in self._wants
            self._want(ref)
            if fresh:
                self._wants[ref].parked = True
            self._cond.notify_all()  # the room may be what a waiter needs

    def unpark(self, ref: AdapterRef) -> None:
        """Drop a parked hold without taking the reference again (its request ended)."""
        with self._cond:
            version = self._versions.get(ref)
            if version is None or version.parked <= 0:
                raise ValueError(f"unpark of {ref} without a matching park")
            version.parked -= 1
            if version.retired:
                self._free_if_drained(version)

    def acquire_wait(self, ref: AdapterRef, timeout: float = 30.0) -> int:
        """`acquire`, waiting up to `timeout` s for the page-in (tests, warm-up; not the step
        loop). Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                slot = self.acquire(ref)
                if slot is not None:
                    return slot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{ref} not resident after {timeout} s")
                self._cond.wait(min(left, _TICK_S))

    def waiting(self) -> list[AdapterRef]:
        """Wanted versions not yet usable on the device, oldest want first (the scheduler's and
        metrics' `waiting_lora_adapters`)."""
        with self._lock:
            return [ref for ref, _ in sorted(self._wants.items(), key=lambda kv: kv[1].since)
                    if not self._usable(ref)]

    def resident(self) -> list[AdapterRef]:
        """Versions ready on the device (metrics' `running_lora_adapters`)."""
        with self._lock:
            return [r.key for r in self._pool.residents() if r.ready]  # type: ignore[misc]

    @property
    def max_slots(self) -> int:
        """Accelerator adapter slots: the most adapters resident at once (metrics'
        `max_lora`); the pool's bytes may bind first (`pool_capacity`)."""
        return self._pool.num_slots

    def pool_capacity(self, rank: int) -> int:
        """How many adapters of `rank` on every projection the accelerator pool holds."""
        return self.pool_size.adapters_at(self.base, rank, self._element)

    def _log_pool(self) -> None:
        size, top = self.pool_size, self.config.max_lora_rank
        smaller = ", ".join(f"{self.pool_capacity(r)} at rank {r}" for r in (16, 8) if r < top)
        log.info("adapter pool: %.2f GiB on %s (%s), %d slots; it holds %d adapters of rank "
                 "%d (--max-lora-rank) on every projection%s", size.capacity_bytes / 2**30,
                 self.device, size.source, size.num_slots, self.pool_capacity(top), top,
                 f" ({smaller})" if smaller else "")

    def ready(self) -> bool:
        """Whether every pinned adapter is resident (gate readiness on it)."""
        with self._lock:
            return all(self._usable(ref) for ref, v in self._versions.items() if v.pinned)

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until `ready()`; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, _TICK_S))
            return True

    # ================================================================== admin side

    def load(self, name: str, path: Path | str, *, pinned: bool = False,
             trusted: bool = False) -> LoadResult:
        """Validate the PEFT adapter at `path` and register it as the newest version of `name`.

        `trusted` paths (the operator's --adapter and desired-set entries) may lie anywhere;
        others (admin API, uploads) must resolve inside adapter_root. Raises AdapterError
        naming the broken rule, leaving the registry unchanged.
        """
        check_name(name)
        with self._name_lock(name):
            result = self._load_locked(name, Path(path), pinned=pinned, trusted=trusted)
            self._record(name)
            return result

    def validate(self, path: Path | str, *, trusted: bool = False) -> PeftAdapter:
        """Every check `load` makes (path, files, tensors, size against both tiers) without
        registering anything: for uploads, before they are moved into place."""
        path = Path(path)
        try:
            root = None if trusted else self._root_for(path)
            adapter = read_adapter(path, self.base, self.limits, root=root, dtype=self.dtype)
            self._check_fits(pack(adapter, self.base, self.dtype, pin=False))
        except OSError as exc:
            raise AdapterRefused(Rule.FILES, f"{path}: {exc}") from None
        return adapter

    def lazy_names(self) -> builtins.list[str]:
        """Folders under adapter_root that `resolve` would load and that are not loaded yet
        (valid names holding an adapter_config.json; not validated here)."""
        root = self.config.adapter_root
        if root is None or not root.is_dir():
            return []
        with self._lock:
            loaded = set(self._names)
        found = []
        for child in root.iterdir():
            if child.name in loaded or not NAME_RE.fullmatch(child.name) or ".." in child.name:
                continue
            if (child / CONFIG_FILE).is_file():
                found.append(child.name)
        return sorted(found)

    def unload(self, name: str) -> AdapterRef:
        """Remove `name` now; its memory is freed when its last reference is released."""
        with self._name_lock(name):
            with self._cond:
                ref = self._names.pop(name, None)
                if ref is None:
                    raise AdapterNotFound(name)
                self._retire(self._versions[ref])
                self._lazy_failures.pop(name, None)
                self.stats.unloads += 1
                self._cond.notify_all()
            self._record(name)
            return ref

    def pin(self, name: str) -> AdapterRef:
        """Keep `name`'s current version (and its future versions) resident, never evicted."""
        with self._cond:
            ref = self._names.get(name)
            if ref is None:
                raise AdapterNotFound(name)
            version = self._versions[ref]
            if not version.pinned:
                self._check_pin_room(exclude=name)
                self._set_pinned(version, True)
                self._cond.notify_all()
        self._record(name)
        return ref

    def unpin(self, name: str) -> AdapterRef:
        """Make `name` evictable again (LRU)."""
        with self._cond:
            ref = self._names.get(name)
            if ref is None:
                raise AdapterNotFound(name)
            self._set_pinned(self._versions[ref], False)
        self._record(name)
        return ref

    def list(self) -> builtins.list[AdapterInfo]:
        """Every loaded version (current first by name, then draining ones)."""
        with self._lock:
            rows = [self._info(v) for v in self._versions.values()]
        return sorted(rows, key=lambda i: (not i.current, i.name, i.version))

    def describe(self, ref: AdapterRef) -> AdapterInfo:
        """The listing row of version `ref`; AdapterNotFound once it is gone."""
        with self._lock:
            version = self._versions.get(ref)
            if version is None:
                raise AdapterNotFound(ref.name)
            return self._info(version)

    def get(self, name: str) -> AdapterInfo:
        """The listing row of `name`'s current version; AdapterNotFound if none."""
        with self._lock:
            ref = self._names.get(name)
            if ref is None:
                raise AdapterNotFound(name)
            return self._info(self._versions[ref])

    def names(self) -> builtins.list[str]:
        with self._lock:
            return sorted(self._names)

    def memory(self) -> dict[str, int]:
        """Bytes in use and budgets of both tiers."""
        with self._lock:
            return {
                "device_used_bytes": self._pool.used_bytes,
                "device_capacity_bytes": self._pool.capacity_bytes,
                "host_used_bytes": self._host.nbytes,
                "host_entries": len(self._host),
            }

    # ================================================================== loading

    @contextmanager
    def _name_lock(self, name: str) -> Iterator[None]:
        """One load, unload or lazy read of `name` at a time; the entry lives only while
        someone holds or waits for it, so names that come and go leave nothing behind."""
        with self._lock:
            entry = self._name_locks.setdefault(name, _NameLock())
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._name_locks[name]

    def _load_locked(self, name: str, path: Path, *, pinned: bool, trusted: bool) -> LoadResult:
        started = time.perf_counter()
        try:
            root = None if trusted else self._root_for(path)
            adapter, host = _in_own_thread(lambda: self._read_and_pack(path, root))
            self._check_fits(host)
            with self._cond:
                current = self._names.get(name)
                if current is not None:
                    old = self._versions[current]
                    if (old.ref.digest, old.config_digest) == (adapter.digest,
                                                                adapter.config_digest):
                        if pinned and not old.pinned:
                            self._check_pin_room(exclude=name)
                            self._set_pinned(old, True)
                        return self._refresh(old, adapter, host, root)
                pin = pinned or (current is not None and self._versions[current].pinned)
                if pin:
                    self._check_pin_room(exclude=name)
                result = self._register(name, adapter, host, root, pin, current,
                                        time.perf_counter() - started)
        except AdapterError:
            with self._lock:
                self.stats.load_failures += 1
            raise
        except OSError as exc:  # a file vanished or is unreadable mid-load
            with self._lock:
                self.stats.load_failures += 1
            raise AdapterRefused(Rule.FILES, f"{path}: {exc}") from None
        log.info("loaded adapter %s v%d (%s) from %s: %d modules, ranks %s, %d bytes",
                 name, result.version, result.digest[:12], result.path, len(result.applied),
                 result.ranks, result.size_bytes)
        return result

    def _refresh(self, version: _Version, adapter: PeftAdapter, host: HostAdapter,
                 root: Path | None) -> LoadResult:
        """Under the lock: a reload of the same content. The files just read back fine, so a
        remembered failure is cleared, re-reads go to the folder given now, and the fresh host
        buffer is kept if the version had none; the version number stays."""
        recovered = version.error is not None
        if recovered:
            log.info("reload of %s with the same content: the files read back fine, the "
                     "earlier failure is cleared (%s)", version.ref, version.error)
        version.error = version.error_files = None
        version.error_count = 0
        version.root = root
        version.result = dataclasses.replace(version.result, path=adapter.path)
        ref = version.ref
        if ref not in self._host and ref not in self._reading and self._pool.get(ref) is None:
            self._put_host(ref, host)
        self._cond.notify_all()
        return dataclasses.replace(version.result, unchanged=True, replaced=None,
                                   recovered=recovered)

    def _retry_if_due(self, version: _Version) -> None:
        """Clear a remembered re-read failure once its backoff ran out or the folder now
        differs from the one that failed, so the next acquire reads it again (one read however
        many requests ask); the clock, then a few stat calls, never a read."""
        with self._lock:
            seen, count, at = version.error_files, version.error_count, version.error_at
        if seen is None:
            return
        due = self._clock() - at >= _backoff(count)
        if not due and _signature(version.result.path) == seen:
            return
        with self._cond:
            if version.error_files is seen and version.error_count == count:  # not retried yet
                log.info("retrying the re-read of %s: %s", version.ref,
                         f"{count} failure(s), backoff over" if due else "its folder changed")
                version.error = version.error_files = None
                self._cond.notify_all()

    def _read_and_pack(self, path: Path, root: Path | None, digest: str | None = None,
                       config_digest: str | None = None) -> tuple[PeftAdapter, HostAdapter]:
        adapter = read_adapter(path, self.base, self.limits, root=root, dtype=self.dtype,
                               expected_digest=digest, expected_config_digest=config_digest)
        return adapter, pack(adapter, self.base, self.dtype, pin=self._pin_host)

    def _register(self, name: str, adapter: PeftAdapter, host: HostAdapter, root: Path | None,
                  pinned: bool, current: AdapterRef | None, seconds: float) -> LoadResult:
        """Under the lock: make the new version current and retire the old one."""
        number = self._next_version.get(name, 0) + 1
        self._next_version[name] = number
        ref = AdapterRef(name=name, version=number, digest=adapter.digest)
        modules = tuple(dict.fromkeys(m for _, m in adapter.applied))
        result = LoadResult(ref=ref, path=adapter.path, applied=adapter.applied,
                            modules=tuple(sorted(modules, key=_module_order)),
                            ranks=adapter.ranks, size_bytes=host.nbytes,
                            file_bytes=adapter.file_bytes, load_seconds=seconds,
                            replaced=current)
        version = _Version(ref=ref, result=result, config_digest=adapter.config_digest,
                           numel=host.layout.numel, root=root, loaded_at=time.time())
        self._versions[ref] = version
        self._names[name] = ref
        self._put_host(ref, host)  # if the host is full, the disk thread re-reads it later
        if pinned:
            self._set_pinned(version, True)
        if current is not None:
            self._retire(self._versions[current])
        self._lazy_failures.pop(name, None)
        self.stats.loads += 1
        self.stats.load_seconds.append(seconds)
        self._cond.notify_all()
        return result

    def _root_for(self, path: Path) -> Path:
        if self.config.adapter_root is None:
            raise AdapterRefused(Rule.PATH, f"{path}: no adapter root is configured, so only "
                                 "operator-given paths (trusted) can be loaded")
        return self.config.adapter_root

    def _check_fits(self, host: HostAdapter) -> None:
        if host.nbytes > self._pool.capacity_bytes:
            raise AdapterRefused(Rule.SIZE, f"packed size {host.nbytes} bytes is larger than "
                                 f"the accelerator pool ({self._pool.capacity_bytes} bytes)")
        if not self._host.fits(host.nbytes):
            raise AdapterRefused(Rule.SIZE, f"packed size {host.nbytes} bytes is larger than "
                                 f"the host cache ({self._host.max_bytes} bytes)")

    def _check_pin_room(self, exclude: str) -> None:
        pinned = sum(1 for v in self._versions.values()
                     if v.pinned and not v.retired and v.ref.name != exclude)
        if pinned + 1 >= self._pool.num_slots:
            raise AdapterRefused(Rule.PIN, f"{pinned} adapters are pinned and "
                                 f"{self._pool.num_slots} slots exist; one slot always stays "
                                 "for unpinned adapters")

    def _resolve_lazy(self, name: str) -> AdapterRef:
        root = self.config.adapter_root
        try:
            check_name(name)
        except AdapterRefused:
            raise AdapterNotFound(name) from None
        if root is None or not (root / name).is_dir():
            with self._lock:
                self._lazy_failures.pop(name, None)
            raise AdapterNotFound(name)
        signature = _signature(root / name)  # before the read: a change during it retries
        failure = self._lazy_failure(name, signature)
        if failure is not None:
            raise failure  # the same files failed before: do not re-validate per request
        with self._name_lock(name):
            with self._lock:
                if name in self._names:  # another request loaded it meanwhile
                    return self._names[name]
            failure = self._lazy_failure(name, signature)
            if failure is not None:
                raise failure  # a request ahead of this one just refused the same files
            try:
                result = self._load_locked(name, Path(name), pinned=False, trusted=False)
            except MemoryError:
                raise
            except Exception as exc:
                if isinstance(exc, AdapterError):
                    log.warning("lazy folder %s refused: %s", name, exc)
                    refusal = exc
                else:  # a bug in validation: still a refusal to remember, not a 500 per request
                    log.exception("validating the lazy folder %s failed unexpectedly", name)
                    with self._lock:
                        self.stats.load_failures += 1
                    refusal = AdapterError(f"{name}: validation failed unexpectedly "
                                           f"({type(exc).__name__})")
                error = _public(refusal, self._known_paths(root / name))
                with self._lock:
                    previous = self._lazy_failures.get(name)
                    self._lazy_failures[name] = _LazyFailure(
                        signature, error, self._clock(),
                        previous.count + 1 if previous is not None else 1)
                raise error from None
            with self._lock:
                self.stats.lazy_loads += 1
        return result.ref

    def _lazy_failure(self, name: str, signature: tuple[Any, ...]) -> AdapterError | None:
        """The remembered refusal of the lazy folder `name`, unless its folder changed since
        or its backoff ran out (then it is validated again)."""
        with self._lock:
            failure = self._lazy_failures.get(name)
        if failure is None or failure.signature != signature:
            return None
        if self._clock() - failure.at >= _backoff(failure.count):
            return None
        return failure.error

    def _known_paths(self, folder: Path) -> list[tuple[Path, str]]:
        """Server paths a tenant-facing message may hold, with what each is shown as."""
        paths = [(folder, "the adapter folder")]
        if self.config.adapter_root is not None:
            paths.append((self.config.adapter_root, "the adapter root"))
        return paths

    # ================================================================== state changes (locked)

    def _want(self, ref: AdapterRef) -> None:
        now = self._clock()
        want = self._wants.get(ref)
        if want is None:
            self._wants[ref] = _Want(since=now, touched=now)
        else:
            want.touched = now

    def _usable(self, ref: AdapterRef) -> bool:
        resident = self._pool.get(ref)
        return resident is not None and resident.ready

    def _set_pinned(self, version: _Version, pinned: bool) -> None:
        version.pinned = pinned
        resident = self._pool.get(version.ref)
        if resident is not None:
            resident.pinned = pinned
        if pinned:
            self._want(version.ref)
            self._wants[version.ref].pinned = True
        elif version.ref in self._wants:
            self._wants[version.ref].pinned = False

    def _retire(self, version: _Version) -> None:
        version.retired = True
        self._set_pinned(version, False)
        self._wants.pop(version.ref, None)
        self._free_if_drained(version)

    def _free_if_drained(self, version: _Version) -> None:
        """Free a retired version's device region and host buffer once nothing uses them."""
        ref = version.ref
        if version.parked > 0:
            return  # requests parked mid-run take it again; the last unpark calls again
        resident = self._pool.get(ref)
        if resident is not None:
            if resident.refcount > 0 or not resident.ready:
                return  # the last release, or the end of the page-in, calls again
            self._pool.evict(ref)
        self._host.drop(ref)
        self._closed.discard(ref)
        del self._versions[ref]
        self._cond.notify_all()

    def _evict(self, resident: Resident) -> None:
        self._pool.evict(resident.key)
        self.stats.device_evictions += 1

    def _host_evictable(self, key: Hashable) -> bool:
        """Host entries that a pending page-in still needs stay; the rest are LRU fodder."""
        return key not in self._wants or self._usable(key)  # type: ignore[arg-type]

    def _info(self, version: _Version) -> AdapterInfo:
        ref = version.ref
        resident = self._pool.get(ref)
        if resident is not None:
            tier = "device" if resident.ready else "paging"
        elif ref in self._reading:
            tier = "paging"
        else:
            tier = "host" if ref in self._host else "disk"
        result = version.result
        return AdapterInfo(
            name=ref.name, version=ref.version, digest=ref.digest, current=not version.retired,
            tier=tier, slot=resident.slot if resident is not None and resident.ready else None,
            modules=result.modules, ranks=result.ranks, size_bytes=result.size_bytes,
            refcount=resident.refcount if resident is not None else 0, pinned=version.pinned,
            last_use=version.last_use, loaded_at=version.loaded_at,
            load_seconds=result.load_seconds, path=result.path,
        )

    # ================================================================== host -> device thread

    def _device_loop(self) -> None:
        while True:
            with self._cond:
                job = self._next_page_in()
                while job is None and not self._closing:
                    self._cond.wait(_TICK_S)
                    job = self._next_page_in()
                if job is None:  # closing
                    return
                if self._closing:
                    self._finish_page_in(job, error=RuntimeError("registry closed"))
                    return
            started = time.perf_counter()
            error: Exception | None = None
            try:
                if self._pool.device.type == "cpu":  # a large CPU copy: see _in_own_thread
                    _in_own_thread(lambda: self._pool.write(job.resident, job.host))
                else:
                    self._pool.write(job.resident, job.host, after=self.compute_stream)
            except Exception as exc:  # noqa: BLE001 - e.g. a CUDA error: it must not look resident
                error = exc
            with self._cond:
                self._finish_page_in(job, error=error, seconds=time.perf_counter() - started)

    def _next_page_in(self) -> _PageIn | None:
        """Under the lock: pick the next waiter, make room, place it (fairness rule above)."""
        now = self._clock()
        self._closed = set()
        for ref, want in sorted(self._wants.items(), key=lambda kv: kv[1].since):
            version = self._versions.get(ref)
            if version is None or not version.serving or version.error is not None:
                del self._wants[ref]
                continue
            if not want.pinned and now - want.touched > self.config.want_ttl_s:
                del self._wants[ref]  # nobody asked for a while: the request went away
                continue
            if self._pool.get(ref) is not None or ref not in self._host:
                continue  # resident, paging, or still on disk (the disk thread's job)
            since = want.since
            victims = self._pool.victims_for(
                version.numel, lambda r, since=since: self._evictable_for(r, since))
            if victims is not None:
                for victim in victims:
                    self._evict(victim)
                resident = self._pool.place(ref, version.numel, now)
                resident.pinned = version.pinned
                return _PageIn(ref=ref, resident=resident, host=self._host.hold(ref),
                               since=since)
            patience = self.config.parked_wait_s if want.parked else self.config.fairness_wait_s
            if now - since >= patience:
                needed = self._pool.victims_for(version.numel, lambda r: True, referenced=True)
                if needed is not None:  # else pins fill the pool: skip it, block nobody
                    self._closed = {r.key for r in needed if r.refcount > 0}  # type: ignore[misc]
                    return None
        return None

    def _evictable_for(self, resident: Resident, since: float) -> bool:
        want = self._wants.get(resident.key)  # type: ignore[arg-type]
        return want is None or want.since > since  # never steal from an older waiter

    def _finish_page_in(self, job: _PageIn, *, error: Exception | None,
                        seconds: float = 0.0) -> None:
        self._host.unhold(job.ref)
        version = self._versions.get(job.ref)
        if error is not None:
            self._pool.evict(job.ref)
            self.stats.page_in_failures += 1
            log.error("page-in of %s failed: %s", job.ref, error)
            if version is not None:
                version.error = AdapterError(f"page-in failed: {error}")
        else:
            job.resident.ready = True
            self.stats.page_ins += 1
            self.stats.page_in_seconds.append(seconds)
            self.stats.wait_seconds.append(max(0.0, self._clock() - job.since))
        if version is not None and version.retired:
            self._free_if_drained(version)
        self._cond.notify_all()

    # ================================================================== disk -> host thread

    def _disk_loop(self) -> None:
        while True:
            with self._cond:
                job = self._next_disk_read()
                while job is None and not self._closing:
                    self._cond.wait(_TICK_S)
                    job = self._next_disk_read()
                if job is None or self._closing:
                    if job is not None:
                        self._reading.discard(job.ref)
                    return
            started = time.perf_counter()
            folder = job.result.path
            seen = _signature(folder)  # before the read: a change during it is retried
            host: HostAdapter | None = None
            error: AdapterError | None = None
            try:
                _, host = _in_own_thread(
                    lambda: self._read_and_pack(folder, job.root, job.ref.digest,
                                                job.config_digest))
            except AdapterError as exc:
                error = exc
            except OSError as exc:
                error = AdapterRefused(Rule.FILES, f"{folder}: {exc}")
            with self._cond:
                self._reading.discard(job.ref)
                if error is not None and job.result.path != folder:
                    pass  # reloaded from another folder meanwhile: the next want reads there
                elif error is not None:
                    self.stats.disk_read_failures += 1
                    log.error("re-reading %s from disk failed: %s", job.ref, error)
                    # acquire raises it until resolve retries (the folder changed or the
                    # backoff ran out) or a reload
                    job.error = _public(error, self._known_paths(folder), suffix=(
                        f" (re-reading {job.ref.name} version {job.ref.version} from disk; "
                        "restore the files or reload the adapter)"))
                    job.error_files = seen
                    job.error_count += 1
                    job.error_at = self._clock()
                    self._wants.pop(job.ref, None)
                elif job.ref in self._versions and job.serving:
                    job.error_count = 0  # read back fine: the next failure backs off from 1 s
                    self.stats.disk_reads += 1
                    self.stats.disk_read_seconds.append(time.perf_counter() - started)
                    assert host is not None
                    self._put_host(job.ref, host)
                self._cond.notify_all()

    def _next_disk_read(self) -> _Version | None:
        """Under the lock: the oldest waiter that is only on disk, if the host has room."""
        for ref, _ in sorted(self._wants.items(), key=lambda kv: kv[1].since):
            version = self._versions.get(ref)
            if (version is None or not version.serving or version.error is not None
                    or ref in self._host or ref in self._reading or self._pool.get(ref)):
                continue
            if self._host.room_for(version.result.size_bytes, self._host_evictable) is None:
                return None  # the host is full of adapters that waiters still need
            self._reading.add(ref)
            return version
        return None

    def _put_host(self, ref: AdapterRef, host: HostAdapter) -> None:
        before = self._host.evictions
        self._host.put(ref, host, self._host_evictable)
        self.stats.host_evictions += self._host.evictions - before


def _module_order(module: str) -> int:
    return MODULES.index(module)


def _backoff(failures: int) -> float:
    """How long a remembered failure stands, unchanged folder, after `failures` in a row."""
    return float(min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** min(max(failures - 1, 0), 32)))


def _signature(directory: Path) -> tuple[Any, ...]:
    """What identifies a folder and its files cheaply: the folder's resolved path and its own
    device and inode (of the name itself and of what it points to: a folder moved away and a
    symlink put in its place differs, and so does moving it back), then its files' names,
    sizes, mtimes, and the ctimes and inodes that also change when a file is rewritten with
    its old size and mtime."""
    entries: list[Any] = []
    try:
        own, target = os.lstat(directory), os.stat(directory)
        entries.append((os.path.realpath(directory), own.st_dev, own.st_ino,
                        target.st_dev, target.st_ino))
    except OSError as exc:
        entries.append(("", type(exc).__name__))
    try:
        for child in sorted(directory.iterdir()):
            stat = child.stat()
            entries.append((child.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                            stat.st_dev, stat.st_ino))
    except OSError as exc:
        entries.append(("", type(exc).__name__))  # a vanished folder differs from any other
    return tuple(entries)


def _public(exc: AdapterError, paths: Iterable[tuple[Path, str]], suffix: str = ""
            ) -> AdapterError:
    """`exc` as a tenant may read it, with the same rule: files of the adapter folder by their
    name in it, other server paths by their last part, no digests (the log has the full text).
    """
    rule = getattr(exc, "rule", None)
    text = str(exc)
    prefix = f"{rule}: "
    detail = text[len(prefix):] if isinstance(rule, str) and text.startswith(prefix) else text
    shown: dict[str, str] = {}
    for path, label in paths:
        for form in {str(path), os.path.realpath(path)}:
            shown.setdefault(form, label)
    for form in sorted(shown, key=len, reverse=True):  # a folder before the root holding it
        detail = detail.replace(form + os.sep, "").replace(form, shown[form])
    detail = _DIGESTS.sub(" no longer holds the bytes that were loaded", detail)
    detail = _ABSOLUTE_PATH.sub(r"\1", detail) + suffix
    return AdapterRefused(rule, detail) if isinstance(rule, str) else AdapterError(detail)


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a crash at any point leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself
    finally:
        os.close(directory)


def _in_own_thread(work: Callable[[], _T]) -> _T:
    """Run `work` in a new thread that ends with it; return its result or raise its error.

    libgomp (PyTorch's OpenMP on Linux) keeps a team of worker threads for every thread that
    ever ran a parallel op, for as long as that thread lives. Once the process holds more
    OpenMP threads than CPUs, workers stop spinning between parallel regions and every small
    op of the engine's step loop waits for a futex wake-up (decode steps 2-3x slower on two
    CPUs). A thread that exits takes its team with it, so the registry's long-lived threads
    (and the server's worker threads that call `load`) do their large tensor work in
    short-lived ones. Starting a thread costs ~0.1 ms against milliseconds of work.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="loramux-adapter-work") as one:
        return one.submit(work).result()  # the pool's thread exits when the block ends
