"""The registry: tables equal to PEFT, tiers and LRU, references, pins, versions, drain,
serialised loads, lazy names, the desired set, fairness, and a numeric check through the
kernels' reference."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_factory import (
    WEIGHTS_FILE,
    base_spec,
    copy_adapter,
    edit_config,
    load_peft_model,
    make_adapter,
    peft_scaling,
    peft_weights,
    read_tensors,
    tiny_base,
    tiny_llama_config,
)

import loramux.adapters.registry as registry_module
from loramux.adapters.config import RegistryConfig
from loramux.adapters.peft import AdapterRefused, Rule
from loramux.adapters.registry import AdapterRegistry
from loramux.adapters.types import AdapterError, AdapterNotFound, AdapterRef
from loramux.adapters.host_cache import full_rank_numel
from loramux.adapters.pool import RegionAllocator
from loramux.adapters.types import MODULE_PARENTS, MODULES

CFG = tiny_llama_config(layers=3)
SPEC = base_spec(CFG)
MAX_RANK = 8
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class FakeClock:
    """The registry's monotonic clock, advanced by hand (fairness and want ageing)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def registry(slots: int = 8, *, host: int = 64, root: Path | None = None,
             clock: Any = time.monotonic, pool_adapters: int | None = None,
             **overrides: Any) -> AdapterRegistry:
    """A registry whose device pool holds `pool_adapters` (default `slots`) full-rank adapters."""
    element = 4  # float32
    pool = full_rank_numel(SPEC, MAX_RANK) * (pool_adapters or slots) * element
    config = RegistryConfig(max_gpu_adapters=slots, max_cpu_adapters=host,
                            max_lora_rank=MAX_RANK, gpu_pool_bytes=pool, adapter_root=root,
                            **overrides)
    return AdapterRegistry(config, SPEC, "cpu", torch.float32, clock=clock)


def check_slot(reg: AdapterRegistry, slot: int, path: Path) -> None:
    """The slot's table columns and pool blocks hold exactly the adapter file at `path`."""
    tensors = {k.removeprefix("base_model.model."): v for k, v in read_tensors(path).items()}
    t = reg.tables
    for layer in range(SPEC.num_layers):
        for m, module in enumerate(MODULES):
            prefix = f"model.layers.{layer}.{MODULE_PARENTS[module]}.{module}"
            rank = int(t.ranks[layer, m, slot])
            if f"{prefix}.lora_A.weight" not in tensors:
                assert rank == 0, (path, layer, module)
                continue
            a, b = tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"]
            assert rank == a.shape[0], (path, layer, module)
            n_in, n_out = SPEC.shapes[module]
            ao, bo = int(t.a_offsets[layer, m, slot]), int(t.b_offsets[layer, m, slot])
            assert torch.equal(t.pool[ao:ao + rank * n_in].view(rank, n_in), a), (path, prefix)
            assert torch.equal(t.pool[bo:bo + n_out * rank].view(n_out, rank), b), (path, prefix)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """40 distinct adapters: ranks 1..8, assorted module subsets."""
    root = tmp_path_factory.mktemp("many")
    subsets = [MODULES, ("q_proj", "v_proj"), MLP, ATTN, ("down_proj",), ("q_proj", "up_proj")]
    return [make_adapter(root / f"a{i:02d}", CFG, rank=1 + i % MAX_RANK, alpha=2 + i,
                         target_modules=subsets[i % len(subsets)], seed=100 + i)
            for i in range(40)]


@pytest.fixture(scope="module")
def base_model() -> Any:
    return tiny_base(CFG)


# ----------------------------------------------------------------------------- tables vs PEFT


