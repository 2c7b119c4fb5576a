"""Where the CPU LoRA path should draw the line between its stacks and the kernels.

StackedLora (engine/lora_cpu.py) multiplies a bucket's adapters with k rows per position, k its
longest group, so a group of n rows costs k - n padded rows there; a group sent to the kernels
costs a few torch calls per projection instead. This measures both on SmolLM2-135M's q and
gate shapes (576 -> 576, 576 -> 1536) at rank 16, one layer, random weights:

  saved per group    G prefills of 12 rows each: kernels vs stacks (no padding), per group
  per padded row     15 one-row groups plus one of n rows, all stacked, as n grows

PAD_ROWS_PER_GROUP should sit below saved-per-group / per-padded-row.

Run:  .venv/bin/python -m loramux.loadtest.benchmark_stacking
"""

from __future__ import annotations

import time

import torch

from loramux.adapters.types import MODULES, AdapterRef, BaseSpec, LoraTables
from loramux.engine import lora_cpu
from loramux.engine.lora import LoraMeta, SlotGroup

SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192),
          "o_proj": (576, 576), "gate_proj": (576, 1536), "up_proj": (576, 1536),
          "down_proj": (1536, 576)}
RANK = 16


def _tables(spec: BaseSpec, slots: int) -> LoraTables:
    shape = (1, len(MODULES), slots)
    a_off = torch.zeros(shape, dtype=torch.int64)
    b_off = torch.zeros(shape, dtype=torch.int64)
    cursor = 0
    for m, name in enumerate(MODULES):
        in_f, out_f = spec.shapes[name]
        for s in range(slots):
            a_off[0, m, s], b_off[0, m, s] = cursor, cursor + RANK * in_f
            cursor += RANK * (in_f + out_f)
    return LoraTables(pool=torch.randn(cursor) * 0.01, a_offsets=a_off, b_offsets=b_off,
                      ranks=torch.full(shape, RANK, dtype=torch.int32),
                      scales=torch.ones(shape), max_rank=RANK)


def per_projection_us(tables: LoraTables, spec: BaseSpec, lengths: list[int],
                      pad_rows: int, iters: int = 200) -> float:
    """Microseconds per projection (q and gate alternating) for groups of `lengths` rows in
    slots 0.., with pad_rows_per_group = pad_rows (-1: every group of more than 4 rows to the
    kernels)."""
    lora = lora_cpu.StackedLora(tables, spec, max_rows=4096, max_segments=64,
                                  pad_rows_per_group=pad_rows)
    meta = LoraMeta(64, 4096, RANK, torch.device("cpu"))
    lora.prepare([SlotGroup(s, AdapterRef(f"a{s}", 1, "-"), n)
                  for s, n in enumerate(lengths)], meta, None)
    rows = sum(lengths)
    x = torch.randn(rows, 576)
    out = torch.zeros(rows, 1536)

    def once() -> None:
        for m in (MODULES.index("q_proj"), MODULES.index("gate_proj")):
            lora.apply(x, out[:, :spec.shapes[MODULES[m]][1]], meta, 0, m)

    for _ in range(20):
        once()
    start = time.perf_counter()
    for _ in range(iters):
        once()
    return (time.perf_counter() - start) / iters / 2 * 1e6


def main() -> None:
    spec = BaseSpec(num_layers=1, shapes=SHAPES)
    tables = _tables(spec, 40)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    saved = []
    for groups in (8, 16):
        kernels = per_projection_us(tables, spec, [12] * groups, -1)
        stacked = per_projection_us(tables, spec, [12] * groups, 10**6)
        saved.append((kernels - stacked) / groups)
        print(f"{groups} groups of 12 rows: kernels {kernels:.0f} us, stacks {stacked:.0f} us "
              f"per projection: {saved[-1]:.1f} us saved per group")
    points = []
    for n in (8, 32, 64):
        lengths = [1] * 15 + [n]
        points.append((16 * n - sum(lengths), per_projection_us(tables, spec, lengths, 10**6)))
        print(f"15 x 1 row + {n} rows, stacked: {points[-1][1]:.0f} us "
              f"({points[-1][0]} padded rows)")
    per_row = (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
    print(f"per padded row {per_row:.2f} us; break-even {min(saved) / per_row:.0f} padded rows "
          f"per group (PAD_ROWS_PER_GROUP = {lora_cpu.PAD_ROWS_PER_GROUP})")


if __name__ == "__main__":
    main()
