"""The OpenAPI document at /openapi.json: FastAPI's own plus what FastAPI cannot see.

Handlers read raw bodies (so a bad body is an OpenAI 400 whatever its Content-Type), which
hides the request bodies from FastAPI; they are added here from the same pydantic models the
handlers parse with, together with the bearer schemes and the error responses (always the
OpenAI error body; never FastAPI's 422, which the handlers turn into 400). Clients and the
schema fuzzer (tests/test_reliability_fuzz.py) read this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from loramux.adapters.peft import CONFIG_FILE, SAFETENSORS_FILE
from loramux.server.openai_schemas import (
    AdminLoadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)

_BODIES: dict[tuple[str, str], type[BaseModel]] = {
    ("/v1/completions", "post"): CompletionRequest,
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/v1/load_lora_adapter", "post"): LoadLoraAdapterRequest,
    ("/v1/unload_lora_adapter", "post"): UnloadLoraAdapterRequest,
    ("/admin/adapters", "post"): AdminLoadRequest,
}
_UPLOAD = ("/admin/adapters/{name}", "put")
_PUBLIC = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}")
_OPEN = ("/health", "/ready", "/metrics", "/openapi.json")

_ERROR_STATUSES = {
    "400": "Bad input (invalid JSON, an unknown field, a wrong field or value).",
    "401": "No or wrong API key / admin token.",
    "404": "Unknown model or adapter, or one this key may not use (admin routes: admin is off).",
    "409": "Conflicting adapter operation.",
    "413": "Upload or adapter too large.",
    "415": "Upload not sent as multipart/form-data.",
    "429": "Over a tenant limit (Retry-After says when to retry).",
    "503": "Overloaded, shutting down or not ready (Retry-After says when to retry).",
}

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]},
        },
    }},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for `app` completed with request bodies, auth and error bodies."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # never sent (422 -> 400)
        schemas.pop(name, None)
    schemas["ErrorResponse"] = _ERROR_SCHEMA
    components["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "a tenant's API key"},
        "adminToken": {"type": "http", "scheme": "bearer", "description": "the admin token"},
        "metricsToken": {"type": "http", "scheme": "bearer",
                         "description": "the metrics (or admin) token, when one is set"},
    }
    for (path, method), model in _BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
        schema["paths"][path][method]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": _ref(model.__name__)}}}
    binary = {"type": "string", "format": "binary"}
    schema["paths"][_UPLOAD[0]][_UPLOAD[1]]["requestBody"] = {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [CONFIG_FILE, SAFETENSORS_FILE],
            "properties": {CONFIG_FILE: binary, SAFETENSORS_FILE: binary}}}}}
    error = {"content": {"application/json": {"schema": _ref("ErrorResponse")}}}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if path in _OPEN:
                statuses = {"/ready": ("503",), "/metrics": ("401",)}.get(path, ())
            else:
                statuses = tuple(_ERROR_STATUSES)
                operation["security"] = [{"apiKey": []} if path in _PUBLIC
                                         else {"adminToken": []}]
            if path == "/metrics":  # open unless --metrics-token is set
                operation["security"] = [{}, {"metricsToken": []}, {"adminToken": []}]
            for status in statuses:
                responses.setdefault(status, {"description": _ERROR_STATUSES[status], **error})
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi(app)` (built once, on first request) as the app's document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