def test_tables_equal_peft_weights(many: list[Path], base_model: Any) -> None:
    with registry(4) as reg:
        for i, path in enumerate(many[:4]):
            ref = reg.load(f"a{i}", path, trusted=True).ref
            slot = reg.acquire_wait(ref)
            peft_model = load_peft_model(base_model, path)
            t = reg.tables
            for layer in range(SPEC.num_layers):
                for m, module in enumerate(MODULES):
                    rank = int(t.ranks[layer, m, slot])
                    try:
                        a, b = peft_weights(peft_model, layer, module)
                    except AttributeError:  # PEFT did not wrap it: the slot must skip it too
                        assert rank == 0
                        continue
                    n_in, n_out = SPEC.shapes[module]
                    ao, bo = int(t.a_offsets[layer, m, slot]), int(t.b_offsets[layer, m, slot])
                    assert torch.equal(t.pool[ao:ao + rank * n_in].view(rank, n_in), a)
                    assert torch.equal(t.pool[bo:bo + n_out * rank].view(n_out, rank), b)
                    assert float(t.scales[layer, m, slot]) == pytest.approx(
                        peft_scaling(peft_model, layer, module), rel=1e-6)


SCALING_CASES: dict[str, dict[str, Any]] = {
    "alpha_over_r": {"rank": 8, "alpha": 16},
    "rslora": {"rank": 8, "alpha": 16, "use_rslora": True},
    "patterns": {"rank": 8, "alpha": 16,
                 "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 4},
                 "alpha_pattern": {"down_proj": 3, r"layers\.2\.self_attn\.q_proj": 7}},
    "rslora_patterns": {"rank": 6, "alpha": 5, "use_rslora": True,
                        "rank_pattern": {"v_proj": 3}, "alpha_pattern": {"mlp.up_proj": 11}},
    # A pattern key matches a dot-separated suffix only: "proj" must not match "q_proj".
    "pattern_suffix": {"rank": 4, "alpha": 8, "rank_pattern": {"proj": 2, "o_proj": 3},
                       "alpha_pattern": {"j": 100, "up_proj": 5}},
}


@pytest.mark.parametrize("case", sorted(SCALING_CASES))
def test_scaling_matches_peft(case: str, tmp_path: Path, base_model: Any) -> None:
    path = make_adapter(tmp_path / case, CFG, seed=7, **SCALING_CASES[case])
    peft_model = load_peft_model(base_model, path)
    with registry(2) as reg:
        result = reg.load(case, path, trusted=True)
        slot = reg.acquire_wait(result.ref)
        assert len(result.applied) == SPEC.num_layers * len(MODULES)
        for layer, module in result.applied:
            m = MODULES.index(module)
            a, _ = peft_weights(peft_model, layer, module)
            assert int(reg.tables.ranks[layer, m, slot]) == a.shape[0]
            assert float(reg.tables.scales[layer, m, slot]) == pytest.approx(
                peft_scaling(peft_model, layer, module), rel=1e-6)
        check_slot(reg, slot, path)


def test_overlapping_patterns_follow_the_saved_file_like_peft(tmp_path: Path) -> None:
    """PEFT picks the first matching pattern key in dict order, but adapter_config.json is saved
    with sorted keys: an adapter trained with {"self_attn.o_proj": 1, "o_proj": 3} reloads with
    o_proj at rank 3, and PeftModel.from_pretrained fails on the shapes. So does loramux."""
    path = make_adapter(tmp_path / "overlap", CFG, rank=4, alpha=8,
                        rank_pattern={"self_attn.o_proj": 1, "o_proj": 3})
    with registry(2) as reg:
        with pytest.raises(AdapterRefused) as info:
            reg.load("overlap", path, trusted=True)
        assert info.value.rule == Rule.RANK and "o_proj" in str(info.value)


