"""The HTTP benchmark driver (loadtest/benchmarks.py) end to end in its quick mode, on a tiny
random Llama: two real `loramux serve` subprocesses, PEFT in process, files and figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from loramux.loadtest.benchmarks import QUICK, SCHEMA, best_of, cached_adapters, main, ratios
from loramux.loadtest.report import LoadedResult, load_result
from server_model import make_model_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    base = tmp_path_factory.mktemp("benchmarks")
    model_dir, _, _ = make_model_dir(base / "tiny-bench", max_positions=1024)
    out = base / "out"
    assert main(["--out", str(out), "--quick", "--model-dir", str(model_dir), "--device", "cpu",
                 "--no-progress"]) == 0
    return out, json.loads((out / "benchmarks.json").read_text())


def _consistent(summary: dict[str, Any], requests: int = QUICK.requests) -> None:
    assert summary["sent"] == summary["ok"] + summary["errors"] == requests
    assert summary["errors"] == 0 and summary["errors_by_status"] == {}
    assert summary["output_tokens"] == requests * QUICK.output_len
    assert summary["output_tokens_per_s"] == pytest.approx(
        summary["output_tokens"] / summary["duration_s"])
    assert summary["tpot_s"]["count"] == requests
    assert summary["cpu_s"] > 0  # the server's (or PEFT's) CPU time over the run
    assert summary["output_tokens_per_cpu_s"] == pytest.approx(
        summary["output_tokens"] / summary["cpu_s"])


def test_quick_run_writes_consistent_json_tables_and_plots(
        quick: tuple[Path, dict[str, Any]]) -> None:
    out, doc = quick
    assert doc["schema"] == SCHEMA and doc["plan"]["requests"] == QUICK.requests
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["torch"]
    assert "$ADMIN_TOKEN" in doc["servers"]["resident"]  # the token itself is never written
    assert doc["servers"]["fewer_slots"][doc["servers"]["fewer_slots"].index(
        "--max-gpu-adapters") + 1] == str(QUICK.slots)
    sc = doc["scenarios"]

    for popularity, pair in sc["vs_peft"].items():
        _consistent(pair["loramux"])
        _consistent(pair["peft"])
        for key in ("output_tokens_per_s", "output_tokens_per_cpu_s"):
            assert pair["loramux_over_peft"][key] == pytest.approx(
                pair["loramux"][key] / pair["peft"][key])
        served = load_result(out / f"vs-peft-{popularity}" / "results.json")
        peft = load_result(out / f"vs-peft-{popularity}" / "peft" / "results.json")
        assert [s.model for s in served.samples] == [s.model for s in peft.samples]
        assert {s.model for s in served.samples} <= {f"lt-{i:03d}" for i in
                                                     range(QUICK.adapters)}

    _consistent(sc["overhead"]["base"])
    _consistent(sc["overhead"]["lora"])
    base = load_result(out / "overhead-base" / "results.json")
    assert {s.model for s in base.samples} == {"tiny-bench"}  # the base model, no adapter

    points = sc["scaling"]["points"]
    assert [p["adapters"] for p in points] == list(QUICK.scaling)
    assert points[0]["over_one_adapter"] == {"output_tokens_per_s": 1.0,
                                             "output_tokens_per_cpu_s": 1.0}
    for p in points:  # as many clients and requests as the widest point has adapters
        _consistent(p["summary"], requests=max(QUICK.scaling))
        run = load_result(out / "scaling" / f"adapters-{p['adapters']}" / "results.json")
        assert len({s.model for s in run.samples}) == p["adapters"]  # round-robin: all used

    slots = sc["slots"]
    _consistent(slots["resident"])
    _consistent(slots["overcommitted"])
    assert slots["resident_page_ins"] == 0  # a slot per adapter: nothing to page in
    assert slots["page_ins"] >= 1 and slots["evictions"] >= 1  # fewer slots than adapters

    for name in doc["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    text = (out / "tables.md").read_text()
    assert text.count("| run | ok/sent |") == 4
    assert f"| {QUICK.slots} slots | {QUICK.requests}/{QUICK.requests} |" in text


def test_adapters_are_made_once(quick: tuple[Path, dict[str, Any]]) -> None:
    out, doc = quick
    root = out / "adapters"
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/adapter_model.safetensors")}
    assert len(before) == QUICK.made
    again = cached_adapters(doc["model_dir"], root, QUICK)
    assert list(again) == [f"lt-{i:03d}" for i in range(QUICK.made)]
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/adapter_model.safetensors")} == before


def test_best_round_and_ratios() -> None:
    runs = [LoadedResult(Path(f"r{i}"), "x", {"output_tokens_per_s": tps,
                                              "output_tokens_per_cpu_s": cpu}, [])
            for i, (tps, cpu) in enumerate(((40.0, 30.0), (50.0, 25.0), (45.0, 35.0)))]
    best = best_of(runs)
    assert best is runs[1]  # the fastest round; its figures are not mixed with others'
    assert [r["output_tokens_per_s"] for r in best.summary["rounds"]] == [40.0, 50.0, 45.0]
    assert [r["path"] for r in best.summary["rounds"]] == ["r0", "r1", "r2"]
    assert ratios(best.summary, runs[0].summary) == {"output_tokens_per_s": 1.25,
                                                     "output_tokens_per_cpu_s": 25.0 / 30.0}


def test_engine_benchmark_counts_the_bytes_a_step_reads(tmp_path: Path) -> None:
    """benchmark_engine's ceiling rests on adapter_bytes: every A [r, in] and B [out, r] of
    every adapted projection, at 4 bytes (float32), for each adapter."""
    from adapter_factory import make_adapter, tiny_llama_config
    from loramux.adapters.types import MODULES
    from loramux.loadtest.benchmark_engine import adapter_bytes, stream_rate

    config = tiny_llama_config()
    paths = {f"a{r}": make_adapter(tmp_path / f"r{r}", config, rank=r) for r in (4, 8)}
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    shapes = {"q_proj": (h, config.num_attention_heads * config.head_dim), "k_proj": (h, kv),
              "v_proj": (h, kv), "o_proj": (config.num_attention_heads * config.head_dim, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_rank = config.num_hidden_layers * sum(i + o for i, o in (shapes[m] for m in MODULES))
    assert adapter_bytes(paths, 4) == 4 * (4 + 8) * per_rank
    assert stream_rate(1 << 20, reps=3) > 0


def test_residency_quick_run_starts_servers_on_default_flags_and_pages_the_small_pool(
        tmp_path: Path) -> None:
    """`--residency --quick`: three servers (the defaults, the defaults with a cap of N, a
    pool that holds S of the M adapters), every run complete, the small pool paging adapters
    in while the default one holds every adapter; tables and plots written."""
    from loramux.loadtest.benchmarks import RESIDENCY_QUICK as PLAN
    from loramux.loadtest.benchmarks import pool_bytes_for

    model_dir, _, _ = make_model_dir(tmp_path / "tiny-residency", max_positions=1024)
    out = tmp_path / "out"
    assert main(["--out", str(out), "--residency", "--quick", "--model-dir", str(model_dir),
                 "--device", "cpu", "--no-progress"]) == 0
    doc = json.loads((out / "benchmarks.json").read_text())
    servers = doc["servers"]
    flags = {name: [a for a in argv if a.startswith("--")] for name, argv in servers.items()}
    for name in servers:  # only what names the model, the adapters and the admin token
        extra = set(flags[name]) - {"--model", "--device", "--adapter-root", "--admin-token"}
        assert extra == {"defaults": set(), "capped": {"--max-gpu-adapters"},
                         "small_pool": {"--adapter-pool-bytes"}}[name], name
    small = servers["small_pool"]
    pool_bytes = pool_bytes_for(str(model_dir), PLAN.ranks, PLAN.slots, 4)
    assert small[small.index("--adapter-pool-bytes") + 1] == str(pool_bytes)
    d, p = doc["scenarios"]["defaults"], doc["scenarios"]["pool"]
    for summary in (d["lora"], d["capped"], d["base"], d["peft"]):
        assert summary["ok"] == summary["sent"] == PLAN.requests
    for summary in (p["resident"], p["small"]):
        assert summary["ok"] == summary["sent"] == PLAN.slot_adapters  # each adapter once
    assert p["resident_page_ins"] == 0 and p["page_ins"] >= PLAN.slot_adapters - PLAN.slots
    assert p["pool_bytes"] == pool_bytes
    assert d["lora_over_base"]["output_tokens_per_s"] == pytest.approx(
        d["lora"]["output_tokens_per_s"] / d["base"]["output_tokens_per_s"])
    tables = (out / "tables.md").read_text()
    assert f"over a pool that holds {PLAN.slots}" in tables and "vs PEFT" in tables
    for plot in doc["plots"]:
        assert (out / plot).read_bytes().startswith(PNG_MAGIC)
