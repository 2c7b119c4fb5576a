"""The load tester: workload and report arithmetic by hand, the generator against a real loramux
server on loopback (tiny random Llama, real PEFT adapters made and loaded by the tool), the
PEFT baseline in process, and the CLI's files.

A small OpenAI-SSE stub serves only what a real server should never do on purpose (a
mid-stream error, a stream cut before [DONE], no usage, a request that never answers), so
that the generator's error accounting and hard timeout are tested deterministically.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from loramux.adapters.config import RegistryConfig
from loramux.engine.config import EngineConfig
from loramux.loadtest.__main__ import main
from loramux.loadtest.adapters import (
    AdapterRecipe,
    find_adapters,
    load_adapters,
    make_adapters,
)
from loramux.loadtest.generator import (
    ClientConfig,
    LengthSpec,
    LoadShape,
    PromptRecord,
    RequestSpec,
    RunResult,
    Sample,
    Workload,
    popularity_weights,
    read_prompts,
    request_stream,
    run_load,
    take,
)
from loramux.loadtest.report import (
    SCHEMA,
    distribution,
    load_result,
    summarize,
    timeline,
)
from loramux.server.app import create_app
from loramux.server.config import ServerConfig
from loramux.server.local_engine import LocalEngineClient
from loramux.server.tenants import hash_key, parse_tenants
from server_harness import LiveServer
from server_model import make_model_dir

BASE = "tiny-lt"
ADMIN = "admin-for-loadtest"
KEYS = {"open": "sk-open", "limited": "sk-limited"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ============================================================================ pure arithmetic


def test_percentiles_match_hand_computation() -> None:
    # numpy's "linear" method: h = (n - 1) q / 100, v[floor h] + frac(h) (v[floor h + 1] - ...)
    d = distribution([10.0, 1.0, 4.0, 7.0, 2.0, 9.0, 3.0, 8.0, 6.0, 5.0])  # 1..10 shuffled
    assert d["count"] == 10 and d["min"] == 1.0 and d["max"] == 10.0 and d["mean"] == 5.5
    assert d["p50"] == pytest.approx(5.5)  # h = 4.5: 5 + 0.5 * (6 - 5)
    assert d["p90"] == pytest.approx(9.1)  # h = 8.1: 9 + 0.1 * (10 - 9)
    assert d["p99"] == pytest.approx(9.91)  # h = 8.91
    d = distribution([0.2, 0.1, 0.4])  # sorted .1 .2 .4
    assert d["p50"] == pytest.approx(0.2)  # h = 1
    assert d["p90"] == pytest.approx(0.2 + 0.8 * 0.2)  # h = 1.8
    assert d["p99"] == pytest.approx(0.2 + 0.98 * 0.2)  # h = 1.98
    assert distribution([])["p50"] is None and distribution([3.0])["p99"] == 3.0


def _sample(i: int, *, ttft: float | None = None, e2e: float | None = None, tokens: int = 0,
            status: int = 200, kind: str | None = None, start: float = 0.0) -> Sample:
    s = Sample(index=i, model="m", start=start, ttft=ttft, e2e=e2e, output_tokens=tokens,
               max_tokens=tokens, status=status, prompt_tokens=5 if kind is None else None)
    if kind is not None:
        s.error_kind, s.error = kind, "failed"
    elif tokens > 1 and ttft is not None and e2e is not None:
        s.tpot = (e2e - ttft) / (tokens - 1)
    return s


def test_summary_counts_percentiles_errors_and_slo_from_samples() -> None:
    ok = [_sample(i, ttft=0.1 * (i + 1), e2e=0.1 * (i + 1) + 0.9, tokens=10, start=float(i))
          for i in range(5)]  # ttft .1 .. .5, tpot (0.9 / 9) = 0.1 each
    bad = [_sample(5, status=404, kind="http"), _sample(6, status=429, kind="http"),
           _sample(7, status=429, kind="http"), _sample(8, kind="timeout", status=0),
           _sample(9, kind="stream")]
    result = RunResult(samples=ok + bad, wall_start=0.0, elapsed=10.0)
    s = summarize(result, slo_ttft=0.3 + 1e-9, slo_tpot=0.1 + 1e-9)
    assert (s["sent"], s["ok"], s["errors"]) == (10, 5, 5)
    assert s["sent"] == s["ok"] + s["errors"]
    assert s["errors_by_status"] == {"404": 1, "429": 2, "stream": 1, "timeout": 1}
    assert s["requests_per_s"] == pytest.approx(0.5)
    assert s["output_tokens"] == 50 and s["output_tokens_per_s"] == pytest.approx(5.0)
    assert s["prompt_tokens"] == 25
    assert s["ttft_s"]["p50"] == pytest.approx(0.3)
    assert s["ttft_s"]["p90"] == pytest.approx(0.46)  # h = 3.6 over .1 .2 .3 .4 .5
    assert s["tpot_s"]["p99"] == pytest.approx(0.1)
    assert s["e2e_s"]["count"] == 5 and s["e2e_s"]["p50"] == pytest.approx(1.2)
    # SLO over *sent* requests: 3 of 10 meet ttft <= 0.3, all 5 successes meet tpot.
    assert s["slo"]["attainment"] == pytest.approx(0.3)
    assert s["slo"]["ttft_attainment"] == pytest.approx(0.3)
    assert s["slo"]["tpot_attainment"] == pytest.approx(0.5)
    assert s["slo"]["goodput_rps"] == pytest.approx(0.3)
    assert summarize(result)["slo"] is None


def test_timeline_conserves_tokens_and_requests() -> None:
    samples = [_sample(i, ttft=0.05 * i, e2e=0.3 + 0.1 * i, tokens=7 + i, start=0.13 * i)
               for i in range(20)]
    samples.append(_sample(20, kind="http", status=500))
    series = timeline(samples, duration=5.0, bin_s=0.25)
    bin_s = series["bin_s"]
    assert sum(series["output_tokens_per_s"]) * bin_s == pytest.approx(sum(7 + i
                                                                          for i in range(20)))
    assert sum(series["requests_per_s"]) * bin_s == pytest.approx(20)
    assert max(series["in_flight"]) >= 1 and len(series["t"]) == 20


def test_zipf_popularity_is_zipf() -> None:
    weights = popularity_weights(8, "zipf", 1.0)
    expected = 1 / np.arange(1, 9)
    assert np.allclose(weights, expected / expected.sum())
    assert np.all(np.diff(weights) < 0)  # the first adapter is the most popular
    assert np.allclose(popularity_weights(8, "zipf", 0.0), 1 / 8)  # s = 0 is uniform
    names = tuple(f"a{i}" for i in range(8))
    workload = Workload(base="b", adapters=names, popularity="zipf", zipf_s=1.2,
                        prompt_len=LengthSpec(2, 2), output_len=LengthSpec(1, 1), seed=3)
    drawn = [r.model for r in take(request_stream(workload), 8000)]
    freq = np.array([drawn.count(n) for n in names]) / len(drawn)
    p = popularity_weights(8, "zipf", 1.2)
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / len(drawn)))  # 4 sigma
    assert freq[0] > 2 * freq[3]
    # Uniform: flat within 4 sigma; distinct: exact round-robin.
    uniform = [r.model for r in take(request_stream(Workload(
        base="b", adapters=names, prompt_len=LengthSpec(2, 2), seed=1)), 8000)]
    counts = np.array([uniform.count(n) for n in names])
    assert np.all(np.abs(counts / 8000 - 1 / 8) < 4 * np.sqrt(1 / 8 * 7 / 8 / 8000))
    distinct = take(request_stream(Workload(base="b", adapters=names, popularity="distinct",
                                            prompt_len=LengthSpec(2, 2))), 20)
    assert [r.model for r in distinct] == [names[i % 8] for i in range(20)]


def test_workload_lengths_files_and_determinism(tmp_path: Path) -> None:
    assert LengthSpec.parse("16") == LengthSpec(16, 16)
    assert LengthSpec.parse("4-9") == LengthSpec.parse("4:9") == LengthSpec(4, 9)
    with pytest.raises(ValueError):
        LengthSpec.parse("9-4")
    workload = Workload(base="b", adapters=("x", "y"), prompt_len=LengthSpec(3, 12),
                        output_len=LengthSpec(2, 5), base_fraction=0.25, seed=7)
    first, again = take(request_stream(workload), 300), take(request_stream(workload), 300)
    assert first == again  # the plan depends on the seed only
    assert {len(r.prompt_text().split()) for r in first} == set(range(3, 13))
    assert {r.max_tokens for r in first} == {2, 3, 4, 5}
    assert 0.15 < sum(r.model == "b" for r in first) / 300 < 0.35

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('"plain"\n{"prompt": "p", "max_tokens": 3}\n\n'
                     '{"messages": [{"role": "user", "content": "hi"}]}\n')
    records = read_prompts(jsonl)
    assert records[0] == PromptRecord(text="plain")
    assert records[1].max_tokens == 3
    assert records[2].messages == ({"role": "user", "content": "hi"},)
    text = tmp_path / "prompts.txt"
    text.write_text("one\n\ntwo\n")
    assert [r.text for r in read_prompts(text)] == ["one", "two"]
    from_file = take(request_stream(Workload(base="b", prompts=tuple(records),
                                             output_len=LengthSpec(9, 9))), 6)
    assert sorted(r.prompt_text() for r in from_file[:3]) == ["hi", "p", "plain"]
    assert {r.max_tokens for r in from_file if r.prompt == "p"} == {3}
    assert from_file[0].chat_messages()[0]["role"] == "user"


# ============================================================================ the real server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("loadtest")
    model_dir, _, _ = make_model_dir(base / BASE, max_positions=1024)
    made_dir = base / "made"
    made = make_adapters(model_dir, made_dir, 4, recipe=AdapterRecipe(
        ranks=(4, 8), target_modules=("q_proj", "v_proj", "down_proj"), b_std=0.2),
        progress=False)
    # Loading by path needs the folder under the server's adapter root; an upload needs the
    # name free there, so only two of the four are copied in.
    root = base / "adapter-root"
    for name in ("lt-002", "lt-003"):
        shutil.copytree(made[name], root / name)
    return {"model": model_dir, "root": root, "made": made_dir, **made}


@pytest.fixture(scope="module")
def server(world: dict[str, Path]) -> Iterator[LiveServer]:
    engine = EngineConfig(model=str(world["model"]), device="cpu", dtype="float32",
                          kv_cache_tokens=8192, max_num_seqs=16,
                          registry=RegistryConfig(adapter_root=world["root"], max_lora_rank=16,
                                                  max_gpu_adapters=2, max_cpu_adapters=8))
    tenants = parse_tenants({"tenants": {
        "open": {"keys_sha256": [hash_key(KEYS["open"])], "adapters": ["*"]},
        "limited": {"keys_sha256": [hash_key(KEYS["limited"])], "adapters": ["*"],
                    "requests_per_minute": 3},
    }})
    app = create_app(ServerConfig(engine=engine, admin_token=ADMIN),
                     LocalEngineClient(engine), tenants=tenants)
    with LiveServer(app) as live:
        outcomes = load_adapters(live.url, {n: world[n] for n in ("lt-000", "lt-001")},
                                 admin_token=ADMIN, via="upload", progress=False)
        outcomes += load_adapters(live.url, {n: world["root"] / n for n in ("lt-002", "lt-003")},
                                  admin_token=ADMIN, via="path", progress=False)
        assert [o.status for o in outcomes] == [201, 201, 200, 200], outcomes
        yield live


ADAPTERS = ("lt-000", "lt-001", "lt-002", "lt-003")


def _client(server: LiveServer, key: str = "open", **kwargs: Any) -> ClientConfig:
    return ClientConfig(url=server.url, api_key=KEYS.get(key, key), **kwargs)


def _workload(**kwargs: Any) -> Workload:
    settings: dict[str, Any] = {"base": BASE, "adapters": ADAPTERS, "popularity": "zipf",
                                "prompt_len": LengthSpec(5, 20), "output_len": LengthSpec(3, 6)}
    settings.update(kwargs)
    return Workload(**settings)


def _run(server: LiveServer, shape: LoadShape, workload: Workload | None = None,
         key: str = "open", tokenizer: Any = None, **client: Any) -> RunResult:
    return asyncio.run(run_load(_client(server, key, **client), shape,
                                request_stream(workload or _workload(), tokenizer),
                                progress=False))


def test_adapters_are_made_real_and_loaded(server: LiveServer, world: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    assert list(find_adapters(world["made"])) == list(ADAPTERS)
    config = json.loads((world["lt-001"] / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    tensors = load_file(str(world["lt-001"] / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 3 * 2  # A and B x 3 modules x 2 layers
    assert all(t.abs().sum() > 0 for t in tensors.values())  # lora_B is not PEFT's zeros
    listed = httpx.get(server.url + "/v1/models",
                       headers={"Authorization": f"Bearer {KEYS['open']}"}).json()["data"]
    assert {m["id"] for m in listed} >= {BASE, *ADAPTERS}
    bad = load_adapters(server.url, {"lt-000": world["lt-000"]}, admin_token="wrong",
                        progress=False)
    assert bad[0].status == 401 and not bad[0].ok


def test_cli_makes_and_uploads_adapters(server: LiveServer, world: dict[str, Path],
                                        tmp_path: Path) -> None:
    from safetensors.torch import load_file

    code = main(["make-adapters", "--model-dir", str(world["model"]), "--num", "2",
                 "--out", str(tmp_path), "--prefix", "cli-", "--rank", "2", "--targets", "all",
                 "--url", server.url, "--admin-token", ADMIN, "--no-progress"])
    assert code == 0
    tensors = load_file(str(tmp_path / "cli-001" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2  # A and B x every projection x 2 layers
    rows = httpx.get(server.url + "/admin/adapters",
                     headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert {"cli-000", "cli-001"} <= {r["name"] for r in rows}
    assert main(["load-adapters", "--url", server.url, "--admin-token", "wrong", "--dir",
                 str(tmp_path), "--no-progress"]) == 1


def test_open_loop_counts_tokens_and_timings(server: LiveServer,
                                             world: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(world["model"]))
    shape = LoadShape(rate=40.0, num_requests=16, timeout=60)
    result = _run(server, shape, tokenizer=tokenizer)
    samples = result.samples
    assert len(samples) == 16 and all(s.ok for s in samples), [s.error for s in samples]
    plan = take(request_stream(_workload(), tokenizer), 16)
    assert [(s.index, s.model, s.max_tokens) for s in samples] == \
        [(r.index, r.model, r.max_tokens) for r in plan]
    for s, r in zip(samples, plan):
        assert s.status == 200 and s.tokens_from_usage and s.finish_reason == "length"
        assert s.output_tokens == s.max_tokens  # ignore_eos + max_tokens control the length
        assert s.prompt_tokens == len(tokenizer.encode(r.prompt_text()))  # exact lengths
        assert 5 <= s.prompt_tokens <= 20
        assert s.ttft is not None and s.e2e is not None and 0 < s.ttft <= s.e2e
        assert s.tpot == pytest.approx((s.e2e - s.ttft) / (s.output_tokens - 1))
        assert s.scheduled is not None and s.start >= s.scheduled
    s = summarize(result)
    assert (s["sent"], s["ok"], s["errors"]) == (16, 16, 0)
    assert s["output_tokens"] == sum(r.max_tokens for r in plan)
    assert s["ttft_s"]["p50"] == pytest.approx(float(np.percentile(
        [x.ttft for x in samples], 50)))
    assert s["e2e_s"]["p99"] == pytest.approx(float(np.percentile(
        [x.e2e for x in samples], 99, method="linear")))


def test_closed_loop_stops_at_duration_and_chat_works(server: LiveServer) -> None:
    shape = LoadShape(concurrency=3, duration=1.0, timeout=60)
    result = _run(server, shape, _workload(popularity="distinct"), endpoint="chat")
    samples = result.samples
    assert samples and all(s.ok for s in samples), [s.error for s in samples[:3]]
    assert all(s.start < 1.0 for s in samples)  # nothing new after the duration
    assert all(s.output_tokens == s.max_tokens and s.ttft is not None for s in samples)
    assert [s.model for s in samples[:8]] == [ADAPTERS[i % 4] for i in range(8)][
        :len(samples[:8])]
    assert summarize(result)["sent"] == len(samples)


def test_errors_are_counted_by_status(server: LiveServer) -> None:
    # Closed loop, one client, round-robin over a real adapter and an unknown one. The
    # tenant's 3 requests per minute pass (requests 1, 3, 5); the unknown ones before the limit
    # (2, 4) are 404s; from the 6th on everything is a 429, since a tenant over its limit is
    # refused before its model is resolved (issue 15, item 8: cheap checks first).
    workload = _workload(adapters=("lt-001", "no-such-adapter"), popularity="distinct")
    result = _run(server, LoadShape(concurrency=1, num_requests=10, timeout=60), workload,
                  key="limited")
    s = summarize(result)
    assert (s["sent"], s["ok"], s["errors"]) == (10, 3, 7)
    assert s["errors_by_status"] == {"404": 2, "429": 5}
    assert all(x.error and x.e2e is not None for x in result.samples if not x.ok)
    unknown_key = summarize(_run(server, LoadShape(rate=math.inf, num_requests=4, timeout=60),
                                 key="sk-nobody"))
    assert unknown_key["errors_by_status"] == {"401": 4} and unknown_key["ok"] == 0


def test_cli_sweep_writes_json_and_plots(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    code = main(["run", "--url", server.url, "--api-key", KEYS["open"], "--rate", "20,inf",
                 "--num-requests", "8", "--adapter-prefix", "lt-", "--popularity", "zipf",
                 "--prompt-len", "4-12", "--output-len", "3", "--slo-ttft", "5",
                 "--slo-tpot", "1", "--timeout", "60", "--out", str(out), "--no-progress"])
    assert code == 0
    for point in ("rate-20", "rate-inf"):
        doc = json.loads((out / point / "results.json").read_text())
        assert doc["schema"] == SCHEMA
        assert {"config", "summary", "timeline", "samples", "server_metrics"} <= set(doc)
        summary = doc["summary"]
        assert {"sent", "ok", "errors", "errors_by_status", "requests_per_s",
                "output_tokens_per_s", "ttft_s", "tpot_s", "e2e_s", "slo",
                "percentile_method"} <= set(summary)
        assert summary["sent"] == summary["ok"] + summary["errors"] == 8
        assert summary["ok"] == 8 and summary["slo"]["attainment"] == 1.0
        assert {"p50", "p90", "p99"} <= set(summary["ttft_s"])
        assert doc["config"]["workload"]["adapters"] == 4
        assert doc["server_metrics"]["loramux_generation_tokens_total"] == 24
        for plot in ("latency.png", "throughput.png"):
            assert (out / point / plot).read_bytes()[:8] == PNG_MAGIC
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["label"] for p in sweep["points"]] == ["rate-20", "rate-inf"]
    assert (out / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    # compare: bars without x, lines with x
    code = main(["compare", str(out / "rate-20" / "results.json"),
                 str(out / "rate-inf" / "results.json"), "--labels", "slow,fast",
                 "--out", str(tmp_path / "cmp.png")])
    assert code == 0 and (tmp_path / "cmp.png").read_bytes()[:8] == PNG_MAGIC
    assert [r["label"] for r in json.loads((tmp_path / "cmp.json").read_text())["results"]] \
        == ["slow", "fast"]
    assert load_result(out / "rate-20" / "results.json").summary["sent"] == 8
    code = main(["compare", str(out / "rate-20" / "results.json"),
                 str(out / "rate-inf" / "results.json"), "--x", "1,4", "--x-label", "k",
                 "--out", str(tmp_path / "lines.png")])
    assert code == 0 and (tmp_path / "lines.png").read_bytes()[:8] == PNG_MAGIC


# ============================================================================ PEFT baseline


def test_peft_baseline_same_plan_and_metrics(world: dict[str, Path], tmp_path: Path) -> None:
    from loramux.loadtest.peft_baseline import PeftRunner, run_peft

    runner = PeftRunner(world["model"], {n: world[n] for n in ADAPTERS}, BASE, progress=False)
    workload = _workload(adapters=(*ADAPTERS, "no-such-adapter"), popularity="distinct",
                         base_fraction=0.2)
    result = run_peft(runner, LoadShape(concurrency=4, num_requests=10, timeout=60),
                      request_stream(workload), progress=False)
    s = summarize(result)
    plan = take(request_stream(workload), 10)
    unknown = sum(r.model == "no-such-adapter" for r in plan)
    assert unknown >= 1
    assert (s["sent"], s["errors"], s["errors_by_status"]) == (10, unknown, {"404": unknown})
    assert [x.model for x in result.samples] == [r.model for r in plan]
    assert any(r.model == BASE for r in plan)
    for x in result.samples:
        if x.ok:
            assert x.output_tokens == x.max_tokens and 0 < x.ttft <= x.e2e  # type: ignore[operator]
    assert s["output_tokens"] == sum(r.max_tokens for r in plan if r.model != "no-such-adapter")
    # Open loop, bounded by a duration: arrivals after it are never taken.
    opened = run_peft(runner, LoadShape(rate=20.0, duration=0.5, timeout=60),
                      request_stream(_workload()), batch_size=3, progress=False)
    assert opened.samples and all(x.ok and x.start < 0.5 for x in opened.samples)
    assert all(x.scheduled == x.start for x in opened.samples)


def test_cli_run_with_peft_baseline_in_one_command(server: LiveServer, world: dict[str, Path],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "vs"
    code = main(["run", "--url", server.url, "--api-key", KEYS["open"], "--concurrency", "2",
                 "--num-requests", "6", "--adapters", "lt-000,lt-003", "--popularity",
                 "uniform", "--model-dir", str(world["model"]), "--adapters-dir",
                 str(world["made"]), "--baseline", "peft", "--prompt-len", "6",
                 "--output-len", "4", "--out", str(out), "--no-progress", "--fail-on-errors"])
    assert code == 0
    served = load_result(out / "results.json")
    peft = load_result(out / "peft" / "results.json")
    assert [x.model for x in served.samples] == [x.model for x in peft.samples]
    assert [x.prompt_tokens for x in served.samples] == [x.prompt_tokens for x in peft.samples]
    assert served.summary["output_tokens"] == peft.summary["output_tokens"] == 24
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    compared = json.loads((out / "compare.json").read_text())
    assert compared["dimension"] is None and len(compared["points"]) == 1
    assert compared["points"][0]["peft"]["ok"] == 6


def test_cli_sweeps_the_number_of_adapters(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "scaling"
    code = main(["run", "--url", server.url, "--api-key", KEYS["open"], "--concurrency", "4",
                 "--num-requests", "8", "--adapter-prefix", "lt-", "--num-adapters", "1,4",
                 "--popularity", "distinct", "--prompt-len", "5", "--output-len", "3",
                 "--out", str(out), "--no-progress", "--fail-on-errors"])
    assert code == 0
    one = load_result(out / "adapters-1" / "results.json")
    four = load_result(out / "adapters-4" / "results.json")
    assert {x.model for x in one.samples} == {"lt-000"}
    assert [x.model for x in four.samples] == [ADAPTERS[i % 4] for i in range(8)]
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["dimension"] == "adapters" and [p["x"] for p in sweep["points"]] == [1, 4]
    for plot in ("sweep.png", "scaling.png"):
        assert (out / plot).read_bytes()[:8] == PNG_MAGIC


# ============================================================================ stub server


def stub_app() -> FastAPI:
    """Misbehaviours by model name; "ok-N" answers N one-token chunks with usage."""
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        body = await request.json()
        model, n = body["model"], int(body["max_tokens"])
        if model == "boom":
            return JSONResponse({"error": {"message": "kaput", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)

        def event(payload: dict[str, Any]) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        async def events() -> AsyncIterator[str]:
            if model == "hang":
                await asyncio.sleep(60)
            for i in range(n):
                yield event({"choices": [{"index": 0, "text": "x",
                                          "finish_reason": "length" if i == n - 1 else None}]})
                await asyncio.sleep(0.002)
                if model == "midstream" and i == 1:
                    yield event({"error": {"message": "engine fell over", "code": 503}})
                    break
            if model == "cut":
                return
            if model != "nousage":
                yield event({"choices": [], "usage": {"prompt_tokens": 3,
                                                      "completion_tokens": n}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub() -> Iterator[LiveServer]:
    with LiveServer(stub_app()) as live:
        yield live


def _specs(models: list[str], max_tokens: int = 4) -> Iterator[RequestSpec]:
    for i, model in enumerate(models):
        yield RequestSpec(index=i, model=model, max_tokens=max_tokens, prompt="p")


def test_stub_error_kinds_and_token_fallback(stub: LiveServer) -> None:
    models = ["ok", "boom", "midstream", "cut", "nousage", "ok"]
    result = asyncio.run(run_load(ClientConfig(url=stub.url), LoadShape(
        concurrency=2, num_requests=len(models), timeout=30), _specs(models), progress=False))
    by_model = {s.model: s for s in result.samples}
    assert len(result.samples) == 6
    assert by_model["boom"].status == 500 and by_model["boom"].error == "kaput"
    assert by_model["midstream"].error_kind == "stream"
    assert by_model["midstream"].error == "engine fell over"
    assert by_model["cut"].error_kind == "incomplete"
    nousage = by_model["nousage"]
    assert nousage.ok and not nousage.tokens_from_usage and nousage.output_tokens == 4
    s = summarize(result)
    assert s["errors_by_status"] == {"500": 1, "incomplete": 1, "stream": 1}
    assert (s["ok"], s["sent"]) == (3, 6)


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_hard_timeout_bounds_the_run(stub: LiveServer, mode: str) -> None:
    # Requests that never answer are cancelled at the hard timeout and still counted.
    shape = LoadShape(rate=50.0 if mode == "open" else None,
                      concurrency=2 if mode == "closed" else None, num_requests=4,
                      timeout=1.0)
    result = asyncio.run(run_load(ClientConfig(url=stub.url), shape,
                                  _specs(["ok", "hang", "ok", "hang"]), progress=False))
    assert result.timed_out and result.elapsed < 30
    s = summarize(result)
    assert s["sent"] == s["ok"] + s["errors"]
    assert s["errors_by_status"].get("cancelled", 0) >= 1
    assert all(x.error_kind == "cancelled" for x in result.samples if x.model == "hang")