def test_kernel_reference_end_to_end(many: list[Path], base_model: Any) -> None:
    """A mixed batch (three adapters and rows without one) through loramux.kernels reads the
    registry's tables and gives PEFT's LoRA delta for every projection."""
    try:
        from loramux.kernels.ops import sgmv_expand, sgmv_shrink
    except ImportError:
        try:
            from loramux.kernels.reference import sgmv_expand_ref as sgmv_expand
            from loramux.kernels.reference import sgmv_shrink_ref as sgmv_shrink
        except ImportError:
            pytest.skip("loramux.kernels is not importable yet")
    paths = [many[0], many[1], many[2]]  # all modules r1; q,v r2; mlp r3
    with registry(4) as reg:
        refs = [reg.load(f"k{i}", p, trusted=True).ref for i, p in enumerate(paths)]
        slots = [reg.acquire_wait(ref) for ref in refs]
        peft_models = [load_peft_model(base_model, p) for p in paths]
        seg_slots = torch.tensor([slots[1], -1, slots[0], slots[2]], dtype=torch.int32)
        seg_starts = torch.tensor([0, 3, 5, 9, 12], dtype=torch.int32)
        owner = [1, 1, 1, None, None, 0, 0, 0, 0, 2, 2, 2]  # which adapter each row uses
        t = reg.tables
        gen = torch.Generator().manual_seed(0)
        for layer in range(SPEC.num_layers):
            for m, module in enumerate(MODULES):
                n_in, n_out = SPEC.shapes[module]
                x = torch.randn(len(owner), n_in, generator=gen)
                v = torch.full((len(owner), t.max_rank), float("nan"))
                out = torch.zeros(len(owner), n_out)
                sgmv_shrink(x, t.pool, t.a_offsets[layer, m], t.ranks[layer, m], seg_starts,
                            seg_slots, v)
                sgmv_expand(v, t.pool, t.b_offsets[layer, m], t.ranks[layer, m],
                            t.scales[layer, m], seg_starts, seg_slots, out)
                for row, who in enumerate(owner):
                    expected = torch.zeros(n_out)  # no adapter, or PEFT left it unwrapped
                    target = None if who is None else _peft_module(peft_models[who], layer,
                                                                   module)
                    if target is not None and hasattr(target, "base_layer"):
                        with torch.no_grad():  # PEFT's own forward minus the base: its delta
                            row_x = x[row:row + 1]
                            expected = (target(row_x) - target.base_layer(row_x))[0]
                    torch.testing.assert_close(out[row], expected, rtol=1e-4, atol=1e-5)


def _peft_module(peft_model: Any, layer: int, module: str) -> Any:
    decoder = peft_model.base_model.model.model.layers[layer]
    return getattr(getattr(decoder, MODULE_PARENTS[module]), module)


# ----------------------------------------------------------------------------- tiers and LRU


def test_forty_adapters_over_eight_slots(many: list[Path]) -> None:
    """Acquire/release cycles over 40 adapters with room for 8: every acquired slot holds the
    right adapter, held and pinned slots are never touched, loads and evictions counted."""
    rng = random.Random(0)
    with registry(8, host=12) as reg:
        refs = [reg.load(f"a{i:02d}", p, trusted=True).ref for i, p in enumerate(many)]
        assert reg.stats.loads == 40
        pinned = reg.pin("a00")
        pinned_slot = reg.acquire_wait(pinned)
        reg.release(pinned)
        held: list[tuple[AdapterRef, int, Path]] = []
        for step in range(300):
            i = min(int(rng.paretovariate(0.8)) - 1, 39)  # skewed: a few hot, a long tail
            slot = reg.acquire_wait(refs[i])
            check_slot(reg, slot, many[i])
            held.append((refs[i], slot, many[i]))
            while len(held) > 5 or (held and rng.random() < 0.4):
                ref, _, _ = held.pop(rng.randrange(len(held)))
                reg.release(ref)
            if step % 25 == 0:
                for ref, held_slot, path in held:  # never evicted while referenced
                    check_slot(reg, held_slot, path)
                check_slot(reg, pinned_slot, many[0])
                assert len(reg.resident()) <= 8
        for ref, _, _ in held:
            reg.release(ref)
        assert reg.stats.device_evictions > 0 and reg.stats.page_ins > 8
        assert reg.stats.host_evictions > 0 and reg.stats.disk_reads > 0
        assert reg.get("a00").tier == "device" and reg.get("a00").slot == pinned_slot
        assert all(row.refcount == 0 for row in reg.list())
        check_slot(reg, pinned_slot, many[0])


