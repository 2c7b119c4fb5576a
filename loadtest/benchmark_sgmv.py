"""Time and bandwidth of the SGMV shrink/expand kernels on Llama-2-7B shapes (GPU only).

Shapes: shrink x [T, H] -> v [T, r] with H = --hidden (4096), expand v [T, r] -> out [T, O]
with O in --out-features (4096: q/k/v/o, 11008: gate/up), one adapter of rank r per slot,
--adapters distinct adapters spread over the batch:

  decode    --batch rows, one row per segment, segment i uses adapter i % adapters
  prefill   --tokens rows in `adapters` equal contiguous segments (one per adapter)

Per case: median of --iters calls timed with CUDA events after --warmup calls (eager, or
replays of a CUDA graph with --cuda-graph), with L2 flushed before every timed call
(--no-flush-l2 to keep it warm, as back-to-back calls on one layer would); achieved
bandwidth from the bytes the op must move (x or v read, the weights of the adapters it uses,
out written, and read too for expand); for prefill also TFLOP/s next to a dense bf16 matmul of
the same shape and FLOPs measured in the same run (the ceiling for the same arithmetic).
Each case is checked once against the torch backend before timing.

Dtypes are the engine's: x, the pools and out in the model dtype (--dtype, bfloat16), v (the
shrink output, the expand input) float32 as engine/lora.py keeps it, so expand is a tf32 dot;
--v-dtype bfloat16 times a bf16 v instead (a bf16 dot), --v-dtype both times each case with
both (loadtest/sgmv_precision.py measures what each costs in accuracy).

Run:  .venv/bin/python -m loramux.loadtest.benchmark_sgmv [--mode decode] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from loramux.kernels.ops import Backend, sgmv_expand, sgmv_shrink

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MiB)


@dataclass(frozen=True)
class Result:
    """One measured case."""

    mode: str  # decode | prefill
    op: str  # shrink | expand
    v_dtype: str  # float32 (the engine's) | bfloat16
    rows: int  # T
    adapters: int  # distinct adapters in the batch
    rank: int
    inner: int  # H for shrink, r for expand
    outer: int  # r for shrink, O for expand
    ms: float  # median time of one call
    gbps: float  # achieved bandwidth, 1e9 bytes / s
    tflops: float  # achieved TFLOP/s
    dense_tflops: float | None  # dense matmul of the same shape, prefill only


@dataclass
class Batch:
    """Kernel inputs of one case: flat pools and segment metadata, on the GPU."""

    a_pool: torch.Tensor  # [S * r * H]
    b_pool: torch.Tensor  # [S * O * r]
    a_offsets: torch.Tensor  # int64 [S]
    b_offsets: torch.Tensor  # int64 [S]
    ranks: torch.Tensor  # int32 [S]
    scales: torch.Tensor  # float32 [S]
    seg_starts: torch.Tensor  # int32 [N + 1]
    seg_slots: torch.Tensor  # int32 [N]


def make_batch(
    mode: str, rows: int, adapters: int, rank: int, hidden: int, out_features: int,
    dtype: torch.dtype,
) -> Batch:
    """Adapters packed back to back in two pools; segments as the module docstring says."""
    if mode == "decode":
        lengths = [1] * rows
        slots = [i % adapters for i in range(rows)]
    else:
        lengths = [rows // adapters + (i < rows % adapters) for i in range(adapters)]
        slots = list(range(adapters))
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)

    def ints(values: list[int], dt: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dt, device="cuda")

    return Batch(
        a_pool=(torch.randn(adapters * rank * hidden, device="cuda") / hidden**0.5).to(dtype),
        b_pool=(torch.randn(adapters * out_features * rank, device="cuda") * 0.01).to(dtype),
        a_offsets=ints([k * rank * hidden for k in range(adapters)], torch.int64),
        b_offsets=ints([k * out_features * rank for k in range(adapters)], torch.int64),
        ranks=ints([rank] * adapters, torch.int32),
        scales=torch.full((adapters,), 2.0, device="cuda"),
        seg_starts=ints(starts, torch.int32),
        seg_slots=ints(slots, torch.int32),
    )


def time_ms(fn: Callable[[], object], args: argparse.Namespace,
            flush: torch.Tensor | None) -> float:
    """Median milliseconds of fn() over --iters calls, each bracketed by its own CUDA events.

    Eager calls include any launch overhead the GPU waits for; --cuda-graph replays a captured
    call instead, as a decode step under CUDA graphs would, and measures the GPU alone.
    """
    for _ in range(args.warmup):  # also compiles the Triton kernels before any capture
        fn()
    if args.cuda_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
    samples = []
    for _ in range(args.iters):
        if flush is not None:
            flush.zero_()  # evict L2 outside the timed region
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def _dense_tflops(mode: str, flops: float, dense: Callable[[], object],
                  args: argparse.Namespace, flush: torch.Tensor | None) -> float | None:
    if mode != "prefill":
        return None
    return flops / time_ms(dense, args, flush) / 1e9


def v_dtypes(choice: str) -> list[str]:
    """The v dtypes --v-dtype asks for, the engine's (float32) first."""
    return ["float32", "bfloat16"] if choice == "both" else [choice]


def run_case(
    args: argparse.Namespace, mode: str, rows: int, adapters: int, rank: int,
    flush: torch.Tensor | None,
) -> list[Result]:
    """Per v dtype, time shrink once (it does not depend on O) and expand for every
    --out-features width."""
    results: list[Result] = []
    for v_dtype in v_dtypes(args.v_dtype):
        for i, out_features in enumerate(args.out_features):
            results += _measure(args, mode, rows, adapters, rank, out_features, v_dtype, i == 0,
                                flush)
    return results


