"""Soak test: load with adapter churn for a set time; report errors, wrong outputs, memory
growth and leaked KV blocks. Loopback only; not part of CI (docs/reliability.md has figures).

    python -m loramux.loadtest.soak --duration 600 --out soak.json

starts `loramux serve` itself on a free 127.0.0.1 port (the embedded default model unless
--model is given; --url targets a server that is already running on loopback instead, which
must serve the same --model and share --adapter-root with this script), then for --duration
seconds:

  load     --concurrency closed-loop clients; each request picks a target (the base, one
           static adapter, or one of the --names churned names), a prompt, completions or
           chat, streamed or not; greedy with ignore_eos except a --sampled share (seeded
           temperature sampling: checked for status only); a --disconnect share of streams
           is dropped after the first chunk (the server must abort it and free its blocks)
  churn    every --churn-every seconds one churned name is loaded (vLLM endpoint, admin
           POST, or a multipart upload), reloaded as another variant (a new version under
           the same name) or unloaded (vLLM endpoint or DELETE)
  checks   every greedy 200 is compared with PEFT's greedy output for an adapter variant
           that was current for that name at some time while the request ran (computed in
           this process before the load starts); a 404 must fall in a time when the name
           was unloaded; everything else is an error. Every --quiesce-every seconds the load
           pauses until idle and /metrics must show no running or waiting request, 0 KV
           cache use and 0 adapter references, and /admin/adapters no drained version left.
           The server's RSS (/proc/PID/status, or psutil) is sampled every --rss-every s.

A greedy mismatch is counted `near_tie` rather than `wrong` when PEFT's top-2 logit margin
at the first differing token is below --tie-eps (float32 batching order can flip an exact
tie); both are reported. Exit status 0 only when there were no errors, no wrong outputs and
no leak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ABSENT = "<absent>"  # a churned name that is not loaded
BASE = "<base>"
PROMPTS = (
    "The history of the printing press",
    "Write a short note about rivers:",
    "Three reasons to learn a new language are",
    "Once upon a time in a small village,",
    "The recipe needs flour, eggs and",
    "In computer science, a hash table",
    "Dear team, the meeting tomorrow",
    "A good night's sleep helps",
)


# ============================================================================ adapters


def make_variants(model_dir: Path, root: Path, count: int, *, rank: int = 8,
                  targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj"),
                  b_std: float = 0.05, seed: int = 0) -> list[str]:
    """`count` random PEFT adapters `soak-var-<i>` under `root` (folder names returned).

    The layout comes from peft on a weightless (meta) copy of the base; B is random, not
    PEFT's zeros, so every variant changes the greedy output."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, lora)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(peft_model).items()}
    peft_config = peft_model.peft_config["default"]
    peft_config.inference_mode = True
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed * 7919 + i)
        tensors = {}
        for key, shape in shapes.items():
            if ".lora_A." in key:
                tensors[key] = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
            else:
                tensors[key] = torch.randn(shape, generator=gen) * b_std
        name = f"soak-var-{i}"
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        peft_config.save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        names.append(name)
    return names


# ============================================================================ references


@dataclass(frozen=True)
class Reference:
    """PEFT's greedy continuation: token ids, text, and the top-2 logit margin per step."""

    ids: tuple[int, ...]
    text: str
    margins: tuple[float, ...]