def test_memory_is_proportional_to_rank(many: list[Path]) -> None:
    with registry(4) as reg:
        sizes = {}
        for path in (many[0], many[6]):  # every module at rank 1 and at rank 7
            result = reg.load(path.name, path, trusted=True)
            before = reg.memory()["device_used_bytes"]
            slot = reg.acquire_wait(result.ref)
            assert slot is not None
            sizes[path.name] = reg.memory()["device_used_bytes"] - before
            assert sizes[path.name] == result.size_bytes
        assert 5 < sizes[many[6].name] / sizes[many[0].name] <= 7


def test_region_allocator_first_fit_and_coalescing() -> None:
    alloc = RegionAllocator(100)
    a, b, c = alloc.alloc(30), alloc.alloc(30), alloc.alloc(30)
    assert (a, b, c) == (0, 30, 60) and alloc.alloc(20) is None
    alloc.free(0, 30)
    alloc.free(60, 30)
    assert alloc.largest_free == 40 and alloc.alloc(35) == 60  # first range that fits
    assert alloc.fits_after_freeing(60, [(30, 30)])
    alloc.free(30, 30)
    assert alloc.largest_free == 60 and alloc.free_elements == 65
    alloc.free(60, 35)
    assert alloc.largest_free == 100  # fully coalesced
    with pytest.raises(ValueError):
        alloc.free(10, 5)  # double free


def test_pinned_adapter_is_never_evicted(many: list[Path]) -> None:
    with registry(2, host=4) as reg:
        pinned = reg.load("pinned", many[0], pinned=True, trusted=True).ref
        assert reg.wait_ready(10)
        slot = reg.get("pinned").slot
        for i in range(1, 6):
            ref = reg.load(f"o{i}", many[i], trusted=True).ref
            other = reg.acquire_wait(ref)
            assert other != slot
            reg.release(ref)
        assert reg.get("pinned").tier == "device" and reg.get("pinned").slot == slot
        check_slot(reg, slot, many[0])
        assert reg.acquire(pinned) == slot
        reg.release(pinned)
        with pytest.raises(AdapterRefused, match="pin limit"):
            reg.pin("o1")  # the last slot stays for unpinned adapters
        reg.unpin("pinned")
        reg.pin("o1")
        assert reg.wait_ready(10)


