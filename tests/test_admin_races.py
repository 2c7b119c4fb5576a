"""Admin uploads under races, storage faults and restarts, against a live server (issue 15,
items 4 and 10).

Concurrent uploads of one name are serialised: each reply describes the version its own
content became, and the registry, the files on disk and the text served after an eviction
all agree with the last one. A full or read-only disk answers 507 and leaves nothing behind.
A streamed upload over the limit is refused while it streams, holding one chunk at a time.
Leftovers of an upload cut short by a kill are removed when the next server starts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from adapter_factory import WEIGHTS_FILE, make_adapter
from reliability_world import (
    ADMIN_HEADERS,
    World,
    assert_error,
    build_world,
    completion,
    upload_files,
)
from server_harness import LiveServer

import loramux.server.admin as admin

NAME = "acme-race"
UPLOADERS = 8
PROMPT = "race"
TOKENS = 8
LIMIT = 2 << 20  # the upload body limit of this module's server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("races"))


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    # One device slot and one host entry: any other adapter's load evicts ours from host
    # memory, so its next request re-reads (and re-checks) its files on disk.
    with world.serve(registry={"adapters": (), "max_gpu_adapters": 1, "max_cpu_adapters": 1},
                     max_upload_bytes=LIMIT) as server:
        yield server


@pytest.fixture(scope="module")
def sources(world: World, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Distinct adapters (outside the adapter root) to upload under one name."""
    base = tmp_path_factory.mktemp("sources")
    return [make_adapter(base / f"v{i}", world.hf_config, rank=4, b_std=0.2,
                         target_modules=("q_proj", "v_proj"), seed=100 + i)
            for i in range(UPLOADERS)]


