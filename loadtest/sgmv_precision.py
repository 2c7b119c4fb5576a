"""Error of the LoRA delta with the shrink output v kept in float32 or rounded to bf16 / fp16.

The engine keeps v = x @ A.T in float32 between shrink and expand (engine/lora.py), whatever
the model dtype; this measures what that buys. Per projection of --shape (7b: 4096 -> 4096,
4096 -> 11008, 11008 -> 4096) and rank in --ranks, one adapter over --rows decode rows:

  x     [T, in]   RMS-normed activations (unit RMS per row) times a norm weight
                  gamma ~ exp(N(0, 0.5)) per channel, rounded to --dtype (bf16)
  A     [r, in]   U(+-1/sqrt(in)) (PEFT's kaiming-uniform init), --dtype
  B     [out, r]  N(0, --b-std) (small, as after training), --dtype
  base  [T, out]  the frozen projection's output, N(0, 0.02 * sqrt(in)) (Llama's 0.02-std
                  weights on unit-RMS x), --dtype; the delta lands on it
  scale           alpha / r with alpha = 2r (as loadtest/gpu_models.write_adapter writes)

Reference: delta = scale * (x @ A.T) @ B.T in float64 from the same rounded x, A, B. Errors
are relative Frobenius norms ||got - ref|| / ||ref|| over the [T, out] delta:

  delta_err  the kernel's float32 scale * acc before it is added to out
  out_err    (out - base) after out is rounded to --dtype: what the next layer sees
  floor      out_err of the exact delta rounded the same way (no kernel can do better)

CPU emulation of the GPU arithmetic (the default without CUDA): shrink accumulates in
float32 from the rounded inputs (exact products, so only the summation order differs from a
GPU's); expand with float32 v is a tf32 dot (v rounded to 10 explicit mantissa bits, to
nearest; a bf16 B is exact in tf32), with "float32/tf32-trunc" as the same with the low bits
dropped instead (which PTX's mma.tf32 does with operands nobody rounded); bfloat16 v is a bf16
dot of v rounded to bf16; float16 v is rounded to fp16 and upcast (exact in tf32: sgmv.py's
dot_modes for mixed dtypes); every expand accumulates in float32, and out = round(base + delta).

On CUDA it also runs the real kernels through SgmvLauncher with v float32 and v bfloat16
(x and pool --dtype), reports their errors the same way, and times shrink + expand of both
with triton.testing.do_bench (median, L2 flushed) at --rows decode rows of one adapter.

Run:  python -m loramux.loadtest.sgmv_precision [--shape 7b] [--ranks 8,16,32,64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from loramux.adapters.types import MODULES, BaseSpec
from loramux.loadtest.gpu_models import SHAPES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TF32_DROPPED_BITS = 13  # float32 has 23 explicit mantissa bits, tf32 10


@dataclass(frozen=True)
class Inputs:
    """One projection's operands, rounded to the model dtype, and the float64 reference."""

    x: torch.Tensor  # [T, in]
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    base: torch.Tensor  # [T, out]
    scale: float
    want: torch.Tensor  # float64 [T, out], the exact delta of the rounded operands


@dataclass(frozen=True)
class Result:
    """Errors of one (projection, rank, v dtype), and the time on CUDA."""

    in_features: int
    out_features: int
    rank: int
    v_dtype: str
    source: str  # emulated | cuda | interp (the kernels under TRITON_INTERPRET=1)
    delta_err: float | None  # None for the real kernels: the pre-rounding delta is not seen
    out_err: float
    floor: float
    delta_over_base: float  # RMS of the delta / RMS of base
    us: float | None = None  # shrink + expand, CUDA only


def round_tf32(t: torch.Tensor, *, nearest: bool = True) -> torch.Tensor:
    """float32 t with its mantissa cut to tf32's 10 bits: to nearest (ties to even) or
    truncated. Finite inputs only (the bit trick would carry a rounded-up max into inf)."""
    bits = t.float().contiguous().view(torch.int32)
    low = (1 << TF32_DROPPED_BITS) - 1
    if nearest:
        bits = bits + ((low >> 1) + ((bits >> TF32_DROPPED_BITS) & 1))
    return (bits & ~low).view(torch.float32)