def test_prefetch_and_acquire_do_not_wait_for_the_copy(many: list[Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with registry(2) as reg:
        ref = reg.load("slow", many[3], trusted=True).ref
        gate, entered = threading.Event(), threading.Event()
        real_write = reg._pool.write

        def slow_write(*args: Any, **kwargs: Any) -> None:
            entered.set()
            gate.wait(10)
            real_write(*args, **kwargs)

        monkeypatch.setattr(reg._pool, "write", slow_write)
        reg.prefetch(ref)  # returns although the copy cannot finish
        assert entered.wait(5)
        assert reg.acquire(ref) is None
        assert reg.get("slow").tier == "paging" and reg.waiting() == [ref]
        gate.set()
        slot = reg.acquire_wait(ref)
        check_slot(reg, slot, many[3])
        assert reg.waiting() == [] and reg.resident() == [ref]
        assert reg.stats.page_ins == 1 and len(reg.stats.page_in_seconds) == 1
        reg.release(ref)


@pytest.mark.parametrize("change", ["weights", "config"])
def test_host_tier_rereads_from_disk_and_checks_the_digest(many: list[Path], tmp_path: Path,
                                                           change: str) -> None:
    paths = [copy_adapter(p, tmp_path / p.name) for p in many[:5]]
    with registry(2, host=2) as reg:
        refs = [reg.load(f"h{i}", p, trusted=True).ref for i, p in enumerate(paths)]
        assert reg.memory()["host_entries"] == 2  # the host tier holds 2; the rest on disk
        assert {row.tier for row in reg.list()} == {"host", "disk"}
        for _ in range(2):
            for ref, path in zip(refs, paths):
                slot = reg.acquire_wait(ref)
                check_slot(reg, slot, path)
                reg.release(ref)
        assert reg.stats.disk_reads >= 3 and reg.stats.host_evictions > 0
        # h0 is now on disk only; its weights, or its config (the scaling lives there), change
        # under it: version 1 must not serve them.
        assert reg.get("h0").tier == "disk"
        if change == "weights":
            make_adapter(paths[0], CFG, rank=2, target_modules=("q_proj",), seed=999)
        else:
            edit_config(paths[0], lora_alpha=64)
        deadline = time.monotonic() + 10
        with pytest.raises(AdapterRefused) as info:
            while time.monotonic() < deadline:
                assert reg.acquire(refs[0]) is None
                time.sleep(0.01)
        assert info.value.rule == Rule.DIGEST
        assert reg.stats.disk_read_failures == 1


# ----------------------------------------------------------------------------- versions and drain


def test_reload_makes_a_new_version_and_the_old_drains(many: list[Path], tmp_path: Path) -> None:
    path = copy_adapter(many[0], tmp_path / "x")
    with registry(4) as reg:
        v1 = reg.load("x", path, trusted=True).ref
        slot1 = reg.acquire_wait(v1)
        assert reg.memory()["device_used_bytes"] == reg.get("x").size_bytes
        copy_adapter(many[5], path)  # new weights in the same folder
        result = reg.load("x", path, trusted=True)
        v2 = result.ref
        assert (v2.version, result.replaced) == (2, v1) and v2.digest != v1.digest
        assert reg.resolve("x") == v2
        assert reg.acquire(v1) == slot1  # a running request's version is still acquirable
        check_slot(reg, slot1, many[0])
        slot2 = reg.acquire_wait(v2)
        assert slot2 != slot1
        check_slot(reg, slot2, many[5])
        check_slot(reg, slot1, many[0])  # new version paged in without touching the old
        rows = {(r.version, r.current) for r in reg.list()}
        assert rows == {(1, False), (2, True)}
        reg.release(v1)
        assert reg.get("x").version == 2 and len(reg.list()) == 2  # one reference left
        reg.release(v1)
        assert [(r.version, r.current) for r in reg.list()] == [(2, True)]
        assert reg.memory()["device_used_bytes"] == reg.get("x").size_bytes  # v1 freed
        assert int(reg.tables.ranks[:, :, slot1].abs().sum()) == 0  # a freed slot applies nothing
        with pytest.raises(AdapterNotFound):
            reg.acquire(v1)
        reg.release(v2)


def test_reload_and_unload_under_traffic(many: list[Path], tmp_path: Path) -> None:
    """Clients stream requests on "x" while it is reloaded five times and then unloaded: each
    request sees exactly the weights of the version it resolved, from acquire to release;
    none fails (a version drained between resolve and acquire is re-resolved, as the engine
    does); after the unload the memory goes when the last request ends."""
    import hashlib

    sources = many[:6]
    by_digest = {hashlib.sha256((p / WEIGHTS_FILE).read_bytes()).hexdigest(): p for p in sources}
    path = copy_adapter(sources[0], tmp_path / "x")
    served: dict[int, int] = {}
    errors: list[BaseException] = []
    re_resolved = [0]
    stop = threading.Event()
    with registry(4) as reg:
        reg.load("x", path, trusted=True)

        def client() -> None:
            try:
                while not stop.is_set():
                    try:
                        ref = reg.resolve("x")
                        slot = reg.acquire_wait(ref, 10)
                    except AdapterNotFound:
                        if "x" in reg.names():
                            re_resolved[0] += 1
                            continue
                        return  # unloaded: new requests get a 404
                    check_slot(reg, slot, by_digest[ref.digest])
                    time.sleep(0.002)
                    check_slot(reg, slot, by_digest[ref.digest])  # unchanged while held
                    reg.release(ref)
                    served[ref.version] = served.get(ref.version, 0) + 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        for source in sources[1:]:
            time.sleep(0.08)
            copy_adapter(source, path)
            reg.load("x", path, trusted=True)
        time.sleep(0.08)
        held = reg.resolve("x")
        slot = reg.acquire_wait(held)
        reg.unload("x")
        for thread in clients:
            thread.join(10)
        stop.set()
        assert not errors, errors
        assert len(served) >= 3 and max(served) == 6  # old and new versions both served
        check_slot(reg, slot, sources[-1])  # the in-flight request still has its weights
        assert reg.names() == [] and len(reg.list()) == 1
        reg.release(held)
        assert reg.list() == [] and reg.memory()["device_used_bytes"] == 0


def test_reload_of_an_idle_version_frees_it_at_once(many: list[Path], tmp_path: Path) -> None:
    path = copy_adapter(many[1], tmp_path / "y")
    with registry(2) as reg:
        v1 = reg.load("y", path, trusted=True).ref
        reg.acquire_wait(v1)
        reg.release(v1)
        copy_adapter(many[2], path)
        reg.load("y", path, trusted=True)
        assert [r.version for r in reg.list()] == [2]
        with pytest.raises(AdapterNotFound):
            reg.acquire(v1)


def test_loading_the_same_files_again_is_a_no_op(many: list[Path]) -> None:
    with registry(2) as reg:
        first = reg.load("same", many[4], trusted=True)
        again = reg.load("same", many[4], trusted=True)
        assert again.unchanged and again.ref == first.ref and reg.stats.loads == 1


def test_unload_drains(many: list[Path]) -> None:
    with registry(2) as reg:
        ref = reg.load("u", many[2], trusted=True).ref
        slot = reg.acquire_wait(ref)
        assert reg.unload("u") == ref
        with pytest.raises(AdapterNotFound):
            reg.resolve("u")
        assert reg.names() == [] and [r.current for r in reg.list()] == [False]
        check_slot(reg, slot, many[2])  # the in-flight request still reads its weights
        assert reg.memory()["device_used_bytes"] > 0
        reg.release(ref)
        assert reg.list() == [] and reg.memory()["device_used_bytes"] == 0
        assert reg.memory()["host_used_bytes"] == 0
        with pytest.raises(AdapterNotFound):
            reg.unload("u")
        assert reg.load("u", many[2], trusted=True).version == 2  # refs are never reused


def test_release_without_acquire_is_an_error(many: list[Path]) -> None:
    with registry(2) as reg:
        ref = reg.load("r", many[0], trusted=True).ref
        with pytest.raises(ValueError):
            reg.release(ref)


def test_concurrent_loads_of_one_name_are_serialised(many: list[Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    peak_all = [0]
    lock = threading.Lock()
    real_read = registry_module.read_adapter

    def tracked_read(path: Path, *args: Any, **kwargs: Any) -> Any:
        name = "same" if path.name.startswith("a0") else path.name
        with lock:
            active[name] = active.get(name, 0) + 1
            peak[name] = max(peak.get(name, 0), active[name])
            peak_all[0] = max(peak_all[0], sum(active.values()))
        time.sleep(0.03)
        try:
            return real_read(path, *args, **kwargs)
        finally:
            with lock:
                active[name] -= 1

    monkeypatch.setattr(registry_module, "read_adapter", tracked_read)
    with registry(4) as reg:
        results: list[Any] = []
        jobs = [("same", many[i]) for i in range(6)] + [(f"other{i}", many[10 + i])
                                                         for i in range(3)]
        threads = [threading.Thread(target=lambda n=n, p=p: results.append(
            reg.load(n, p, trusted=True))) for n, p in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert peak["same"] == 1 and peak_all[0] > 1  # one name serial, names in parallel
        versions = sorted(r.version for r in results if r.name == "same")
        assert versions == [1, 2, 3, 4, 5, 6]
        assert reg.resolve("same").version == 6
        assert [r.version for r in reg.list() if r.name == "same"] == [6]  # the rest freed


def test_failed_reload_under_traffic_keeps_serving(many: list[Path], tmp_path: Path) -> None:
    good = copy_adapter(many[3], tmp_path / "good")
    broken = copy_adapter(many[4], tmp_path / "broken")
    (broken / WEIGHTS_FILE).write_bytes((broken / WEIGHTS_FILE).read_bytes()[:100])
    with registry(2) as reg:
        ref = reg.load("svc", good, trusted=True).ref
        slot = reg.acquire_wait(ref)
        with pytest.raises(AdapterRefused):
            reg.load("svc", broken, trusted=True)
        assert reg.resolve("svc") == ref and reg.acquire(ref) == slot
        check_slot(reg, slot, many[3])
        reg.release(ref)
        reg.release(ref)
        assert reg.stats.load_failures == 1


# ----------------------------------------------------------------------------- sources


def test_lazy_resolution(many: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    copy_adapter(many[0], root / "lazy-one")
    broken = copy_adapter(many[1], root / "broken")
    edit_config(broken, use_dora=True)
    (root / ".hidden").mkdir()
    with registry(2, root=root) as reg:
        assert reg.lazy_names() == ["broken", "lazy-one"]
        assert reg.validate(root / "lazy-one").digest and reg.names() == []
        with pytest.raises(AdapterRefused, match="DoRA"):
            reg.validate(root / "broken")
        assert reg.stats.load_failures == 0  # validation alone counts nothing
        ref = reg.resolve("lazy-one")
        assert reg.lazy_names() == ["broken"]
        assert (ref.name, ref.version) == ("lazy-one", 1) and reg.stats.lazy_loads == 1
        assert reg.resolve("lazy-one") == ref and reg.stats.loads == 1
        check_slot(reg, reg.acquire_wait(ref), many[0])
        for unknown in ("nope", "../root/lazy-one", "a/b", ""):
            with pytest.raises(AdapterNotFound):
                reg.resolve(unknown)
        for _ in range(3):  # a broken folder is validated once per change, not per request
            with pytest.raises(AdapterError, match="DoRA"):
                reg.resolve("broken")
        assert reg.stats.load_failures == 1 and "broken" not in reg.names()
        time.sleep(0.01)
        edit_config(broken, use_dora=False)
        assert reg.resolve("broken").version == 1


def test_desired_set_is_reconciled_at_start(many: list[Path], tmp_path: Path) -> None:
    copy_adapter(many[0], tmp_path / "sets" / "rel")
    broken = copy_adapter(many[1], tmp_path / "sets" / "broken")
    (broken / WEIGHTS_FILE).unlink()
    desired = tmp_path / "sets" / "desired.yaml"
    desired.write_text(
        "adapters:\n"
        "  - {name: relative, path: rel, pinned: true}\n"
        f"  - {{name: absolute, path: {many[2]}}}\n"
        "  - {name: broken, path: broken}\n"
    )
    flag = copy_adapter(many[3], tmp_path / "flag")
    with registry(4, desired_set=desired, adapters=(("flagged", flag),)) as reg:
        errors = reg.start()
        assert len(errors) == 1 and "broken" in errors[0] and Rule.FILES in errors[0]
        assert reg.names() == ["absolute", "flagged", "relative"]
        assert reg.wait_ready(10) and reg.get("relative").pinned
        assert reg.get("relative").tier == "device"
        check_slot(reg, reg.get("relative").slot, many[0])
        assert reg.reconcile(desired) == errors  # again: nothing changes, same error
        assert reg.get("relative").version == 1
    json_set = tmp_path / "sets" / "desired.json"
    json_set.write_text(f'[{{"name": "j", "path": "{many[4]}"}}]')
    with registry(2, desired_set=json_set) as reg:
        assert reg.start() == [] and reg.names() == ["j"]


def test_adapter_flag_failure_stops_start(tmp_path: Path) -> None:
    with registry(2, adapters=(("missing", tmp_path / "nowhere"),)) as reg, \
            pytest.raises(AdapterRefused):
        reg.start()


# ----------------------------------------------------------------------------- fairness


def _settle(reg: AdapterRegistry) -> None:
    """Let the page-in thread run a pass over the current state."""
    with reg._cond:
        reg._cond.notify_all()
    time.sleep(0.15)


def test_cold_adapter_is_not_starved_by_hot_ones(many: list[Path]) -> None:
    clock = FakeClock()
    with registry(2, clock=clock, fairness_wait_s=1.0) as reg:
        hot_a, hot_b, cold = (reg.load(n, many[i], trusted=True).ref
                              for n, i in (("hot-a", 0), ("hot-b", 6), ("cold", 8)))
        held_a = [reg.acquire_wait(hot_a)]
        clock.advance(0.1)
        held_b = [reg.acquire_wait(hot_b)]
        assert reg.acquire(cold) is None  # both slots referenced
        for _ in range(3):  # a stream of hot requests, each new one before the old ends
            clock.advance(0.2)
            held_a.append(reg.acquire(hot_a))
            held_b.append(reg.acquire(hot_b))
            reg.release(hot_a)
            reg.release(hot_b)
            del held_a[0], held_b[0]
            assert reg.acquire(cold) is None
        assert None not in held_a + held_b
        _settle(reg)
        assert reg.waiting() == [cold]
        # Past fairness_wait_s the cold waiter starves: the LRU hot adapter (hot-a, last
        # acquired before hot-b in each round) takes no new references.
        clock.advance(1.0)
        assert reg.acquire(cold) is None
        _settle(reg)
        assert reg.acquire(hot_a) is None  # closed
        assert reg.acquire(hot_b) is not None  # the other hot adapter still serves
        reg.release(hot_b)
        reg.release(hot_a)  # hot-a's running request ends: the room goes to the cold one
        slot = reg.acquire_wait(cold, 5)
        check_slot(reg, slot, many[8])
        assert reg.get("hot-a").tier in ("host", "disk") and reg.stats.device_evictions == 1
        assert reg.waiting() == [hot_a]  # and now hot-a waits, ageing like anyone else
        reg.release(cold)
        reg.release(hot_b)


def test_wants_lapse_when_nobody_renews_them(many: list[Path]) -> None:
    clock = FakeClock()
    with registry(2, clock=clock, want_ttl_s=5.0) as reg:
        refs = [reg.load(f"w{i}", many[i], trusted=True).ref for i in range(3)]
        held = [reg.acquire_wait(refs[0]), reg.acquire_wait(refs[1])]
        reg.prefetch(refs[2])  # the request went away without acquiring
        _settle(reg)
        assert reg.waiting() == [refs[2]]
        clock.advance(6.0)
        _settle(reg)
        assert reg.waiting() == []
        assert held == [0, 1] or sorted(held) == [0, 1]
        reg.release(refs[0])
        reg.release(refs[1])


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    yield
    leaked = [t for t in threading.enumerate() if t.name.startswith("loramux-adapter")]
    assert not leaked, leaked


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or torch.get_num_threads() < 2,
                    reason="needs Linux's /proc and more than one torch thread")
def test_background_work_leaves_no_openmp_team_behind(tmp_path: Path) -> None:
    """Loading, re-reading and paging in big adapters must not leave OpenMP worker threads
    behind in the registry's long-lived threads: with more OpenMP threads than CPUs, libgomp
    stops spinning and the step loop's decode slows 2-3x (see `_in_own_thread`)."""
    import os

    wide = tiny_llama_config(layers=2)
    wide.hidden_size, wide.intermediate_size = 512, 1024  # tensors above ATen's grain size
    spec = base_spec(wide)
    paths = [make_adapter(tmp_path / f"w{i}", wide, rank=64, seed=i) for i in range(3)]
    torch.ones(1 << 17).sum()  # this thread's own team exists before we count
    threads = len(os.listdir("/proc/self/task"))
    config = RegistryConfig(max_gpu_adapters=1, max_cpu_adapters=1, max_lora_rank=64)
    with AdapterRegistry(config, spec, "cpu", torch.float32) as reg:
        refs = [reg.load(f"w{i}", p, trusted=True).ref for i, p in enumerate(paths)]
        for ref in refs + refs:  # page-ins, device evictions, host evictions and re-reads
            reg.acquire_wait(ref)
            reg.release(ref)
        assert reg.stats.page_ins >= 4 and reg.stats.disk_reads >= 1
        time.sleep(0.2)  # exited threads' workers wind down
        assert len(os.listdir("/proc/self/task")) == threads + 2  # the disk and page-in threads
