"""Per-projection SGMV launchers: launch parameters decided once, at load time, not per call.

The engine builds one launcher per adapted projection shape with `make_launcher` and calls
`shrink` then `expand` on it for every layer:

    launcher = make_launcher(4096, 11008, max_rank=64, x_dtype=torch.bfloat16,
                             pool_dtype=torch.bfloat16, v_dtype=torch.float32, device=dev,
                             max_rows=2048, max_segments=64)
    launcher.shrink(x, pool, a_offsets, ranks, seg_starts, seg_slots, v)   # v [T, R_max]
    launcher.expand(v, pool, b_offsets, ranks, scales, seg_starts, seg_slots, out)

Semantics are those of loramux.kernels.ops.sgmv_shrink / sgmv_expand. Arguments are not checked
(the engine fills valid metadata; ops.py's entry points check); `debug=True` checks every call.
The one check always made compares host ints: T <= max_rows and N <= max_segments, which the
buffers sized at construction rely on.

`SgmvLauncher` (CUDA, Triton) reads the device's name and SM count once, fixes every launch
config at construction (one per regime and batch bucket, from the tuned table or the
heuristics, see sgmv_config.py), and allocates the float32 split-K partials once at their
largest size. A call picks its config from x.shape[0] and seg_slots.shape[0] with a dict
lookup and launches: no allocation, no host sync, so it can be captured in a CUDA graph.
`TorchSgmvLauncher` is the same interface over torch_ops.py for CPU tensors.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch
from loramux.kernels.checks import check_expand, check_shrink
from loramux.kernels.sgmv_config import (
    REGIMES,
    Config,
    ExpandConfig,
    Regime,
    ShapeKey,
    ShrinkConfig,
    TunedTable,
    batch_bucket,
    dtype_name,
    heuristic_buckets,
    rank_bucket,
    regime_of,
)
from loramux.kernels.torch_ops import sgmv_expand_torch, sgmv_shrink_torch


class Launcher(Protocol):
    """shrink and expand of one projection shape (see the module docstring)."""

    def shrink(self, x: torch.Tensor, pool: torch.Tensor, a_offsets: torch.Tensor,
               ranks: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """v[t, :ranks[k]] = x[t] @ A_k.T; x [T, in], v [T, R_max]. Returns v."""
        ...

    def expand(self, v: torch.Tensor, pool: torch.Tensor, b_offsets: torch.Tensor,
               ranks: torch.Tensor, scales: torch.Tensor, seg_starts: torch.Tensor,
               seg_slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[t] += scales[k] * v[t, :ranks[k]] @ B_k.T; out [T, out]. Returns out."""
        ...


def make_launcher(
    in_features: int,
    out_features: int,
    max_rank: int,
    x_dtype: torch.dtype,
    pool_dtype: torch.dtype,
    v_dtype: torch.dtype,
    device: torch.device,
    *,
    max_rows: int,
    max_segments: int,
    debug: bool = False,
) -> Launcher:
    """The launcher for `device`: Triton kernels on CUDA, torch_ops.py elsewhere.

    in/out_features: the projection's; max_rank: the widest v (LoRA rank) it serves; x_dtype:
    the activations' (and out's); pool_dtype: the adapter pool's; v_dtype: the shrink output's
    (float32 or pool_dtype); max_rows, max_segments: the largest T and N of any call.
    """
    if device.type == "cuda":
        return SgmvLauncher(in_features, out_features, max_rank, x_dtype, pool_dtype, v_dtype,
                            device, max_rows=max_rows, max_segments=max_segments, debug=debug)
    return TorchSgmvLauncher(in_features, out_features, max_rank, max_rows=max_rows,
                             max_segments=max_segments, debug=debug)


