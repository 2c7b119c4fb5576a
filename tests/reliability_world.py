"""Shared set-up of the real-server tests (tests/test_reliability_*.py, test_server_e2e.py): a
tiny random Llama with a character tokenizer, real PEFT adapters under an adapter root, a
tenants file, a real loramux server on a loopback port, PEFT's greedy outputs as the
reference, and /metrics scraping.

Each test module builds one `World` (milliseconds: the model is tiny) and starts the servers
it needs through `World.serve`, each with its own engine configuration (tiny KV budget,
short queue, ...). PEFT reference models are built lazily and cached per adapter.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from adapter_factory import CONFIG_FILE, WEIGHTS_FILE, load_peft_model, make_adapter
from prometheus_client.parser import text_string_to_metric_families
from server_harness import LiveServer
from server_model import greedy_reference, make_model_dir

from loramux.adapters.config import RegistryConfig
from loramux.engine.config import EngineConfig
from loramux.server.app import create_app
from loramux.server.config import ServerConfig
from loramux.server.local_engine import LocalEngineClient
from loramux.server.tenants import hash_key

BASE = "tiny-llama"
ADMIN = "reliability-admin-token"
METRICS_TOKEN = "reliability-metrics-token"
KEYS = {"acme": "sk-rel-acme", "beta": "sk-rel-beta", "gamma": "sk-rel-gamma",
        "flood": "sk-rel-flood"}

# name -> make_adapter arguments; every adapter differs in targets, rank and seed.
ADAPTERS: dict[str, dict[str, Any]] = {
    "acme-one": {"rank": 4, "target_modules": ("q_proj", "v_proj"), "seed": 11},
    "acme-two": {"rank": 8, "target_modules": ("o_proj", "down_proj"), "seed": 12,
                 "use_rslora": True},
    "beta-one": {"rank": 2, "target_modules": ("k_proj", "up_proj"), "seed": 13},
    "beta-two": {"rank": 6, "target_modules": ("gate_proj", "v_proj"), "seed": 14},
    "gamma-one": {"rank": 4, "target_modules": ("q_proj", "o_proj"), "seed": 15},
    "shared-sum": {"rank": 4, "target_modules": ("v_proj", "down_proj"), "seed": 16},
    # folders for reloads under another name (variants of one adapter)
    "var-a": {"rank": 4, "target_modules": ("q_proj", "down_proj"), "seed": 21},
    "var-b": {"rank": 6, "target_modules": ("k_proj", "o_proj"), "seed": 22},
}
PRELOADED = ("acme-one", "acme-two", "beta-one", "beta-two", "gamma-one", "shared-sum")
TENANTS: dict[str, dict[str, Any]] = {
    "acme": {"adapters": ["acme-*", BASE]},
    "beta": {"adapters": ["beta-*"]},
    "gamma": {"adapters": ["gamma-*", "shared-sum"]},
    "flood": {"adapters": ["*"], "max_concurrent": 2},
}


@dataclass
class World:
    """The model folder, adapter root, tenants file, and PEFT references (built lazily)."""

    model_dir: Path
    root: Path
    keys_file: Path
    hf_config: Any
    tokenizer: Any
    preloaded: tuple[str, ...] = PRELOADED  # --adapter entries of every server
    _base: Any = None
    _peft: dict[str, Any] = field(default_factory=dict)
    _expected: dict[tuple[str | None, tuple[int, ...], int], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ servers

    def engine_config(self, *, registry: dict[str, Any] | None = None,
                      **engine: Any) -> EngineConfig:
        settings: dict[str, Any] = {
            "adapter_root": self.root, "max_lora_rank": 16, "max_gpu_adapters": 4,
            "max_cpu_adapters": 8,
            "adapters": tuple((n, self.root / n) for n in self.preloaded),
        }
        settings.update(registry or {})
        values: dict[str, Any] = {"model": str(self.model_dir), "device": "cpu",
                                  "dtype": "float32", "kv_cache_tokens": 8192,
                                  "max_num_seqs": 16}
        values.update(engine)
        return EngineConfig(registry=RegistryConfig(**settings), **values)

    @contextmanager
    def serve(self, *, registry: dict[str, Any] | None = None,
              engine: dict[str, Any] | None = None, **server: Any) -> Iterator[LiveServer]:
        """A live server over the real engine; `server` overrides ServerConfig fields."""
        values: dict[str, Any] = {"api_keys": self.keys_file, "admin_token": ADMIN}
        values.update(server)
        config = ServerConfig(engine=self.engine_config(registry=registry, **(engine or {})),
                              **values)
        app = create_app(config, LocalEngineClient(config.engine))
        with LiveServer(app) as live:
            yield live

    # ------------------------------------------------------------------ references

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def reference_model(self, adapter: str | None) -> Any:
        with self._lock:
            if self._base is None:
                from transformers import AutoModelForCausalLM

                self._base = AutoModelForCausalLM.from_pretrained(str(self.model_dir)).eval()
            if adapter is None:
                return self._base
            if adapter not in self._peft:
                self._peft[adapter] = load_peft_model(self._base, self.root / adapter)
            return self._peft[adapter]

    def expected(self, adapter: str | None, prompt: str | list[int], max_tokens: int) -> str:
        """PEFT's greedy text (the server is asked with ignore_eos); `adapter` is the folder
        under the root whose weights the name should serve, None for the base."""
        ids = self.ids(prompt) if isinstance(prompt, str) else list(prompt)
        key = (adapter, tuple(ids), max_tokens)
        if key not in self._expected:
            out = greedy_reference(self.reference_model(adapter), ids, max_tokens)
            self._expected[key] = str(self.tokenizer.decode(out, skip_special_tokens=True))
        return self._expected[key]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt the server makes of `messages` (the chat template, then encode)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def build_world(base: Path, *, max_positions: int = 512) -> World:
    model_dir, hf_config, tokenizer = make_model_dir(base / BASE, max_positions=max_positions)
    root = base / "adapters"
    for name, kwargs in ADAPTERS.items():
        # b_std large enough that every adapter changes the greedy text of the tiny model.
        make_adapter(root / name, hf_config, b_std=0.2, **kwargs)
    keys = base / "keys.yaml"
    tenants = {name: {"keys_sha256": [hash_key(KEYS[name])], **spec}
               for name, spec in TENANTS.items()}
    keys.write_text(json.dumps({"tenants": tenants}))
    return World(model_dir=model_dir, root=root, keys_file=keys, hf_config=hf_config,
                 tokenizer=tokenizer)


def upload_files(folder: Path) -> dict[str, tuple[str, bytes, str]]:
    """The two PEFT files of `folder` as an admin upload's multipart `files`."""
    return {f: (f, (folder / f).read_bytes(), "application/octet-stream")
            for f in (CONFIG_FILE, WEIGHTS_FILE)}


