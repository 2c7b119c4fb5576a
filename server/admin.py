"""The admin API: vLLM's runtime LoRA endpoints and loramux's /admin/adapters.

Every route needs `Authorization: Bearer <admin token>` (compared in constant time; 401
without it or with a wrong one). Without a configured token the admin API is off: every path
under /admin and both vLLM routes answer 404 (whatever the method) with an OpenAI error body
saying so and how to turn it on, so that an operator does not chase a wrong URL.

    POST   /v1/load_lora_adapter      {"lora_name", "lora_path"}  (vLLM; a new version if
                                                                  the name exists)
    POST   /v1/unload_lora_adapter    {"lora_name"}               (vLLM; drains)
    GET    /admin/adapters            every loaded version: tier, rank, size, version, digest,
                                      references, pinned, last use; plus lazy names on disk
    GET    /admin/adapters/{name}
    POST   /admin/adapters            {"name", "path"?, "pin"?}   load from under the root
    PUT    /admin/adapters/{name}     multipart upload of adapter_config.json and
                                      adapter_model.safetensors (size-limited, streamed into a
                                      staging folder under the root and validated there before
                                      registration; 507 when the disk is full or read-only)
    DELETE /admin/adapters/{name}     unload (drains); removes the files of an upload
    POST   /admin/adapters/{name}/pin, /unpin

Paths are confined to the adapter root after resolving symlinks (the registry checks that);
operator-given `--adapter` paths are the only ones that may lie elsewhere.

Uploads, loads, unloads and deletes of one name run one at a time (an asyncio lock per name,
held from the swap of the folders to the registry's answer), so each reply describes the
version its own call installed and the files under the root are those of the current
version. Different names stay concurrent. Folders an upload leaves in `.uploads/` when the
process dies are removed at the next start (`clean_upload_leftovers`).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from loramux.adapters.peft import CONFIG_FILE, SAFETENSORS_FILE, AdapterRefused, Rule, check_name
from loramux.adapters.types import AdapterError, AdapterNotFound
from loramux.server.engine_client import AdapterRow
from loramux.server.errors import APIError, bad_request
from loramux.server.openai_schemas import (
    AdminLoadRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    parse_body,
    read_body,
)

log = logging.getLogger("loramux.admin")

UPLOAD_DIR = ".uploads"  # under the adapter root; never a valid adapter name
UPLOAD_MARKER = ".loramux-upload"  # in a folder the admin API created (DELETE removes it)
UPLOAD_FILES = (CONFIG_FILE, SAFETENSORS_FILE)
PART_HEADER_BYTES = 16 << 10  # headers of one multipart part; more is not an upload
LEFTOVER_STALE_S = 3600.0  # another process's leftovers are removed once untouched this long

_T = TypeVar("_T")


def _state(request: Request) -> Any:
    return request.app.state.loramux


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def bearer_is(request: Request, token: str | None) -> bool:
    """Whether the request's `Authorization: Bearer` token equals `token` (constant time)."""
    if token is None:
        return False
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    # Digests first, so compare_digest sees equal lengths whatever was sent.
    valid = hmac.compare_digest(_digest(presented.strip()), _digest(token))
    return scheme.lower() == "bearer" and valid


_VLLM_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def admin_disabled() -> APIError:
    """The 404 of every admin path while the admin API is off."""
    return APIError(404, "The admin API is disabled on this server: start loramux with "
                    "--admin-token (or LORAMUX_ADMIN_TOKEN) to enable it.",
                    code="admin_disabled")


def is_admin_path(path: str) -> bool:
    path = path.rstrip("/")
    return path == "/admin" or path.startswith("/admin/") or path in _VLLM_PATHS


def unrouted_admin(request: Request) -> APIError | None:
    """For the error handlers: the admin-off 404 also for admin paths no route matches
    (`/admin/nope`, a wrong method), which never reach `require_admin`."""
    if is_admin_path(request.url.path) and _state(request).config.admin_token is None:
        return admin_disabled()
    return None


async def require_admin(request: Request) -> None:
    """404 when admin is off; 401 unless the bearer token equals the admin token."""
    token: str | None = _state(request).config.admin_token
    if token is None:
        raise admin_disabled()
    if not bearer_is(request, token):
        raise APIError(401, "Invalid or missing admin token.", code="invalid_admin_token")
    request.state.tenant = "admin"


