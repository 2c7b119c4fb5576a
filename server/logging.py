"""Request ids and the access log.

Every HTTP request gets an id the server makes: a client's choice could repeat another
client's, or pose as one in the log. It is stored in `request.state.request_id`, returned in
the `X-Request-Id` response header and written on the access-log line, which is emitted when
the response has been sent completely (for a stream: after `[DONE]`) with method, path,
status, duration, tenant and adapter. The client's own id (`X-Client-Request-Id`, OpenAI's
header, else `X-Request-Id`) travels apart: returned in `X-Client-Request-Id` when it is
printable ASCII of at most 512 characters (OpenAI's rule), and put on the access line as
`client_id=`, escaped and cut to 128 characters. Handlers fill `request.state.adapter` / `.tenant`; prompts and outputs
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

_CLIENT_ID_ECHOED = re.compile(r"[\x20-\x7e]{1,512}")  # fullmatch; OpenAI's rule
_CLIENT_ID_LOGGED = 128  # characters of a client's id on the access line
# C0, DEL and C1 controls (U+0085 is a line break to str.splitlines and some log shippers),
# the Unicode line and paragraph separators, and lone surrogates (no encoding takes them).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_LOGGED_CHARS = 256  # of one client-supplied field on a log line


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _loggable(value: object, limit: int = _LOGGED_CHARS) -> str:
    """`value` with control characters and line separators escaped, so a caller cannot forge
    log lines, and cut to `limit` characters, so a caller cannot fill the disk (a 14 MB
    `model` value was logged whole)."""
    text = str(value)
    cut = f"...({len(text)} characters)" if len(text) > limit else ""
    return _CONTROL.sub(_escape, text[:limit]) + cut


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
        sent = dict(scope.get("headers") or [])
        client_id = (sent.get(b"x-client-request-id") or sent.get(b"x-request-id")
                     or b"").decode("latin-1")
        echoed = client_id.encode("ascii") if _CLIENT_ID_ECHOED.fullmatch(client_id) else None
        shown = f" client_id={_loggable(client_id, _CLIENT_ID_LOGGED)}" if client_id else ""
        request_id = new_request_id()
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
                "%s %s %s %d %.1fms tenant=%s adapter=%s%s%s",
                request_id, _loggable(scope.get("method", "")), _loggable(path), final,
                (time.monotonic() - start) * 1000.0,
                _loggable(state.get("tenant", "-")), _loggable(state.get("adapter", "-")),
                " disconnected" if state.get("disconnected") else "", shown,
            )

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode("latin-1")))
                if echoed is not None:
                    headers.append((b"x-client-request-id", echoed))
                message = {**message, "headers": headers}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_line()

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log_line()
