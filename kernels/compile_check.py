"""Compile a @triton.jit kernel for an NVIDIA GPU without one, and report what ptxas made of it.

Registers, spills and shared memory decide whether a kernel variant is fit to launch, and they
are fixed at compile time, so a CPU-only CI can check them. Nothing needs a GPU or a CUDA
driver: Triton lowers to PTX and the ptxas bundled with Triton assembles it. Use:

    from loramux.kernels.compile_check import KernelVariant, compile_variants

    variant = KernelVariant.of(
        _my_kernel,  # the decorated kernel, as its module defines it
        {"x_ptr": torch.bfloat16, "n": 4096, "stride": 4096, "BLOCK": 128},  # every parameter
        arch=90, num_warps=4, num_stages=3,
    )
    (report,) = compile_variants([variant])  # a list of variants is split over the CPUs
    assert report.spill_bytes == 0, report  # or: report = compile_kernel(_my_kernel, {...})
    report.global_loads()  # Counter of ld.global widths in the PTX, e.g. {"v4.b32": 8}

`args` gives every parameter of the kernel by name, as a launch would pass it:
  - a pointer: a torch.dtype (a 16-byte-aligned tensor of that dtype) or a tensor (any device);
  - an int: its value, specialised like a launch (1 becomes a constant, a multiple of 16 is
    marked divisible by 16, past int32 makes it int64), so pass the sizes and strides of a
    realistic call; variants whose ints specialise alike are equal (one compile);
  - a float or bool: any value; a tl.constexpr parameter: its value.
Defaults of the kernel's signature fill parameters left out.

TRITON_INTERPRET: a process that imported triton under the interpreter cannot compile (Triton's
own library functions were decorated for the interpreter too), so `compile_variants` compiles
in fresh worker processes started with TRITON_INTERPRET=0 whenever this process interprets,
and in this process otherwise. Workers import the kernel's module by name, so the kernel must
be a module-level @triton.jit function of an importable module.
"""

from __future__ import annotations

import collections
import importlib
import inspect
import os
import pickle
import re
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.runtime.jit import JITFunction, native_specialize_impl

ARCHES = (80, 90)  # A100, H100: the GPUs loramux is sized for

_TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
}


