"""`python -m loramux.loadtest.gpu_check --cpu`, run as a bare GPU machine would run it.

The run happens in a subprocess from the repository root with `python -S` (no site-packages
processing, so loramux's editable install is not on the path) and a site folder of links to
this environment's packages minus those a bare GPU image lacks (fastapi, uvicorn, pydantic,
bitsandbytes, gguf, ...). So it also shows that the check imports none of them and that the
checkout's `loramux/` folder of symlinks is enough. Then the JSON's structure and the
correctness checks are examined; the runner's time limit and error handling are tested on
fake sections.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# Not on the device image (its package list; docs/gpu.md), or loramux's own install.
ABSENT = ("fastapi", "uvicorn", "starlette", "pydantic", "pydantic_core", "bitsandbytes",
          "gguf", "multipart", "python_multipart", "openai", "schemathesis", "kernels",
          "loramux", "__editable__")
SECTIONS = ["versions", "copy_bandwidth", "kernels", "lora_bandwidth", "pagein", "decode_step",
            "end_to_end", "peft", "quantized"]
STATUSES = {"ok", "failed", "error", "skipped", "timed_out"}


def _absent(entry: str) -> bool:
    name = entry.split("-")[0].split(".")[0].lower()
    return name in ABSENT or entry.startswith("__editable__")


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("bare-site")
    folders = dict.fromkeys(Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib"))
    for folder in folders:
        for entry in folder.iterdir():
            link = site / entry.name
            if not _absent(entry.name) and not entry.name.endswith(".pth") \
                    and not link.exists():
                link.symlink_to(entry)
    return site


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "TRITON_", "OMP_")) and k != "LORAMUX_CACHE"}
    return {**env, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def run(bare_site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "loramux.loadtest.gpu_check", "--out", str(out), "--cpu"],
        cwd=REPO, env=_env(bare_site), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"doc": json.loads((out / "gpu_check.json").read_text()), "stdout": proc.stdout}


def test_the_run_is_complete_and_every_correctness_check_passed(run: dict[str, Any]) -> None:
    doc = run["doc"]
    assert doc["complete"] and doc["mode"] == "cpu" and doc["finished"]
    assert doc["summary"]["correctness_passed"], doc["summary"]
    kernels = doc["sections"]["kernels"]
    assert kernels["status"] == "ok" and not kernels["truncated"]
    assert set(kernels["backends"]) == {"torch", "triton"}  # the Triton interpreter ran
    for name, c in kernels["checks"].items():
        assert c["kind"] == "correctness" and c["passed"] in (True, None), name
    # every kind of case ran: both ops, both batch layouts, both dtypes, on both backends
    kinds = {(c["op"], c["batch"], c["dtype"], c["backend"]) for c in kernels["cases"]}
    assert len(kinds) == 2 * 2 * 2 * 2
    assert all(c["untouched_ok"] and c["error"] < 2e-2 for c in kernels["cases"])


def test_every_section_has_a_status_and_nothing_broke(run: dict[str, Any]) -> None:
    sections = run["doc"]["sections"]
    assert list(sections) == SECTIONS
    for name, s in sections.items():
        assert s["status"] in STATUSES, name
        assert s["status"] in ("ok", "skipped"), (name, s.get("error"), s.get("traceback"))
        assert "seconds" in s or s["status"] == "skipped", name
    assert "GPU only" in sections["lora_bandwidth"]["reason"]
    # bitsandbytes is absent, as on the device image: skipped, saying why
    assert "bitsandbytes" in sections["quantized"]["reason"]
    for name in ("pagein", "decode_step", "end_to_end", "peft"):
        assert sections[name]["status"] == "ok", name
    e2e = {(r["batch"], r["adapters"]) for r in sections["end_to_end"]["results"]}
    assert e2e == {(1, 0), (1, 1), (8, 0), (8, 1), (8, 8)}
    assert sections["peft"]["peft_tokens_per_s"] > 0


def test_checks_say_value_target_kind_and_verdict(run: dict[str, Any]) -> None:
    for name, s in run["doc"]["sections"].items():
        for key, c in (s.get("checks") or {}).items():
            assert set(c) == {"value", "target", "kind", "passed"}, (name, key)
            assert c["kind"] in ("correctness", "target")
            if c["kind"] == "target" and name != "quantized":
                assert c["passed"] is None, (name, key)  # CPU figures are not judged
    assert set(run["doc"]["summary"]["checks"]) >= {"kernels.triton_bf16_max_rel_error",
                                                    "end_to_end.lora_overhead",
                                                    "peft.loramux_vs_peft",
                                                    "pagein.host_to_device_copy_ms"}


def test_it_ran_from_the_checkout_without_the_absent_packages(run: dict[str, Any]) -> None:
    versions = run["doc"]["sections"]["versions"]
    assert versions["loramux_from"] == str(REPO / "loramux")
    for name in ("fastapi", "uvicorn", "bitsandbytes", "pydantic", "gguf"):
        assert versions["packages"][name] is None, name
    assert versions["missing_needed"] == []
    assert "correctness passed: True" in run["stdout"]


def test_the_quantized_section_compares_with_peft_where_bitsandbytes_imports(
        tmp_path: Path) -> None:
    """In this environment (bitsandbytes installed, as `make test` installs it): nf4 and int8
    bases, loramux against PEFT on the same quantized modules (bitsandbytes' exact float32
    CPU path: the same tokens)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "loramux.loadtest.gpu_check", "--out", str(tmp_path), "--cpu",
         "--only", "quantized"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(doc["sections"]) == ["versions", "quantized"]
    section = doc["sections"]["quantized"]
    assert section["status"] == "ok", section
    assert section["results"]["nf4"] == {"status": "ok", "same_greedy_tokens": "5/5"}
    assert section["results"]["int8"]["status"] == "ok"  # reported, not judged
    assert section["checks"]["nf4_same_tokens_as_peft"]["passed"] is True


