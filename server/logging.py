"""Request ids and the access log.

Every HTTP request gets an id: the caller's `X-Request-Id` when it is a short token, else a
fresh one. It is stored in `request.state.request_id`, returned in the `X-Request-Id`
response header and written on the access-log line, which is emitted when the response has
been sent completely (for a stream: after `[DONE]`) with method, path, status, duration,
tenant and adapter. Handlers fill `request.state.adapter` / `.tenant`; prompts and outputs
are never part of the line (see `ServerConfig.log_prompts` for the opt-in debug log).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("loramux.access")

_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # fullmatch: `$` accepts a trailing "\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _loggable(value: object) -> str:
    """`value` with control characters escaped, so a caller cannot forge log lines (\\r\\n)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def new_request_id() -> str:
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streaming bodies)."""

    def __init__(self, app: ASGIApp,
                 on_response: Callable[[str, str, int], None] | None = None) -> None:
        """`on_response(method, path, status)` is called once per response (metrics)."""
        self.app = app
        self.on_response = on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _ID_RE.fullmatch(incoming) else new_request_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        start = time.monotonic()
        status: int | None = None
        logged = False

        def log_line() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            path = scope.get("path", "")
            # Probes and scrapes every few seconds would drown the log.
            level = logging.DEBUG if path in ("/metrics", "/health", "/ready") else logging.INFO
            final = status if status is not None else (499 if state.get("disconnected") else 500)
            if self.on_response is not None:
                self.on_response(scope.get("method", ""), path, final)
            access_log.log(
                level,
                "%s %s %s %d %.1fms tenant=%s adapter=%s%s",
                request_id, _loggable(scope.get("method", "")), _loggable(path), final,
                (time.monotonic() - start) * 1000.0,
                _loggable(state.get("tenant", "-")), _loggable(state.get("adapter", "-")),
                " disconnected" if state.get("disconnected") else "",
            )

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line()

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log_line()