def _adapter_error(exc: Exception, name: str) -> APIError:
    """Map a registry refusal to its status: 404 unknown, 413 size, 409 pin room, else 400."""
    if isinstance(exc, AdapterNotFound):
        return APIError(404, f"The lora adapter '{name}' cannot be found.", code="not_found",
                        param="lora_name")
    if isinstance(exc, AdapterRefused) and exc.rule == Rule.SIZE:
        return APIError(413, str(exc))
    if isinstance(exc, AdapterRefused) and exc.rule == "pin limit":
        return APIError(409, str(exc))
    return APIError(400, str(exc))


def _check_name(name: str) -> None:
    try:
        check_name(name)
    except AdapterRefused as exc:
        raise bad_request(str(exc), "name") from None


def _root(request: Request) -> Path:
    root: Path | None = _state(request).engine.adapter_root
    if root is None:
        raise bad_request("No adapter root is configured (--adapter-root); adapters can "
                          "only be loaded from paths given at start.")
    # Absolute, because the registry reads relative paths as relative to the root.
    return root.resolve()


def build_admin_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_admin)])
    locks = _NameLocks()

    async def load(request: Request, name: str, path: Path, pinned: bool) -> AdapterRow:
        _check_name(name)
        request.state.adapter = name
        engine = _state(request).engine
        try:
            return await locks.run(name, lambda: engine.load_adapter(name, path, pinned=pinned))
        except (AdapterError, AdapterNotFound) as exc:
            raise _adapter_error(exc, name) from None

    # ------------------------------------------------------------------ vLLM-compatible

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: Request) -> str:
        body = parse_body(await read_body(request), LoadLoraAdapterRequest)
        row = await load(request, body.lora_name, Path(body.lora_path), pinned=False)
        log.info("admin: loaded %s v%d (%s) from %s", row.name, row.version, row.outcome,
                 row.path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: Request) -> str:
        body = parse_body(await read_body(request), UnloadLoraAdapterRequest)
        request.state.adapter = body.lora_name
        engine = _state(request).engine
        try:
            await locks.run(body.lora_name, lambda: engine.unload_adapter(body.lora_name))
        except AdapterNotFound as exc:
            raise _adapter_error(exc, body.lora_name) from None
        log.info("admin: unloaded %s", body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    # ------------------------------------------------------------------ /admin/adapters

    @router.get("/admin/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        engine = _state(request).engine
        stats = engine.stats()
        return {
            "object": "list",
            "data": [row.as_json() for row in engine.list_adapters()],
            "lazy": engine.lazy_adapter_names(),
            "max_lora": stats.max_lora,
        }

    def current_row(request: Request, name: str) -> AdapterRow:
        for row in _state(request).engine.list_adapters():
            if row.name == name and row.current:
                return row
        raise _adapter_error(AdapterNotFound(name), name)

    @router.get("/admin/adapters/{name}")
    async def get_adapter(name: str, request: Request) -> dict[str, Any]:
        return current_row(request, name).as_json()

    @router.post("/admin/adapters", status_code=201)
    async def load_adapter(request: Request) -> dict[str, Any]:
        body = parse_body(await read_body(request), AdminLoadRequest)
        root = _root(request)
        path = Path(body.path) if body.path else Path(body.name)
        if not path.is_absolute():
            path = root / path
        row = await load(request, body.name, path, pinned=body.pin)
        log.info("admin: loaded %s v%d (%s) from %s", row.name, row.version, row.outcome,
                 row.path)
        return row.as_json()

    @router.put("/admin/adapters/{name}", status_code=201)
    async def upload_adapter(name: str, request: Request) -> JSONResponse:
        _check_name(name)
        request.state.adapter = name
        root = _root(request)
        state = _state(request)
        limit: int = state.config.upload_limit
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"The upload is {declared} bytes; the limit is {limit}.")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(415, "Upload the two PEFT files as multipart/form-data "
                           f"({CONFIG_FILE}, {SAFETENSORS_FILE}).")
        staging = _scratch(root, "staging", name)
        installing = False
        try:
            # Received and validated in its own staging folder, concurrently with anything
            # else; only the swap into root/name and the registration hold the name's lock.
            with _storage_refusals("upload", name):
                await _receive_upload(request, staging, limit)
                try:
                    await state.engine.validate_adapter(staging)
                except AdapterError as exc:
                    raise _adapter_error(exc, name) from None
                installing = True  # from here _install removes the staging folder itself
                row = await locks.run(name, lambda: _install(state.engine, name, staging, root))
        finally:
            if not installing:
                await asyncio.to_thread(shutil.rmtree, staging, True)
        log.info("admin: uploaded %s v%d (%s)", row.name, row.version, row.digest[:12])
        return JSONResponse(row.as_json(), status_code=201)

    @router.delete("/admin/adapters/{name}")
    async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
        request.state.adapter = name
        engine = _state(request).engine
        root = engine.adapter_root
        if root is not None:
            _check_name(name)

        async def delete() -> tuple[bool, bool]:
            # An uploaded folder is moved aside first (one atomic rename), so no request can
            # load it lazily again between the unload and the removal of its files.
            trash = None
            if root is not None and (root / name / UPLOAD_MARKER).is_file():
                trash = _scratch(root, "deleted", name)
                await asyncio.to_thread(_move_aside, root / name, trash)
            unloaded = True
            try:
                await engine.unload_adapter(name)
            except AdapterNotFound:
                unloaded = False
            if trash is not None:
                await asyncio.to_thread(shutil.rmtree, trash, True)
            return unloaded, trash is not None

        with _storage_refusals("delete", name):
            unloaded, removed = await locks.run(name, delete)
        if not unloaded and not removed:
            raise _adapter_error(AdapterNotFound(name), name)
        log.info("admin: deleted %s (unloaded=%s, files removed=%s)", name, unloaded, removed)
        return {"name": name, "deleted": True, "unloaded": unloaded, "files_removed": removed}

    @router.post("/admin/adapters/{name}/pin")
    async def pin(name: str, request: Request) -> dict[str, Any]:
        request.state.adapter = name
        try:
            row = await _state(request).engine.pin_adapter(name)
        except (AdapterError, AdapterNotFound) as exc:
            raise _adapter_error(exc, name) from None
        return row.as_json()  # type: ignore[no-any-return]

    @router.post("/admin/adapters/{name}/unpin")
    async def unpin(name: str, request: Request) -> dict[str, Any]:
        request.state.adapter = name
        try:
            row = await _state(request).engine.unpin_adapter(name)
        except (AdapterError, AdapterNotFound) as exc:
            raise _adapter_error(exc, name) from None
        return row.as_json()  # type: ignore[no-any-return]

    return router


# ============================================================================ one name at a time


@dataclass
class _NameLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holding or waiting


class _NameLocks:
    """One asyncio lock per adapter name. An entry lives only while a call holds or waits for
    it, so the map never outgrows the calls in flight (all on the event loop: no thread lock).
    """

    def __init__(self) -> None:
        self._locks: dict[str, _NameLock] = {}

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(name, _NameLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[name]

    async def run(self, name: str, work: Callable[[], Awaitable[_T]]) -> _T:
        """`work()` under `name`'s lock, carried to its end even if the request is cancelled
        meanwhile: a cancelled handler must not release the lock while a swap or a registry
        load it started is still running in a worker thread."""

        async def locked() -> _T:
            async with self.hold(name):
                return await work()

        task = asyncio.ensure_future(locked())
        # Read the outcome even when no one awaits it any more (no "never retrieved" noise).
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)


# ============================================================================ storage


@contextmanager
def _storage_refusals(action: str, name: str) -> Iterator[None]:
    """Turn an OSError the adapter root raises into its 507 (see `_storage_error`)."""
    try:
        yield
    except OSError as exc:
        refusal = _storage_error(exc)
        if refusal is None:
            raise
        log.warning("admin: %s of %s refused: %s", action, name, exc)
        raise refusal from None


def _storage_error(exc: OSError) -> APIError | None:
    """507 for a write the adapter root cannot take, None for any other OSError (a 500).

    A full disk or quota and a read-only mount are both "the server cannot store this":
    nothing in the request is wrong and retrying it here changes nothing until an operator
    frees space or remounts, so neither is a 503 (which invites retries) nor a bare 500.
    """
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return APIError(507, "The adapter root has no space left (disk or quota full); the "
                        "upload was discarded and nothing changed. Free space, then upload "
                        "again.", type="server_error", code="insufficient_storage")
    if exc.errno == errno.EROFS:
        return APIError(507, "The adapter root is on a read-only file system, so this server "
                        "cannot store uploads; nothing changed. Mount it read-write, or load "
                        "adapters from paths already there.", type="server_error",
                        code="read_only_storage")
    return None


def _host() -> str:
    """This machine's name as it appears in scratch folder names (no `~`, at most 63 chars)."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname())[:63]


def _scratch(root: Path, kind: str, name: str) -> Path:
    """A new scratch folder path under root/.uploads: `<kind>~<name>~<host>~<pid>~<12 hex>`.

    kind: "staging" (an upload being received and validated), "old" (the previous upload,
    moved aside while the new one registers) or "deleted" (a DELETE's files being removed).
    The host and pid let `clean_upload_leftovers` tell a dead process's folders from those of
    a live one on another replica sharing the volume.
    """
    return root / UPLOAD_DIR / f"{kind}~{name}~{_host()}~{os.getpid()}~{uuid.uuid4().hex[:12]}"


def _move_aside(folder: Path, trash: Path) -> None:
    trash.parent.mkdir(exist_ok=True)
    folder.rename(trash)
    os.utime(trash)  # a rename keeps the old mtime; the cleanup's clock starts now


_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_SCRATCH_RE = re.compile(rf"(?:staging|old|deleted)~{_NAME}~(?P<host>[A-Za-z0-9.-]{{1,63}})"
                         r"~(?P<pid>[1-9][0-9]{0,9})~[0-9a-f]{12}")
# What versions before the host and pid wrote: `<name>-<hex>`, `.old-...`, `.deleted-...`.
_LEGACY_RE = re.compile(rf"(?:\.old-|\.deleted-)?{_NAME}-[0-9a-f]{{12}}")


def clean_upload_leftovers(root: Path | None, *, stale_after: float = LEFTOVER_STALE_S
                           ) -> list[str]:
    """Remove the scratch folders of uploads and deletes that a dead process left under
    root/.uploads; called once at start, before the server accepts requests. Returns the names
    removed.

    Only folders named as `_scratch` (or an earlier version) names them are candidates. One of
    this host whose process is gone (or whose pid is this process's: a restarted container
    reuses it, and this process has made none yet) goes at once; any other goes once nothing
    in it changed for `stale_after` seconds, because it may belong to a live upload on another
    replica that shares the adapter volume. Real adapter folders are never looked at.
    """
    if root is None:
        return []
    uploads = root / UPLOAD_DIR
    try:
        entries = list(os.scandir(uploads))
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot list %s to remove upload leftovers: %s", uploads, exc)
        return []
    removed = []
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or not _leftover(entry, stale_after):
                continue
            shutil.rmtree(entry.path)
        except OSError as exc:
            log.warning("cannot remove upload leftover %s: %s", entry.path, exc)
            continue
        removed.append(entry.name)
    if removed:
        log.info("removed %d upload leftovers under %s: %s", len(removed), uploads,
                 ", ".join(sorted(removed)))
    return removed


def _leftover(entry: os.DirEntry[str], stale_after: float) -> bool:
    match = _SCRATCH_RE.fullmatch(entry.name)
    if match is None and _LEGACY_RE.fullmatch(entry.name) is None:
        return False
    if match is not None and match["host"] == _host() and not _alive(int(match["pid"])):
        return True
    newest = entry.stat(follow_symlinks=False).st_mtime
    with os.scandir(entry.path) as children:
        for child in children:
            newest = max(newest, child.stat(follow_symlinks=False).st_mtime)
    return newest < time.time() - stale_after


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ============================================================================ upload helpers


async def _receive_upload(request: Request, staging: Path, limit: int) -> None:
    """Stream the multipart body's two PEFT files straight into `staging` (created here).

    One received chunk is in memory at a time: no spool in /tmp, no second copy. The body is
    refused (413) as soon as it passes `limit` bytes, whatever Content-Length said.
    """
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad_request("The multipart body has no boundary in its Content-Type.")
    await asyncio.to_thread(staging.mkdir, parents=True)
    writer = _PartWriter(staging)
    parser = MultipartParser(boundary, writer.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise APIError(413, f"The upload is larger than the limit of {limit} bytes.")
            if chunk:
                # Parsing calls the writer, which writes to disk: off the event loop.
                await asyncio.to_thread(parser.write, chunk)
        parser.finalize()
    except FormParserError:
        raise bad_request("The multipart body is malformed.") from None
    finally:
        await asyncio.to_thread(writer.close)
    if not writer.ended:
        raise bad_request("The multipart body ended before its closing boundary.")
    missing = set(UPLOAD_FILES) - writer.written
    if missing:
        raise bad_request(f"The upload lacks {', '.join(sorted(missing))}.")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    await asyncio.to_thread((staging / UPLOAD_MARKER).write_text, f"uploaded {stamp}\n")


class _PartWriter:
    """python-multipart callbacks that write each file part to staging/<its PEFT file name>.

    A part is one of the two files, named by its field or its filename; a plain form field, an
    unknown file or a file sent twice is a 400, and so are part headers over
    PART_HEADER_BYTES (the parser would otherwise gather them in memory).
    """

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.written: set[str] = set()
        self.ended = False  # the closing boundary arrived
        self._headers: dict[bytes, bytes] = {}
        self._field = self._value = b""
        self._header_bytes = 0
        self._out: IO[bytes] | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished,
                "on_part_data": self.on_part_data, "on_part_end": self.on_part_end,
                "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self._headers, self._header_bytes = {}, 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += self._header(data, start, end)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += self._header(data, start, end)

    def _header(self, data: bytes, start: int, end: int) -> bytes:
        self._header_bytes += end - start
        if self._header_bytes > PART_HEADER_BYTES:
            raise bad_request(f"A part's headers are over {PART_HEADER_BYTES} bytes.")
        return data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in options:
            raise bad_request(f"Unexpected form field {field_name!r}; send only the two files.")
        filename = options[b"filename"].decode("utf-8", "replace")
        wanted = field_name if field_name in UPLOAD_FILES else filename
        if wanted not in UPLOAD_FILES:
            raise bad_request(f"Unexpected file {filename!r} in field {field_name!r}; send "
                              f"{CONFIG_FILE} and {SAFETENSORS_FILE}.")
        if wanted in self.written:
            raise bad_request(f"{wanted} was sent twice.")
        self.written.add(wanted)
        self._out = open(self.staging / wanted, "wb")  # noqa: SIM115 - closed at part end

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._out is not None  # on_headers_finished opened it or raised
        self._out.write(memoryview(data)[start:end])

    def on_part_end(self) -> None:
        self.close()

    def on_end(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self._out is not None:
            out, self._out = self._out, None
            out.close()


async def _install(engine: Any, name: str, staging: Path, root: Path) -> AdapterRow:
    """Under `name`'s lock: move the validated upload to root/name and register it; put back
    the old folder if registration fails, so a failed upload changes nothing. The reply is the
    registry's row for this install: no other change of the name can land in between."""
    final = root / name
    trash = _scratch(root, "old", name)

    def swap_in() -> None:
        moved = False
        if final.exists() or final.is_symlink():
            if not (final / UPLOAD_MARKER).is_file():
                # The operator's folder (e.g. on a volume): an upload never overwrites it.
                raise APIError(409, f"{name} exists under the adapter root and was not "
                               "uploaded; remove it there or upload under another name.")
            _move_aside(final, trash)
            moved = True
        try:
            staging.rename(final)
        except BaseException:
            if moved:
                trash.rename(final)
            raise

    def swap_back() -> None:
        shutil.rmtree(final, ignore_errors=True)
        if trash.exists():
            trash.rename(final)

    try:
        await asyncio.to_thread(swap_in)
        try:
            row: AdapterRow = await engine.load_adapter(name, final, pinned=False)
        except BaseException as exc:
            await asyncio.to_thread(swap_back)
            if isinstance(exc, AdapterError | AdapterNotFound):
                raise _adapter_error(exc, name) from None
            raise
        await asyncio.to_thread(shutil.rmtree, trash, True)
        return row
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)