# ------------------------------------------------------------------ the runner itself

_SLOW_RUN = """
import sys, time
from loramux.loadtest import gpu_check

def fine(ctx):
    return {"checks": {"c": gpu_check.check(1, "= 1", True, "correctness")}}

def broken(ctx):
    raise RuntimeError("planted")

def slow(ctx):
    time.sleep(60)
    return {}

gpu_check._sections = lambda: [gpu_check.Section("versions", fine, 5),
                               gpu_check.Section("broken", broken, 5),
                               gpu_check.Section("slow", slow, 100),
                               gpu_check.Section("never", fine, 5)]
sys.exit(gpu_check.main(["--out", sys.argv[1], "--cpu", "--max-seconds", "8"]))
"""


def test_the_time_limit_leaves_the_sections_done_and_a_broken_one_recorded(
        tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _SLOW_RUN, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = doc["sections"]
    assert not doc["complete"]
    assert sections["versions"]["status"] == "ok"
    assert sections["broken"]["status"] == "error"
    assert "planted" in sections["broken"]["error"]
    assert sections["slow"]["status"] == "timed_out"
    assert "never" not in sections
    assert doc["summary"]["not_clean"] == {"broken": "error", "slow": "timed_out"}


def test_summary_counts_an_unjudged_check_as_no_failure() -> None:
    from loramux.loadtest.gpu_check import check, summary

    sections = {"k": {"status": "ok", "checks": {"a": check(1, "x", True, "correctness"),
                                                 "b": check(2, "y", None, "correctness")}},
                "t": {"status": "failed", "checks": {"c": check(3, "z", False)}}}
    result = summary(sections)
    assert result["correctness_passed"] is True
    assert result["targets_missed"] == ["t.c"]
    sections["k"]["checks"]["b"]["passed"] = False
    assert summary(sections)["correctness_passed"] is False


def test_pagein_benchmark_measures_any_shape(tmp_path: Path) -> None:
    """benchmark_pagein.measure (what gpu_check's pagein section runs) on the tiny shape."""
    import torch
    from loramux.adapters.types import BaseSpec
    from loramux.loadtest.benchmark_pagein import measure
    from loramux.loadtest.gpu_models import adapter_numel, llama_config

    base = BaseSpec.from_hf_config(llama_config("tiny"))
    figures = measure(base, torch.device("cpu"), torch.bfloat16, rank=8, iters=2, tmp=tmp_path)
    assert figures["layers"] == 2 and figures["rank"] == 8
    # packed: every A and B in bf16 (plus alignment padding below one 64-element block each)
    packed = figures["packed_mib"] * 2**20
    assert 2 * adapter_numel(base, 8) <= packed + 0.01 * 2**20
    for key in ("disk_to_host_cold_ms", "host_to_device_copy_ms", "acquire_wait_ms"):
        assert figures[key] > 0


def test_random_model_shapes_match_the_real_checkpoints() -> None:
    from loramux.adapters.types import BaseSpec
    from loramux.loadtest.gpu_models import llama_config

    shapes = BaseSpec.from_hf_config(llama_config("8b")).shapes
    assert shapes["k_proj"] == (4096, 1024) and shapes["gate_proj"] == (4096, 14336)
    seven = BaseSpec.from_hf_config(llama_config("7b", layers=8))
    assert seven.num_layers == 8 and seven.shapes["down_proj"] == (11008, 4096)
