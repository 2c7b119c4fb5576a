"""SGMV launch parameters: the config dataclasses, the heuristics, and the tuned table per GPU.

A launch is chosen for a *shape key*: (op, regime, features, rank bucket, batch bucket, dtype),
where features is H for shrink and O for expand, the rank bucket is the power of two (at least
16) at or above the projection's max rank, the batch bucket is the power of two at or above
the segment count (decode) or the row count (prefill), and dtype is the pool's (the model's;
the engine's shrink output is float32 whatever it is). The tuned table, written offline by
loadtest/tune_sgmv.py from timings on one GPU model, maps keys to configs under that GPU's
name; any key it lacks falls back to the heuristics here. Nothing here imports triton, so
tables can be read and written on any machine.

Table file (JSON), e.g. kernels/tuned_configs.json:

    {"version": 2,
     "devices": {"NVIDIA H100 80GB HBM3": {
         "shrink/decode/f4096/r16/b64/bf16": {"block_m": 16, "block_r": 16,
                                              "block_k": 128, "split_k": 8,
                                              "num_warps": 4, "num_stages": 3}}}}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeAlias

Regime = Literal["decode", "prefill"]
Op = Literal["shrink", "expand"]
REGIMES: tuple[Regime, ...] = ("decode", "prefill")
TABLE_VERSION = 2  # 2: keys name the pool dtype
PACKAGED_TABLE = Path(__file__).with_name("tuned_configs.json")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block(name: str, value: int, minimum: int) -> None:
    if value < minimum or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value}")


@dataclass(frozen=True)
class ShrinkConfig:
    """Launch parameters of the shrink kernel (block sizes are powers of two, >= 16 for tl.dot)."""

    block_m: int = 16  # rows per tile
    block_r: int = 16  # rank columns per program
    block_k: int = 128  # hidden elements per loop step
    split_k: int = 1  # programs sharing one tile's hidden dimension (> 1: partial sums)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _check_block("block_m", self.block_m, 16)
        _check_block("block_r", self.block_r, 16)
        _check_block("block_k", self.block_k, 16)
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        _check_launch(self.num_warps, self.num_stages)


@dataclass(frozen=True)
class ExpandConfig:
    """Launch parameters of the expand kernel (block sizes are powers of two, >= 16 for tl.dot)."""

    block_m: int = 16  # rows per tile
    block_n: int = 128  # output columns per program
    block_r: int = 16  # rank elements per loop step
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        _check_block("block_m", self.block_m, 16)
        _check_block("block_n", self.block_n, 16)
        _check_block("block_r", self.block_r, 16)
        _check_launch(self.num_warps, self.num_stages)


def _check_launch(num_warps: int, num_stages: int) -> None:
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {num_warps}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")


Config: TypeAlias = ShrinkConfig | ExpandConfig
_CONFIG_TYPES: dict[str, type[ShrinkConfig] | type[ExpandConfig]] = {
    "shrink": ShrinkConfig, "expand": ExpandConfig}


def regime_of(rows: int, segments: int) -> Regime:
    """decode when segments average at most 4 rows (one tile each, weight traffic dominates)."""
    return "decode" if rows <= 4 * max(segments, 1) else "prefill"


def rank_bucket(max_rank: int) -> int:
    """The power of two at or above max_rank, at least 16 (tl.dot's smallest block)."""
    return max(16, next_power_of_2(max_rank))


def batch_bucket(regime: Regime, rows: int, segments: int) -> int:
    """The power of two at or above what sizes the grid: segments (decode) or rows (prefill)."""
    return next_power_of_2(max(segments if regime == "decode" else rows, 1))


DType = Literal["bf16", "fp16", "fp32"]
DTYPES: tuple[DType, ...] = ("bf16", "fp16", "fp32")


def dtype_name(dtype: object) -> DType:
    """The key's name of a torch dtype (str(torch.bfloat16) is "torch.bfloat16")."""
    names: dict[str, DType] = {"torch.bfloat16": "bf16", "torch.float16": "fp16",
                               "torch.float32": "fp32"}
    if str(dtype) not in names:
        raise ValueError(f"no SGMV launch configs for {dtype}: bfloat16, float16 or float32")
    return names[str(dtype)]


@dataclass(frozen=True)
class ShapeKey:
    """What a launch is chosen for (see the module docstring)."""

    op: Op
    regime: Regime
    features: int  # H for shrink, O for expand
    rank: int  # rank_bucket(max rank)
    bucket: int  # batch_bucket(regime, rows, segments)
    dtype: DType  # the pool's (the model's): float32 tiles are twice as wide in registers

    @property
    def rank_block(self) -> int:
        """One rank block covers ranks up to 64, the common case."""
        return min(64, self.rank)

    def __str__(self) -> str:
        return (f"{self.op}/{self.regime}/f{self.features}/r{self.rank}/b{self.bucket}/"
                f"{self.dtype}")

    @classmethod
    def parse(cls, text: str) -> ShapeKey:
        parts = text.split("/")
        if len(parts) != 6:
            raise ValueError(f"not a shape key: {text!r}")
        op, regime, f, r, b, dtype = parts
        if op not in _CONFIG_TYPES or regime not in REGIMES or dtype not in DTYPES or not (
            f[0] == "f" and r[0] == "r" and b[0] == "b"
        ):
            raise ValueError(f"not a shape key: {text!r}")
        return cls(op, regime, int(f[1:]), int(r[1:]), int(b[1:]), dtype)  # type: ignore[arg-type]


def shrink_heuristic(key: ShapeKey, num_sms: int) -> ShrinkConfig:
    """Default shrink launch: split the hidden dimension until about 2 programs per SM.

    Sized for the largest batch of the bucket; every config it returns compiles without
    register spills for sm_80 and sm_90 (tests/test_kernel_compile.py).
    """
    decode = key.regime == "decode"
    block_m = 16 if decode else 64
    # A float32 [64, 128] x tile with a [128, 64] A tile needs more than 255 registers.
    block_k = 64 if key.dtype == "fp32" and not decode else 128
    tiles = key.bucket if decode else cdiv(key.bucket, block_m)
    programs = tiles * cdiv(key.rank, key.rank_block)
    # Prefill reads x once per rank block; float32 partials would add 8 * SPLIT_K * R bytes
    # per row against 2 * H bytes of x, so prefill splits less than decode.
    max_split = min(cdiv(key.features, block_k), 16 if decode else 4)
    split_k = 1
    while split_k * 2 <= max_split and programs * split_k < 2 * num_sms:
        split_k *= 2
    return ShrinkConfig(block_m=block_m, block_r=key.rank_block, block_k=block_k,
                        split_k=split_k)


def expand_heuristic(key: ShapeKey, num_sms: int) -> ExpandConfig:
    """Default expand launch: narrow output blocks until about 2 programs per SM.

    Sized so that nothing spills for sm_80 and sm_90 (tests/test_kernel_compile.py): prefill
    keeps rank steps of at most 32 and 64 output columns (a [64, 128] tile with a 64-wide rank
    step spills on sm_80), float32 pools take rank steps of at most 32 (decode) and 16
    (prefill), and a 16-bit pool's rank loop of one step is not pipelined three deep
    (nothing to overlap; a third stage made a bf16 [64, 64] prefill tile spill on sm_80).
    Float32 keeps three: at two, ptxas spilled 4-24 B of its one-step tiles.
    """
    fp32 = key.dtype == "fp32"
    if key.regime == "decode":
        block_m, block_n = 16, 128
        block_r = min(key.rank_block, 32) if fp32 else key.rank_block
        while block_n > 32 and key.bucket * cdiv(key.features, block_n) < 2 * num_sms:
            block_n //= 2
    else:
        block_m, block_n, block_r = 64, 64, 16 if fp32 else min(key.rank_block, 32)
    num_stages = 2 if key.rank <= block_r and not fp32 else 3
    return ExpandConfig(block_m=block_m, block_n=block_n, block_r=block_r,
                        num_stages=num_stages)


def heuristic(key: ShapeKey, num_sms: int) -> Config:
    return (shrink_heuristic if key.op == "shrink" else expand_heuristic)(key, num_sms)


def heuristic_buckets(regime: Regime, max_batch: int) -> list[int]:
    """Every bucket a launcher may see up to max_batch (segments or rows): 1, 2, 4, ..."""
    buckets, b = [], 1
    while b < 2 * max(max_batch, 1):
        buckets.append(b)
        b *= 2
    return buckets


@dataclass(frozen=True)
class TunedTable:
    """Tuned configs by device name, then shape key; immutable once loaded."""

    devices: Mapping[str, Mapping[str, Config]] = field(
        default_factory=lambda: MappingProxyType({}))

    def lookup(self, device: str, key: ShapeKey) -> Config | None:
        config = self.devices.get(device, {}).get(str(key))
        return config if isinstance(config, _CONFIG_TYPES[key.op]) else None

    def choose(self, device: str, key: ShapeKey, num_sms: int) -> Config:
        """The tuned config for key on device, else the heuristic's."""
        return self.lookup(device, key) or heuristic(key, num_sms)

    def with_entries(self, device: str, entries: Mapping[ShapeKey, Config]) -> TunedTable:
        """A copy with `entries` added for `device` (replacing equal keys)."""
        merged = {name: dict(table) for name, table in self.devices.items()}
        merged.setdefault(device, {}).update({str(k): c for k, c in entries.items()})
        return TunedTable(_frozen(merged))

    def to_json(self) -> str:
        devices = {name: {key: asdict(config) for key, config in sorted(table.items())}
                   for name, table in sorted(self.devices.items())}
        return json.dumps({"version": TABLE_VERSION, "devices": devices}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TunedTable:
        """Parse a table; a wrong version, unknown key, field or invalid config raises."""
        data = json.loads(text)
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"tuned table version {data.get('version')!r}, "
                             f"expected {TABLE_VERSION}")
        devices: dict[str, dict[str, Config]] = {}
        for name, table in data["devices"].items():
            devices[name] = {}
            for text_key, values in table.items():
                key = ShapeKey.parse(text_key)
                kind = _CONFIG_TYPES[key.op]
                unknown = set(values) - {f.name for f in fields(kind)}
                if unknown:
                    raise ValueError(f"{name} {text_key}: unknown fields {sorted(unknown)}")
                devices[name][str(key)] = kind(**values)
        return cls(_frozen(devices))

    @classmethod
    def load(cls, path: Path = PACKAGED_TABLE) -> TunedTable:
        """The table in `path`; an empty table when the file does not exist."""
        return cls.from_json(path.read_text()) if path.exists() else cls()


def _frozen(devices: Mapping[str, Mapping[str, Config]]) -> Mapping[str, Mapping[str, Config]]:
    return MappingProxyType({name: MappingProxyType(dict(t)) for name, t in devices.items()})