def projections(shape: str) -> list[tuple[int, int]]:
    """Distinct (in, out) widths of `shape`'s adapted projections."""
    base = BaseSpec.from_hf_config(SimpleNamespace(**SHAPES[shape]))
    return sorted({base.shapes[m] for m in MODULES})


def make_inputs(in_features: int, out_features: int, rank: int, rows: int, dtype: torch.dtype,
                b_std: float, gen: torch.Generator) -> Inputs:
    """Operands as the module docstring describes them."""
    g = torch.randn(rows, in_features, generator=gen)
    gamma = torch.exp(torch.randn(in_features, generator=gen) * 0.5)
    x = (g * g.pow(2).mean(1, keepdim=True).rsqrt() * gamma).to(dtype)  # [T, in]
    bound = in_features**-0.5
    a = ((torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound).to(dtype)  # [r, in]
    b = (torch.randn(out_features, rank, generator=gen) * b_std).to(dtype)  # [out, r]
    base = (torch.randn(rows, out_features, generator=gen)
            * 0.02 * in_features**0.5).to(dtype)  # [T, out]
    scale = 2.0  # alpha / r with alpha = 2r
    want = scale * (x.double() @ a.double().T) @ b.double().T
    return Inputs(x, a, b, base, scale, want)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def judged(inputs: Inputs, out: torch.Tensor) -> tuple[float, float, float]:
    """(out_err, floor, delta_over_base) of an output `out` in the model dtype."""
    base = inputs.base.double()
    exact = (base + inputs.want).to(inputs.base.dtype)
    return (rel(out.double() - base, inputs.want), rel(exact.double() - base, inputs.want),
            float(inputs.want.norm() / base.norm()))


def emulate(inputs: Inputs, v_dtype: str) -> tuple[float, float, float, float]:
    """(delta_err, out_err, floor, delta_over_base) of the GPU arithmetic for one v dtype."""
    v = inputs.x.float() @ inputs.a.float().T  # [T, r]: float32 accumulation
    rounded = {
        "float32": lambda: round_tf32(v),
        "float32/tf32-trunc": lambda: round_tf32(v, nearest=False),
        "bfloat16": lambda: v.to(torch.bfloat16).float(),
        "float16": lambda: v.to(torch.float16).float(),
    }[v_dtype]()
    delta = inputs.scale * (rounded @ inputs.b.float().T)  # [T, out], float32 accumulation
    out = (inputs.base.float() + delta).to(inputs.base.dtype)
    return (rel(delta, inputs.want), *judged(inputs, out))


def run_kernels(inputs: Inputs, v_dtype: torch.dtype, dev: torch.device,
                time_it: bool) -> tuple[float, float, float, float | None]:
    """(out_err, floor, delta_over_base, microseconds or None) of the real kernels on `dev`
    (CUDA, or the CPU under TRITON_INTERPRET=1: errors only, and the interpreter upcasts)."""
    import triton.testing
    from loramux.kernels.launch import SgmvLauncher

    rows, in_features = inputs.x.shape
    out_features, rank = inputs.b.shape
    dtype = inputs.x.dtype
    b_offset = -(-(rank * in_features) // 64) * 64
    pool = torch.empty(b_offset + out_features * rank, dtype=dtype, device=dev)
    pool[:rank * in_features] = inputs.a.flatten().to(dev)
    pool[b_offset:] = inputs.b.flatten().to(dev)
    meta = {"a": torch.tensor([0], dtype=torch.int64, device=dev),
            "b": torch.tensor([b_offset], dtype=torch.int64, device=dev),
            "ranks": torch.tensor([rank], dtype=torch.int32, device=dev),
            "scales": torch.tensor([inputs.scale], device=dev),
            "starts": torch.arange(rows + 1, dtype=torch.int32, device=dev),  # one row each
            "slots": torch.zeros(rows, dtype=torch.int32, device=dev)}
    launcher = SgmvLauncher(in_features, out_features, rank, dtype, dtype, v_dtype, dev,
                            max_rows=rows, max_segments=rows)
    x, base = inputs.x.to(dev), inputs.base.to(dev)
    v = torch.empty(rows, rank, dtype=v_dtype, device=dev)

    def step(out: torch.Tensor) -> None:
        launcher.shrink(x, pool, meta["a"], meta["ranks"], meta["starts"], meta["slots"], v)
        launcher.expand(v, pool, meta["b"], meta["ranks"], meta["scales"], meta["starts"],
                        meta["slots"], out)

    out = base.clone()
    step(out)
    errors = judged(inputs, out.cpu())
    scratch = base.clone()
    timer: Callable[[], object] = lambda: step(scratch)  # noqa: E731
    us = (float(triton.testing.do_bench(timer, warmup=10, rep=50, return_mode="median")) * 1e3
          if time_it and dev.type == "cuda" else None)
    return (*errors, us)


def machine() -> str:
    """What ran it, e.g. "2-vCPU, Intel(R) Xeon(R) ..., torch 2.x, CPU emulation"."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()}-vCPU, {model}, torch {torch.__version__}{gpu}"


def measure(args: argparse.Namespace) -> list[Result]:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    cuda = torch.cuda.is_available() and not args.cpu
    kernels = cuda or (args.kernels and os.environ.get("TRITON_INTERPRET") == "1")
    dev = torch.device("cuda" if cuda else "cpu")
    results: list[Result] = []
    for in_features, out_features in projections(args.shape):
        for rank in args.ranks:
            inputs = make_inputs(in_features, out_features, rank, args.rows, dtype, args.b_std,
                                 gen)
            for v_dtype in ("float32", "float32/tf32-trunc", "bfloat16", "float16"):
                results.append(Result(in_features, out_features, rank, v_dtype, "emulated",
                                      *emulate(inputs, v_dtype)))
            if kernels:
                for name, v_dtype in (("float32", torch.float32), ("bfloat16", dtype)):
                    out_err, floor, ratio, us = run_kernels(inputs, v_dtype, dev,
                                                            not args.no_time)
                    results.append(Result(in_features, out_features, rank, name,
                                          "cuda" if cuda else "interp", None, out_err, floor,
                                          ratio, us))
    return results


def print_table(results: list[Result]) -> None:
    header = (f"{'in':>6} {'out':>6} {'rank':>4} {'v dtype':18} {'source':8} {'delta_err':>10} "
              f"{'out_err':>9} {'floor':>9} {'d/base':>7} {'us':>7}")
    print(header)
    print("-" * len(header))
    for r in results:
        delta = f"{r.delta_err:10.2e}" if r.delta_err is not None else f"{'':10}"
        us = f"{r.us:7.1f}" if r.us is not None else f"{'':7}"
        print(f"{r.in_features:6d} {r.out_features:6d} {r.rank:4d} {r.v_dtype:18} "
              f"{r.source:8} {delta} {r.out_err:9.2e} {r.floor:9.2e} "
              f"{r.delta_over_base:7.3f} {us}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--ranks", default="8,16,32,64", help="comma-separated")
    parser.add_argument("--rows", type=int, default=64, help="T, decode rows of one adapter")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="x's, the pool's and out's")
    parser.add_argument("--b-std", type=float, default=0.01, help="std of B's entries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="emulation only, even with CUDA")
    parser.add_argument("--no-time", action="store_true", help="skip timing the real kernels")
    parser.add_argument("--kernels", action="store_true",
                        help="without CUDA, run the kernels under TRITON_INTERPRET=1 too (slow: "
                             "--shape tiny; the interpreter upcasts, so bf16 v is not a bf16 dot)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results")
    args = parser.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    results = measure(args)
    cuda = any(r.source == "cuda" for r in results)
    where = machine() + ("" if cuda else ", CPU emulation (speed unmeasured: no GPU)")
    print(f"sgmv_precision: --shape {args.shape}, x/pool/out {args.dtype}, {args.rows} rows; "
          f"{where}")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": where, "shape": args.shape, "dtype": args.dtype, "rows": args.rows,
             "b_std": args.b_std, "seed": args.seed, "results": [asdict(r) for r in results]},
            indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
