"""Every attention kernel variant the engine can launch compiles for sm_80 and sm_90 unspilled.

No GPU needed: kernels/compile_check.py lowers each variant to PTX and reads ptxas's resource
usage. The variants are what engine/triton_attention.py launches with its heuristic configs:
head dims 64 and 128, GQA groups 1, 4 and 8, bfloat16/float16/float32, the unsplit kernel at
every config `attention_heuristic` returns, and the split and reduce kernels at the decode
config (their split count is a runtime argument: one compiled kernel serves every count). Run with -s to see the registers of each.
"""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

from loramux.engine.triton_attention import (
    MAX_SPLITS,
    REDUCE_WARPS,
    AttentionConfig,
    _paged_attention_kernel,
    _paged_attention_split_kernel,
    _precision,
    _split_reduce_kernel,
    attention_heuristic,
)
from loramux.kernels.compile_check import ARCHES, CompileReport, KernelVariant, compile_variants

HEAD_DIMS = (64, 128)
GROUPS = (1, 4, 8)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NUM_KV = 8  # strides of a Llama-like layer; they only decide divisibility specialisations
BLOCK_SIZE = 16  # the engine's KV cache block
MAX_BLOCKS = 512  # block table width


def _heuristic_configs(group: int, head_dim: int, dtype: torch.dtype) -> list[AttentionConfig]:
    """Every distinct config the heuristic returns, over all query lengths (it saturates by 64)."""
    configs = {attention_heuristic(n, group, head_dim, dtype) for n in range(1, 130)}
    return sorted(configs, key=lambda c: (c.block_m, c.block_n))


def _common_args(group: int, head_dim: int, dtype: torch.dtype) -> dict[str, object]:
    """Pointers, strides and sizes of a realistic launch: q a view of a fused qkv projection,
    contiguous caches [NB, bs, nKV, D], int32 block tables [B, MAX_BLOCKS]."""
    num_heads = group * NUM_KV
    cache = (BLOCK_SIZE * NUM_KV * head_dim, NUM_KV * head_dim, head_dim, 1)
    return {
        "q_ptr": dtype, "k_cache_ptr": dtype, "v_cache_ptr": dtype,
        "context_lens_ptr": torch.int32, "block_tables_ptr": torch.int32,
        "block_size": BLOCK_SIZE, "qk_scale": head_dim**-0.5 * math.log2(math.e),
        "stride_q_t": (num_heads + 2 * NUM_KV) * head_dim, "stride_q_h": head_dim,
        "stride_q_d": 1,
        **{f"stride_k_{n}": s for n, s in zip(("blk", "off", "h", "d"), cache)},
        **{f"stride_v_{n}": s for n, s in zip(("blk", "off", "h", "d"), cache)},
        "stride_bt_seq": MAX_BLOCKS, "stride_bt_blk": 1,
        "GROUP": group, "HEAD_DIM": head_dim, "UPCAST": False,
        "PRECISION": _precision(dtype),
    }  # fmt: skip


def _variants() -> list[KernelVariant]:
    variants = []
    for arch in ARCHES:
        for head_dim in HEAD_DIMS:
            for dtype in DTYPES:
                for group in GROUPS:
                    args = _common_args(group, head_dim, dtype)
                    for c in _heuristic_configs(group, head_dim, dtype):
                        tiles = {
                            **args, "out_ptr": dtype, "query_start_loc_ptr": torch.int32,
                            "num_seqs": 37, "stride_o_t": group * NUM_KV * head_dim,
                            "stride_o_h": head_dim, "stride_o_d": 1, "BLOCK_M": c.block_m,
                            "BLOCK_Q": c.block_m // group, "BLOCK_N": c.block_n,
                        }  # fmt: skip
                        variants.append(KernelVariant.of(
                            _paged_attention_kernel, tiles, arch=arch,
                            num_warps=c.num_warps, num_stages=c.num_stages))
                    d = attention_heuristic(1, group, head_dim, dtype)  # the decode config
                    split = {
                        **args, "part_max_ptr": torch.float32, "part_sum_ptr": torch.float32,
                        "part_acc_ptr": torch.float32, "num_heads": group * NUM_KV,
                        "num_splits": 16, "BLOCK_M": d.block_m, "BLOCK_N": d.block_n,
                    }  # fmt: skip
                    variants.append(KernelVariant.of(
                        _paged_attention_split_kernel, split, arch=arch,
                        num_warps=d.num_warps, num_stages=d.num_stages))
                reduce = {  # sees neither the group nor block_m
                    "part_max_ptr": torch.float32, "part_sum_ptr": torch.float32,
                    "part_acc_ptr": torch.float32, "out_ptr": dtype,
                    "context_lens_ptr": torch.int32, "num_heads": 32, "num_splits": 16,
                    "stride_o_t": 32 * head_dim, "stride_o_h": head_dim, "stride_o_d": 1,
                    "HEAD_DIM": head_dim, "BLOCK_S": MAX_SPLITS,
                    "BLOCK_N": attention_heuristic(1, 1, head_dim, dtype).block_n,
                }  # fmt: skip
                variants.append(KernelVariant.of(_split_reduce_kernel, reduce, arch=arch,
                                                 num_warps=REDUCE_WARPS))
    return variants


@functools.cache
def _reports() -> tuple[CompileReport, ...]:
    variants = _variants()
    reports = tuple(compile_variants(variants))
    for v, r in zip(variants, reports):
        print(dict(v.args)["out_ptr" if "out_ptr" in dict(v.args) else "q_ptr"], r)
    return reports


def test_variants_cover_the_engine() -> None:
    assert len(set(_variants())) == len(_variants())  # no variant compiled twice
    kernels = {v.kernel for v in _variants()}
    assert kernels == {"_paged_attention_kernel", "_paged_attention_split_kernel",
                       "_split_reduce_kernel"}


@pytest.mark.timeout(300)
def test_every_variant_compiles_without_spills() -> None:
    reports = _reports()
    spilled = [str(r) for r in reports if r.spill_bytes]
    assert not spilled, "\n".join(spilled)
    assert all(r.registers <= 255 for r in reports)
