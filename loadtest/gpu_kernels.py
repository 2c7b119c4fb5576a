"""gpu_check sections on the SGMV kernels: correctness against kernels/reference.py at real
model shapes, and decode bandwidth against the device's copy rate.

Correctness cases (fresh random inputs every run; the seed is in the JSON). For each model's
projection widths (7b: shrink from 4096 and 11008, expand to 4096 and 11008; 8b: shrink from
4096 and 14336, expand to 4096, 1024 (k/v) and 14336; tiny on the CPU), two batch layouts and
two dtype sets:

  decode    ~24 short segments (0-4 rows), slots drawn with repeats from 8 slots of mixed
            ranks (1, 8, 16, 32, 64, 0) and -1, empty segments among them
  prefill   6 segments of 0, 1 or 50-300 rows, the same slot mix
  bf16      x and pool bfloat16, the shrink output / expand input float32 (the engine's v
            buffer), out bfloat16: relative error <= 2e-2
  fp32      everything float32: relative error <= 1e-4

plus one bf16 case per op whose first slot sits past 2**31 elements of a > 4 GiB pool (GPU
only). Pools hold NaN between blocks, inputs are NaN wherever the contract says nothing is
read, outputs are poisoned first: shrink's with NaN (what must stay unwritten stays NaN),
expand's with random values (rows without an adapter must come back bit-identical).
Error is ||out - ref|| / ||ref|| over what the op writes, ref from kernels/reference.py
(float32 arithmetic on the same inputs, float64 output).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from loramux.loadtest.gpu_check import Context, check, judged

TOLERANCE = {"bf16": 2e-2, "fp32": 1e-4}
SLOT_RANKS = (16, 8, 64, 32, 1, 0, 16, 64)  # slot k has rank SLOT_RANKS[k]; 0 does nothing
R_MAX = 64
BIG_OFFSET = 2**31 + 4096  # elements (a multiple of 64): int32 offsets would wrap here
WIDTHS = {  # model -> (shrink input widths, expand output widths)
    "7b": ((4096, 11008), (4096, 11008)),
    "8b": ((4096, 14336), (4096, 1024, 14336)),
    "tiny": ((64, 128), (64, 32, 128)),
}
BANDWIDTH_TARGET = 0.6


@dataclass(frozen=True)
class Layout:
    """Segments of one batch: seg_starts (N+1) and seg_slots (N)."""

    starts: list[int]
    slots: list[int]

    @property
    def rows(self) -> int:
        return self.starts[-1]

    def active_rows(self) -> list[int]:
        """Rows of segments whose slot applies something (slot >= 0, rank > 0)."""
        return [t for n, slot in enumerate(self.slots)
                if slot >= 0 and SLOT_RANKS[slot] > 0
                for t in range(self.starts[n], self.starts[n + 1])]


def make_layout(kind: str, rng: random.Random, small: bool) -> Layout:
    if kind == "decode":
        lengths = [rng.choice((0, 1, 1, 1, 2, 4)) for _ in range(10 if small else 24)]
    else:
        long = (5, 40) if small else (50, 300)
        lengths = [rng.choice((0, 1, rng.randint(*long), rng.randint(*long))) for _ in range(6)]
    slots = [rng.choice((-1, *range(len(SLOT_RANKS)))) for _ in lengths]
    if not any(s >= 0 and SLOT_RANKS[s] > 0 for s, n in zip(slots, lengths) if n):
        lengths[0], slots[0] = max(lengths[0], 1), 0  # at least one segment does something
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    return Layout(starts, slots)


def make_pool(block_numel: list[int], dtype: torch.dtype, device: torch.device,
              rng: random.Random, first_at: int = 0) -> tuple[torch.Tensor, list[int]]:
    """A flat NaN pool holding one random block per slot (gaps between them), and the
    blocks' offsets, multiples of 64 elements as the registry packs them (the kernels may
    rely on 16: kernels/checks.py); slot 0's block starts at `first_at` if given."""
    offsets, cursor = [], 0
    for k, numel in enumerate(block_numel):
        cursor += rng.randint(0, 3) * 64  # NaN gap before the block
        if k == 0 and first_at:
            offset = first_at
        else:
            offset = cursor
            cursor = -(-(cursor + numel) // 64) * 64
        offsets.append(offset)
    size = max(o + n for o, n in zip(offsets, block_numel)) + 64
    pool = torch.full((size,), float("nan"), dtype=dtype, device=device)
    for offset, numel in zip(offsets, block_numel):
        if numel:
            pool[offset:offset + numel] = torch.randn(numel, device=device).to(dtype)
    return pool, offsets


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _meta(layout: Layout, offsets: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "offsets": torch.tensor(offsets, dtype=torch.int64, device=device),
        "ranks": torch.tensor(SLOT_RANKS, dtype=torch.int32, device=device),
        "scales": torch.tensor([0.5 + 0.25 * k for k in range(len(SLOT_RANKS))],
                               dtype=torch.float32, device=device),
        "seg_starts": torch.tensor(layout.starts, dtype=torch.int32, device=device),
        "seg_slots": torch.tensor(layout.slots, dtype=torch.int32, device=device),
    }


def shrink_case(layout: Layout, hidden: int, dtype: torch.dtype, backend: str,
                device: torch.device, rng: random.Random, first_at: int = 0) -> dict[str, Any]:
    """Run sgmv_shrink once and judge it; see the module docstring."""
    from loramux.kernels.ops import sgmv_shrink
    from loramux.kernels.reference import sgmv_shrink_ref

    pool, offsets = make_pool([r * hidden for r in SLOT_RANKS], dtype, device, rng, first_at)
    meta = _meta(layout, offsets, device)
    x = torch.randn(layout.rows, hidden, device=device).to(dtype)  # [T, H]
    active = layout.active_rows()
    unread = torch.ones(layout.rows, dtype=torch.bool)
    unread[active] = False
    x[unread.to(device)] = float("nan")  # rows nobody may read
    out = torch.full((layout.rows, R_MAX), float("nan"), dtype=torch.float32, device=device)
    want = out.double()
    sgmv_shrink_ref(x, pool, meta["offsets"], meta["ranks"], meta["seg_starts"],
                    meta["seg_slots"], want)
    sgmv_shrink(x, pool, meta["offsets"], meta["ranks"], meta["seg_starts"], meta["seg_slots"],
                out, backend=backend)  # type: ignore[arg-type]
    written = ~torch.isnan(want)
    untouched = bool(torch.isnan(out[~written]).all())
    return {"rows": layout.rows, "segments": len(layout.slots),
            "error": rel_error(out[written], want[written]) if written.any() else 0.0,
            "untouched_ok": untouched, "pool_elements": pool.numel()}


def expand_case(layout: Layout, out_features: int, dtype: torch.dtype, backend: str,
                device: torch.device, rng: random.Random, first_at: int = 0) -> dict[str, Any]:
    """Run sgmv_expand once and judge it; see the module docstring."""
    from loramux.kernels.ops import sgmv_expand
    from loramux.kernels.reference import sgmv_expand_ref

    pool, offsets = make_pool([out_features * r for r in SLOT_RANKS], dtype, device, rng,
                              first_at)
    meta = _meta(layout, offsets, device)
    v = torch.full((layout.rows, R_MAX), float("nan"), dtype=torch.float32, device=device)
    for n, slot in enumerate(layout.slots):  # only [rows of slot k, :rank_k] may be read
        if slot >= 0:
            rows = slice(layout.starts[n], layout.starts[n + 1])
            v[rows, :SLOT_RANKS[slot]] = torch.randn(
                layout.starts[n + 1] - layout.starts[n], SLOT_RANKS[slot], device=device)
    before = torch.randn(layout.rows, out_features, device=device).to(dtype)
    out = before.clone()
    want = before.double()
    sgmv_expand_ref(v, pool, meta["offsets"], meta["ranks"], meta["scales"],
                    meta["seg_starts"], meta["seg_slots"], want)
    sgmv_expand(v, pool, meta["offsets"], meta["ranks"], meta["scales"], meta["seg_starts"],
                meta["seg_slots"], out, backend=backend)  # type: ignore[arg-type]
    active = torch.zeros(layout.rows, dtype=torch.bool)
    active[layout.active_rows()] = True
    active = active.to(device)
    untouched = bool(torch.equal(out[~active], before[~active]))
    return {"rows": layout.rows, "segments": len(layout.slots),
            "error": rel_error(out[active], want[active]) if active.any() else 0.0,
            "untouched_ok": untouched, "pool_elements": pool.numel()}


def correctness(ctx: Context) -> dict[str, Any]:
    """Every case of the module docstring; one correctness check per dtype and backend."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's float32 matmuls, in full
    try:
        return _correctness(ctx)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _correctness(ctx: Context) -> dict[str, Any]:
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = ctx.device
    models = ("tiny",) if ctx.cpu else ("7b", "8b")
    backends = ("torch", "triton") if ctx.cpu else ("triton",)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    cases: list[dict[str, Any]] = []
    truncated = False
    for model in models:
        shrink_widths, expand_widths = WIDTHS[model]
        plan = [("shrink", w) for w in shrink_widths] + [("expand", w) for w in expand_widths]
        for op, width in plan:
            for kind in ("decode", "prefill"):
                for dname, dtype in dtypes.items():
                    for backend in backends:
                        if ctx.out_of_time(reserve=10):
                            truncated = True
                            continue
                        layout = make_layout(kind, rng, small=ctx.cpu)
                        run = shrink_case if op == "shrink" else expand_case
                        result = run(layout, width, dtype, backend, device, rng)
                        cases.append({"model": model, "op": op, "width": width, "batch": kind,
                                      "dtype": dname, "backend": backend, **result})
    big: list[dict[str, Any]] = []
    if not ctx.cpu and not ctx.out_of_time(reserve=10):
        for op, width in (("shrink", 14336), ("expand", 14336)):
            layout = make_layout("decode", rng, small=False)
            run = shrink_case if op == "shrink" else expand_case
            result = run(layout, width, torch.bfloat16, "triton", device, rng, BIG_OFFSET)
            big.append({"model": "8b", "op": op, "width": width, "dtype": "bf16",
                        "slot0_offset": BIG_OFFSET, **result})
            torch.cuda.empty_cache()
        cases += big
    checks = {}
    for dname in dtypes:
        for backend in backends:
            mine = [c for c in cases if c["dtype"] == dname and c.get("backend", "triton") ==
                    backend]
            if not mine:
                continue
            worst = max(c["error"] for c in mine)
            clean = all(c["untouched_ok"] for c in mine)
            checks[f"{backend}_{dname}_max_rel_error"] = check(
                worst, f"<= {TOLERANCE[dname]:g}", worst <= TOLERANCE[dname], "correctness")
            checks[f"{backend}_{dname}_untouched"] = check(
                clean, "nothing outside the contract written", clean, "correctness")
    if not ctx.cpu:
        checks["past_2_31_elements"] = check(
            [round(c["error"], 6) for c in big] or "not run",
            f"slot past {BIG_OFFSET} elements: error <= 2e-2, untouched",
            len(big) == 2 and all(c["error"] <= 2e-2 and c["untouched_ok"] for c in big),
            "correctness")
    else:
        checks["past_2_31_elements"] = check("skipped on the CPU (needs a > 4 GiB pool)",
                                             "GPU only", None, "correctness")
    return {"seed": seed, "models": list(models), "backends": list(backends),
            "truncated": truncated, "cases": cases, "checks": checks}


# ------------------------------------------------------------------------- bandwidth


def _time_graph(calls: list[Callable[[], object]], reps: int, flush: torch.Tensor) -> float:
    """Seconds per call: a CUDA graph of `calls` back to back, L2 flushed before each replay."""
    for call in calls:  # compile, allocate split-K partials, before capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    samples = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples) / len(calls)


def _time_eager(calls: list[Callable[[], object]], reps: int, flush: torch.Tensor) -> float:
    """Seconds per call launched from Python (launch and argument checks included)."""
    samples = []
    for _ in range(reps):
        flush.zero_()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples) / len(calls)


def _decode_call(op: str, b: Any, rows: int, rank: int, hidden: int,
                 out_features: int) -> Callable[[], object]:
    """One decode shrink (x [rows, H] bf16 -> v float32, as the engine's buffer) or expand
    (v float32 -> out [rows, O] bf16) over the pools of `b` (benchmark_sgmv.Batch)."""
    from loramux.kernels.ops import sgmv_expand, sgmv_shrink

    if op == "shrink":
        x = torch.randn(rows, hidden, device="cuda").to(torch.bfloat16)
        v = torch.empty(rows, rank, device="cuda")
        return lambda: sgmv_shrink(x, b.a_pool, b.a_offsets, b.ranks, b.seg_starts,
                                   b.seg_slots, v)
    v = torch.randn(rows, rank, device="cuda")
    out = torch.randn(rows, out_features, device="cuda").to(torch.bfloat16)
    return lambda: sgmv_expand(v, b.b_pool, b.b_offsets, b.ranks, b.scales, b.seg_starts,
                               b.seg_slots, out)


def bandwidth(ctx: Context) -> dict[str, Any]:
    """Decode shrink/expand at 7B widths: adapter-weight bytes read per second, as a fraction
    of the copy rate. Each figure is one call's share of a CUDA graph of 16 calls over 16
    distinct weight sets (so L2 cannot hold them), as a decode step's projections run."""
    from loramux.loadtest.benchmark_sgmv import L2_FLUSH_BYTES, make_batch
    from loramux.loadtest.gpu_system import _copy_gb_per_s

    copy_rate = ctx.shared.get("copy_gb_per_s") or _copy_gb_per_s(2**30, ctx.device, 20)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    configs = [(32, 32, 16), (64, 64, 16), (32, 32, 64)]  # rows, distinct adapters, rank
    plan = [("shrink", 4096), ("shrink", 11008), ("expand", 4096), ("expand", 11008)]
    copies = 16
    results: list[dict[str, Any]] = []
    for rows, adapters, rank in configs:
        for op, width in plan:
            if ctx.out_of_time(reserve=3):
                break
            hidden, out_features = (width, 4096) if op == "shrink" else (4096, width)
            calls = [_decode_call(op, make_batch("decode", rows, adapters, rank, hidden,
                                                 out_features, torch.bfloat16),
                                  rows, rank, hidden, out_features)
                     for _ in range(copies)]
            graph_s = _time_graph(calls, 20, flush)
            eager_s = _time_eager(calls, 10, flush)
            weight_bytes = min(adapters, rows) * rank * width * 2
            gbps = weight_bytes / graph_s / 1e9
            results.append({"op": op, "rows": rows, "adapters": adapters, "rank": rank,
                            "width": width, "graph_us": round(graph_s * 1e6, 2),
                            "eager_us": round(eager_s * 1e6, 2),
                            "weight_bytes": weight_bytes, "gb_per_s": round(gbps, 1),
                            "fraction_of_copy": round(gbps / copy_rate, 3)})
            del calls
            torch.cuda.empty_cache()
    checks = {}
    for op in ("shrink", "expand"):
        head = [r for r in results if r["op"] == op and (r["rows"], r["rank"]) == (32, 16)]
        if head:
            worst = min(r["fraction_of_copy"] for r in head)
            checks[f"{op}_fraction_of_copy"] = check(
                worst, f">= {BANDWIDTH_TARGET} of the copy rate (32 rows, 32 adapters, rank 16, "
                       "worst width)", judged(ctx, worst >= BANDWIDTH_TARGET))
    return {"copy_gb_per_s": round(copy_rate, 1), "calls_per_graph": copies,
            "results": results, "checks": checks}
