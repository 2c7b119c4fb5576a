"""Recovery from bad adapter files, against a live server (issue 15, items 5 and 7):

- an adapter whose weights were corrupted while it lived only on disk (evicted from host and
  device) is served again once the file is restored, without a reload, and the refusal in
  between names the file by its name in the folder, never a server path or a digest; while
  nothing changes, requests do not re-read the files;
- an admin reload of the same content from another folder clears the remembered failure and
  serves at once, keeping the version;
- a lazy folder whose config is malformed is validated once per change of its files, even
  under concurrent requests, and a fixed folder is picked up at once (also when the fix kept
  the files' sizes and mtimes);
- a remembered failure is also retried after a backoff (1 s, doubling up to 60 s) while the
  files stay the same, so a transient one (EMFILE) heals, and as soon as the folder itself
  moves (a symlink swapped in and out); a broken adapter is re-read at most once per backoff.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapter_factory import CONFIG_FILE, WEIGHTS_FILE, copy_adapter
from reliability_world import (
    ADMIN_HEADERS,
    World,
    build_world,
    completion,
)
from server_harness import LiveServer

import loramux.adapters.registry as registry_module
from loramux.adapters.peft import AdapterRefused, Rule


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("recovery"))


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    # Two device slots and two host entries for six preloaded adapters: the first ones loaded
    # live only on disk, so their next use re-reads (and digest-checks) the files.
    with world.serve(registry={"max_gpu_adapters": 2, "max_cpu_adapters": 2}) as server:
        yield server


def registry(live: LiveServer) -> Any:
    return live.app.state.loramux.engine.registry


def tier(live: LiveServer, name: str) -> str:
    rows = httpx.get(live.url + "/admin/adapters", headers=ADMIN_HEADERS).json()["data"]
    return str(next(r["tier"] for r in rows if r["name"] == name and r["current"]))


def serves(live: LiveServer, world: World, model: str, folder: str) -> bool:
    response = completion(live.url, "acme", model, "Recover me", 8)
    if response.status_code != 200:
        return False
    assert response.json()["choices"][0]["text"] == world.expected(folder, "Recover me", 8)
    return True


def assert_tenant_safe(message: str, world: World) -> None:
    assert str(world.root.parent) not in message and "/" not in message, message
    assert not re.search(r"[0-9a-f]{64}", message), message


def test_restored_weights_file_is_served_again(live: LiveServer, world: World,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    name = "acme-one"
    # No retry by backoff during this test: only the restored file may end the refusal.
    monkeypatch.setattr(registry_module, "_RETRY_FIRST_S", 600.0)
    assert tier(live, name) == "disk"
    weights = world.root / name / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated while the server is up
    try:
        assert not serves(live, world, name, name)
        reg = registry(live)
        failures = reg.stats.disk_read_failures
        assert failures >= 1
        ref = reg.current(name)
        with pytest.raises(AdapterRefused) as info:
            reg.acquire(ref)
        assert info.value.rule == Rule.DIGEST
        assert WEIGHTS_FILE in str(info.value) and name in str(info.value)
        assert_tenant_safe(str(info.value), world)
        for _ in range(3):  # nothing changed: the same refusal, no new read
            assert not serves(live, world, name, name)
        assert reg.stats.disk_read_failures == failures
    finally:
        weights.write_bytes(good)
    # Restored: the next request re-reads, the digest matches, version 1 serves again.
    assert serves(live, world, name, name)
    assert reg.current(name) == ref and reg.stats.disk_read_failures == failures


def test_reload_of_the_same_content_clears_the_failure(live: LiveServer, world: World) -> None:
    name = "acme-two"
    assert tier(live, name) == "disk"
    weights = world.root / name / WEIGHTS_FILE
    good = weights.read_bytes()
    restored = copy_adapter(world.root / name, world.root / "acme-two-restored")
    (restored / WEIGHTS_FILE).write_bytes(good)
    weights.write_bytes(good[:100])  # the original folder stays broken
    ref = registry(live).current(name)
    try:
        assert not serves(live, world, name, restored.name)
        response = httpx.post(live.url + "/v1/load_lora_adapter", headers=ADMIN_HEADERS,
                              json={"lora_name": name, "lora_path": str(restored)}, timeout=60)
        assert response.status_code == 200, response.text
        # Same weights and config: the same version, now read from the good folder.
        assert registry(live).current(name) == ref
        assert serves(live, world, name, restored.name)
        row = httpx.get(live.url + f"/admin/adapters/{name}", headers=ADMIN_HEADERS).json()
        assert row["version"] == ref.version and row["path"] == str(restored.resolve())
    finally:
        weights.write_bytes(good)


def test_load_replies_say_what_the_load_did(live: LiveServer, world: World) -> None:
    """The admin's 201 describes the version that call made or kept, and says which."""
    def load(path: str) -> dict[str, Any]:
        response = httpx.post(live.url + "/admin/adapters", headers=ADMIN_HEADERS,
                              json={"name": "acme-outcome", "path": path}, timeout=60)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    first = load("var-a")
    assert first["outcome"] == "new version"
    again = load("var-a")
    assert again["outcome"] == "unchanged" and again["version"] == first["version"]
    other = load("var-b")
    assert other["outcome"] == "new version" and other["version"] == first["version"] + 1
    assert other["digest"] != first["digest"]
    assert serves(live, world, "acme-outcome", "var-b")


