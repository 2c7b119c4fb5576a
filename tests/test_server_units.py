"""Server pieces that need no engine: tenants file and glob rules, limiter math, metrics
exposition, request schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from loramux.server.errors import APIError
from loramux.server.limits import Limiter, TokenBucket
from loramux.server.metrics import RuntimeStats, ServerMetrics
from loramux.server.openai_schemas import (
    AdminLoadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    parse_body,
)
from loramux.server.tenants import (
    OPEN_TENANT,
    Tenant,
    TenantFileError,
    TenantLimits,
    hash_key,
    load_tenants,
    parse_tenants,
)

KEY_A, KEY_B = "sk-acme-123", "sk-beta-456"


def tenants_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(f"""
tenants:
  acme:
    keys_sha256: ["{hash_key(KEY_A)}", "{hash_key('sk-acme-second')}"]
    adapters: ["acme-*", "shared-summarizer", "base"]
    requests_per_minute: 600
    tokens_per_minute: 200000
    max_concurrent: 16
  beta:
    keys_sha256: ["{hash_key(KEY_B).upper()}"]
    adapters: ["beta-?"]
""")
    return path


# ============================================================================ tenants


def test_tenants_file_maps_hashed_keys_to_tenants(tmp_path: Path) -> None:
    table = load_tenants(tenants_yaml(tmp_path))
    assert not table.open
    acme = table.authenticate(KEY_A)
    assert acme is not None and acme.name == "acme"
    assert table.authenticate("sk-acme-second") is acme
    assert acme.limits == TenantLimits(600, 200000, 16)
    beta = table.authenticate(KEY_B)  # stored upper-case: hex is case-insensitive
    assert beta is not None and beta.name == "beta"
    assert beta.limits == TenantLimits()
    assert table.authenticate("sk-wrong") is None
    assert table.authenticate("") is None and table.authenticate(None) is None
    assert hash_key("test") == \
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    # The clear key appears nowhere in the table.
    assert KEY_A.encode() not in repr(table).encode()


def test_tenants_json_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"tenants": {"t": {"keys_sha256": [hash_key("k")],
                                                  "adapters": ["*"]}}}))
    tenant = load_tenants(path).authenticate("k")
    assert tenant is not None and tenant.may_use("anything", "base")


def test_design_example_key_is_sha256_of_test() -> None:
    # The DESIGN.md example stores sha256("test").
    table = parse_tenants({"tenants": {"acme": {
        "keys_sha256": ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
        "adapters": ["acme-*", "shared-summarizer"]}}})
    assert table.authenticate("test") is not None


@pytest.mark.parametrize("doc, fragment", [
    ({"tenants": {"a": {"keys_sha256": ["not-hex"]}}}, "not a hex sha256"),
    ({"tenants": {"a": {"keys": ["sk-clear"]}}}, "unknown fields"),
    ({"tenants": {"a": {"keys_sha256": "abc"}}}, "must be a list"),
    ({"tenants": {"a": {"adapters": "acme-*"}}}, "adapters must be a list"),
    ({"tenants": {"a": {"max_concurrent": 0}}}, "positive integer"),
    ({"tenants": {"a": {"requests_per_minute": "many"}}}, "positive integer"),
    ({"tenants": {"a": {"keys_sha256": [hash_key("k")]},
                  "b": {"keys_sha256": [hash_key("k")]}}}, "also a key of tenant"),
    ({"tenant": {}}, "unknown top-level"),
    ([1, 2], "must be a mapping"),
])
def test_malformed_tenants_files_are_refused(doc: object, fragment: str) -> None:
    with pytest.raises(TenantFileError, match=fragment):
        parse_tenants(doc)


def test_empty_tenants_file_refuses_everyone(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("tenants: {}\n")
    table = load_tenants(path)
    assert not table.open and table.authenticate("anything") is None


def test_no_file_is_an_open_server() -> None:
    table = load_tenants(None)
    assert table.open and table.authenticate(None) is OPEN_TENANT
    assert OPEN_TENANT.may_use("base", "base") and OPEN_TENANT.may_use("any-adapter", "base")


def test_unreadable_or_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TenantFileError, match="cannot read"):
        load_tenants(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [unclosed\n")
    with pytest.raises(TenantFileError, match="not valid YAML"):
        load_tenants(bad)


def test_adapter_globs_and_base_rules() -> None:
    acme = Tenant("acme", adapters=("acme-*", "shared-summarizer"))
    assert acme.may_use("acme-support", "base")
    assert acme.may_use("shared-summarizer", "base")
    assert not acme.may_use("beta-support", "base")
    assert not acme.may_use("ACME-support", "base")  # case-sensitive on every platform
    assert not acme.may_use("shared-summarizer-v2", "base")
    # The base is granted only by its name or "*", never by an adapter glob it happens to fit.
    assert not acme.may_use("acme-base", "acme-base")
    assert Tenant("t", adapters=("acme-base",)).may_use("acme-base", "acme-base")
    assert Tenant("t", adapters=("*",)).may_use("acme-base", "acme-base")
    single = Tenant("t", adapters=("team-?", "[ab]-x"))
    assert single.may_use("team-1", "base") and not single.may_use("team-12", "base")
    assert single.may_use("a-x", "base") and not single.may_use("c-x", "base")


# ============================================================================ limits


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate_and_caps() -> None:
    bucket = TokenBucket.full(60, now=0.0)  # 1 per second
    assert bucket.wait_for(60, 0.0) == 0.0
    bucket.take(60, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait_for(10, 4.0) == pytest.approx(6.0)  # 4 refilled, 6 to go
    bucket.refund(1000, 4.0)
    assert bucket.level == 60  # never above one minute's budget
    assert bucket.wait_for(60, 1000.0) == 0.0


def test_request_rate_limit_gives_retry_after() -> None:
    clock = Clock()
    limiter = Limiter(capacity=100, clock=clock)
    tenant = Tenant("t", ("*",), TenantLimits(requests_per_minute=3))
    for _ in range(3):
        limiter.admit(tenant, 10).release()
    with pytest.raises(APIError) as err:
        limiter.admit(tenant, 10)
    assert err.value.status == 429
    assert err.value.headers()["Retry-After"] == "20"  # one request refills in 20 s
    clock.now += 20.0
    limiter.admit(tenant, 10).release()


def test_token_limit_charges_up_front_and_refunds_unused() -> None:
    clock = Clock()
    limiter = Limiter(capacity=100, clock=clock)
    tenant = Tenant("t", ("*",), TenantLimits(tokens_per_minute=1000))
    first = limiter.admit(tenant, 800)  # prompt + max_tokens
    with pytest.raises(APIError) as err:
        limiter.admit(tenant, 300)
    assert err.value.status == 429 and "tokens per minute" in err.value.message
    first.release(used_tokens=100)  # only 100 were used: 700 come back
    limiter.admit(tenant, 300).release(300)
    # A request larger than a minute's budget goes through on a full bucket, into debt.
    clock.now += 60.0
    big = limiter.admit(tenant, 5000)
    big.release(5000)
    with pytest.raises(APIError) as err:
        limiter.admit(tenant, 1)
    assert err.value.retry_after == pytest.approx((1 + 4000) / (1000 / 60))


def test_concurrency_limit_and_release_once() -> None:
    limiter = Limiter(capacity=100, clock=Clock())
    tenant = Tenant("t", ("*",), TenantLimits(max_concurrent=2))
    a, b = limiter.admit(tenant, 1), limiter.admit(tenant, 1)
    with pytest.raises(APIError) as err:
        limiter.admit(tenant, 1)
    assert err.value.status == 429 and err.value.headers()["Retry-After"] == "1"
    a.release()
    a.release()  # idempotent: a second release gives nothing back twice
    assert limiter.running(tenant) == 1
    c = limiter.admit(tenant, 1)
    b.release()
    c.release()
    assert limiter.running(tenant) == 0 and limiter.in_flight == 0


def test_global_queue_bound_gives_503_and_refused_requests_cost_nothing() -> None:
    limiter = Limiter(capacity=3, clock=Clock())
    tenant = Tenant("t", ("*",), TenantLimits(requests_per_minute=100))
    held = [limiter.admit(tenant, 1, sequences=2)]
    with pytest.raises(APIError) as err:
        limiter.admit(tenant, 1, sequences=2)
    assert err.value.status == 503 and "Retry-After" in err.value.headers()
    state = limiter._tenants["t"]
    assert state.running == 1 and state.requests is not None
    assert state.requests.level == pytest.approx(99)  # the refused request was not charged
    held.append(limiter.admit(tenant, 1, sequences=1))
    for admission in held:
        admission.release()
    assert limiter.in_flight == 0


def test_tenants_are_limited_separately() -> None:
    limiter = Limiter(capacity=100, clock=Clock())
    a = Tenant("a", ("*",), TenantLimits(max_concurrent=1))
    b = Tenant("b", ("*",), TenantLimits(max_concurrent=1))
    limiter.admit(a, 1)
    limiter.admit(b, 1)  # a's slot being taken does not block b
    with pytest.raises(APIError):
        limiter.admit(a, 1)


# ============================================================================ metrics


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(family.name, []).append((sample.name, sample.labels, sample.value))
    return out


def test_metrics_expose_vllm_router_series_with_only_the_current_label_set() -> None:
    current = {"stats": RuntimeStats(
        num_waiting=3, num_running=5, kv_cache_usage=0.25, max_lora=4,
        running_adapters=("a", "b"), waiting_adapters=("c",), timestamp=1700000000.5,
        adapters_per_tier={"device": 2, "host": 3, "disk": 1}, adapter_loads=7,
        adapter_evictions={"device": 2}, adapter_load_seconds=(7, 1.4),
        adapter_residency={("a", "device"): 1, ("b", "device"): 1, ("c", "host"): 2},
    )}
    metrics = ServerMetrics(lambda: current["stats"], "base-model")
    fams = families(metrics.exposition().decode())
    assert fams["vllm:num_requests_waiting"] == [
        ("vllm:num_requests_waiting", {"model_name": "base-model"}, 3.0)]
    assert fams["vllm:num_requests_running"][0][2] == 5.0
    assert fams["vllm:kv_cache_usage_perc"][0][2] == 0.25
    (info,) = fams["vllm:lora_requests_info"]
    assert info[1] == {"max_lora": "4", "running_lora_adapters": "a,b",
                       "waiting_lora_adapters": "c"}
    assert info[2] == 1700000000.5
    tiers = {labels["tier"]: value for _, labels, value in fams["loramux_adapters"]}
    assert tiers == {"device": 2.0, "host": 3.0, "disk": 1.0, "paging": 0.0}
    resident = {(labels["adapter"], labels["tier"]): value
                for _, labels, value in fams["loramux_adapter_resident"]}
    assert resident == {("a", "device"): 1.0, ("b", "device"): 1.0, ("c", "host"): 2.0}
    assert ("loramux_adapter_loads_total", {}, 7.0) in fams["loramux_adapter_loads"]
    evictions = {s[1]["tier"]: s[2] for s in fams["loramux_adapter_evictions"]
                 if s[0].endswith("_total")}
    assert evictions == {"host": 0.0, "device": 2.0}
    load = {s[0]: s[2] for s in fams["loramux_adapter_load_seconds"]}
    assert load["loramux_adapter_load_seconds_count"] == 7
    assert load["loramux_adapter_load_seconds_sum"] == pytest.approx(1.4)

    # A change of adapters replaces the label set instead of adding a second series.
    current["stats"] = RuntimeStats(max_lora=4, running_adapters=("c",), waiting_adapters=(),
                                    timestamp=1700000001.0)
    (info,) = families(metrics.exposition().decode())["vllm:lora_requests_info"]
    assert info[1] == {"max_lora": "4", "running_lora_adapters": "c",
                       "waiting_lora_adapters": ""}
    assert info[2] == 1700000001.0
    # adapters that left memory leave no stale series behind
    assert families(metrics.exposition().decode()).get("loramux_adapter_resident", []) == []


def test_request_latency_metrics() -> None:
    metrics = ServerMetrics(RuntimeStats, "m")
    metrics.observe_request(arrival=10.0, first_token=10.5, end=12.5, prompt_tokens=7,
                            output_tokens=5)
    metrics.observe_request(arrival=20.0, first_token=None, end=20.1, prompt_tokens=3,
                            output_tokens=0)
    fams = families(metrics.exposition().decode())

    def value(family: str, sample: str) -> float:
        return next(v for n, _, v in fams[family] if n == sample)

    assert value("loramux_time_to_first_token_seconds",
                 "loramux_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value("loramux_time_per_output_token_seconds",
                 "loramux_time_per_output_token_seconds_sum") == pytest.approx(0.5)
    assert value("loramux_e2e_request_latency_seconds",
                 "loramux_e2e_request_latency_seconds_count") == 2
    assert value("loramux_prompt_tokens", "loramux_prompt_tokens_total") == 10
    assert value("loramux_generation_tokens", "loramux_generation_tokens_total") == 5


def test_two_apps_do_not_share_metrics() -> None:
    one, two = ServerMetrics(RuntimeStats, "m"), ServerMetrics(RuntimeStats, "m")
    one.prompt_tokens.inc(5)
    assert "loramux_prompt_tokens_total 0.0" in two.exposition().decode()


# ============================================================================ schemas


def test_completion_request_fields() -> None:
    body = parse_body(json.dumps({
        "model": "m", "prompt": "hi", "max_tokens": 5, "stop": "x", "n": 2, "seed": 3,
        "top_k": 5, "min_tokens": 2, "ignore_eos": True, "repetition_penalty": 1.1,
        "stop_token_ids": [7], "logprobs": 2,
    }).encode(), CompletionRequest)
    params = body.sampling_params(5, body.logprobs, body.seed)
    assert params.stop == ("x",) and params.top_k == 5 and params.min_tokens == 2
    assert params.ignore_eos and params.repetition_penalty == 1.1
    assert params.stop_token_ids == (7,) and params.logprobs == 2 and params.seed == 3
    assert body.prompts() == ["hi"]
    assert parse_body(b'{"model":"m","prompt":[1,2,3]}', CompletionRequest).prompts() == \
        [[1, 2, 3]]
    assert parse_body(b'{"model":"m","prompt":[[1],[2,3]]}', CompletionRequest).prompts() == \
        [[1], [2, 3]]
    assert parse_body(b'{"model":"m","prompt":["a","b"]}', CompletionRequest).prompts() == \
        ["a", "b"]


def test_chat_request_fields() -> None:
    body = parse_body(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text",
                                                                  "text": "hi"}]}],
        "max_tokens": 9, "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3,
        "stream": True, "stream_options": {"include_usage": True}, "stop": ["a", "b"],
    }).encode(), ChatCompletionRequest)
    assert body.requested_max_tokens() == 4  # the newer field wins
    assert body.logprobs_count() == 3 and body.include_usage
    assert body.messages[0].text() == "hi"
    assert body.sampling_params(4, 3, None).stop == ("a", "b")


@pytest.mark.parametrize("raw, status_param", [
    (b"{nope", None),
    (b"[1]", None),
    (b'{"model": "m"}', "prompt"),
    (b'{"model": "m", "prompt": "x", "n": 0}', "n"),
    (b'{"model": 3, "prompt": "x"}', "model"),
])
def test_bad_bodies_are_400(raw: bytes, status_param: str | None) -> None:
    with pytest.raises(APIError) as err:
        parse_body(raw, CompletionRequest)
    assert err.value.status == 400 and err.value.param == status_param


@pytest.mark.parametrize(("model", "raw", "param"), [
    (CompletionRequest, b'{"model": "m", "prompt": "x", "max_token": 3}', "max_token"),
    (CompletionRequest, b'{"model": "m", "prompt": "x", "stream_options": {"x": 1}}',
     "stream_options.x"),
    (ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user"}], "echo": true}',
     "echo"),
    (LoadLoraAdapterRequest, b'{"lora_name": "a", "lora_path": "b", "base_model": "c"}',
     "base_model"),
    (UnloadLoraAdapterRequest, b'{"lora_name": "a", "lora_path": "b"}', "lora_path"),
    (AdminLoadRequest, b'{"name": "a", "pinned": true}', "pinned"),
])
def test_unknown_fields_are_400_in_openais_words(model: type[BaseModel], raw: bytes,
                                                 param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_body(raw, model)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.message == f"Unrecognized request argument supplied: {param}"


def test_chat_messages_ignore_keys_they_do_not_declare() -> None:
    """Clients send history back as they got it (tool_calls, refusal, reasoning_content...)."""
    body = parse_body(json.dumps({"model": "m", "messages": [
        {"role": "assistant", "content": None, "refusal": None, "reasoning_content": "hm",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [
            {"type": "text", "text": "ok", "cache_control": {"type": "ephemeral"}}]},
    ]}).encode(), ChatCompletionRequest)
    assert [m.text() for m in body.messages] == ["", "ok"]


def test_out_of_range_sampling_values_are_400_naming_the_field() -> None:
    # The body's schema holds the ranges (so /openapi.json states them) ...
    with pytest.raises(APIError, match="temperature") as err:
        parse_body(b'{"model":"m","prompt":"x","temperature":3}', CompletionRequest)
    assert err.value.status == 400 and err.value.param == "temperature"
    # ... and SamplingParams still checks them for callers that skip the schema.
    body = CompletionRequest.model_construct(model="m", prompt="x", temperature=3.0)
    with pytest.raises(ValueError, match="temperature"):
        body.sampling_params(4, None, None)


def test_local_engine_reports_no_context_length_before_the_model_loads(tmp_path: Path) -> None:
    """/v1/models answers while the model loads; its max_model_len must then be unknown (None),
    not 0 and not the --max-model-len cap, which the model itself may lower."""
    from loramux.engine.config import EngineConfig
    from loramux.server.local_engine import LocalEngineClient

    client = LocalEngineClient(EngineConfig(model=str(tmp_path / "model"), max_model_len=512))
    info = client.model
    assert info.name == "model" and info.max_model_len is None