@dataclass(frozen=True)
class CompileReport:
    """What one compiled kernel variant costs: ptxas's resource usage, and its PTX."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int  # per thread; 255 is the cap, reaching it usually means spilling
    spill_stores: int  # bytes per thread written to local memory
    spill_loads: int  # bytes per thread read back
    stack: int  # bytes of stack frame per thread
    shared: int  # bytes of shared memory per program (Triton's allocation)
    ptx: str

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    def global_loads(self) -> collections.Counter[str]:
        """Counts of ld.global forms in the PTX by width, e.g. {"b16": 64, "v4.b32": 8}."""
        forms = re.findall(r"ld\.global(?:\.[a-z_]+\d*)*?\.((?:v\d\.)?b\d+)\b", self.ptx)
        return collections.Counter(forms)

    def async_copies(self) -> collections.Counter[int]:
        """cp.async copies (global -> shared, pipelined) in the PTX by bytes each."""
        sizes = re.findall(r"cp\.async\.c[ag]\.shared\.global[^[]*\[[^]]+\],\s*\[[^]]+\],"
                           r"\s*(0x[0-9a-f]+|\d+)", self.ptx)
        return collections.Counter(int(n, 0) for n in sizes)

    def __str__(self) -> str:
        return (f"{self.name} sm_{self.arch} warps={self.num_warps} stages={self.num_stages}: "
                f"{self.registers} registers, spills {self.spill_stores} B stored / "
                f"{self.spill_loads} B loaded, {self.shared} B shared")


@dataclass(frozen=True)
class KernelVariant:
    """One compilation: a module-level kernel (by name), its launch arguments and options."""

    module: str
    kernel: str
    args: tuple[tuple[str, Any], ...]  # (parameter, value) pairs, see the module docstring
    arch: int = 90
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def of(cls, kernel: Any, args: Mapping[str, Any], *, arch: int = 90, num_warps: int = 4,
           num_stages: int = 3) -> KernelVariant:
        """The variant of a @triton.jit `kernel` (compiled or interpreted) launched with args."""
        python_fn = kernel.fn  # JITFunction and InterpretedFunction both wrap the function
        constexprs = {name for name, param in inspect.signature(python_fn).parameters.items()
                      if "constexpr" in str(param.annotation)}
        values = tuple(sorted(
            (name, value if name in constexprs else _portable(value))
            for name, value in args.items()
        ))
        return cls(module=python_fn.__module__, kernel=python_fn.__name__, args=values,
                   arch=arch, num_warps=num_warps, num_stages=num_stages)

    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.args if k.isupper())
        return (f"{self.kernel}[sm_{self.arch},w{self.num_warps},s{self.num_stages},"
                f"{consts}]")


def compile_variants(variants: Iterable[KernelVariant], *,
                     processes: int | None = None) -> list[CompileReport]:
    """Compile each variant and report on it, in order; raise CompileFailed on an error.

    Runs in this process when it does not interpret Triton and `processes` is at most 1, else
    in `processes` fresh worker processes (default: the CPU count) that split the list.
    """
    todo = list(variants)
    if not todo:
        return []
    if not triton.knobs.runtime.interpret and (processes is None or processes <= 1):
        return [compile_variant(v) for v in todo]
    workers = max(1, min(processes or os.cpu_count() or 1, len(todo)))
    chunks = [todo[i::workers] for i in range(workers)]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    running = [
        subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=env)
        for _ in chunks
    ]
    results: list[list[CompileReport]] = []
    for chunk, worker in zip(chunks, running):
        reply, _ = worker.communicate(pickle.dumps(chunk))
        if worker.returncode != 0:
            raise CompileFailed(f"compile worker exited with {worker.returncode}")
        outcome = pickle.loads(reply)
        if isinstance(outcome, str):
            raise CompileFailed(outcome)
        results.append(outcome)
    reports: list[CompileReport] = [None] * len(todo)  # type: ignore[list-item]
    for i, chunk_reports in enumerate(results):
        reports[i::workers] = chunk_reports
    return reports


def compile_kernel(kernel: Any, args: Mapping[str, Any], *, arch: int = 90,
                   num_warps: int = 4, num_stages: int = 3) -> CompileReport:
    """compile_variants of the one variant KernelVariant.of(kernel, args, ...)."""
    variant = KernelVariant.of(kernel, args, arch=arch, num_warps=num_warps,
                               num_stages=num_stages)
    return compile_variants([variant], processes=1)[0]


class CompileFailed(RuntimeError):
    """A variant did not compile (the message holds the compiler's error)."""


def compile_variant(variant: KernelVariant) -> CompileReport:
    """Compile one variant in this process (which must not interpret Triton); raise on errors."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("this process interprets Triton; use compile_variants")
    fn = getattr(importlib.import_module(variant.module), variant.kernel)
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{variant.module}.{variant.kernel} is not a @triton.jit kernel")
    signature, constexprs, attrs = _specialize(fn, dict(variant.args))
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", variant.arch, 32),
                              options={"num_warps": variant.num_warps,
                                       "num_stages": variant.num_stages})
    ptx = compiled.asm["ptx"]
    usage = _ptxas_usage(ptx, variant.arch)
    return CompileReport(
        name=variant.label(), arch=variant.arch, num_warps=variant.num_warps,
        num_stages=variant.num_stages, registers=usage["registers"],
        spill_stores=usage["spill stores"], spill_loads=usage["spill loads"],
        stack=usage["stack frame"], shared=compiled.metadata.shared, ptx=ptx,
    )  # fmt: skip


def _portable(value: Any) -> Any:
    """A picklable, hashable stand-in for a launch argument that compiles the same code: a
    tensor becomes its dtype, an int the smallest of its specialisation class (so variants
    that differ only in such values are equal and compile once)."""
    if isinstance(value, torch.Tensor):
        if value.data_ptr() % 16:
            raise ValueError("a tensor argument must be 16-byte aligned, as launches assume")
        return value.dtype
    if isinstance(value, int) and not isinstance(value, bool) and value != 1:
        wide = not -(2**31) <= value < 2**31
        return (2**32 if wide else 16) + (0 if value % 16 == 0 else 1)
    return value


def _specialize(
    fn: JITFunction, args: Mapping[str, Any]
) -> tuple[dict[str, str], dict[tuple[int, ...], Any], dict[tuple[int, ...], Any]]:
    """(signature, constexprs, attrs) for triton.compile, as a launch with `args` makes them."""
    unknown = set(args) - set(fn.arg_names)
    if unknown:
        raise TypeError(f"{fn.__name__} has no parameters {sorted(unknown)}")
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], Any] = {}
    for i, param in enumerate(fn.params):
        if param.name in args:
            value = args[param.name]
        elif param.has_default:
            value = param.default
        else:
            raise TypeError(f"{fn.__name__}: missing argument {param.name!r}")
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        if isinstance(value, torch.dtype):  # a pointer: torch allocations are 16-byte aligned
            signature[param.name] = "*" + _TORCH_TO_TRITON[value]
            attrs[(i,)] = BaseBackend.parse_attr("D")
            continue
        # The specialisation a launch applies (Triton's own function, as JITFunction.run).
        kind, spec = native_specialize_impl(BaseBackend, value, False,
                                            not param.do_not_specialize, True)
        signature[param.name] = kind
        if kind == "constexpr":  # an int equal to 1 (or None): a launch makes it a constant
            constexprs[(i,)] = value
        elif isinstance(spec, str):
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """registers, stack frame, spill stores, spill loads (bytes) from `ptxas -v` on the PTX.

    Same flags as Triton's own ptxas run (which prints nothing unless asked), so the same code.
    """
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        log = subprocess.run(
            [triton.knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
            check=True, capture_output=True, text=True,
        ).stderr
    usage = {key: int(n) for n, key in re.findall(r"(\d+) bytes (stack frame|spill stores|"
                                                  r"spill loads)", log)}
    match = re.search(r"Used (\d+) registers", log)
    if match is None or len(usage) != 3:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    usage["registers"] = int(match.group(1))
    return usage


def _worker() -> None:
    """Compile the pickled variants on stdin; pickle the reports (or the error text) to stdout."""
    variants = pickle.loads(sys.stdin.buffer.read())
    try:
        outcome: list[CompileReport] | str = [compile_variant(v) for v in variants]
    except Exception:  # every compile error, reported to the parent as text
        outcome = traceback.format_exc()
    sys.stdout.buffer.write(pickle.dumps(outcome))


# Imported, not run as __main__, so that the reports it pickles unpickle as this module's types.
_WORKER = "from loramux.kernels.compile_check import _worker; _worker()"