def poison(tensors: dict[str, torch.Tensor], kind: str, number: float) -> None:
    """Set one value of the first `kind` ("lora_A" or "lora_B") tensor (for rewrite_tensors)."""
    tensors[next(k for k in sorted(tensors) if kind in k)][0, 0] = number


# ============================================================================ HTTP helpers


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
GREEDY: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}


def completion(url: str, tenant: str, model: str, prompt: str | list[int], max_tokens: int,
               timeout: float = 120.0, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **GREEDY, **extra}
    return httpx.post(url + "/v1/completions", json=body, headers=auth(tenant),
                      timeout=timeout)


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI error body with exactly its four fields, and the given status."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any] | str]:
    """The data payloads of an SSE stream: dicts, then the string "[DONE]"."""
    for line in lines:
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield data if data == "[DONE]" else json.loads(data)


# ============================================================================ metrics


Families = dict[str, list[tuple[str, dict[str, str], float]]]


def scrape(url: str, headers: dict[str, str] | None = None) -> Families:
    response = httpx.get(url + "/metrics", headers=headers or {}, timeout=30)
    response.raise_for_status()
    out: Families = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(family.name, []).append((sample.name, sample.labels, sample.value))
    return out


def value(fams: Families, name: str, sample: str | None = None) -> float:
    rows = [s for s in fams[name] if sample is None or s[0] == sample]
    assert len(rows) == 1, rows
    return float(rows[0][2])


def idle(fams: Families) -> bool:
    """Nothing running or waiting, no KV block and no adapter reference held."""
    return (value(fams, "vllm:num_requests_running") == 0
            and value(fams, "vllm:num_requests_waiting") == 0
            and value(fams, "vllm:kv_cache_usage_perc") == 0
            and value(fams, "loramux_adapter_references") == 0
            and value(fams, "loramux_http_requests_in_flight") == 0)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
             ) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)


# ============================================================================ streams


class Stream:
    """One streamed greedy request read in a background thread, collecting its text;
    `disconnect()` drops the connection mid-stream, `result()` waits for a normal end."""

    def __init__(self, url: str, tenant: str, model: str, prompt: str, max_tokens: int, *,
                 chat: bool = False, **extra: Any) -> None:
        if chat:
            path = "/v1/chat/completions"
            body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
        else:
            path, body = "/v1/completions", {"prompt": prompt}
        self.model, self.prompt, self.max_tokens, self.chat = model, prompt, max_tokens, chat
        self.body = {"model": model, "max_tokens": max_tokens, "stream": True, **GREEDY,
                     **body, **extra}
        self.url, self.path, self.headers = url, path, auth(tenant)
        self.status = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.done = False  # "[DONE]" arrived
        self.failure: Any = None  # an error event, a non-200 body, or an exception
        self.started = threading.Event()  # set at the first text (or on failure)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", self.url + self.path, json=self.body,
                              headers=self.headers, timeout=120) as response:
                self.status = response.status_code
                if self.status != 200:
                    self.failure = response.read().decode()
                    return
                for event in sse_events(response.iter_lines()):
                    if self._stop.is_set():
                        return  # leaving the block closes the connection: a disconnect
                    if event == "[DONE]":
                        self.done = True
                        return
                    assert isinstance(event, dict)
                    if "error" in event:
                        self.failure = event
                        return
                    for choice in event["choices"]:
                        self.text += choice.get("text") or (choice.get("delta") or {}).get(
                            "content") or ""
                        self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    if self.text:
                        self.started.set()
        except Exception as exc:  # noqa: BLE001 - reported by result()
            self.failure = exc
        finally:
            self.started.set()

    def wait_started(self, timeout: float = 60.0) -> Stream:
        assert self.started.wait(timeout), "the stream did not start"
        assert self.failure is None, self.failure
        return self

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def disconnect(self) -> None:
        self._stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()

    def result(self, timeout: float = 120.0) -> str:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not end"
        assert self.failure is None and self.status == 200, (self.status, self.failure)
        assert self.done and self.finish_reason == "length", (self.done, self.finish_reason)
        return self.text

    def expected_from(self, world: World, adapter: str | None) -> str:
        """PEFT's text for this stream's prompt under `adapter` (a folder under the root)."""
        ids = (world.chat_ids([{"role": "user", "content": self.prompt}]) if self.chat
               else world.ids(self.prompt))
        return world.expected(adapter, ids, self.max_tokens)
