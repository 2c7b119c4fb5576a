"""OpenAI-shaped errors: every failure leaves the server as `{"error": {...}}`.

Handlers raise `APIError` (or one of its helpers); FastAPI's own validation errors and
Starlette's HTTP errors are turned into the same body here, with 400 instead of FastAPI's 422
because that is what OpenAI clients expect; the router's bare 404 and 405 say which method
and URL were wrong, as OpenAI's do. Anything unexpected becomes a 500 whose message never
carries the exception's text: the details go to the log under the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("loramux.server")

_STATUS_TYPES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "overloaded"),
}


class APIError(Exception):
    """An error the client should see: status, OpenAI type/code/param, optional Retry-After."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        default_type, default_code = _STATUS_TYPES.get(status, ("invalid_request_error", None))
        self.status = status
        self.message = message
        self.type = type or default_type
        self.code = code if code is not None else default_code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, int(self.retry_after + 0.999)))}

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = self.headers()
        if request_id:
            headers["X-Request-Id"] = request_id
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(name: str) -> APIError:
    """The one 404 for a model that does not exist and one the caller may not use. A name
    longer than any model can have is cut (a 14 MB `model` was echoed whole)."""
    if len(name) > 256:
        name = f"{name[:64]}...({len(name)} characters)"
    return APIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def unauthorized(message: str = "Invalid or missing API key.") -> APIError:
    return APIError(401, message)


def rate_limited(message: str, retry_after: float) -> APIError:
    return APIError(429, message, retry_after=retry_after)


def overloaded(message: str, retry_after: float = 1.0) -> APIError:
    return APIError(503, message, retry_after=retry_after)


def shutting_down(message: str = "The server is shutting down.") -> APIError:
    """The 503 of a draining server: new requests, and running ones cut at the grace's end."""
    return APIError(503, message, code="shutting_down", retry_after=1.0)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


# pydantic names the member of a union a value failed against in `loc` ("prompt", "str"):
# those are types, not fields, and are left out of `param`.
_UNION_MEMBERS = {"str", "int", "float", "bool", "list", "dict", "function-after"}


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    parts = [p for p in parts if p not in _UNION_MEMBERS and "[" not in p]
    return ".".join(parts) or None


def _unknown_fields(errors: Sequence[Any]) -> list[str]:
    """The fields pydantic refused as undeclared (`extra="forbid"`), the outermost first."""
    locs = [tuple(e.get("loc", ())) for e in errors if e.get("type") == "extra_forbidden"]
    names = [_loc_param(loc) for loc in sorted(locs, key=len)]
    return [name for name in names if name]


def validation_error(errors: Sequence[Any]) -> APIError:
    """A 400 naming the first invalid field (pydantic's or FastAPI's error list).

    Unknown fields are named before anything else, in OpenAI's words: a misspelt field
    (`promt`) also makes the real one missing, and the spelling is what the caller must fix.
    """
    unknown = _unknown_fields(errors)
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        message = f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}"
        others = len(errors) - len(unknown)
        if others > 0:
            message += f" (and {others} more)"
        return APIError(400, message, param=unknown[0])
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    param = _loc_param(loc)
    if first.get("type") == "json_invalid":
        message = "The request body is not valid JSON."
    else:
        message = str(first.get("msg", "invalid request"))
        if param:
            message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return APIError(400, message, param=param)


_PATH_SHOWN = 200  # characters of a request path an error message repeats


def _routing_message(request: Request, exc: StarletteHTTPException) -> str:
    """What the router's bare 404 / 405 ("Not Found") means, in OpenAI's words."""
    path = request.url.path
    if len(path) > _PATH_SHOWN:
        path = path[:_PATH_SHOWN] + "..."
    where = f"{request.method} {path}"
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow")
        return f"Invalid method for URL ({where})" + (f"; use {allowed}." if allowed else ".")
    return f"Invalid URL ({where})."


def install_error_handlers(
    app: FastAPI, *, unrouted: Callable[[Request], APIError | None] | None = None
) -> None:
    """Route every error through the OpenAI body.

    `unrouted(request)` may give the error for a path no route answered (404) or answered
    with another method (405), instead of the generic one: the admin API's when it is off.
    """

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(_request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response(_request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405) and unrouted is not None:
            instead = unrouted(request)
            if instead is not None:
                return instead.response(_request_id(request))
        detail = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code in (404, 405) and detail == HTTPStatus(exc.status_code).phrase:
            detail = _routing_message(request, exc)  # the router's, which says nothing
        err = APIError(exc.status_code, detail)
        response = err.response(_request_id(request))
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = _request_id(request)
        # The traceback is logged by the server (Starlette re-raises after this response).
        log.error("request %s failed with %s", rid, type(exc).__name__)
        return APIError(
            500, f"Internal server error (request id {rid})." if rid else "Internal server error."
        ).response(rid)