def put(live: LiveServer, name: str, **kwargs: Any) -> httpx.Response:
    headers = {**ADMIN_HEADERS, **kwargs.pop("headers", {})}
    return httpx.put(f"{live.url}/admin/adapters/{name}", headers=headers, timeout=120, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(world: World) -> list[str]:
    uploads = world.root / admin.UPLOAD_DIR
    return sorted(p.name for p in uploads.iterdir()) if uploads.is_dir() else []


def current(live: LiveServer, name: str) -> dict[str, Any]:
    response = httpx.get(f"{live.url}/admin/adapters/{name}", headers=ADMIN_HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


# ============================================================================ item 4


def test_concurrent_uploads_of_one_name(live: LiveServer, world: World,
                                        sources: list[Path]) -> None:
    replies: list[httpx.Response | None] = [None] * UPLOADERS
    start = threading.Barrier(UPLOADERS)

    def upload(i: int) -> None:
        files = upload_files(sources[i])
        start.wait()
        replies[i] = put(live, NAME, files=files)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(UPLOADERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    versions = []
    for i, reply in enumerate(replies):
        assert reply is not None and reply.status_code == 201, (i, reply and reply.text)
        body = reply.json()
        # The reply is the version this call's own content became.
        assert body["digest"] == sha256(sources[i] / WEIGHTS_FILE), (i, body)
        versions.append(body["version"])
    assert len(set(versions)) == UPLOADERS, versions  # one version per install
    final = current(live, NAME)
    assert final["version"] == max(versions)
    on_disk = sha256(world.root / NAME / WEIGHTS_FILE)
    assert final["digest"] == on_disk
    assert leftovers(world) == []
    # Push it out of host memory (one host entry), so serving it re-reads the files on disk.
    load = httpx.post(f"{live.url}/admin/adapters", headers=ADMIN_HEADERS,
                      json={"name": "acme-evict", "path": "var-a"}, timeout=60)
    assert load.status_code == 201, load.text
    assert completion(live.url, "acme", "acme-evict", PROMPT, TOKENS).status_code == 200
    winner = next(s for s in sources if sha256(s / WEIGHTS_FILE) == on_disk)
    response = completion(live.url, "acme", NAME, PROMPT, TOKENS)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == world.expected(str(winner), PROMPT, TOKENS)


def test_uploads_and_deletes_of_one_name_interleave(live: LiveServer, world: World,
                                                    sources: list[Path]) -> None:
    name = "acme-churn"
    replies: dict[int, httpx.Response] = {}

    def work(i: int) -> None:
        if i % 3 == 2:
            replies[i] = httpx.delete(f"{live.url}/admin/adapters/{name}", headers=ADMIN_HEADERS,
                                      timeout=120)
        else:
            replies[i] = put(live, name, files=upload_files(sources[i % UPLOADERS]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for i, reply in sorted(replies.items()):
        if i % 3 == 2:
            assert reply.status_code in (200, 404), (i, reply.text)
        else:
            assert reply.status_code == 201, (i, reply.text)
            assert reply.json()["digest"] == sha256(sources[i % UPLOADERS] / WEIGHTS_FILE)
    assert len(replies) == 9, replies
    assert leftovers(world) == []
    folder = world.root / name
    response = httpx.get(f"{live.url}/admin/adapters/{name}", headers=ADMIN_HEADERS, timeout=30)
    if response.status_code == 200:  # the last change was an upload: registry == files
        assert response.json()["digest"] == sha256(folder / WEIGHTS_FILE)
    else:  # the last change was a delete: no files either
        assert response.status_code == 404 and not folder.exists()


# ============================================================================ item 10


def _failing_open(failure: int, after: int) -> Any:
    """An `open` for admin.py whose files fail with `failure` once `after` bytes are written
    (at open time when `after` is negative), as a full disk or a read-only mount does."""
    real_open = open

    class Full:
        def __init__(self, file: Any) -> None:
            self.file, self.written = file, 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > after:
                raise OSError(failure, os.strerror(failure))
            self.written += len(data)
            return int(self.file.write(data))

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.file, attr)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    def fake_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if not set(mode) & set("wax+"):
            return real_open(path, mode, *args, **kwargs)
        if after < 0:
            raise OSError(failure, os.strerror(failure), str(path))
        return Full(real_open(path, mode, *args, **kwargs))

    return fake_open


STORAGE = [  # (errno, bytes written before it fails, code)
    (errno.ENOSPC, 1000, "insufficient_storage"),
    (errno.EDQUOT, 0, "insufficient_storage"),
    (errno.EROFS, -1, "read_only_storage"),
]


@pytest.mark.parametrize(("failure", "after", "code"), STORAGE,
                         ids=[errno.errorcode[s[0]] for s in STORAGE])
def test_full_or_read_only_disk_is_507(live: LiveServer, world: World, sources: list[Path],
                                       monkeypatch: pytest.MonkeyPatch, failure: int,
                                       after: int, code: str) -> None:
    name = f"acme-disk-{errno.errorcode[failure].lower()}"
    first = put(live, name, files=upload_files(sources[0]))
    assert first.status_code == 201, first.text
    before = sorted(p.name for p in world.root.iterdir())
    monkeypatch.setattr(admin, "open", _failing_open(failure, after), raising=False)
    err = assert_error(put(live, name, files=upload_files(sources[1])), 507)
    monkeypatch.undo()
    assert err["code"] == code and err["type"] == "server_error", err
    # Nothing left behind, and the first upload is still what is served and on disk.
    assert leftovers(world) == []
    assert sorted(p.name for p in world.root.iterdir()) == before
    assert current(live, name)["digest"] == sha256(sources[0] / WEIGHTS_FILE)
    assert sha256(world.root / name / WEIGHTS_FILE) == sha256(sources[0] / WEIGHTS_FILE)


def _chunked_put(live: LiveServer, path: str, content_type: str, body: bytes) -> tuple[int, str]:
    """PUT `body` with Transfer-Encoding: chunked over a raw socket, sending slices of one
    buffer, so that the client allocates next to nothing while memory is traced. The reply is
    read by a second thread while the body goes out, since the server answers a refused body
    before it ends and then resets the connection."""
    with socket.create_connection(("127.0.0.1", live.port), timeout=60) as conn:
        reply = bytearray()

        def read() -> None:
            with contextlib.suppress(OSError):
                while chunk := conn.recv(65536):
                    reply.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        head = (f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                f"Authorization: {ADMIN_HEADERS['Authorization']}\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        view, step = memoryview(body), 64 << 10
        with contextlib.suppress(OSError):  # reset once the server has answered
            conn.sendall(head.encode())
            for i in range(0, len(body), step):
                if reply:
                    break
                piece = view[i:i + step]
                conn.sendall(b"%x\r\n" % len(piece))
                conn.sendall(piece)
                conn.sendall(b"\r\n")
                time.sleep(0.002)  # one piece per server read, not 256 KiB socket reads
            conn.sendall(b"0\r\n\r\n")
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        reader.join(60)
    status_line, _, rest = bytes(reply).partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), reply
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode()


def test_streamed_upload_over_the_limit_is_refused_in_bounded_memory(
        live: LiveServer, world: World, sources: list[Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    files = upload_files(sources[0])
    files[WEIGHTS_FILE] = (WEIGHTS_FILE, os.urandom(LIMIT + (4 << 20)), "application/octet-stream")
    request = httpx.Request("PUT", "http://x", files=files)
    body, content_type = request.read(), request.headers["content-type"]
    del files, request
    # Nothing of an upload may go to the temporary directory (memory, where /tmp is a
    # tmpfs): a spool there now fails, as it would on a full /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmp"))
    tracemalloc.start()
    try:
        status, text = _chunked_put(live, "/admin/adapters/acme-stream", content_type, body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 413, text
    assert f"limit of {LIMIT} bytes" in text
    # All Python allocations meanwhile, in every thread: uvicorn's and h11's socket buffers
    # (a few reads of at most 256 KiB) and the one chunk being written; about 0.5 MB here,
    # where the old multipart spool alone kept 1 MiB in memory, then copied it to /tmp.
    assert peak < 2 << 20, peak
    assert leftovers(world) == [] and not (world.root / "acme-stream").exists()


# ============================================================================ leftovers


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _host() -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname())[:63]


def _backdate(folder: Path, seconds: float) -> None:
    when = time.time() - seconds
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (when, when))


def test_leftovers_are_removed_at_start(tmp_path: Path) -> None:
    world = build_world(tmp_path)
    uploads = world.root / admin.UPLOAD_DIR
    uploads.mkdir()
    real = {p.name: sha256(p / WEIGHTS_FILE) for p in world.root.iterdir() if p.is_dir()
            and p != uploads}

    def leftover(folder: str, *, age: float = 0.0) -> str:
        (uploads / folder).mkdir()
        (uploads / folder / WEIGHTS_FILE).write_bytes(b"partial")
        if age:
            _backdate(uploads / folder, age)
        return folder

    dead = _dead_pid()
    gone = [
        # What earlier versions left (a kill during validation, during a swap, a delete).
        leftover("acme-x-0123456789ab", age=7200),
        leftover(".old-acme-x-0123456789ab", age=7200),
        leftover(".deleted-acme-y-0123456789ab", age=7200),
        # This host's, from a process that is gone.
        leftover(f"staging~acme-x~{_host()}~{dead}~0123456789ab"),
        leftover(f"old~acme-x~{_host()}~{dead}~0123456789ab"),
        # Another replica's (shared volume), untouched for long.
        leftover("staging~acme-x~other-pod~7~0123456789ab", age=7200),
    ]
    kept = [
        # Another replica's, fresh: its upload may still be running.
        leftover("staging~acme-x~other-pod~7~abcdef012345"),
        leftover("acme-z-abcdef012345"),
        # Not a name the admin API makes.
        leftover("notes", age=7200),
        leftover("old~acme-x~other-pod~7~XYZ", age=7200),
    ]
    (uploads / "acme-w-0123456789ab").write_bytes(b"a file, not a folder")
    os.utime(uploads / "acme-w-0123456789ab", (time.time() - 7200,) * 2)
    with world.serve():
        remaining = sorted(p.name for p in uploads.iterdir())
    assert remaining == sorted([*kept, "acme-w-0123456789ab"]), (remaining, gone)
    assert {p.name: sha256(p / WEIGHTS_FILE) for p in world.root.iterdir() if p.is_dir()
            and p != uploads} == real
