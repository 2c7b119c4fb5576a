"""Issue 15: generated adapter configs against a live server.

Every generated adapter_config.json (tests/config_strategies.py: valid-looking and hostile,
backtracking regexes, odd types, deep nesting, huge numbers, broken JSON) is uploaded through
the admin API next to a valid weights file, and also dropped as a lazy folder under the adapter
root and named by a tenant's request. Each case must end in 201/200 or a 4xx with the OpenAI
error body within a second, and a thread polling /health throughout must never see it stall
or fail. Before the bounded matcher, `(.*)*z` in target_modules froze the process (and /health
with it) for tens of seconds; malformed configs answered 500.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapter_factory import CONFIG_FILE, WEIGHTS_FILE
from config_strategies import config_texts
from hypothesis import HealthCheck, given, settings
from reliability_world import ADMIN_HEADERS, World, auth, build_world
from server_harness import LiveServer

SOURCE = "acme-one"  # rank 4 on q_proj and v_proj: the weights every case is paired with
CASE_SECONDS = 1.0  # the bound for one case; the slowest case is in the failure text
HEALTH_TIMEOUT = 5.0
# A freeze fails the module instead of holding CI ("thread": a matcher in C ignores signals).
pytestmark = pytest.mark.timeout(300, method="thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("fuzz_live"))


class HealthWatch:
    """Polls /health every 20 ms in a thread; records failures and the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url, self.failures, self.slowest, self.polls = url, [], 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=HEALTH_TIMEOUT) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = client.get(self.url + "/health").status_code
                    if status != 200:
                        self.failures.append(f"/health answered {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"/health: {type(exc).__name__}: {exc}")
                self.slowest = max(self.slowest, time.monotonic() - started)
                self.polls += 1
                self._stop.wait(0.02)

    def __enter__(self) -> HealthWatch:  # noqa: PYI034 - py310 has no typing.Self
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=HEALTH_TIMEOUT + 1)


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    with world.serve() as server:
        # One valid upload first, so that the first timed case does not pay for cold paths.
        files = {f: (f, (world.root / SOURCE / f).read_bytes(), "application/octet-stream")
                 for f in (CONFIG_FILE, WEIGHTS_FILE)}
        assert httpx.put(f"{server.url}/admin/adapters/acme-warm", files=files,
                         headers=ADMIN_HEADERS, timeout=60).status_code == 201
        yield server


@pytest.fixture(scope="module")
def watch(live: LiveServer) -> Iterator[HealthWatch]:
    with HealthWatch(live.url) as watcher:
        yield watcher
    assert not watcher.failures, watcher.failures[:5]
    assert watcher.polls > 10


def _ends_well(response: httpx.Response, ok: int, seconds: float, config: bytes) -> None:
    where = f"{response.status_code} in {seconds:.2f} s for config {config[:300]!r}"
    assert response.status_code == ok or 400 <= response.status_code < 500, \
        f"{where}: {response.text[:300]}"
    if response.status_code != ok:
        body = response.json()
        assert set(body) == {"error"} and body["error"]["message"], where
    assert seconds < CASE_SECONDS, where


FUZZ = settings(derandomize=True, deadline=None, max_examples=40, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])
_count = iter(range(10**6))


@FUZZ
@given(config=config_texts(targets=("q_proj", "v_proj"), rank=4, layers=2))
def test_uploaded_configs_end_in_201_or_4xx(live: LiveServer, world: World, watch: HealthWatch,
                                          config: bytes) -> None:
    name = f"acme-fuzz-{next(_count)}"
    weights = (world.root / SOURCE / WEIGHTS_FILE).read_bytes()
    files: dict[str, Any] = {CONFIG_FILE: (CONFIG_FILE, config, "application/json"),
                             WEIGHTS_FILE: (WEIGHTS_FILE, weights, "application/octet-stream")}
    started = time.monotonic()
    response = httpx.put(f"{live.url}/admin/adapters/{name}", files=files,
                         headers=ADMIN_HEADERS, timeout=30)
    _ends_well(response, 201, time.monotonic() - started, config)
    if response.status_code == 201:  # keep the registry small; the files go with it
        assert httpx.delete(f"{live.url}/admin/adapters/{name}", headers=ADMIN_HEADERS,
                            timeout=30).status_code == 200


@FUZZ
@given(config=config_texts(targets=("q_proj", "v_proj"), rank=4, layers=2))
def test_lazy_folders_end_in_200_or_4xx(live: LiveServer, world: World, watch: HealthWatch,
                                        config: bytes) -> None:
    name = f"acme-lazy-{next(_count)}"
    folder: Path = world.root / name
    folder.mkdir()
    (folder / CONFIG_FILE).write_bytes(config)
    (folder / WEIGHTS_FILE).write_bytes((world.root / SOURCE / WEIGHTS_FILE).read_bytes())
    body = {"model": name, "prompt": "ab", "max_tokens": 1, "temperature": 0}
    for _ in range(2):  # the second asks again: a refusal is remembered, not recomputed
        started = time.monotonic()
        response = httpx.post(live.url + "/v1/completions", json=body, headers=auth("acme"),
                              timeout=30)
        _ends_well(response, 200, time.monotonic() - started, config)
