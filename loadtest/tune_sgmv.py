"""Tune the SGMV launch configs on this GPU and merge the winners into a tuned table.

What it measures: for every shape key the engine's launchers can hit for a model shape
(kernels/launch.py's SgmvLauncher: each adapted projection's in features for shrink and out
features for expand, the rank bucket of every --ranks value, both regimes, every batch bucket
of heuristic_buckets up to --max-segments (decode) or --max-rows (prefill)), the median time
of one launch of each candidate config at the bucket's largest batch, and keeps the fastest.

The batch of a key, at its bucket's largest size (what the heuristics are sized for):
  decode   min(bucket, --max-segments) segments of one row each
  prefill  min(bucket, --max-rows) rows in about one segment per 128 rows (at most
           --max-segments, fewer than rows / 4: regime_of would call it decode otherwise),
           of unequal lengths. Prefill buckets below 8 are skipped: no call reaches them.
Slots have mixed ranks (max rank, half, a quarter, max rank again; the v buffer is max rank
wide); every fifth segment has no adapter (slot -1). x and the pool are in --dtype, v is
float32 (the engine's shrink output, engine/lora.py), so expand is the engine's tf32 dot.

Candidates (coordinate search around the heuristic, sgmv_config.py): the heuristic, the
table's current entry for the key if it has one, and every config one step away from the
heuristic in one parameter:
  shrink  block_m 16-128 (prefill; decode rows are one per segment, 16 stays),
          block_r 16/32/64 (<= the rank bucket), block_k 32/64/128/256,
          split_k halved/doubled (<= the hidden blocks), num_warps 2/4/8, num_stages 2/3/4
  expand  block_m 16-128 (prefill), block_n 32/64/128/256, block_r 16/32/64 (<= rank),
          num_warps 2/4/8, num_stages 2/3/4
then, for --rounds > 1, the same around the round's winner while it changes. --candidates
caps the configs tried per round (the heuristic first).

A candidate is rejected when its output differs from kernels/reference.py (float64) by more
than TOLERANCE (relative, over what the op writes; NaN-poisoned output, NaN in what must not
be read: pool gaps, v past a slot's rank, x of rows without an adapter; rows without an
adapter must come back unchanged), and, unless --no-spill-check, when it spills registers on
sm_80 or sm_90 (kernels/compile_check.py; compiled once per distinct variant, in parallel).

Timing: triton.testing.do_bench on CUDA (L2 flushed before every call, median over --rep-ms
of calls after --warmup-ms); under TRITON_INTERPRET=1 the median of --cpu-repeats wall-clock
calls, which says nothing about a GPU: the CPU run is a dry run of enumeration, checks and
writing.

Written: the table in --out (merged with what the file holds: other devices and other keys are
kept) gets, under this device's name (sgmv.device_info: torch.cuda.get_device_name() on CUDA,
"cpu" under the interpreter, the names SgmvLauncher looks up), the winner of every key that is
at least --margin faster than the heuristic (default 3%, a judgement, not a measurement: a
smaller gap is within what repeated medians may differ by, and would make the table churn); a
key whose winner is not drops any entry it had, so the heuristic applies again. The file is
rewritten after every key, so a run cut short keeps what it finished.

Run (GPU, from the repository root; docs/gpu.md):
  python -m loramux.loadtest.tune_sgmv --out kernels/tuned_configs.json --shape 7b 8b
CPU dry run:
  python -m loramux.loadtest.tune_sgmv --out /tmp/table.json --shape tiny --max-rows 64 \
      --max-segments 8 --limit-keys 4 --candidates 3 --no-spill-check
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Protocol

import torch
from loramux.adapters.types import MODULES, BaseSpec
from loramux.kernels.sgmv_config import (
    DTYPES,
    REGIMES,
    Config,
    ShapeKey,
    ShrinkConfig,
    TunedTable,
    cdiv,
    heuristic,
    heuristic_buckets,
    next_power_of_2,
    rank_bucket,
)
from loramux.loadtest.gpu_models import SHAPES

if TYPE_CHECKING:  # compile_check imports triton, which must wait for TRITON_INTERPRET
    from loramux.kernels.compile_check import KernelVariant

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative error a correct candidate stays under: shrink is exact products summed in float32
# (~1e-6); expand's tf32 dot and the rounding into out (bf16: 2**-9) stay near 1e-3.
TOLERANCE = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-4}
PREFILL_ROWS_PER_SEGMENT = 128
POOL_GAP = 64  # NaN elements between blocks; offsets stay multiples of 64 as the registry packs

# Parameter ladders of the search: a candidate moves one parameter one rung from its base.
LADDERS: dict[str, tuple[int, ...]] = {
    "block_m": (16, 32, 64, 128), "block_r": (16, 32, 64), "block_k": (32, 64, 128, 256),
    "block_n": (32, 64, 128, 256), "num_warps": (2, 4, 8), "num_stages": (2, 3, 4)}


@dataclass(frozen=True)
class Target:
    """One key to tune and the v width (max rank) its batch is built with."""

    key: ShapeKey
    max_rank: int


@dataclass
class Outcome:
    """What tuning one key found; times in milliseconds."""

    key: ShapeKey
    heuristic: Config
    heuristic_ms: float
    best: Config
    best_ms: float
    tried: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # str(config) -> why

    @property
    def speedup(self) -> float:
        return self.heuristic_ms / self.best_ms if self.best_ms > 0 else 1.0


class Measure(Protocol):
    """Milliseconds one launch of `config` takes; run() launches it once."""

    def __call__(self, config: Config, run: Callable[[], object]) -> float: ...


def projection_features(shape: str) -> tuple[list[int], list[int]]:
    """(shrink features, expand features) of `shape`'s adapted projections: in and out widths."""
    base = BaseSpec.from_hf_config(SimpleNamespace(**SHAPES[shape]))
    ins = sorted({base.shapes[m][0] for m in MODULES})
    outs = sorted({base.shapes[m][1] for m in MODULES})
    return ins, outs


