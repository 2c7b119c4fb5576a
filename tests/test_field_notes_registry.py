"""Registry traps from shared/FIELD-NOTES.md, each through the real registry and engine:

- prefetch on enqueue: a request queued behind a full batch starts its adapter's page-in when
  it is added, not when it is finally scheduled (SGLang PR #13349, #15129);
- one contiguous buffer and one copy per page-in: the host copy of an adapter is one 1-D
  contiguous tensor, and a page-in writes the device pool once, from that buffer, onto the
  adapter's whole region (LoRAX #433, vLLM #31317);
- readiness waits for pinned adapters: while a pinned adapter (from the pin list or from the
  desired set) still pages in, the registry and the server's /ready say not ready (llm-d #330).

Slow work is held with gates (threading.Event) wrapped around the real functions, so every
test synchronises on events, never on timing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from adapter_factory import base_spec
from engine_helpers import make_adapters, prompts, tiny_config, tiny_model
from reliability_world import ADMIN, World, build_world, wait_for
from server_harness import LiveServer
from torch.overrides import TorchFunctionMode

from loramux.adapters.config import RegistryConfig
from loramux.adapters.registry import AdapterRegistry
from loramux.adapters.pool import DevicePool, Resident
from loramux.engine.config import EngineConfig
from loramux.engine.engine import LLMEngine
from loramux.engine.sampling_params import SamplingParams
from loramux.server.app import create_app
from loramux.server.config import ServerConfig
from loramux.server.local_engine import LocalEngineClient

CFG = tiny_config()
SPEC = base_spec(CFG)
# Ranks 4 to 16, attention-only, MLP-only, all projections, one layer only.
NAMES = ["r4-attn", "r8-mlp", "r16-all", "r8-rslora", "r8-layer1-only"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("field-notes"), CFG, NAMES)


def registry(slots: int = 2, host: int = 4, **overrides: Any) -> AdapterRegistry:
    """A CPU float32 registry with room for `slots` adapters of rank 16 on the device."""
    config = RegistryConfig(max_gpu_adapters=slots, max_cpu_adapters=host, max_lora_rank=16,
                            **overrides)
    return AdapterRegistry(config, SPEC, "cpu", torch.float32)


# ============================================================================ prefetch on enqueue


def test_request_queued_behind_a_full_batch_pages_its_adapter_in_at_once(
        paths: dict[str, Path]) -> None:
    """max_num_seqs=1 and a long base request running: a request for a host-tier adapter
    cannot be scheduled, yet its adapter reaches the device while the blocker still runs, so
    it starts without waiting once the blocker goes."""
    greedy = SamplingParams(max_tokens=200, temperature=0.0)
    with registry() as reg:
        ref = reg.load("cold", paths["r16-all"], trusted=True).ref
        assert reg.get("cold").tier == "host"
        engine = LLMEngine(tiny_model(CFG), EngineConfig(max_num_seqs=1, kv_cache_tokens=512,
                                                         block_size=4), adapters=reg)
        blocker, queued = prompts(2, seed=3)
        engine.add_request("blocker", blocker, greedy, None)
        engine.step()
        engine.add_request("queued", queued, SamplingParams(max_tokens=3, temperature=0.0),
                           "cold")
        for _ in range(3):
            engine.step()
        # Those steps could not admit it (max_num_seqs=1) and no step runs from here on: only
        # the enqueue can have asked for the page-in.
        wait_for(lambda: reg.get("cold").tier == "device", timeout=10,
                 what="the queued request's adapter on the device")
        assert [s.request_id for s in engine.scheduler.running] == ["blocker"]
        assert [s.request_id for s in engine.scheduler.waiting] == ["queued"]
        assert reg.stats.page_ins == 1 and reg.waiting() == []
        engine.abort("blocker")
        outputs = engine.step()
        assert [(o.request_id, len(o.token_ids)) for o in outputs] == [("queued", 1)]
        assert engine.scheduler.stats.adapter_waits == 0  # never skipped for a page-in
        while engine.has_unfinished():
            engine.step()
        assert reg.get("cold").refcount == 0 and ref in reg.resident()


# ============================================================================ one copy per page-in


class PoolCopies(TorchFunctionMode):
    """Records every `copy_` whose destination lies in `pool`'s storage (this thread only)."""

    def __init__(self, pool: torch.Tensor) -> None:
        super().__init__()
        self.storage = pool.untyped_storage().data_ptr()
        self.element = pool.element_size()
        # (destination element offset, destination numel, source data_ptr, source numel)
        self.copies: list[tuple[int, int, int, int]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1]
            if dst.untyped_storage().data_ptr() == self.storage:
                self.copies.append((dst.storage_offset(), dst.numel(), src.data_ptr(),
                                    src.numel()))
        return func(*args, **(kwargs or {}))


@dataclass
class Write:
    """One call of the device pool's write, as the spy saw it."""

    resident: Resident
    buffer: torch.Tensor  # the host copy handed to the write
    copies: list[tuple[int, int, int, int]]