class References:
    """PEFT greedy outputs for every (variant or base, prompt, endpoint), computed up front."""

    def __init__(self, model_dir: Path, root: Path, variants: list[str], max_tokens: int,
                 log: Any = print) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.model = PeftModel.from_pretrained(base, str(root / variants[0]),
                                               adapter_name=variants[0]).eval()
        for name in variants[1:]:
            self.model.load_adapter(str(root / name), adapter_name=name)
        self.max_tokens = max_tokens
        self.table: dict[tuple[str, int, str], Reference] = {}
        started = time.monotonic()
        for variant in [BASE, *variants]:
            for p in range(len(PROMPTS)):
                for endpoint in ("completions", "chat"):
                    self.table[(variant, p, endpoint)] = self._greedy(variant, p, endpoint)
        log(f"references: {len(self.table)} greedy PEFT outputs in "
            f"{time.monotonic() - started:.0f} s")

    def prompt_ids(self, p: int, endpoint: str) -> list[int]:
        """Token ids as the server makes them (completions: encode; chat: the template)."""
        if endpoint == "completions":
            return list(self.tokenizer.encode(PROMPTS[p]))
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[p]}],
                                                  tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _greedy(self, variant: str, p: int, endpoint: str) -> Reference:
        import torch

        ids = self.prompt_ids(p, endpoint)
        context = (self.model.disable_adapter() if variant == BASE
                   else contextlib.nullcontext())
        if variant != BASE:
            self.model.set_adapter(variant)
        out_ids: list[int] = []
        margins: list[float] = []
        with torch.no_grad(), context:
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(self.max_tokens):
                logits = out.logits[0, -1].float()
                top = torch.topk(logits, 2)
                out_ids.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                out = self.model(input_ids=torch.tensor([[out_ids[-1]]]),
                                 past_key_values=out.past_key_values, use_cache=True)
        text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        return Reference(tuple(out_ids), text, tuple(margins))

    def judge(self, text: str, candidates: set[str], p: int, endpoint: str,
              tie_eps: float) -> str:
        """"ok" if `text` is some candidate's greedy output, "near_tie" if it departs from
        one only where PEFT's top-2 margin is below tie_eps, else "wrong"."""
        refs = [self.table[(c, p, endpoint)] for c in candidates if c != ABSENT]
        if any(text == r.text for r in refs):
            return "ok"
        for r in refs:
            k = next((k for k in range(len(r.ids) + 1)
                      if not text.startswith(self.tokenizer.decode(
                          r.ids[:k + 1], skip_special_tokens=True))), len(r.ids))
            if k < len(r.ids) and r.margins[k] < tie_eps:
                return "near_tie"
        return "wrong"


# ============================================================================ churn state


@dataclass
class Interval:
    state: str  # a variant folder name, or ABSENT
    start: float  # the action that set it began (it may have applied any time after)
    end: float = math.inf  # the action that replaced it returned


@dataclass
class Churned:
    """What a churned name served over time, and whether an upload folder exists for it."""

    history: list[Interval]
    folder: bool = False

    @property
    def state(self) -> str:
        return self.history[-1].state

    def during(self, t0: float, t1: float) -> set[str]:
        return {i.state for i in self.history if i.start <= t1 and i.end >= t0}


# ============================================================================ the run


@dataclass
class Record:
    kind: str  # ok, near_tie, wrong, expected_404, error, abandoned, sampled
    target: str
    status: int
    detail: str = ""


@dataclass
class Report:
    duration_s: float = 0.0
    requests: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    checked_greedy: int = 0
    wrong_examples: list[str] = field(default_factory=list)
    error_examples: list[str] = field(default_factory=list)
    churn: dict[str, int] = field(default_factory=dict)
    churn_failures: list[str] = field(default_factory=list)
    quiesce_checks: int = 0
    leaks: list[str] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (t, MB)
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    rss_slope_mb_per_min_second_half: float = 0.0
    preemptions: float = 0.0
    adapter_loads: float = 0.0
    server: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return (not self.outcomes.get("wrong") and not self.outcomes.get("error")
                and not self.leaks and not self.churn_failures)


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import psutil

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        return None