class _Limits:
    """The sizes a launcher was built for, and the per-call checks of them."""

    def __init__(self, in_features: int, out_features: int, max_rank: int, max_rows: int,
                 max_segments: int, debug: bool) -> None:
        if min(in_features, out_features, max_rank, max_rows, max_segments) < 1:
            raise ValueError("in_features, out_features, max_rank, max_rows and max_segments "
                             "must be positive")
        self.in_features, self.out_features = in_features, out_features
        self.max_rank, self.max_rows, self.max_segments = max_rank, max_rows, max_segments
        self.debug = debug

    def check_sizes(self, op: str, rows: int, segments: int) -> None:
        if rows > self.max_rows or segments > self.max_segments:
            raise ValueError(f"{op}: {rows} rows in {segments} segments exceed the launcher's "
                             f"{self.max_rows} rows / {self.max_segments} segments")

    def check_shapes(self, op: str, features: tuple[int, int], width: int) -> None:
        expected = (self.in_features, self.out_features)
        if op == "sgmv_shrink" and features[0] != expected[0] or (
            op == "sgmv_expand" and features[1] != expected[1]
        ):
            raise ValueError(f"{op}: built for {expected[0]} -> {expected[1]} features, got "
                             f"{features}")
        if width > self.max_rank:
            raise ValueError(f"{op}: v is {width} wide, past the launcher's max_rank "
                             f"{self.max_rank}")


class SgmvLauncher:
    """One projection's SGMV on CUDA (or under TRITON_INTERPRET=1), configs fixed at build."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        max_rank: int,
        x_dtype: torch.dtype,
        pool_dtype: torch.dtype,
        v_dtype: torch.dtype,
        device: torch.device,
        *,
        max_rows: int,
        max_segments: int,
        table: TunedTable | None = None,
        debug: bool = False,
    ) -> None:
        from loramux.kernels import sgmv  # triton is imported only for a Triton launcher

        self._sgmv = sgmv
        self.limits = _Limits(in_features, out_features, max_rank, max_rows, max_segments, debug)
        self.dtypes = (x_dtype, pool_dtype, v_dtype)
        name, num_sms = sgmv.device_info(device)  # read once
        table = sgmv.TUNED_TABLE if table is None else table
        ranks, dtype = rank_bucket(max_rank), dtype_name(pool_dtype)
        # (regime, batch bucket) -> config, for every bucket a call within the limits can hit.
        self.shrink_configs: dict[tuple[Regime, int], ShrinkConfig] = {}
        self.expand_configs: dict[tuple[Regime, int], ExpandConfig] = {}
        partial_elements = 0
        for regime in REGIMES:
            most = max_segments if regime == "decode" else max_rows
            for bucket in heuristic_buckets(regime, most):
                shrink = _of(ShrinkConfig, table.choose(
                    name, ShapeKey("shrink", regime, in_features, ranks, bucket, dtype), num_sms))
                expand = _of(ExpandConfig, table.choose(
                    name, ShapeKey("expand", regime, out_features, ranks, bucket, dtype), num_sms))
                self.shrink_configs[regime, bucket] = shrink
                self.expand_configs[regime, bucket] = expand
                if shrink.split_k > 1:  # rows such a call can have: decode has <= 4 per segment
                    rows = min(max_rows, 4 * bucket if regime == "decode" else bucket)
                    partial_elements = max(partial_elements, shrink.split_k * rows * max_rank)
        # float32 split-K partials [SPLIT_K, T, R_max], flat; allocated once at their largest.
        self._partial = torch.empty(max(partial_elements, 1), dtype=torch.float32,
                                    device=device)
        self._segments_block = sgmv.seg_block(max_segments)  # one SEG_BLOCK for every call
        self._shrink_modes = sgmv.dot_modes(x_dtype, pool_dtype)
        self._expand_modes = sgmv.dot_modes(v_dtype, pool_dtype)

    def configs_for(self, rows: int, segments: int) -> tuple[ShrinkConfig, ExpandConfig]:
        """The (shrink, expand) configs a call with T = rows, N = segments launches."""
        regime = regime_of(rows, segments)
        key = (regime, batch_bucket(regime, rows, segments))
        return self.shrink_configs[key], self.expand_configs[key]

    def shrink(self, x: torch.Tensor, pool: torch.Tensor, a_offsets: torch.Tensor,
               ranks: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """v[t, :ranks[k]] = x[t] @ A_k.T for every row t of a segment with slot k >= 0.

        x [T, in]; pool [P]; a_offsets int64 [S]; ranks int32 [S]; seg_starts int32 [N+1];
        seg_slots int32 [N]; v [T, R_max]. Returns v.
        """
        rows, segments = x.shape[0], seg_slots.shape[0]
        self.limits.check_sizes("sgmv_shrink", rows, segments)
        if self.limits.debug:
            check_shrink(x, pool, a_offsets, ranks, seg_starts, seg_slots, v)
            self.limits.check_shapes("sgmv_shrink", (x.shape[1], -1), v.shape[1])
            self._check_dtypes("sgmv_shrink", x=x.dtype, pool=pool.dtype, v=v.dtype)
        if rows == 0 or segments == 0:
            return v
        regime = regime_of(rows, segments)
        config = self.shrink_configs[regime, batch_bucket(regime, rows, segments)]
        self._sgmv.launch_shrink(x, pool, a_offsets, ranks, seg_starts, seg_slots, v,
                                 self._partial, config, self._segments_block,
                                 *self._shrink_modes)
        return v

    def expand(self, v: torch.Tensor, pool: torch.Tensor, b_offsets: torch.Tensor,
               ranks: torch.Tensor, scales: torch.Tensor, seg_starts: torch.Tensor,
               seg_slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[t] += scales[k] * v[t, :ranks[k]] @ B_k.T for every row t of a segment with slot
        k >= 0.

        v [T, R_max]; pool [P]; b_offsets int64 [S]; ranks int32 [S]; scales float32 [S];
        seg_starts int32 [N+1]; seg_slots int32 [N]; out [T, out]. Returns out.
        """
        rows, segments = v.shape[0], seg_slots.shape[0]
        self.limits.check_sizes("sgmv_expand", rows, segments)
        if self.limits.debug:
            check_expand(v, pool, b_offsets, ranks, scales, seg_starts, seg_slots, out)
            self.limits.check_shapes("sgmv_expand", (-1, out.shape[1]), v.shape[1])
            self._check_dtypes("sgmv_expand", v=v.dtype, pool=pool.dtype)
        if rows == 0 or segments == 0:
            return out
        regime = regime_of(rows, segments)
        config = self.expand_configs[regime, batch_bucket(regime, rows, segments)]
        self._sgmv.launch_expand(v, pool, b_offsets, ranks, scales, seg_starts, seg_slots, out,
                                 config, self._segments_block, *self._expand_modes)
        return out

    def _check_dtypes(self, op: str, **got: torch.dtype) -> None:
        # The dot modes (upcast, precision) were fixed for these dtypes at construction.
        x_dtype, pool_dtype, v_dtype = self.dtypes
        built = {"x": x_dtype, "pool": pool_dtype, "v": v_dtype}
        wrong = {name: dtype for name, dtype in got.items() if dtype != built[name]}
        if wrong:
            raise ValueError(f"{op}: the launcher was built for {built}, got {wrong}")