def test_each_page_in_is_one_copy_of_one_contiguous_host_buffer(
        paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten page-ins over two slots (host room for two, so some come from disk re-reads): the
    pool is written once per counted page-in, by exactly one copy from the adapter's 1-D
    contiguous host buffer onto its whole region."""
    with registry(slots=2, host=2) as reg:
        refs = [reg.load(name, paths[name], trusted=True).ref for name in NAMES]
        sizes = {ref: reg.get(ref.name).size_bytes for ref in refs}
        writes: list[Write] = []
        real_write = reg._pool.write

        def spy(resident: Resident, host: Any, *args: Any, **kwargs: Any) -> None:
            with PoolCopies(reg.tables.pool) as seen:
                real_write(resident, host, *args, **kwargs)
            writes.append(Write(resident=resident, buffer=host.buffer, copies=seen.copies))

        monkeypatch.setattr(reg._pool, "write", spy)
        for i in (0, 1, 2, 3, 4, 0, 2, 4, 1, 3):  # every acquire misses both slots
            reg.acquire_wait(refs[i])
            reg.release(refs[i])
        assert reg.stats.page_ins == len(writes) == 10
        assert reg.stats.device_evictions == 8 and reg.stats.disk_reads > 0
        for write in writes:
            resident, buffer = write.resident, write.buffer
            assert buffer.dim() == 1 and buffer.is_contiguous(), buffer.shape
            assert buffer.dtype == torch.float32 and buffer.numel() == resident.numel
            assert buffer.numel() * buffer.element_size() == sizes[resident.key]
            pool_start = reg.tables.pool.storage_offset() + resident.offset
            assert write.copies == [(pool_start, resident.numel, buffer.data_ptr(),
                                     buffer.numel())], resident.key


# ============================================================================ readiness


def _gate_page_in(monkeypatch: pytest.MonkeyPatch, target: Any, name: str
                  ) -> tuple[threading.Event, threading.Event]:
    """Hold `target`'s DevicePool.write (an instance, or the class) for adapter `name` until
    the returned gate is set; `entered` is set when that page-in reaches the write."""
    gate, entered = threading.Event(), threading.Event()
    real_write = target.write

    def gated(*args: Any, **kwargs: Any) -> None:
        resident = next(a for a in args if isinstance(a, Resident))
        if resident.key.name == name:
            entered.set()
            gate.wait(60)
        real_write(*args, **kwargs)

    monkeypatch.setattr(target, "write", gated)
    return gate, entered


@pytest.mark.parametrize("source", ["pin-list", "desired-set"])
def test_registry_is_not_ready_while_a_pinned_adapter_pages_in(
        source: str, paths: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if source == "pin-list":
        settings: dict[str, Any] = {
            "adapters": (("pinned", paths["r8-mlp"]), ("loose", paths["r4-attn"])),
            "pinned": ("pinned",)}
    else:
        desired = tmp_path / "desired.yaml"
        desired.write_text("adapters:\n"
                           f"  - {{name: pinned, path: {paths['r8-mlp']}, pinned: true}}\n"
                           f"  - {{name: loose, path: {paths['r4-attn']}}}\n")
        settings = {"desired_set": desired}
    with registry(slots=3, **settings) as reg:
        gate, entered = _gate_page_in(monkeypatch, reg._pool, "pinned")
        try:
            assert reg.start() == []
            assert entered.wait(10), "the pinned adapter's page-in did not start"
            assert reg.get("pinned").pinned and reg.get("pinned").tier == "paging"
            assert not reg.ready()
            assert not reg.get("loose").pinned  # an unpinned adapter is not waited for
        finally:
            gate.set()
        assert reg.wait_ready(10) and reg.ready()
        assert reg.get("pinned").tier == "device"


class StartProbe(LocalEngineClient):
    """The real client; `started` is set once the model is loaded and warmed up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()

    async def start(self) -> None:
        await super().start()
        self.started.set()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("ready"))


def test_server_ready_waits_for_a_pinned_adapter(world: World,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine is up (model loaded, warmed up) but the pinned adapter's page-in is held:
    /ready is 503 not_ready while /health answers; /ready turns 200 once the copy is done."""
    gate, entered = _gate_page_in(monkeypatch, DevicePool, "acme-one")
    config = ServerConfig(engine=world.engine_config(registry={"pinned": ("acme-one",)}),
                          api_keys=world.keys_file, admin_token=ADMIN)
    client = StartProbe(config.engine)
    with LiveServer(create_app(config, client), wait_ready=False) as live:
        try:
            assert entered.wait(60), "the pinned adapter's page-in did not start"
            assert client.started.wait(60), "the engine did not start"
            response = httpx.get(live.url + "/ready", timeout=10)
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "not_ready"
            assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        finally:
            gate.set()  # before the server stops: closing the registry waits for the copy
        wait_for(lambda: httpx.get(live.url + "/ready", timeout=10).status_code == 200,
                 what="/ready after the pinned adapter's page-in")
        assert client.registry.get("acme-one").tier == "device"
