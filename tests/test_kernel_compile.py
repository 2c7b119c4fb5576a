"""Every SGMV kernel variant the launchers can pick compiles for sm_80 and sm_90 without spills.

Compiled for the target without a GPU (loramux.kernels.compile_check), whatever
TRITON_INTERPRET says: the workers it starts compile with the interpreter off. The variants:
every config the heuristics return over decode and prefill buckets, ranks 8 to 128, Llama-sized
projections and the engine's dtypes (x and pool bf16, fp16 or float32, v float32), plus every
entry of the packaged tuned table, each with the SEG_BLOCK of the largest batch (256
sequences). Ints specialise as a launch's (H, O and R_max as multiples of 16, or not for
R_max = 8), so equal variants compile once: about 220, 2.7 minutes on 2 cores with a cold
Triton cache."""

from __future__ import annotations

import os
from functools import cache

import pytest
import torch
from loramux.kernels import sgmv
from loramux.kernels.compile_check import (
    ARCHES,
    CompileReport,
    KernelVariant,
    compile_kernel,
    compile_variants,
)
from loramux.kernels.sgmv_config import (
    REGIMES,
    ExpandConfig,
    ShapeKey,
    ShrinkConfig,
    TunedTable,
    dtype_name,
    heuristic,
    heuristic_buckets,
    rank_bucket,
)

MAX_ROWS, MAX_SEGMENTS = 16384, 256  # past any engine configuration's batch
NUM_SMS = (108, 132)  # A100, H100
FEATURES = (4096, 11008)  # Llama-2-7B's hidden and intermediate sizes
MAX_RANKS = (8, 16, 32, 64, 128)
# One SEG_BLOCK, the largest: a launcher fixes seg_block(max_segments) for every call, and
# fewer lanes scan seg_starts with fewer registers.
SEG_BLOCKS = (sgmv.seg_block(MAX_SEGMENTS),)
# The engine's dtypes: x and the pool in the model's dtype, v float32 (engine/lora.py).
ENGINE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
V_DTYPE = torch.float32


def launchable_configs() -> set[tuple[int, int, torch.dtype, ShrinkConfig | ExpandConfig]]:
    """(features, R_max, pool dtype, config) for every config a launcher can choose."""
    found: set[tuple[int, int, torch.dtype, ShrinkConfig | ExpandConfig]] = set()
    for max_rank in MAX_RANKS:
        for features in FEATURES:
            for dtype in ENGINE_DTYPES:
                for regime in REGIMES:
                    most = MAX_SEGMENTS if regime == "decode" else MAX_ROWS
                    for bucket in heuristic_buckets(regime, most):
                        for op in ("shrink", "expand"):
                            key = ShapeKey(op, regime, features, rank_bucket(max_rank), bucket,
                                           dtype_name(dtype))
                            for num_sms in NUM_SMS:
                                found.add((features, max_rank, dtype, heuristic(key, num_sms)))
    by_name = {dtype_name(d): d for d in ENGINE_DTYPES}
    for table in TunedTable.load().devices.values():
        for text, config in table.items():
            key = ShapeKey.parse(text)
            found.add((key.features, key.rank, by_name[key.dtype], config))
    return found


def all_variants() -> list[KernelVariant]:
    variants: dict[KernelVariant, None] = {}  # ordered, deduplicated
    for features, max_rank, dtype, config in sorted(launchable_configs(), key=repr):
        for segments_block in SEG_BLOCKS:
            for arch in ARCHES:
                if isinstance(config, ShrinkConfig):
                    found = sgmv.shrink_variants(config, features, max_rank, dtype, V_DTYPE,
                                                 segments_block, arch)
                else:
                    found = sgmv.expand_variants(config, features, max_rank, V_DTYPE, dtype,
                                                 segments_block, arch)
                variants.update(dict.fromkeys(found))
    return list(variants)


@cache
def reports() -> dict[KernelVariant, CompileReport]:
    """Every variant compiled once per test session."""
    variants = all_variants()
    return dict(zip(variants, compile_variants(variants, processes=os.cpu_count())))


def test_every_launchable_variant_compiles_without_spills() -> None:
    spilled = [str(r) for r in reports().values() if r.spill_bytes > 0]
    assert not spilled, "\n".join(spilled)


def test_weight_tiles_load_as_vectors() -> None:
    """With H a multiple of 16, A rows stream in 16-byte async copies, no 16-bit loads; B rows
    do too for ranks that are multiples of 8 (the expand kernel's aligned branch) when R_max is
    a multiple of 16, as wide as the tile allows: a [16, 32] bf16 B tile is 8 bytes per thread
    of 4 warps."""
    for variant, report in reports().items():
        args = dict(variant.args)
        if variant.kernel == "_sgmv_shrink_kernel" and args["x_ptr"] != torch.float32:
            assert report.global_loads()["b16"] == 0, report
            assert report.async_copies()[16] > 0, report
        # R_max = 8 (specialised as not a multiple of 16) masks B by it and loads 4 bytes at a
        # time; masking B by the rank alone vectorised it but made ptxas spill elsewhere.
        if (variant.kernel == "_sgmv_expand_kernel" and args["b_pool_ptr"] != torch.float32
                and args["max_rank"] % 16 == 0):
            tile_bytes = args["BLOCK_R"] * args["BLOCK_N"] * 2
            widest = min(16, tile_bytes // (32 * variant.num_warps))
            assert report.async_copies()[widest] > 0, report


def test_compile_check_reports_resources() -> None:
    report = compile_kernel(
        sgmv._sgmv_shrink_reduce_kernel,
        {"partial_ptr": torch.float32, "ranks_ptr": torch.int32, "seg_starts_ptr": torch.int32,
         "seg_slots_ptr": torch.int32, "out_ptr": torch.float32, "num_rows": 64, "max_rank": 64,
         "num_segs": 64, "stride_out_row": 64, "stride_out_col": 1, "BLOCK_M": 16,
         "BLOCK_R": 64, "SEG_BLOCK": 64, "num_splits": 4},
        arch=90,
    )
    assert 0 < report.registers <= 255
    assert report.spill_bytes == 0, report
    assert report.global_loads()  # the PTX is there to inspect
    assert ".target sm_90a" in report.ptx


def test_variants_that_compile_alike_are_equal() -> None:
    args = {"BLOCK_M": 16, "x_ptr": torch.bfloat16, "hidden": 4096}
    a = KernelVariant.of(sgmv._sgmv_shrink_kernel, args, arch=80)
    b = KernelVariant.of(sgmv._sgmv_shrink_kernel, {**args, "hidden": 11008}, arch=80)
    c = KernelVariant.of(sgmv._sgmv_shrink_kernel, {**args, "hidden": 4100}, arch=80)
    assert a == b and hash(a) == hash(b) and a != c
    assert a.label().startswith("_sgmv_shrink_kernel[sm_80,")


@pytest.mark.parametrize("op", ["shrink", "expand"])
def test_heuristics_never_choose_a_config_that_spills_before_the_fix(op: str) -> None:
    """The kernels' expand config of issue 16 (64 x 128 tile, 64-wide rank step) is no longer
    what prefill chooses: it spilled on sm_80 even with the alignment hints."""
    if op == "expand":
        config = heuristic(ShapeKey("expand", "prefill", 4096, 64, 4096, "bf16"), 132)
        assert config != ExpandConfig(block_m=64, block_n=128, block_r=64)