def reachable(key: ShapeKey, max_rows: int) -> bool:
    """Whether a call can land in key's bucket: prefill needs rows > 4 * segments >= 4."""
    return key.regime == "decode" or min(key.bucket, max_rows) > 4


def targets(shapes: Iterable[str], ranks: Iterable[int], dtype: str, max_rows: int,
            max_segments: int) -> list[Target]:
    """Every key SgmvLauncher enumerates for these shapes and ranks, each once (widest rank)."""
    widest: dict[ShapeKey, int] = {}
    for shape in shapes:
        ins, outs = projection_features(shape)
        for rank in ranks:
            for regime in REGIMES:
                most = max_segments if regime == "decode" else max_rows
                for bucket in heuristic_buckets(regime, most):
                    for op, features in [("shrink", f) for f in ins] + [("expand", f)
                                                                        for f in outs]:
                        key = ShapeKey(op, regime, features, rank_bucket(rank), bucket,
                                       dtype)  # type: ignore[arg-type]
                        if reachable(key, max_rows):
                            widest[key] = max(widest.get(key, 0), rank)
    return [Target(key, rank) for key, rank in widest.items()]


def neighbours(key: ShapeKey, base: Config) -> list[Config]:
    """Configs one rung away from `base` in one parameter (see the module docstring)."""
    found: list[Config] = []
    widest = max(16, next_power_of_2(key.features))  # a wider block_k / block_n is padding
    for f in fields(base):
        value = getattr(base, f.name)
        if f.name == "split_k":
            steps = [value // 2, value * 2]
        elif f.name == "block_m" and key.regime == "decode":
            continue  # decode tiles hold one row per segment: a wider tile only adds padding
        else:
            ladder = LADDERS[f.name]
            i = ladder.index(value) if value in ladder else -1
            steps = [ladder[j] for j in (i - 1, i + 1) if i >= 0 and 0 <= j < len(ladder)]
            if f.name in ("block_k", "block_n"):
                steps = [s for s in steps if s <= max(widest, value)]
        for step in steps:
            try:
                config = replace(base, **{f.name: step})
            except ValueError:
                continue
            if config != base and sensible(key, config) and config not in found:
                found.append(config)
    return found


def sensible(key: ShapeKey, config: Config) -> bool:
    """Drops configs that only add idle programs: rank blocks past the rank bucket, splits
    with no hidden block of their own."""
    if config.block_r > key.rank:
        return False
    if isinstance(config, ShrinkConfig):
        return config.split_k <= cdiv(key.features, config.block_k)
    return True


@dataclass
class Batch:
    """Inputs of one key's launches: flat pool, segment metadata, input and output buffers."""

    pool: torch.Tensor  # [P], NaN between blocks
    offsets: torch.Tensor  # int64 [S]
    ranks: torch.Tensor  # int32 [S]
    scales: torch.Tensor  # float32 [S]
    seg_starts: torch.Tensor  # int32 [N + 1]
    seg_slots: torch.Tensor  # int32 [N]
    inputs: torch.Tensor  # shrink: x [T, H] in the pool dtype; expand: v float32 [T, R_max]
    before: torch.Tensor  # shrink: NaN float32 [T, R_max]; expand: out [T, O] before the call
    want: torch.Tensor  # float64, the reference output (NaN where nothing is written)
    active: torch.Tensor  # bool [T]: rows of segments with an adapter


def layout(target: Target, max_rows: int, max_segments: int,
           gen: torch.Generator) -> tuple[list[int], list[int]]:
    """(segment lengths, slots) of the bucket's largest batch (see the module docstring)."""
    key = target.key
    if key.regime == "decode":
        lengths = [1] * min(key.bucket, max_segments)
    else:
        rows = min(key.bucket, max_rows)
        count = min(max_segments, max(1, rows // PREFILL_ROWS_PER_SEGMENT), (rows - 1) // 4)
        cuts = sorted(torch.randperm(rows - 1, generator=gen)[: count - 1].add(1).tolist())
        lengths = [b - a for a, b in zip([0, *cuts], [*cuts, rows])]
    slots = [-1 if n % 5 == 4 else n % 4 for n in range(len(lengths))]
    return lengths, slots


def make_batch(target: Target, device: torch.device, max_rows: int, max_segments: int,
               gen: torch.Generator) -> Batch:
    """Random inputs for one key, its reference output, and the rows the op may touch."""
    from loramux.kernels.reference import sgmv_expand_ref, sgmv_shrink_ref

    key, r_max = target.key, target.max_rank
    dtype = TORCH_DTYPES[key.dtype]
    slot_ranks = [r_max, max(1, r_max // 2), max(1, r_max // 4), r_max]
    lengths, slots = layout(target, max_rows, max_segments, gen)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    rows = starts[-1]
    shrink = key.op == "shrink"
    # A_k [r, H] ~ U(+-1/sqrt(H)) (PEFT's kaiming init); B_k [O, r] ~ N(0, 0.01).
    numel = [r * key.features for r in slot_ranks]
    offsets, cursor = [], 0
    for n in numel:
        offsets.append(cursor)
        cursor += cdiv(n + POOL_GAP, 64) * 64
    pool = torch.full((cursor,), float("nan"), dtype=dtype)
    for offset, n in zip(offsets, numel):
        block = ((torch.rand(n, generator=gen) * 2 - 1) / key.features**0.5 if shrink
                 else torch.randn(n, generator=gen) * 0.01)
        pool[offset:offset + n] = block.to(dtype)

    active = torch.zeros(rows, dtype=torch.bool)
    for n, slot in enumerate(slots):
        if slot >= 0:
            active[starts[n]:starts[n + 1]] = True
    if shrink:
        inputs = torch.randn(rows, key.features, generator=gen).to(dtype)  # x [T, H]
        inputs[~active] = float("nan")  # rows without an adapter are never read
        before = torch.full((rows, r_max), float("nan"))  # v, float32 [T, R_max]
    else:
        inputs = torch.full((rows, r_max), float("nan"))  # v, float32 [T, R_max]
        for n, slot in enumerate(slots):  # only v[rows of slot k, :rank_k] may be read
            if slot >= 0:
                span = slice(starts[n], starts[n + 1])
                inputs[span, :slot_ranks[slot]] = torch.randn(lengths[n], slot_ranks[slot],
                                                              generator=gen)
        before = torch.randn(rows, key.features, generator=gen).to(dtype)  # out [T, O]

    meta = {"offsets": torch.tensor(offsets, dtype=torch.int64),
            "ranks": torch.tensor(slot_ranks, dtype=torch.int32),
            "scales": torch.tensor([2.0, 1.0, 0.5, 0.25]),
            "seg_starts": torch.tensor(starts, dtype=torch.int32),
            "seg_slots": torch.tensor(slots, dtype=torch.int32)}
    want = before.double()  # the reference on the CPU: float32 arithmetic, float64 output
    if shrink:
        sgmv_shrink_ref(inputs, pool, meta["offsets"], meta["ranks"], meta["seg_starts"],
                        meta["seg_slots"], want)
    else:
        sgmv_expand_ref(inputs, pool, meta["offsets"], meta["ranks"], meta["scales"],
                        meta["seg_starts"], meta["seg_slots"], want)
    moved = {name: t.to(device) for name, t in meta.items()}
    return Batch(pool.to(device), moved["offsets"], moved["ranks"], moved["scales"],
                 moved["seg_starts"], moved["seg_slots"], inputs.to(device), before.to(device),
                 want.to(device), active.to(device))


def launch(target: Target, batch: Batch, config: Config, out: torch.Tensor,
           partial: torch.Tensor, segments_block: int) -> None:
    """One raw launch of `config`, as SgmvLauncher makes it (v float32)."""
    from loramux.kernels import sgmv

    if isinstance(config, ShrinkConfig):
        upcast, precision = sgmv.dot_modes(batch.inputs.dtype, batch.pool.dtype)
        sgmv.launch_shrink(batch.inputs, batch.pool, batch.offsets, batch.ranks,
                           batch.seg_starts, batch.seg_slots, out, partial, config,
                           segments_block, upcast, precision)
    else:
        upcast, precision = sgmv.dot_modes(batch.inputs.dtype, batch.pool.dtype)
        sgmv.launch_expand(batch.inputs, batch.pool, batch.offsets, batch.ranks, batch.scales,
                           batch.seg_starts, batch.seg_slots, out, config, segments_block,
                           upcast, precision)


def error_of(target: Target, batch: Batch, out: torch.Tensor) -> float:
    """Relative error of a launch's output against the reference; inf if it touched what it
    must not (shrink: anything the reference leaves NaN; expand: rows without an adapter)."""
    if target.key.op == "shrink":
        written = ~torch.isnan(batch.want)
        if not torch.isnan(out[~written]).all():
            return float("inf")
    else:
        if not torch.equal(out[~batch.active], batch.before[~batch.active]):
            return float("inf")
        written = batch.active[:, None].expand_as(out)
    got, want = out[written].double(), batch.want[written]
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


class SpillCheck:
    """Which configs spill registers on sm_80 or sm_90; compiles each distinct variant once."""

    def __init__(self, segments_block: int) -> None:
        self.segments_block = segments_block
        self._spills: dict[KernelVariant, int] = {}  # spilled bytes, both ways

    def spilling(self, target: Target, configs: list[Config]) -> dict[Config, str]:
        """config -> what spilled, for the configs of `configs` that spill."""
        from loramux.kernels.compile_check import ARCHES

        variants = {(c, arch): self._variants(target, c, arch) for c in configs for arch in ARCHES}
        self.compile([v for vs in variants.values() for v in vs])
        spilled: dict[Config, str] = {}
        for (config, arch), vs in variants.items():
            total = sum(self._spills[v] for v in vs)
            if total:
                spilled[config] = spilled.get(config, "") + f"sm_{arch} spills {total} B; "
        return spilled

    def prefetch(self, work: Iterable[tuple[Target, list[Config]]]) -> None:
        """Compile the variants of many keys' candidates at once (one pool of workers)."""
        from loramux.kernels.compile_check import ARCHES

        self.compile([v for target, configs in work for c in configs for arch in ARCHES
                      for v in self._variants(target, c, arch)])

    def compile(self, variants: list[KernelVariant]) -> None:
        """Compile those not compiled yet, split over the CPUs."""
        from loramux.kernels.compile_check import compile_variants

        todo = sorted(set(variants) - set(self._spills), key=lambda v: v.label())
        reports = compile_variants(todo, processes=os.cpu_count())
        self._spills.update({v: r.spill_bytes for v, r in zip(todo, reports)})

    def _variants(self, target: Target, config: Config, arch: int) -> list[KernelVariant]:
        from loramux.kernels import sgmv

        key, dtype = target.key, TORCH_DTYPES[target.key.dtype]
        if isinstance(config, ShrinkConfig):
            return list(sgmv.shrink_variants(config, key.features, target.max_rank, dtype,
                                             torch.float32, self.segments_block, arch))
        return list(sgmv.expand_variants(config, key.features, target.max_rank, torch.float32,
                                         dtype, self.segments_block, arch))


def first_round(key: ShapeKey, base: Config, current: Config | None,
                candidates: int) -> list[Config]:
    """The configs tune() tries first: the heuristic, the table's entry, its neighbours."""
    around = [base, *([current] if current else []), *neighbours(key, base)]
    return list(dict.fromkeys(around))[:candidates]


def tune(target: Target, batch: Batch, measure: Measure, *, num_sms: int, tolerance: float,
         current: Config | None, spill_check: SpillCheck | None, candidates: int,
         rounds: int, segments_block: int) -> Outcome:
    """Check and time the candidates of one key (see the module docstring)."""
    key = target.key
    base = heuristic(key, num_sms)
    rows = batch.inputs.shape[0]
    times: dict[Config, float] = {}
    rejected: dict[str, str] = {}
    centre: Config = base
    for round_ in range(rounds):
        around = first_round(key, centre, current if round_ == 0 else None, len(times)
                             + len(rejected) + candidates)
        todo = [c for c in around if c not in times and str(c) not in rejected][:candidates]
        if base not in times and base not in todo:
            todo.insert(0, base)
        if spill_check is not None:
            for config, why in spill_check.spilling(target, todo).items():
                if config != base:
                    rejected[str(config)] = why.strip("; ")
        for config in todo:
            if str(config) in rejected:
                continue
            # float32 split-K partials [SPLIT_K, T, R_max], as SgmvLauncher sizes them.
            split_k = config.split_k if isinstance(config, ShrinkConfig) else 1
            partial = torch.empty(max(split_k * rows * target.max_rank, 1),
                                  dtype=torch.float32, device=batch.pool.device)
            out = batch.before.clone()
            launch(target, batch, config, out, partial, segments_block)
            error = error_of(target, batch, out)
            if not error <= tolerance:
                rejected[str(config)] = f"relative error {error:.2e} > {tolerance:.0e}"
                continue
            scratch = batch.before.clone()
            times[config] = measure(config, lambda c=config, o=scratch, p=partial: launch(
                target, batch, c, o, p, segments_block))
        winner = min(times, key=times.__getitem__) if times else base
        if winner == centre:
            break
        centre = winner
    if base not in times:
        raise RuntimeError(f"{key}: the heuristic {base} failed its own check: "
                           f"{rejected.get(str(base))}")
    best = min(times, key=times.__getitem__)
    return Outcome(key, base, times[base], best, times[best], len(times) + len(rejected),
                   rejected)


def cuda_measure(warmup_ms: float, rep_ms: float) -> Measure:
    """do_bench's median (L2 flushed before every call)."""
    import triton.testing

    def measure(config: Config, run: Callable[[], object]) -> float:
        return float(triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms,
                                             return_mode="median"))

    return measure


def wall_measure(repeats: int) -> Measure:
    """Median wall-clock milliseconds of `repeats` calls (the interpreter: a dry run)."""

    def measure(config: Config, run: Callable[[], object]) -> float:
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return measure


def merged(table: TunedTable, device: str, winners: dict[ShapeKey, Config],
           dropped: Iterable[ShapeKey]) -> TunedTable:
    """`table` with `winners` set and `dropped` removed for `device`; other devices kept."""
    gone = {str(k) for k in dropped}
    result = TunedTable()
    for name, entries in table.devices.items():
        kept = {ShapeKey.parse(k): c for k, c in entries.items()
                if name != device or k not in gone}
        result = result.with_entries(name, kept)
    return result.with_entries(device, winners)


def write_table(path: Path, table: TunedTable) -> None:
    """Atomically: a run killed mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(table.to_json())
    os.replace(tmp, path)


def describe(config: Config) -> str:
    short = {"block_m": "m", "block_r": "r", "block_k": "k", "block_n": "n", "split_k": "split",
             "num_warps": "warps", "num_stages": "stages"}
    return " ".join(f"{short[f.name]}={getattr(config, f.name)}" for f in fields(config))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="the table to merge into, e.g. kernels/tuned_configs.json")
    parser.add_argument("--shape", nargs="+", choices=sorted(SHAPES), default=["7b"])
    parser.add_argument("--ranks", default="16,64",
                        help="max ranks the pools serve, comma-separated (bucketed: 8 -> 16)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="x's and the pool's")
    parser.add_argument("--max-rows", type=int, default=2048)
    parser.add_argument("--max-segments", type=int, default=64)
    parser.add_argument("--margin", type=float, default=0.03,
                        help="write a winner only when this much faster than the heuristic")
    parser.add_argument("--candidates", type=int, default=16, help="configs per round, at most")
    parser.add_argument("--rounds", type=int, default=2, help="search rounds per key")
    parser.add_argument("--limit-keys", type=int, default=None, help="tune the first N keys")
    parser.add_argument("--no-spill-check", dest="spill_check", action="store_false",
                        help="skip compiling candidates for sm_80/sm_90 to reject spills")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no key after this long (the table keeps what finished)")
    parser.add_argument("--warmup-ms", type=float, default=10.0)
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--cpu-repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    if min(args.ranks) < 1 or args.max_rows < 1 or args.max_segments < 1:
        parser.error("--ranks, --max-rows and --max-segments must be positive")
    return args


def main(argv: list[str] | None = None, measure: Measure | None = None) -> list[Outcome]:
    """Tune, print a line per key, merge into --out; returns the outcomes (for tests)."""
    args = parse_args(argv)
    started = time.monotonic()
    cuda = torch.cuda.is_available()
    if not cuda:
        # Before anything imports triton: @triton.jit reads it when a kernel is decorated.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    from loramux.kernels import sgmv

    if not cuda and not triton.knobs.runtime.interpret:
        sys.exit("tune_sgmv: no CUDA device, and triton was imported without TRITON_INTERPRET=1")
    device = torch.device("cuda" if cuda else "cpu")
    name, num_sms = sgmv.device_info(device)
    measure = measure or (cuda_measure(args.warmup_ms, args.rep_ms) if cuda
                          else wall_measure(args.cpu_repeats))
    todo = targets(args.shape, args.ranks, args.dtype, args.max_rows, args.max_segments)
    if args.limit_keys is not None:
        todo = todo[:args.limit_keys]
    segments_block = sgmv.seg_block(args.max_segments)  # SgmvLauncher's, for every call
    spill_check = SpillCheck(segments_block) if args.spill_check else None
    print(f"tune_sgmv: {len(todo)} keys on {name!r} ({num_sms} SMs), "
          f"{'CUDA' if cuda else 'interpreter: a dry run, times mean nothing'}", flush=True)
    table = TunedTable.load(args.out)
    if spill_check is not None:  # every first round's compiles, in parallel, up front
        spill_check.prefetch((t, first_round(t.key, heuristic(t.key, num_sms),
                                             table.lookup(name, t.key), args.candidates))
                             for t in todo)
    gen = torch.Generator().manual_seed(args.seed)
    outcomes: list[Outcome] = []
    for i, target in enumerate(todo):
        if args.max_seconds is not None and time.monotonic() - started > args.max_seconds:
            print(f"tune_sgmv: --max-seconds reached, {len(todo) - i} keys left", flush=True)
            break
        batch = make_batch(target, device, args.max_rows, args.max_segments, gen)
        outcome = tune(target, batch, measure, num_sms=num_sms,
                       tolerance=TOLERANCE[target.key.dtype],
                       current=table.lookup(name, target.key), spill_check=spill_check,
                       candidates=args.candidates, rounds=args.rounds,
                       segments_block=segments_block)
        outcomes.append(outcome)
        keep = outcome.best != outcome.heuristic and outcome.speedup >= 1 + args.margin
        table = merged(table, name, {target.key: outcome.best} if keep else {},
                       [] if keep else [target.key])
        write_table(args.out, table)
        verdict = "written" if keep else "heuristic kept"
        print(f"[{i + 1}/{len(todo)}] {target.key}: {describe(outcome.best)} "
              f"{outcome.best_ms * 1e3:.1f} us, x{outcome.speedup:.3f} vs heuristic, "
              f"{outcome.tried} tried, {len(outcome.rejected)} rejected: {verdict}", flush=True)
        for config, why in outcome.rejected.items():
            print(f"    rejected {config}: {why}", flush=True)
    written = sum(o.best != o.heuristic and o.speedup >= 1 + args.margin for o in outcomes)
    print(f"tune_sgmv: {written} of {len(outcomes)} keys written to {args.out} under {name!r} "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return outcomes


if __name__ == "__main__":
    main()
