"""API fuzzing from the server's own OpenAPI document (schemathesis) against a real server on
loopback: every public and admin operation, positive and negative inputs. Whatever comes in,
no 5xx other than a 503 with Retry-After (overload, shutdown), and every error is the OpenAI
error body. Deterministic (derandomized) and bounded: a few hundred requests."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from reliability_world import (
    ADMIN_HEADERS,
    BASE,
    METRICS_TOKEN,
    World,
    auth,
    build_world,
)
from server_harness import LiveServer

MAX_EXAMPLES = 25  # per operation and mode; derandomized, so every run sends the same
GENERATION_EXAMPLES = 50  # the two generation routes have the most to explore
# Models a fuzzed body is pointed at (by the generated name's length, so it stays
# deterministic): most generated names are unknown (a 404), these reach the engine.
VALID_MODELS = (BASE, "acme-one", "acme-two")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def live(world: World) -> Iterator[LiveServer]:
    # A short context keeps every accepted generation small, whatever max_tokens says.
    with world.serve(engine={"max_model_len": 36}, metrics_token=METRICS_TOKEN,
                     max_upload_bytes=256 << 10) as server:
        yield server


@pytest.fixture(scope="module")
def api(live: LiveServer) -> Any:
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


def headers_for(path: str) -> dict[str, str]:
    if path.startswith("/admin") or path.endswith("_lora_adapter"):
        return ADMIN_HEADERS
    if path == "/metrics":
        return {"Authorization": f"Bearer {METRICS_TOKEN}"}
    return auth("acme")


def check_response(response: Any) -> None:
    status = response.status_code
    assert status < 500 or status == 503, (status, response.text[:500])
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1
    if status >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert status != 422  # FastAPI's validation status never leaks through


def point_at_valid_model(case: Any) -> None:
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        pick = len(body["model"]) % (2 * len(VALID_MODELS))
        if pick < len(VALID_MODELS):
            body["model"] = VALID_MODELS[pick]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_5xx_and_errors_are_openai_bodies(api: Any,
                                                                 mode: GenerationMode) -> None:
    failures: dict[str, str] = {}
    seen: dict[str, Counter[int]] = {}
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 16  # every public and admin route is in the document

    for operation in operations:
        examples = GENERATION_EXAMPLES if "completions" in operation.path else MAX_EXAMPLES

        @hypothesis.settings(max_examples=examples, derandomize=True, deadline=None,
                             database=None, suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            point_at_valid_model(case)
            response = case.call(headers=headers_for(case.path), timeout=60)
            seen.setdefault(operation.label, Counter())[response.status_code] += 1
            check_response(response)

        try:
            fuzz()
        except hypothesis.errors.Unsatisfiable:
            # Nothing to break: no parameters and no body (GET /health in negative mode).
            assert mode == GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # noqa: BLE001 - every operation is fuzzed, then reported
            failures[operation.label] = f"{type(exc).__name__}: {exc}"[:2000]
    assert not failures, "\n".join(f"{k}: {v}" for k, v in failures.items())
    print({label: dict(counts) for label, counts in seen.items()})
    if mode == GenerationMode.POSITIVE:  # the fuzz went past validation into the engine
        generated = [seen[label] for label in ("POST /v1/completions",
                                               "POST /v1/chat/completions")]
        assert sum(counts[200] for counts in generated) >= 5, generated
