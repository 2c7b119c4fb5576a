"""loadtest/tune_sgmv.py in its CPU dry mode (Triton interpreter, tiny shapes): what it
enumerates, what it writes and merges, and that wrong candidates never win.

Times under the interpreter mean nothing, so tests that need a winner pass a fake `measure`
that ranks configs by num_warps (8 beats the heuristics' 4); no test asserts a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from loramux.kernels import sgmv
from loramux.kernels.launch import SgmvLauncher
from loramux.kernels.sgmv_config import (
    Config,
    ExpandConfig,
    ShapeKey,
    ShrinkConfig,
    TunedTable,
    heuristic,
)
from loramux.loadtest import tune_sgmv
from loramux.loadtest.tune_sgmv import Target

LIMITS = ["--max-rows", "16", "--max-segments", "8"]
OTHER_GPU = "NVIDIA H100 80GB HBM3"


def warps_win(config: Config, run: object) -> float:
    """A fake timer: more warps is faster (run once, so the launch still happens)."""
    run()  # type: ignore[operator]
    return 1.0 / config.num_warps


def dry_run(path: Path, *extra: str, measure: tune_sgmv.Measure | None = None
            ) -> list[tune_sgmv.Outcome]:
    """One round, every neighbour: the num_warps=8 one is among them."""
    return tune_sgmv.main(["--out", str(path), "--shape", "tiny", "--ranks", "16", *LIMITS,
                           "--rounds", "1", "--no-spill-check", *extra], measure=measure)


def test_targets_are_the_keys_a_launcher_enumerates() -> None:
    found = tune_sgmv.targets(["tiny"], [8, 16], "bf16", 16, 8)
    keys = {t.key for t in found}
    assert len(keys) == len(found) and all(t.max_rank == 16 for t in found)
    ins, outs = tune_sgmv.projection_features("tiny")
    assert (ins, outs) == ([64, 128], [32, 64, 128])
    launcher = SgmvLauncher(128, 32, 16, torch.bfloat16, torch.bfloat16, torch.float32,
                            torch.device("cpu"), max_rows=16, max_segments=8)
    for regime, bucket in launcher.shrink_configs:
        want = {ShapeKey("shrink", regime, 128, 16, bucket, "bf16"),
                ShapeKey("expand", regime, 32, 16, bucket, "bf16")}
        # Prefill buckets below 8 hold no call (rows > 4 * segments): not tuned.
        assert want <= keys or (regime == "prefill" and bucket < 8 and not want & keys)


def test_neighbours_move_one_parameter() -> None:
    for key in (t.key for t in tune_sgmv.targets(["tiny"], [64], "bf16", 64, 8)):
        base = heuristic(key, 1)
        for config in tune_sgmv.neighbours(key, base):
            changed = [f for f in vars(base) if getattr(base, f) != getattr(config, f)]
            assert len(changed) == 1 and tune_sgmv.sensible(key, config), (key, config)


def test_dry_run_writes_a_table_the_launcher_uses(tmp_path: Path) -> None:
    path = tmp_path / "tuned.json"
    other = ShapeKey("shrink", "decode", 4096, 16, 64, "bf16")
    untuned = ShapeKey("expand", "prefill", 128, 16, 16, "bf16")  # past --limit-keys
    path.write_text(TunedTable()
                    .with_entries(OTHER_GPU, {other: ShrinkConfig(split_k=4)})
                    .with_entries("cpu", {untuned: ExpandConfig(num_warps=2)}).to_json())

    outcomes = dry_run(path, "--limit-keys", "4", measure=warps_win)
    table = TunedTable.load(path)
    assert table.lookup(OTHER_GPU, other) == ShrinkConfig(split_k=4)  # other device kept
    assert table.lookup("cpu", untuned) == ExpandConfig(num_warps=2)  # other key kept
    valid = {t.key for t in tune_sgmv.targets(["tiny"], [16], "bf16", 16, 8)}
    tuned = {ShapeKey.parse(k): c for k, c in table.devices["cpu"].items()
             if ShapeKey.parse(k) != untuned}
    assert len(outcomes) == 4 and set(tuned) == {o.key for o in outcomes} <= valid
    for key, config in tuned.items():
        assert config.num_warps == 8 and config != heuristic(key, 1)
        launcher = SgmvLauncher(key.features, key.features, 16, torch.bfloat16,
                                torch.bfloat16, torch.float32, torch.device("cpu"),
                                max_rows=16, max_segments=8, table=table)
        rows, segments = (key.bucket, key.bucket) if key.regime == "decode" else (key.bucket, 1)
        shrink, expand = launcher.configs_for(rows, segments)
        assert (shrink if key.op == "shrink" else expand) == config

    # Timed again with nothing faster than the heuristic: the stale entries go.
    dry_run(path, "--limit-keys", "4", measure=lambda config, run: 1.0)
    table = TunedTable.load(path)
    assert dict(table.devices["cpu"]) == {str(untuned): ExpandConfig(num_warps=2)}
    assert table.lookup(OTHER_GPU, other) == ShrinkConfig(split_k=4)


def test_dry_run_with_wall_clock_times(tmp_path: Path) -> None:
    path = tmp_path / "tuned.json"
    outcomes = dry_run(path, "--limit-keys", "2", "--candidates", "2")
    table = TunedTable.load(path)
    assert {o.key for o in outcomes} >= {ShapeKey.parse(k) for k in table.devices["cpu"]}
    assert all(not o.rejected for o in outcomes)


@pytest.mark.parametrize("op", ["shrink", "expand"])
def test_a_wrong_candidate_is_rejected(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    """Configs with 8 warps compute garbage here; the fake timer says they are fastest."""
    name = f"launch_{op}"
    real = getattr(sgmv, name)

    def corrupting(*args: object) -> None:
        real(*args)
        config = next(a for a in args if isinstance(a, (ShrinkConfig, ExpandConfig)))
        out = args[6] if op == "shrink" else args[7]
        if config.num_warps == 8:
            out.mul_(1.1)  # type: ignore[attr-defined]

    monkeypatch.setattr(sgmv, name, corrupting)
    features = 128 if op == "shrink" else 64
    target = Target(ShapeKey(op, "decode", features, 16, 8, "bf16"), 16)  # type: ignore[arg-type]
    batch = tune_sgmv.make_batch(target, torch.device("cpu"), 16, 8,
                                 torch.Generator().manual_seed(1))
    outcome = tune_sgmv.tune(target, batch, warps_win, num_sms=1, tolerance=1e-2,
                             current=None, spill_check=None, candidates=8, rounds=1,
                             segments_block=sgmv.seg_block(8))
    wrong = [c for c in tune_sgmv.neighbours(target.key, outcome.heuristic)
             if c.num_warps == 8]
    assert wrong and all("relative error" in outcome.rejected[str(c)] for c in wrong)
    assert outcome.best.num_warps != 8