# ============================================================================ lazy folders


def _same_size(text: str, size: int) -> str:
    assert len(text) <= size
    return text[:-1] + " " * (size - len(text)) + text[-1]


def test_malformed_lazy_folder_is_validated_once_per_change(
        live: LiveServer, world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = copy_adapter(world.root / "var-a", world.root / "acme-lazy")
    config_path = folder / CONFIG_FILE
    good = json.loads(config_path.read_text())
    good_text = json.dumps(good)
    bad_text = json.dumps({**good, "target_modules": 5})
    size = max(len(good_text), len(bad_text))
    config_path.write_text(_same_size(bad_text, size))
    reads: list[Path] = []
    real = registry_module.read_adapter

    def counted(path: Path, *args: Any, **kwargs: Any) -> Any:
        reads.append(path)
        time.sleep(0.3)  # so that concurrent requests all arrive while the first validates
        return real(path, *args, **kwargs)

    monkeypatch.setattr(registry_module, "read_adapter", counted)
    monkeypatch.setattr(registry_module, "_RETRY_FIRST_S", 600.0)  # only a change retries here
    answers: list[httpx.Response] = []

    def ask() -> None:
        answers.append(completion(live.url, "acme", "acme-lazy", "Lazy", 4))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for _ in range(3):
        answers.append(completion(live.url, "acme", "acme-lazy", "Lazy", 4))
    statuses = {r.status_code for r in answers}
    assert statuses == {400}, [(r.status_code, r.text) for r in answers]
    assert len({r.json()["error"]["message"] for r in answers}) == 1
    for response in answers:
        assert_tenant_safe(response.json()["error"]["message"], world)
    assert len(reads) == 1, f"{len(reads)} validations of one unchanged folder"
    # Fixed in place with the same size and the same mtime (a restore that keeps times):
    # the folder changed, so the next request validates again and serves it.
    stat = config_path.stat()
    config_path.write_text(_same_size(good_text, size))
    os.utime(config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert config_path.stat().st_size == stat.st_size
    assert serves(live, world, "acme-lazy", "var-a")
    assert len(reads) == 2


def test_lazy_refusals_are_remembered_even_for_unexpected_errors(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: a validation that raises something other than AdapterError (a bug, or a
    config that defeats a check) is a remembered refusal too, not a 500 per request; and a
    lazy refusal's message names no server path."""
    from adapter_factory import base_spec, edit_config

    from loramux.adapters.config import RegistryConfig
    from loramux.adapters.registry import AdapterRegistry
    from loramux.adapters.types import AdapterError

    root = tmp_path / "root"
    copy_adapter(world.root / "var-a", root / "deep")
    edit_config(copy_adapter(world.root / "var-a", root / "dora"), use_dora=True)
    calls: list[Path] = []
    real = registry_module.read_adapter

    def fragile(path: Path, *args: Any, **kwargs: Any) -> Any:
        calls.append(path)
        if path.name == "deep":
            raise RecursionError("maximum recursion depth exceeded")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(registry_module, "read_adapter", fragile)
    config = RegistryConfig(adapter_root=root, max_lora_rank=16, max_gpu_adapters=2,
                            max_cpu_adapters=2)
    with AdapterRegistry(config, base_spec(world.hf_config)) as reg:
        for _ in range(3):
            with pytest.raises(AdapterError, match="validation failed unexpectedly"):
                reg.resolve("deep")
        assert [p.name for p in calls] == ["deep"]
        with pytest.raises(AdapterRefused) as info:
            reg.resolve("dora")
        assert info.value.rule == Rule.FEATURE
        assert_tenant_safe(str(info.value), world)
        assert str(tmp_path) not in str(info.value)


# ============================================================ retries with unchanged files
#
# A remembered failure need not come from the files (EMFILE in a burst, a time budget hit
# under load, the folder briefly swapped for a symlink): it is retried after a backoff even
# while the files stay the same, and as soon as the folder itself (location, identity)
# changes. In process, on the registry's injected clock.


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _in_process(world: World, root: Path, clock: _Clock) -> Any:
    from adapter_factory import base_spec

    from loramux.adapters.config import RegistryConfig
    from loramux.adapters.registry import AdapterRegistry

    config = RegistryConfig(adapter_root=root, max_lora_rank=16, max_gpu_adapters=1,
                            max_cpu_adapters=1)
    return AdapterRegistry(config, base_spec(world.hf_config), clock=clock)


def _on_disk(reg: Any, root: Path) -> Any:
    """Loads root/a then root/b (a host tier of one): "a" lives on disk only; its ref."""
    ref = reg.load("a", root / "a").ref
    reg.load("b", root / "b")
    assert reg.get("a").tier == "disk"
    return ref


def _settle(reg: Any, ref: Any, timeout: float = 20.0) -> Any:
    """What a request gets once any re-read it starts is over: a slot (released again) or the
    AdapterError that acquire raises."""
    from loramux.adapters.types import AdapterError

    deadline = time.monotonic() + timeout
    reg.resolve(ref.name)
    while time.monotonic() < deadline:
        try:
            slot = reg.acquire(ref)
        except AdapterError as exc:
            return exc
        if slot is not None:
            reg.release(ref)
            return slot
        time.sleep(0.005)
    raise TimeoutError(f"{ref} neither served nor refused")


def _counting_reads(monkeypatch: pytest.MonkeyPatch, clock: _Clock,
                    fail: Any = None) -> list[float]:
    """Patches the registry's read function: returns the clock times of reads of folder "a";
    `fail()`, when given and true, makes such a read raise OSError(EMFILE)."""
    import errno

    times: list[float] = []
    real = registry_module.read_adapter

    def counted(path: Path, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == "a":
            times.append(clock.now)
            if fail is not None and fail():
                raise OSError(errno.EMFILE, "Too many open files")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(registry_module, "read_adapter", counted)
    return times


def test_transient_emfile_on_reread_recovers_after_backoff(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loramux.adapters.types import AdapterError

    root = tmp_path / "root"
    copy_adapter(world.root / "var-a", root / "a")
    copy_adapter(world.root / "var-b", root / "b")
    clock = _Clock()
    burst = [True]
    with _in_process(world, root, clock) as reg:
        ref = _on_disk(reg, root)
        reads = _counting_reads(monkeypatch, clock, fail=lambda: burst[0])
        refusal = _settle(reg, ref)
        assert isinstance(refusal, AdapterError) and len(reads) == 1
        assert_tenant_safe(str(refusal), world)
        burst[0] = False  # the burst is over; no file changed
        clock.now += 0.5  # within the backoff: the same refusal, no new read
        assert isinstance(_settle(reg, ref), AdapterError) and len(reads) == 1
        clock.now += 0.5  # 1 s after the failure: one re-read, and it serves
        assert isinstance(_settle(reg, ref), int) and len(reads) == 2
        assert reg.current("a") == ref


def test_folder_moved_out_and_back_recovers(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder replaced by a symlink to itself elsewhere is refused (outside the root);
    moved back, unchanged files and all, it serves at once: no backoff to wait out, because
    the folder's resolved path and identity are part of what the failure remembers."""
    root, away = tmp_path / "root", tmp_path / "away"
    away.mkdir()
    for name in ("a", "lazy"):
        copy_adapter(world.root / "var-a", root / name)
    copy_adapter(world.root / "var-b", root / "b")
    clock = _Clock()  # never advanced: only the change of the folder may retry
    with _in_process(world, root, clock) as reg:
        ref = _on_disk(reg, root)
        reads = _counting_reads(monkeypatch, clock)
        for name in ("a", "lazy"):
            (root / name).rename(away / name)
            (root / name).symlink_to(away / name, target_is_directory=True)
        refusal = _settle(reg, ref)
        assert isinstance(refusal, AdapterRefused) and refusal.rule == Rule.PATH, refusal
        with pytest.raises(AdapterRefused) as info:
            reg.resolve("lazy")
        assert info.value.rule == Rule.PATH
        assert isinstance(_settle(reg, ref), AdapterRefused) and len(reads) == 1  # remembered
        for name in ("a", "lazy"):
            (root / name).unlink()
            (away / name).rename(root / name)
        assert isinstance(_settle(reg, ref), int) and len(reads) == 2
        assert reg.current("a") == ref
        assert reg.resolve("lazy").name == "lazy"


def test_broken_unchanged_adapter_is_reread_once_per_backoff_interval(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Truncated weights, never restored, under a steady stream of (also concurrent)
    requests: re-read 1, 2, 4, ... s after each failure, never more than once a minute."""
    root = tmp_path / "root"
    copy_adapter(world.root / "var-a", root / "a")
    copy_adapter(world.root / "var-b", root / "b")
    clock = _Clock()
    with _in_process(world, root, clock) as reg:
        ref = _on_disk(reg, root)
        weights = root / "a" / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:100])
        reads = _counting_reads(monkeypatch, clock)
        start = clock.now
        while clock.now - start < 200:
            threads = [threading.Thread(target=reg.resolve, args=("a",)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
            refusal = _settle(reg, ref)
            assert isinstance(refusal, AdapterRefused) and refusal.rule == Rule.DIGEST
            clock.now += 0.5
        gaps = [later - earlier for earlier, later in zip(reads, reads[1:])]
        assert gaps == [1, 2, 4, 8, 16, 32, 60, 60], gaps
        assert reg.stats.disk_read_failures == len(reads)
