"""Runtime adapter changes survive SIGKILL (issue 15, item 12).

`loramux serve --adapter-state FILE` writes every runtime load, reload, pin, unpin and unload
to FILE (atomically) and applies it at the next start after --adapter, the desired set and
--pin-adapter. The test makes each kind of change through the admin API, kills the process
with SIGKILL, starts it again and checks what it serves against PEFT.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from reliability_world import ADMIN, ADMIN_HEADERS, World, build_world, completion

from loramux.adapters.config import RegistryConfig
from loramux.adapters.registry import AdapterRegistry


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("persist"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(world: World, state: Path | None, log_path: Path
          ) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`loramux serve` as a process, ready; killed (SIGKILL) when the block ends."""
    port = _free_port()
    exe = Path(sys.executable).with_name("loramux")
    env = {**os.environ, "LORAMUX_DEVICE": "cpu", "LORAMUX_DTYPE": "float32"}
    preloaded = ("acme-one", "acme-two", "beta-one", "gamma-one")
    args = [str(exe), "serve", "--model", str(world.model_dir), "--port", str(port),
            "--adapter-root", str(world.root), "--api-keys", str(world.keys_file),
            "--admin-token", ADMIN, "--max-lora-rank", "16", "--max-gpu-adapters", "4",
            "--pin-adapter", "acme-two"]
    if state is not None:
        args += ["--adapter-state", str(state)]
    for name in preloaded:
        args += ["--adapter", f"{name}={world.root / name}"]
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(args, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                text=True, cwd=log_path.parent)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if httpx.get(url + "/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "not ready"
                time.sleep(0.1)
            yield url, proc
        finally:
            proc.send_signal(signal.SIGKILL)  # no drain, no clean shutdown
            proc.wait()


def rows(url: str) -> dict[str, dict[str, object]]:
    data = httpx.get(url + "/admin/adapters", headers=ADMIN_HEADERS, timeout=30).json()["data"]
    return {r["name"]: r for r in data if r["current"]}


def text(url: str, model: str) -> str:
    response = completion(url, "acme", model, "Persist me", 8)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def admin(url: str, path: str, body: dict[str, object] | None = None) -> httpx.Response:
    response = httpx.post(url + path, json=body, headers=ADMIN_HEADERS, timeout=60)
    assert response.status_code in (200, 201), response.text
    return response


def test_runtime_changes_survive_sigkill(world: World, tmp_path: Path) -> None:
    state = tmp_path / "state" / "adapters.json"
    want = {folder: world.expected(folder, "Persist me", 8) for folder in ("acme-one", "var-a",
                                                                          "var-b")}
    assert len(set(want.values())) == 3  # each folder gives its own text
    with serve(world, state, tmp_path / "first.log") as (url, _):
        assert text(url, "acme-one") == want["acme-one"]
        admin(url, "/admin/adapters", {"name": "acme-one", "path": "var-a"})  # another folder
        admin(url, "/admin/adapters", {"name": "acme-new", "path": "var-b"})  # a new name
        admin(url, "/admin/adapters/beta-one/pin")
        admin(url, "/admin/adapters/acme-two/unpin")  # pinned by --pin-adapter
        admin(url, "/v1/unload_lora_adapter", {"lora_name": "gamma-one"})
        assert text(url, "acme-one") == want["var-a"]
        before = rows(url)
    assert json.loads(state.read_text())  # whole JSON, whatever the kill interrupted
    assert [p.name for p in state.parent.iterdir()] == [state.name]  # no temporary left

    with serve(world, state, tmp_path / "second.log") as (url, _):
        after = rows(url)
        assert text(url, "acme-one") == want["var-a"]  # the reloaded weights, not the original
        assert text(url, "acme-new") == want["var-b"]
        assert after["acme-one"]["path"] == str((world.root / "var-a").resolve())
        assert after["beta-one"]["pinned"] is True and after["acme-two"]["pinned"] is False
        assert "gamma-one" not in after  # the unload held (its folder is still a lazy name)
        assert set(after) == set(before)
        for name in after:
            assert after[name]["digest"] == before[name]["digest"], name
    log = (tmp_path / "second.log").read_text()
    assert "runtime adapter changes" in log and str(state) in log


def test_without_a_state_file_the_start_says_changes_are_not_kept(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    from adapter_factory import base_spec

    config = RegistryConfig(adapter_root=world.root, max_lora_rank=16, max_gpu_adapters=2,
                            max_cpu_adapters=2)
    with caplog.at_level(logging.INFO, logger="loramux.adapters.registry"), \
            AdapterRegistry(config, base_spec(world.hf_config)) as reg:
        assert reg.start() == []
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "not persisted" in said and "--adapter-state" in said


def test_state_is_applied_by_a_registry_that_never_closed(world: World, tmp_path: Path) -> None:
    """In process: a second registry on the same state file while the first is still open
    (as after a kill, nothing was flushed at shutdown)."""
    from adapter_factory import base_spec

    state = tmp_path / "state.json"
    config = RegistryConfig(adapter_root=world.root, max_lora_rank=16, max_gpu_adapters=4,
                            max_cpu_adapters=4, state_file=state,
                            adapters=(("acme-one", world.root / "acme-one"),
                                      ("beta-one", world.root / "beta-one")))
    spec = base_spec(world.hf_config)
    first = AdapterRegistry(config, spec)
    second = None
    try:
        assert first.start() == []
        reloaded = first.load("acme-one", world.root / "var-a")
        first.resolve("beta-two")  # a lazy load: not recorded by itself
        first.pin("beta-two")
        first.unload("beta-one")
        second = AdapterRegistry(config, spec)
        assert second.start() == []
        assert second.get("acme-one").digest == reloaded.digest
        assert second.get("beta-two").pinned
        assert "beta-one" not in second.names()
    finally:
        first.close()
        if second is not None:
            second.close()


def test_an_unreadable_state_file_is_set_aside(world: World, tmp_path: Path) -> None:
    from adapter_factory import base_spec

    state = tmp_path / "state.json"
    state.write_text('{"format": 1, "adapters": ')  # cut short (written by hand)
    config = RegistryConfig(adapter_root=world.root, max_lora_rank=16, max_gpu_adapters=2,
                            max_cpu_adapters=2, state_file=state)
    with AdapterRegistry(config, base_spec(world.hf_config)) as reg:
        errors = reg.start()
        assert len(errors) == 1 and "unreadable" in errors[0]
        assert (tmp_path / "state.json.unreadable").read_text().startswith('{"format"')
        reg.load("acme-one", world.root / "acme-one")
        assert json.loads(state.read_text())["adapters"]["acme-one"]["pinned"] is False