def _metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels or set(sample.labels) == {"model_name"}:
                out[sample.name] = sample.value
    return out


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, root: Path, refs: References,
                 variants: list[str], static: str, pid: int | None) -> None:
        self.args = args
        self.url = url
        self.root = root
        self.refs = refs
        self.variants = variants
        self.static = static
        self.pid = pid
        self.rng = random.Random(args.seed)
        self.names = {f"soak-{k}": Churned([Interval(ABSENT, 0.0)]) for k in range(args.names)}
        self.records: list[Record] = []
        self.report = Report()
        self.admin = {"Authorization": f"Bearer {args.admin_token}"}
        self.running = asyncio.Event()
        self.running.set()
        self.busy = 0
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ------------------------------------------------------------------ one request

    async def one_request(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        a = self.args
        roll = rng.random()
        if roll < 0.15:
            target, model = BASE, self.refs_base_name
        elif roll < 0.30:
            target, model = self.static_variant, self.static
        else:
            model = rng.choice(sorted(self.names))
            target = model
        p = rng.randrange(len(PROMPTS))
        endpoint = "chat" if rng.random() < 0.3 else "completions"
        stream = rng.random() < 0.5
        sampled = rng.random() < a.sampled
        abandon = stream and rng.random() < a.disconnect
        body: dict[str, Any] = {"model": model, "max_tokens": a.max_tokens, "ignore_eos": True,
                                "temperature": 0.8 if sampled else 0.0, "stream": stream}
        if sampled:
            body["seed"] = rng.randrange(2**31)
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": PROMPTS[p]}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = PROMPTS[p]
            path = "/v1/completions"
        t0 = self.now()
        status, text, error = 0, "", ""
        try:
            if stream:
                async with http.stream("POST", self.url + path, json=body) as response:
                    status = response.status_code
                    if status != 200:
                        error = (await response.aread()).decode(errors="replace")[:300]
                    else:
                        async for line in response.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            data = line[6:]
                            if data == "[DONE]":
                                break
                            event = json.loads(data)
                            if "error" in event:
                                error = json.dumps(event)[:300]
                                if event["error"].get("code") == "model_not_found":
                                    # After the 200 headers: the 404 of a name unloaded
                                    # while the request was queued.
                                    status = 404
                                break
                            for choice in event.get("choices", []):
                                text += (choice.get("text") or
                                         (choice.get("delta") or {}).get("content") or "")
                            if abandon and text:
                                self.records.append(Record("abandoned", target, status))
                                return  # leaving the block closes the connection
            else:
                response = await http.post(self.url + path, json=body)
                status = response.status_code
                if status == 200:
                    choice = response.json()["choices"][0]
                    text = choice.get("text") or (choice.get("message") or {}).get(
                        "content") or ""
                else:
                    error = response.text[:300]
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        t1 = self.now()
        self.records.append(self.classify(target, model, p, endpoint, sampled, status, text,
                                          error, t0, t1))

    def classify(self, target: str, model: str, p: int, endpoint: str, sampled: bool,
                 status: int, text: str, error: str, t0: float, t1: float) -> Record:
        candidates = ({target} if target in (BASE, self.static_variant)
                      else self.names[model].during(t0, t1))
        if status == 200 and not error:
            if sampled:
                return Record("sampled", model, status)
            self.report.checked_greedy += 1
            verdict = self.refs.judge(text, candidates, p, endpoint, self.args.tie_eps)
            return Record(verdict, model, status,
                          f"{model} {endpoint} p{p} t={t0:.1f}-{t1:.1f} candidates="
                          f"{sorted(candidates)} got {text!r}")
        if status == 404 and ABSENT in candidates:
            return Record("expected_404", model, status)
        return Record("error", model, status,
                      f"{model} {endpoint} t={t0:.1f}-{t1:.1f} candidates={sorted(candidates)}"
                      f" status={status} {error}")

    async def client(self, k: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + k)
        async with httpx.AsyncClient(timeout=self.args.request_timeout) as http:
            while self.now() < deadline:
                await self.running.wait()
                self.busy += 1
                try:
                    await self.one_request(http, rng)
                finally:
                    self.busy -= 1

    # ------------------------------------------------------------------ churn

    async def churn(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=120, headers=self.admin) as http:
            while self.now() < deadline:
                await asyncio.sleep(self.args.churn_every)
                await self.running.wait()
                name = self.rng.choice(sorted(self.names))
                await self.churn_one(http, name)

    async def churn_one(self, http: httpx.AsyncClient, name: str) -> None:
        entry = self.names[name]
        current = entry.state
        choices = [v for v in self.variants if v != current]
        if current == ABSENT or self.rng.random() < 0.5:
            action, new = ("load" if current == ABSENT else "reload"), self.rng.choice(choices)
            via = self.rng.choice(("vllm", "admin", "upload"))
        else:
            action, new = "unload", ABSENT
            via = "delete" if entry.folder or self.rng.random() < 0.5 else "vllm-unload"
        start = self.now()
        try:
            if via == "vllm":
                r = await http.post(self.url + "/v1/load_lora_adapter",
                                    json={"lora_name": name, "lora_path": new})
            elif via == "admin":
                r = await http.post(self.url + "/admin/adapters", json={"name": name,
                                                                        "path": new})
            elif via == "upload":
                folder = self.root / new
                files = {f: (f, (folder / f).read_bytes(), "application/octet-stream")
                         for f in (CONFIG_FILE, WEIGHTS_FILE)}
                r = await http.put(f"{self.url}/admin/adapters/{name}", files=files)
            elif via == "delete":
                r = await http.delete(f"{self.url}/admin/adapters/{name}")
            else:
                r = await http.post(self.url + "/v1/unload_lora_adapter",
                                    json={"lora_name": name})
            status, message = r.status_code, r.text[:300]
        except httpx.HTTPError as exc:
            status, message = 0, f"{type(exc).__name__}: {exc}"
        end = self.now()
        key = f"{action}:{via}"
        if not 200 <= status < 300:
            # The state is unknown now: widen the current interval's candidates.
            self.report.churn_failures.append(f"t={start:.1f} {name} {key} -> {status} "
                                               f"{message}")
            entry.history[-1].end = end
            entry.history.append(Interval(current, start))
            entry.history.append(Interval(new, start))
            return
        self.report.churn[key] = self.report.churn.get(key, 0) + 1
        entry.history[-1].end = end
        entry.history.append(Interval(new, start))
        if via == "upload":
            entry.folder = True
        elif via == "delete":
            entry.folder = False

    # ------------------------------------------------------------------ checks

    async def quiesce(self, http: httpx.AsyncClient) -> None:
        """Pause the load, wait until idle, and check that nothing is held."""
        self.running.clear()
        try:
            deadline = time.monotonic() + self.args.request_timeout
            while self.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            held: dict[str, float] = {}
            rows: list[dict[str, Any]] = []
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                held = _metrics((await http.get(self.url + "/metrics",
                                                headers=self.metrics_headers)).text)
                rows = (await http.get(self.url + "/admin/adapters",
                                       headers=self.admin)).json()["data"]
                busy = {k: held.get(k, 0.0) for k in (
                    "vllm:num_requests_running", "vllm:num_requests_waiting",
                    "vllm:kv_cache_usage_perc", "loramux_adapter_references",
                    "loramux_http_requests_in_flight")}
                drained = [r for r in rows if not r["current"] or r["refcount"]]
                if not any(busy.values()) and not drained:
                    break
                await asyncio.sleep(0.2)
            else:
                self.report.leaks.append(f"t={self.now():.0f}s not idle: {busy}, "
                                         f"held versions {drained}")
            self.report.quiesce_checks += 1
            self.report.preemptions = held.get("loramux_num_preemptions_total", 0.0)
            self.report.adapter_loads = held.get("loramux_adapter_loads_total", 0.0)
        finally:
            self.running.set()

    async def monitor(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            next_quiesce = self.args.quiesce_every
            while self.now() < deadline:
                await asyncio.sleep(self.args.rss_every)
                if self.pid is not None:
                    rss = _rss_mb(self.pid)
                    if rss is not None:
                        self.report.rss_mb.append((round(self.now(), 1), round(rss, 1)))
                if self.now() >= next_quiesce and self.now() < deadline - 5:
                    next_quiesce += self.args.quiesce_every
                    await self.quiesce(http)

    async def run(self) -> Report:
        a = self.args
        async with httpx.AsyncClient(timeout=30) as http:
            models = (await http.get(self.url + "/v1/models")).json()["data"]
        self.refs_base_name = next(m["id"] for m in models if not m.get("parent"))
        self.metrics_headers = ({"Authorization": f"Bearer {a.metrics_token}"}
                                if a.metrics_token else {})
        self.t0 = time.monotonic()
        deadline = a.duration
        tasks = [self.client(k, deadline) for k in range(a.concurrency)]
        await asyncio.gather(*tasks, self.churn(deadline), self.monitor(deadline))
        async with httpx.AsyncClient(timeout=60) as http:
            await self.quiesce(http)
        if self.pid is not None:
            rss = _rss_mb(self.pid)
            if rss is not None:
                self.report.rss_mb.append((round(self.now(), 1), round(rss, 1)))
        return self.summarize()

    def summarize(self) -> Report:
        r = self.report
        r.duration_s = round(self.now(), 1)
        r.requests = len(self.records)
        r.outcomes = dict(Counter(rec.kind for rec in self.records))
        r.statuses = {str(k): v for k, v in Counter(rec.status for rec in self.records).items()}
        r.wrong_examples = [rec.detail for rec in self.records if rec.kind == "wrong"][:10]
        r.error_examples = [rec.detail for rec in self.records if rec.kind == "error"][:10]
        if r.rss_mb:
            values = [v for _, v in r.rss_mb]
            # The first samples include warm-up (allocator pools filling): measure growth
            # from the first sample after the first minute when the run is long enough.
            warm = [v for t, v in r.rss_mb if t >= min(60.0, r.duration_s / 4)] or values
            r.rss_start_mb, r.rss_end_mb, r.rss_max_mb = warm[0], values[-1], max(values)
            half = [(t, v) for t, v in r.rss_mb if t >= r.duration_s / 2]
            if len(half) >= 2:
                mt = sum(t for t, _ in half) / len(half)
                mv = sum(v for _, v in half) / len(half)
                var = sum((t - mt) ** 2 for t, _ in half)
                cov = sum((t - mt) * (v - mv) for t, v in half)
                r.rss_slope_mb_per_min_second_half = round(60.0 * cov / var, 3) if var else 0.0
        return r

    @property
    def static_variant(self) -> str:
        return self.variants[0]


# ============================================================================ server process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(args: argparse.Namespace, model_dir: Path, root: Path, static: str, variant: str,
          log_path: Path) -> Iterator[tuple[str, int]]:
    """`loramux serve` on a free loopback port; yields (url, pid); SIGTERM at the end."""
    port = _free_port()
    exe = shutil.which("loramux") or str(Path(sys.executable).with_name("loramux"))
    command = [exe, "serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--adapter-root", str(root), "--admin-token",
               args.admin_token, "--adapter", f"{static}={root / variant}",
               "--max-gpu-adapters", str(args.max_gpu_adapters),
               "--max-cpu-adapters", str(max(args.max_gpu_adapters, args.names + 2)),
               "--max-num-seqs", str(args.max_num_seqs), *args.serve_arg]
    env = {**os.environ, "LORAMUX_DEVICE": os.environ.get("LORAMUX_DEVICE", "cpu")}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"loramux serve exited: see {log_path}")
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(url + "/ready", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("loramux serve was not ready in 600 s")
                time.sleep(0.5)
            yield url, proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loramux.loadtest.soak",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    p.add_argument("--model", help="model directory (default: the embedded default model)")
    p.add_argument("--url", help="an already running server on loopback (else one is started)")
    p.add_argument("--adapter-root", help="with --url: the server's --adapter-root")
    p.add_argument("--admin-token", default="soak-admin-token")
    p.add_argument("--metrics-token", help="bearer token for /metrics, if the server gates it")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--names", type=int, default=4, help="churned adapter names")
    p.add_argument("--variants", type=int, default=6, help="adapter variants to churn through")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--churn-every", type=float, default=2.0)
    p.add_argument("--quiesce-every", type=float, default=60.0)
    p.add_argument("--rss-every", type=float, default=2.0)
    p.add_argument("--sampled", type=float, default=0.1, help="share of sampled requests")
    p.add_argument("--disconnect", type=float, default=0.1,
                   help="share of streams dropped after the first chunk")
    p.add_argument("--tie-eps", type=float, default=1e-3)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--max-gpu-adapters", type=int, default=3,
                   help="fewer slots than names, so adapters page in and out")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra argument for `loramux serve` (repeatable)")
    p.add_argument("--ref-threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads for computing the PEFT references (default: half "
                   "the CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="where adapters and the server log go (default: temp)")
    p.add_argument("--out", help="write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.url and not _loopback(args.url):
        print("soak: --url must be a loopback address", file=sys.stderr)
        return 2
    if args.url and not args.adapter_root:
        print("soak: --url needs --adapter-root (the variants are written there)",
              file=sys.stderr)
        return 2
    if args.model:
        model_dir = Path(args.model)
    else:
        from loramux.engine.default_model import ensure_default_model

        model_dir = Path(ensure_default_model())
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="loramux-soak-"))
    root = Path(args.adapter_root) if args.adapter_root else workdir / "adapters"
    root.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[soak] {message}", flush=True)

    variants = make_variants(model_dir, root, args.variants, seed=args.seed)
    import torch

    # On a small shared CPU, torch's default thread count oversubscribes it: a forward of the
    # 135M default model took 1.75 s with 2 threads and 0.16 s with 1 on a 2-core machine
    # under load. The references are computed before the server starts.
    torch.set_num_threads(args.ref_threads)
    refs = References(model_dir, root, variants, args.max_tokens, log=log)
    static = "soak-static"
    distinct = sum(len({refs.table[(v, p, "completions")].text for v in [BASE, *variants]})
                   for p in range(len(PROMPTS))) / len(PROMPTS)
    log(f"variants give {distinct:.1f} distinct greedy texts per prompt "
        f"(of {len(variants) + 1})")

    def run(url: str, pid: int | None) -> Report:
        log(f"load for {args.duration:.0f} s against {url} (server pid {pid})")
        soak = Soak(args, url, root, refs, variants, static, pid)
        report = asyncio.run(soak.run())
        report.server = {"url": url, "pid": pid, "model": str(model_dir),
                         "distinct_texts_per_prompt": distinct}
        return report

    if args.url:
        report = run(args.url.rstrip("/"), None)
    else:
        with serve(args, model_dir, root, static, variants[0], workdir / "serve.log") as (
                url, pid):
            report = run(url, pid)
    payload = {**asdict(report), "passed": report.passed, "args": vars(args)}
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=1))
    summary = {k: payload[k] for k in (
        "duration_s", "requests", "outcomes", "statuses", "checked_greedy", "churn",
        "quiesce_checks", "leaks", "rss_start_mb", "rss_end_mb", "rss_max_mb",
        "rss_slope_mb_per_min_second_half", "preemptions", "adapter_loads", "passed")}
    print(json.dumps(summary, indent=1))
    for line in report.wrong_examples + report.error_examples + report.churn_failures[:10]:
        print("  ", line)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
