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
                                      adapter_model.safetensors (size-limited, validated in a
                                      temporary folder under the root before registration)
    DELETE /admin/adapters/{name}     unload (drains); removes the files of an upload
    POST   /admin/adapters/{name}/pin, /unpin

Paths are confined to the adapter root after resolving symlinks (the registry checks that);
operator-given `--adapter` paths are the only ones that may lie elsewhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest
from starlette.types import Message

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

    async def load(request: Request, name: str, path: Path, pinned: bool) -> AdapterRow:
        _check_name(name)
        request.state.adapter = name
        engine = _state(request).engine
        try:
            return await engine.load_adapter(name, path, pinned=pinned)  # type: ignore[no-any-return]
        except (AdapterError, AdapterNotFound) as exc:
            raise _adapter_error(exc, name) from None

    # ------------------------------------------------------------------ vLLM-compatible

    @router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: Request) -> str:
        body = parse_body(await read_body(request), LoadLoraAdapterRequest)
        row = await load(request, body.lora_name, Path(body.lora_path), pinned=False)
        log.info("admin: loaded %s v%d from %s", row.name, row.version, row.path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: Request) -> str:
        body = parse_body(await read_body(request), UnloadLoraAdapterRequest)
        request.state.adapter = body.lora_name
        try:
            await _state(request).engine.unload_adapter(body.lora_name)
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
        log.info("admin: loaded %s v%d from %s", row.name, row.version, row.path)
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
        staging = root / UPLOAD_DIR / f"{name}-{uuid.uuid4().hex[:12]}"
        try:
            files = await _receive_files(request, limit)
            await asyncio.to_thread(_write_files, staging, files)
            try:
                await state.engine.validate_adapter(staging)
            except AdapterError as exc:
                raise _adapter_error(exc, name) from None
            row = await _install(request, name, staging, root)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        log.info("admin: uploaded %s v%d (%s)", row.name, row.version, row.digest[:12])
        return JSONResponse(row.as_json(), status_code=201)

    @router.delete("/admin/adapters/{name}")
    async def delete_adapter(name: str, request: Request) -> dict[str, Any]:
        request.state.adapter = name
        engine = _state(request).engine
        # An uploaded folder is moved aside first (one atomic rename), so no request can load
        # it lazily again between the unload and the removal of its files.
        removed, trash = False, None
        root = engine.adapter_root
        if root is not None:
            _check_name(name)
            folder = root / name
            if (folder / UPLOAD_MARKER).is_file():
                trash = root / UPLOAD_DIR / f".deleted-{name}-{uuid.uuid4().hex[:12]}"
                trash.parent.mkdir(exist_ok=True)
                folder.rename(trash)
                removed = True
        unloaded = True
        try:
            await engine.unload_adapter(name)
        except AdapterNotFound:
            unloaded = False
        if trash is not None:
            await asyncio.to_thread(shutil.rmtree, trash, True)
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


# ============================================================================ upload helpers


async def _receive_files(request: Request, limit: int) -> dict[str, UploadFile]:
    """The two PEFT files of a multipart body, refusing it (413) once it passes `limit` bytes."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise APIError(413, f"The upload is larger than the limit of {limit} bytes.")
        return message

    limited = StarletteRequest(request.scope, receive)
    form = await limited.form(max_files=2, max_fields=2)
    files: dict[str, UploadFile] = {}
    for field, value in form.multi_items():
        if not isinstance(value, UploadFile):
            raise bad_request(f"Unexpected form field {field!r}; send only the two files.")
        wanted = field if field in (CONFIG_FILE, SAFETENSORS_FILE) else value.filename
        if wanted not in (CONFIG_FILE, SAFETENSORS_FILE):
            raise bad_request(f"Unexpected file {value.filename!r} in field {field!r}; send "
                              f"{CONFIG_FILE} and {SAFETENSORS_FILE}.")
        if wanted in files:
            raise bad_request(f"{wanted} was sent twice.")
        files[wanted] = value
    missing = {CONFIG_FILE, SAFETENSORS_FILE} - files.keys()
    if missing:
        raise bad_request(f"The upload lacks {', '.join(sorted(missing))}.")
    return files


def _write_files(staging: Path, files: dict[str, UploadFile]) -> None:
    staging.mkdir(parents=True, exist_ok=False)
    for filename, upload in files.items():
        upload.file.seek(0)
        with open(staging / filename, "wb") as out:
            shutil.copyfileobj(upload.file, out, 1 << 20)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (staging / UPLOAD_MARKER).write_text(f"uploaded {stamp}\n")


async def _install(request: Request, name: str, staging: Path, root: Path) -> AdapterRow:
    """Move the validated upload to root/name and register it; put back the old folder if
    registration fails, so a failed upload changes nothing."""
    engine = _state(request).engine
    final = root / name
    trash = root / UPLOAD_DIR / f".old-{name}-{uuid.uuid4().hex[:12]}"

    def swap_in() -> None:
        if final.exists() or final.is_symlink():
            if not (final / UPLOAD_MARKER).is_file():
                # The operator's folder (e.g. on a volume): an upload never overwrites it.
                raise APIError(409, f"{name} exists under the adapter root and was not "
                               "uploaded; remove it there or upload under another name.")
            final.rename(trash)
        staging.rename(final)

    def swap_back() -> None:
        shutil.rmtree(final, ignore_errors=True)
        if trash.exists():
            trash.rename(final)

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