def _measure(
    args: argparse.Namespace, mode: str, rows: int, adapters: int, rank: int, out_features: int,
    v_dtype: str, with_shrink: bool, flush: torch.Tensor | None,
) -> list[Result]:
    """Check one case against the torch backend, then time expand (and shrink if asked)."""
    dtype = DTYPES[args.dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    v_size = torch.tensor([], dtype=DTYPES[v_dtype]).element_size()
    hidden = args.hidden
    used = min(adapters, rows)  # adapters whose weights the batch touches
    batch = make_batch(mode, rows, adapters, rank, hidden, out_features, dtype)
    x = torch.randn(rows, hidden, device="cuda").to(dtype)  # [T, H]
    v = torch.zeros(rows, rank, device="cuda", dtype=DTYPES[v_dtype])  # [T, r]
    out = torch.zeros(rows, out_features, device="cuda", dtype=dtype)  # [T, O]

    def shrink(backend: Backend = "triton") -> torch.Tensor:
        return sgmv_shrink(x, batch.a_pool, batch.a_offsets, batch.ranks, batch.seg_starts,
                           batch.seg_slots, v, backend=backend)

    def expand(backend: Backend = "triton") -> torch.Tensor:
        return sgmv_expand(v, batch.b_pool, batch.b_offsets, batch.ranks, batch.scales,
                           batch.seg_starts, batch.seg_slots, out, backend=backend)

    if args.check:
        want_v = shrink("torch").clone()
        torch.testing.assert_close(shrink(), want_v, rtol=2e-2, atol=2e-2)
        before = out.clone()
        want = expand("torch").clone()
        out.copy_(before)
        torch.testing.assert_close(expand(), want, rtol=2e-2, atol=2e-2)

    results = []
    if with_shrink:
        flops = 2.0 * rows * hidden * rank
        nbytes = (rows * hidden + used * rank * hidden) * size + rows * rank * v_size
        a = batch.a_pool[: rank * hidden].view(rank, hidden)  # [r, H]
        ms = time_ms(shrink, args, flush)
        dense = _dense_tflops(mode, flops, lambda: x @ a.T, args, flush)
        results.append(Result(mode, "shrink", v_dtype, rows, adapters, rank, hidden, rank, ms,
                              nbytes / ms / 1e6, flops / ms / 1e9, dense))
    flops = 2.0 * rows * rank * out_features
    # out is read and written: expand adds in place.
    nbytes = (used * out_features * rank + 2 * rows * out_features) * size + rows * rank * v_size
    b = batch.b_pool[: out_features * rank].view(out_features, rank)  # [O, r]
    ms = time_ms(expand, args, flush)
    v_dense = v.to(dtype)  # the dense ceiling is a model-dtype matmul whatever v's dtype
    dense = _dense_tflops(mode, flops, lambda: v_dense @ b.T, args, flush)
    results.append(Result(mode, "expand", v_dtype, rows, adapters, rank, rank, out_features, ms,
                          nbytes / ms / 1e6, flops / ms / 1e9, dense))
    return results


def print_table(results: list[Result]) -> None:
    header = (f"{'mode':8} {'op':6} {'v':4} {'rows':>5} {'adapt':>5} {'rank':>4} {'in':>6} "
              f"{'out':>6} {'us':>9} {'GB/s':>8} {'TFLOP/s':>8} {'dense':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        dense = f"{r.dense_tflops:8.1f}" if r.dense_tflops is not None else f"{'':8}"
        v = {"float32": "fp32", "bfloat16": "bf16"}[r.v_dtype]
        print(f"{r.mode:8} {r.op:6} {v:4} {r.rows:5d} {r.adapters:5d} {r.rank:4d} {r.inner:6d} "
              f"{r.outer:6d} {r.ms * 1e3:9.1f} {r.gbps:8.0f} {r.tflops:8.2f} {dense}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("decode", "prefill", "all"), default="all")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64],
                        help="decode: rows (= segments) per call")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 4096],
                        help="prefill: rows per call")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64],
                        help="distinct adapters in the batch (decode: capped at the batch)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--hidden", type=int, default=4096, help="H, the shrink input width")
    parser.add_argument("--out-features", type=int, nargs="+", default=[4096, 11008],
                        help="O, the expand output width")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="x's, the pools' and out's (the model dtype)")
    parser.add_argument("--v-dtype", choices=("float32", "bfloat16", "both"), default="float32",
                        help="v's, the shrink output: float32 is the engine's")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time replays of a captured call (GPU time without launch cost)")
    parser.add_argument("--no-flush-l2", dest="flush_l2", action="store_false",
                        help="keep L2 warm between calls (weights then come from cache)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the one-off comparison with the torch backend")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmark_sgmv needs a CUDA GPU: the Triton kernels do not run compiled on CPU")
    flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
             if args.flush_l2 else None)
    modes = ["decode", "prefill"] if args.mode == "all" else [args.mode]
    results: list[Result] = []
    for mode in modes:
        sizes = args.batch if mode == "decode" else args.tokens
        for rows in sizes:
            adapter_counts = sorted({min(a, rows) for a in args.adapters})
            for adapters in adapter_counts:
                for rank in args.ranks:
                    results += run_case(args, mode, rows, adapters, rank, flush)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, v {args.v_dtype}, "
          f"H={args.hidden}, L2 {'flushed' if args.flush_l2 else 'warm'}")
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype,
                       "v_dtype": args.v_dtype,
                       "results": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