class TorchSgmvLauncher:
    """The same interface over torch_ops.py (CPU tensors; any device works)."""

    def __init__(self, in_features: int, out_features: int, max_rank: int, *, max_rows: int,
                 max_segments: int, debug: bool = False) -> None:
        self.limits = _Limits(in_features, out_features, max_rank, max_rows, max_segments, debug)

    def shrink(self, x: torch.Tensor, pool: torch.Tensor, a_offsets: torch.Tensor,
               ranks: torch.Tensor, seg_starts: torch.Tensor, seg_slots: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """See SgmvLauncher.shrink."""
        self.limits.check_sizes("sgmv_shrink", x.shape[0], seg_slots.shape[0])
        if self.limits.debug:
            check_shrink(x, pool, a_offsets, ranks, seg_starts, seg_slots, v)
            self.limits.check_shapes("sgmv_shrink", (x.shape[1], -1), v.shape[1])
        return sgmv_shrink_torch(x, pool, a_offsets, ranks, seg_starts, seg_slots, v)

    def expand(self, v: torch.Tensor, pool: torch.Tensor, b_offsets: torch.Tensor,
               ranks: torch.Tensor, scales: torch.Tensor, seg_starts: torch.Tensor,
               seg_slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """See SgmvLauncher.expand."""
        self.limits.check_sizes("sgmv_expand", v.shape[0], seg_slots.shape[0])
        if self.limits.debug:
            check_expand(v, pool, b_offsets, ranks, scales, seg_starts, seg_slots, out)
            self.limits.check_shapes("sgmv_expand", (-1, out.shape[1]), v.shape[1])
        return sgmv_expand_torch(v, pool, b_offsets, ranks, scales, seg_starts, seg_slots, out)


_C = TypeVar("_C", ShrinkConfig, ExpandConfig)


def _of(kind: type[_C], config: Config) -> _C:
    if not isinstance(config, kind):
        raise TypeError(f"expected a {kind.__name__}, got {config!r}")
    return config
