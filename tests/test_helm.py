"""The Helm chart (helm/loramux), rendered by a real Helm engine.

Engine: the `helm` binary when one is on PATH (or named by $HELM_BIN), otherwise the PyPI
package helm-python-sdk, which embeds Helm's own Go SDK (no binary). The tests skip, saying
why, only when neither is available or a test package is missing; the `test` extra of
pyproject.toml installs them all.

For the default values and several combinations (inference router, autoscaler, ServiceMonitor,
upload-only adapters, existing Secret, PVC adapters, ...), every rendered manifest is validated:
built-in kinds against the Kubernetes OpenAPI schemas shipped by kubernetes-validate (strict:
unknown fields are errors) for the oldest supported and the newest Kubernetes; the CRD kinds
kubernetes-validate does not know (ServiceMonitor, InferencePool, HTTPRoute) against JSON
schemas written below from the upstream CRDs. Then `helm lint --strict` must pass, invalid
values must be refused by values.schema.json, and the semantics are checked: probes, grace
period, security context, the Secret's content, and that every LORAMUX_* variable is a real
`loramux serve` flag whose value the real CLI parser accepts.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is not installed")
jsonschema = pytest.importorskip(
    "jsonschema", reason="jsonschema is not installed (pip install -e '.[test]')"
)

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "loramux"
RELEASE, NAMESPACE = "lm", "inference"
FULLNAME = "lm-loramux"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schema set.
KUBE_VERSIONS = ("1.25", "latest")
GRACE_ENV = "LORAMUX_SHUTDOWN_GRACE_SECONDS"


# --------------------------------------------------------------------------------------------
# The Helm engine
# --------------------------------------------------------------------------------------------


class HelmFailure(Exception):
    """Helm refused the values or failed to render."""


class _BinaryHelm:
    def __init__(self, exe: str) -> None:
        self.exe = exe
        self.name = f"helm binary ({exe})"

    def _values_file(self, values: dict[str, Any], tmp: Path) -> Path:
        path = tmp / "values.json"  # JSON is YAML
        path.write_text(json.dumps(values))
        return path

    def template(self, values: dict[str, Any], tmp: Path) -> dict[str, str]:
        result = subprocess.run(
            [self.exe, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
             "-f", str(self._values_file(values, tmp))],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise HelmFailure(result.stderr)
        manifests: dict[str, str] = {}
        for chunk in re.split(r"^---\s*$", result.stdout, flags=re.M):
            match = re.search(r"^# Source: (\S+)\s*$", chunk, flags=re.M)
            if match:
                manifests[match.group(1)] = manifests.get(match.group(1), "") + "\n---\n" + chunk
        return manifests

    def lint(self, values: dict[str, Any], tmp: Path) -> list[str]:
        result = subprocess.run(
            [self.exe, "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
             "-f", str(self._values_file(values, tmp))],
            capture_output=True, text=True, timeout=60,
        )
        problems = [
            line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith(("[WARNING]", "[ERROR]"))
        ]
        if result.returncode != 0 and not problems:
            problems.append(result.stdout + result.stderr)
        return problems


class _SdkHelm:
    def __init__(self, helm: Any) -> None:
        self.helm = helm
        self.chart = helm.Chart.load(str(CHART))
        self.name = f"helm-python-sdk (Helm {helm.helm_sdk_version()})"

    def template(self, values: dict[str, Any], tmp: Path) -> dict[str, str]:
        try:
            return self.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        except self.helm.HelmError as err:
            raise HelmFailure(str(err)) from err

    def lint(self, values: dict[str, Any], tmp: Path) -> list[str]:
        report = self.helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        # Severity: 1 info, 2 warning, 3 error. Info ("icon is recommended") is not a failure,
        # exactly as for `helm lint --strict`.
        return [
            f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2
        ] + list(report.get("errors") or [])


@pytest.fixture(scope="session")
def helm() -> Any:
    exe = os.environ.get("HELM_BIN") or shutil.which("helm")
    if exe:
        return _BinaryHelm(exe)
    sdk = pytest.importorskip(
        "helm_python",
        reason="no helm binary on PATH and helm-python-sdk is not installed "
        "(pip install -e '.[test]')",
    )
    return _SdkHelm(sdk)


# --------------------------------------------------------------------------------------------
# Value combinations and their renders
# --------------------------------------------------------------------------------------------

TENANT_KEY = "sk-acme-test-key"
TENANT_SHA = hashlib.sha256(TENANT_KEY.encode()).hexdigest()  # what the tenants file stores

COMBOS: dict[str, dict[str, Any]] = {
    "default": {},
    # Several replicas behind the Gateway API Inference Extension / llm-d inference scheduler,
    # adapters on a ReadWriteMany claim created by the chart.
    "router": {
        "replicaCount": 3,
        "adapters": {"mode": "pvc", "pvc": {"create": True, "storageClassName": "nfs"}},
        "router": {
            "inferencePool": {"enabled": True,
                              "endpointPicker": {"name": "llm-d-epp", "port": 9002}},
            "httpRoute": {"enabled": True,
                          "parentRefs": [{"name": "inference-gateway",
                                          "namespace": "gateway-system"}]},
        },
    },
    "autoscaler": {
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "adapters": {"mode": "pvc", "pvc": {"existingClaim": "shared-adapters"}},
    },
    # The adapter pool sized by hand, with a residency cap.
    "pool-sized": {"server": {"adapterPoolBytes": "8G", "adapterPoolFraction": 0.2,
                              "maxGpuAdapters": 48}},
    "servicemonitor": {
        "metrics": {"serviceMonitor": {"enabled": True, "interval": "5s",
                                       "labels": {"release": "kube-prometheus-stack"}}},
    },
    "upload-only": {
        "adapters": {"mode": "upload", "uploadSizeLimit": "2Gi"},
        "auth": {
            "adminToken": "admin-secret-token",
            "apiKeys": {"tenants": {"acme": {
                "keys_sha256": [TENANT_SHA], "adapters": ["acme-*", "shared-summarizer"],
                "requests_per_minute": 600, "max_concurrent": 16,
            }}},
        },
    },
    # /metrics behind a token that the ServiceMonitor sends.
    "metrics-token": {
        "auth": {"metricsToken": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "existing-secret": {
        "auth": {"existingSecret": "loramux-auth",
                 "secretKeys": {"adminToken": "token", "apiKeys": "tenants.yaml"}},
    },
    "pvc-adapters": {
        "adapters": {"mode": "pvc", "mountPath": "/srv/adapters",
                     "pvc": {"existingClaim": "adapters-rwx", "readOnly": True},
                     "preload": [{"name": "support", "path": "support-v3"},
                                 {"name": "sql", "path": "team/sql-v1"}]},
        "model": {"source": "pvc", "pvc": {"claimName": "models", "path": "Llama-3.1-8B"}},
        "server": {"quantization": "nf4", "dtype": "bfloat16", "maxGpuAdapters": 32,
                   "maxCpuAdapters": 128, "maxLoraRank": 32, "maxNumSeqs": 96,
                   "maxNumBatchedTokens": 4096, "port": 8080, "shutdownGraceSeconds": 120},
        "cache": {"existingClaim": "loramux-cache"},
    },
    # Triton's compiled kernels on a claim of their own, the rest of the cache an emptyDir.
    "triton-pvc": {"tritonCache": {"existingClaim": "triton-kernels", "sizeLimit": "5Gi"}},
    "model-init": {
        "model": {"source": "init", "init": {
            "image": "example.com/model-fetcher:1", "args": ["--to", "/models/qwen"],
            "path": "qwen"}},
        "server": {"quantization": "int8"},
    },
    "cpu-open": {
        "gpu": {"count": 0},
        "server": {"device": "cpu", "preStopSleepSeconds": 0},
        "auth": {"apiKeys": {"enabled": False}},
        "podDisruptionBudget": {"minAvailable": 1},
        "strategy": {"type": "Recreate"},
        "tolerations": [],
        "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}},
    },
}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="session")
def defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


class Render:
    """One rendered release: its manifests by kind and name, and the merged values."""

    def __init__(self, templates: dict[str, str], values: dict[str, Any]) -> None:
        self.templates = templates
        self.values = values
        self.docs: list[dict[str, Any]] = []
        for path, text in sorted(templates.items()):
            if path.endswith("NOTES.txt"):
                continue
            self.docs.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def kinds(self) -> set[str]:
        return {doc["kind"] for doc in self.docs}

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        (doc,) = self.all(kind)
        return doc

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]

    @property
    def server(self) -> dict[str, Any]:
        (container,) = [c for c in self.pod["spec"]["containers"] if c["name"] == "loramux"]
        return container

    def configmap_env(self) -> dict[str, str]:
        return dict(self.one("ConfigMap")["data"])


@pytest.fixture(scope="session")
def render_values(
    helm: Any, defaults: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[dict[str, Any]], Render]:
    tmp = tmp_path_factory.mktemp("helm")

    def render(values: dict[str, Any]) -> Render:
        return Render(helm.template(values, tmp), _merge(defaults, values))

    return render


@pytest.fixture(scope="session")
def renders(render_values: Callable[[dict[str, Any]], Render]) -> dict[str, Render]:
    return {name: render_values(values) for name, values in COMBOS.items()}


combo = pytest.mark.parametrize("name", list(COMBOS))


# --------------------------------------------------------------------------------------------
# Schemas of the CRD kinds, written from the upstream CRDs (kubernetes-validate only knows the
# built-in kinds). Only the fields this chart emits are listed, with additionalProperties
# false, so a misspelt or misplaced field fails like it would against the real CRD; required
# fields, enums, patterns and ranges are the upstream ones.
# --------------------------------------------------------------------------------------------

_LABELS = {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                 "maxLength": 253},
        "namespace": {"type": "string"},
        "labels": _LABELS,
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_DNS_GROUP = {"type": "string", "maxLength": 253,
              "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_KIND = {"type": "string", "minLength": 1, "maxLength": 63,
         "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": _META, "spec": spec},
        "additionalProperties": False,
    }


# prometheus-operator, monitoring.coreos.com_servicemonitors.yaml (v1; operator 0.84).
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
             r"(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
SERVICE_MONITOR = _resource("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "required": ["endpoints", "selector"],
    "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": _LABELS},
                     "additionalProperties": False},
        "namespaceSelector": {"type": "object", "properties": {
            "any": {"type": "boolean"},
            "matchNames": {"type": "array", "items": {"type": "string"}}},
            "additionalProperties": False},
        "endpoints": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "port": {"type": "string"}, "path": {"type": "string"},
                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": _DURATION, "scrapeTimeout": _DURATION,
                "honorLabels": {"type": "boolean"},
                "authorization": {"type": "object", "properties": {
                    "type": {"type": "string"},
                    "credentials": {"type": "object", "required": ["key"], "properties": {
                        "name": {"type": "string"}, "key": {"type": "string"},
                        "optional": {"type": "boolean"}}, "additionalProperties": False}},
                    "additionalProperties": False},
            },
            "additionalProperties": False}},
    },
    "additionalProperties": False,
})

# Gateway API Inference Extension, inference.networking.k8s.io_inferencepools.yaml (v1, GA).
INFERENCE_POOL = _resource("inference.networking.k8s.io/v1", "InferencePool", {
    "type": "object",
    "required": ["selector", "targetPorts", "endpointPickerRef"],
    "properties": {
        "selector": {
            "type": "object", "required": ["matchLabels"],
            "properties": {"matchLabels": {
                "type": "object", "minProperties": 1, "maxProperties": 64,
                "additionalProperties": {
                    "type": "string", "maxLength": 63,
                    "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}}},
            "additionalProperties": False},
        "targetPorts": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object", "required": ["number"], "properties": {"number": _PORT},
            "additionalProperties": False}},
        "endpointPickerRef": {
            "type": "object", "required": ["name"],
            "properties": {
                "group": _DNS_GROUP, "kind": _KIND,
                "name": {"type": "string", "minLength": 1, "maxLength": 253},
                "port": {"type": "object", "required": ["number"],
                         "properties": {"number": _PORT}, "additionalProperties": False},
                "failureMode": {"enum": ["FailOpen", "FailClose"]},
            },
            # Upstream: port is required when the referent is a Service.
            "if": {"properties": {"kind": {"const": "Service"}}},
            "then": {"required": ["name", "port"]},
            "additionalProperties": False},
    },
    "additionalProperties": False,
})

# Gateway API, gateway.networking.k8s.io_httproutes.yaml (v1).
HTTP_ROUTE = _resource("gateway.networking.k8s.io/v1", "HTTPRoute", {
    "type": "object",
    "properties": {
        "parentRefs": {"type": "array", "maxItems": 32, "items": {
            "type": "object", "required": ["name"],
            "properties": {"group": _DNS_GROUP, "kind": _KIND,
                           "name": {"type": "string", "minLength": 1},
                           "namespace": {"type": "string"}, "sectionName": {"type": "string"},
                           "port": _PORT},
            "additionalProperties": False}},
        "hostnames": {"type": "array", "items": {"type": "string"}},
        "rules": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "matches": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"path": {
                        "type": "object",
                        "properties": {"type": {"enum": ["Exact", "PathPrefix",
                                                         "RegularExpression"]},
                                       "value": {"type": "string", "pattern": "^/"}},
                        "additionalProperties": False}},
                    "additionalProperties": False}},
                "backendRefs": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"group": _DNS_GROUP, "kind": _KIND,
                                   "name": {"type": "string", "minLength": 1},
                                   "namespace": {"type": "string"}, "port": _PORT,
                                   "weight": {"type": "integer", "minimum": 0}},
                    "additionalProperties": False}},
            },
            "additionalProperties": False}},
    },
    "additionalProperties": False,
})

CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("inference.networking.k8s.io/v1", "InferencePool"): INFERENCE_POOL,
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
}


def _kube_validate(doc: dict[str, Any]) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install -e '.[test]')",
    )
    from kubernetes_validate.utils import latest_version

    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        jsonschema.Draft202012Validator(crd).validate(doc)
        return
    for version in KUBE_VERSIONS:
        kv.validate(doc, latest_version() if version == "latest" else version, strict=True)


# --------------------------------------------------------------------------------------------
# Rendering, validation, lint
# --------------------------------------------------------------------------------------------


@combo
def test_every_manifest_is_valid_kubernetes(renders: dict[str, Render], name: str) -> None:
    render = renders[name]
    assert render.docs, "nothing rendered"
    for doc in render.docs:
        try:
            _kube_validate(doc)
        except Exception as err:  # noqa: BLE001 - re-raised with the manifest named
            message = getattr(err, "message", str(err))
            path = ".".join(str(p) for p in getattr(err, "path", []))
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} at {path}: {message}")


@combo
def test_helm_lint_strict_passes(helm: Any, name: str, tmp_path: Path) -> None:
    assert helm.lint(COMBOS[name], tmp_path) == []


def test_helm_lint_reports_bad_values(helm: Any, tmp_path: Path) -> None:
    """Lint is not vacuous: it reads the values and the schema. (In lint mode Helm logs a
    template's `fail` instead of failing: test_inconsistent_values_fail_with_a_message covers
    those checks through `helm template`.)"""
    assert helm.lint({"server": {"quantization": "fp3"}}, tmp_path) != []


def test_default_release_has_the_expected_objects(renders: dict[str, Render]) -> None:
    assert renders["default"].kinds() == {
        "ConfigMap", "Deployment", "Secret", "Service", "ServiceAccount", "PodDisruptionBudget",
    }
    for name, render in renders.items():
        for doc in render.docs:
            assert doc["metadata"]["name"].startswith(FULLNAME), (name, doc["kind"])
            assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, name


def test_crd_schemas_are_not_vacuous() -> None:
    """The hand-written CRD schemas do catch what the real CRDs refuse."""
    pool = {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "p"},
            "spec": {"selector": {"matchLabels": {"app": "x"}}, "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "epp", "kind": "Service",
                                           "port": {"number": 9002}}}}
    jsonschema.validate(pool, INFERENCE_POOL)
    for broken in (
        {"endpointPickerRef": {"name": "epp", "kind": "Service"}},  # port missing
        {"targetPortNumber": 8000},  # the pre-GA field name
        {"targetPorts": []},
        {"selector": {"app": "x"}},  # the pre-GA map form
    ):
        bad = copy.deepcopy(pool)
        bad["spec"].update(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, INFERENCE_POOL)
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "m"},
               "spec": {"selector": {"matchLabels": {"a": "b"}},
                        "endpoints": [{"port": "http", "interval": "1 minute"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR)


# --------------------------------------------------------------------------------------------
# values.schema.json
# --------------------------------------------------------------------------------------------

INVALID_VALUES = {
    "quantization fp3": {"server": {"quantization": "fp3"}},
    "negative replicas": {"replicaCount": -1},
    "unknown top-level key": {"replicas": 2},
    "unknown nested key": {"server": {"maxLoraRnk": 16}},
    "device tpu": {"server": {"device": "tpu"}},
    "rank 0": {"server": {"maxLoraRank": 0}},
    "port as text": {"server": {"port": "eighty"}},
    "port too large": {"service": {"port": 70000}},
    "negative grace": {"server": {"shutdownGraceSeconds": -5}},
    "adapter mode": {"adapters": {"mode": "s3"}},
    "adapter path escapes the root": {
        "adapters": {"preload": [{"name": "x", "path": "../etc"}]}},
    "comma in adapter name": {"adapters": {"preload": [{"name": "a,b", "path": "a"}]}},
    "key in clear": {"auth": {"apiKeys": {"tenants": {"acme": {
        "keys_sha256": ["not-a-hash"], "adapters": ["*"]}}}}},
    "tenant without adapters": {"auth": {"apiKeys": {"tenants": {"acme": {
        "keys_sha256": [TENANT_SHA]}}}}},
    "gpu count": {"gpu": {"count": -1}},
    # a bare number would reach the ConfigMap as a float (8.589934592e+09)
    "pool bytes as a number": {"server": {"adapterPoolBytes": 8589934592}},
    "pool bytes unit": {"server": {"adapterPoolBytes": "8 gigs"}},
    "pool fraction 0": {"server": {"adapterPoolFraction": 0}},
    "pool fraction over 1": {"server": {"adapterPoolFraction": 1.5}},
    "memory quantity": {"resources": {"limits": {"memory": "lots"}}},
    "failure mode": {"router": {"inferencePool": {"endpointPicker": {"failureMode": "Maybe"}}}},
    "scrape interval": {"metrics": {"serviceMonitor": {"interval": "often"}}},
    "model source": {"model": {"source": "s3"}},
    "probe threshold": {"probes": {"startup": {"failureThreshold": 0}}},
    "triton cache size": {"tritonCache": {"sizeLimit": "lots"}},
    "unknown triton cache key": {"tritonCache": {"path": "/tmp/triton"}},
}


@pytest.fixture(scope="session")
def values_schema() -> dict[str, Any]:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def test_default_values_match_the_schema(
    values_schema: dict[str, Any], defaults: dict[str, Any]
) -> None:
    validator = jsonschema.Draft7Validator(values_schema)
    validator.validate(defaults)
    for values in COMBOS.values():
        validator.validate(_merge(defaults, values))


@pytest.mark.parametrize("case", list(INVALID_VALUES))
def test_invalid_values_are_refused(
    render_values: Callable[[dict[str, Any]], Render], values_schema: dict[str, Any],
    defaults: dict[str, Any], case: str,
) -> None:
    values = INVALID_VALUES[case]
    with pytest.raises(HelmFailure) as failure:
        render_values(values)
    assert "schema" in str(failure.value).lower() or "values don't meet" in str(failure.value)
    # The same schema, read by an independent validator.
    assert not jsonschema.Draft7Validator(values_schema).is_valid(_merge(defaults, values))


@pytest.mark.parametrize("values, message", [
    ({"model": {"source": "pvc"}}, "model.pvc.claimName"),
    ({"model": {"source": "init"}}, "model.init.image"),
    ({"adapters": {"mode": "pvc"}}, "adapters.pvc.existingClaim"),
    ({"server": {"maxGpuAdapters": 32, "maxCpuAdapters": 8}}, "maxCpuAdapters"),
    ({"router": {"httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}]}}},
     "router.inferencePool.enabled"),
    ({"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}, "maxReplicas"),
])
def test_inconsistent_values_fail_with_a_message(
    render_values: Callable[[dict[str, Any]], Render], values: dict[str, Any], message: str
) -> None:
    with pytest.raises(HelmFailure, match=re.escape(message)):
        render_values(values)


def test_schema_enums_are_the_cli_choices(values_schema: dict[str, Any]) -> None:
    from loramux.engine.config import DEVICES, DTYPES, QUANTIZATIONS

    server = values_schema["properties"]["server"]["properties"]
    assert server["quantization"]["enum"] == list(QUANTIZATIONS)
    assert server["dtype"]["enum"] == list(DTYPES)
    assert server["device"]["enum"] == list(DEVICES)
    assert set(QUANTIZATIONS) == {"none", "nf4", "int8"}


# --------------------------------------------------------------------------------------------
# Semantics
# --------------------------------------------------------------------------------------------


@combo
def test_probes_use_health_and_ready(renders: dict[str, Render], name: str) -> None:
    server = renders[name].server
    port_names = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["startupProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert server[probe]["httpGet"]["port"] in port_names
    # Room for a slow model load: at least 10 minutes before the kubelet gives up.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert port_names["http"] == int(renders[name].configmap_env()["LORAMUX_PORT"])


@combo
def test_termination_grace_covers_the_server_drain(renders: dict[str, Render], name: str) -> None:
    render = renders[name]
    grace = int(render.configmap_env()[GRACE_ENV])
    assert grace == render.values["server"]["shutdownGraceSeconds"]
    pre_stop = render.server.get("lifecycle", {}).get("preStop", {}).get("exec", {})
    sleep = int(pre_stop["command"][1]) if pre_stop else 0
    assert sleep == render.values["server"]["preStopSleepSeconds"]
    assert render.pod["spec"]["terminationGracePeriodSeconds"] >= grace + sleep + 1


@combo
def test_security_context_is_locked_down(renders: dict[str, Render], name: str) -> None:
    pod = renders[name].pod["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
    # A read-only root needs writable /tmp and cache mounts.
    mounts = {m["mountPath"]: m for m in renders[name].server["volumeMounts"]}
    env = renders[name].configmap_env()
    assert "/tmp" in mounts and env["LORAMUX_CACHE"] in mounts
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert env[var].startswith(env["LORAMUX_CACHE"] + "/")


@combo
def test_every_mount_has_a_volume(renders: dict[str, Render], name: str) -> None:
    pod = renders[name].pod["spec"]
    volumes = {v["name"] for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, (container["name"], mount["name"])


@combo
def test_gpu_resources_follow_values(renders: dict[str, Render], name: str) -> None:
    render = renders[name]
    gpu = render.values["gpu"]
    resources = render.server.get("resources", {})
    if gpu["count"]:
        assert resources["limits"][gpu["resourceName"]] == gpu["count"]
        assert resources["requests"][gpu["resourceName"]] == gpu["count"]
    else:
        for section in resources.values():
            assert gpu["resourceName"] not in section
    for init in render.pod["spec"].get("initContainers", []):
        for section in init.get("resources", {}).values():
            assert gpu["resourceName"] not in section


def _serve_flags() -> dict[str, Any]:
    """LORAMUX_<FLAG> -> argparse action of every `loramux serve` flag, from the real parser."""
    import argparse

    from loramux.server.cli import build_parser

    parser = build_parser()
    flags: dict[str, Any] = {}
    for action in parser._actions:  # top-level options: --log-level reads LORAMUX_LOG_LEVEL
        for option in action.option_strings:
            if option.startswith("--") and option not in ("--help", "--version"):
                flags["LORAMUX_" + option[2:].replace("-", "_").upper()] = action
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["serve"]._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                flags["LORAMUX_" + option[2:].replace("-", "_").upper()] = action
    return flags


def _not_a_flag_but_read(name: str) -> bool:
    """LORAMUX_CACHE is the cache root that engine/default_model.py reads, not a flag."""
    if name != "LORAMUX_CACHE":
        return False
    return "LORAMUX_CACHE" in (REPO / "engine" / "default_model.py").read_text()


def _loramux_env(render: Render) -> dict[str, str]:
    """Every LORAMUX_* variable a container gets: ConfigMap (envFrom) plus env entries."""
    env = {k: v for k, v in render.configmap_env().items()}
    pod = render.pod["spec"]
    for container in pod["containers"] + pod.get("initContainers", []):
        for item in container.get("env", []):
            env[item["name"]] = item.get("value", "<from secret>")
    return {k: v for k, v in env.items() if k.startswith("LORAMUX_")}


@combo
def test_loramux_variables_are_cli_flags(renders: dict[str, Render], name: str) -> None:
    flags = _serve_flags()
    unknown = [
        var for var in _loramux_env(renders[name])
        if var not in flags and not _not_a_flag_but_read(var)
    ]
    assert unknown == [], f"LORAMUX_ variables that `loramux serve` does not read: {unknown}"


def test_grace_variable_is_a_flag() -> None:
    """The chart's termination grace period reaches the server's drain through this flag."""
    action = _serve_flags()[GRACE_ENV]
    assert action.type in (int, float)


@combo
def test_rendered_configuration_is_accepted_by_the_cli(
    renders: dict[str, Render], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ConfigMap + Secret environment, fed to the real parser, gives the values' config."""
    from loramux.server.cli import build_parser, config_from_args

    render = renders[name]
    for var in list(os.environ):
        if var.startswith("LORAMUX_"):
            monkeypatch.delenv(var)
    for var, value in _loramux_env(render).items():
        monkeypatch.setenv(var, value)
    config = config_from_args(build_parser().parse_args(["serve"]))
    server = render.values["server"]
    assert config.host == "0.0.0.0"
    assert config.port == server["port"]
    assert config.engine.quantization == server["quantization"]
    assert config.engine.dtype == server["dtype"]
    assert config.engine.device == server["device"]
    assert config.engine.max_num_seqs == server["maxNumSeqs"]
    assert config.engine.max_num_batched_tokens == server["maxNumBatchedTokens"]
    registry = config.engine.registry
    assert registry.max_gpu_adapters == server["maxGpuAdapters"]
    assert registry.gpu_pool_fraction == server["adapterPoolFraction"]
    assert registry.gpu_pool_bytes == {None: None, "8G": 8 << 30}[server["adapterPoolBytes"]]
    assert registry.max_cpu_adapters == server["maxCpuAdapters"]
    assert registry.max_lora_rank == server["maxLoraRank"]
    root = Path(render.values["adapters"]["mountPath"])
    assert registry.adapter_root == root
    assert [(n, str(p)) for n, p in registry.adapters] == [
        (a["name"], str(root / a["path"])) for a in render.values["adapters"]["preload"]
    ]
    assert config.admin_token  # from the Secret
    source = render.values["model"]["source"]
    if source == "embedded":
        assert config.engine.model is None
    else:
        sub = render.values["model"][source]["path"]
        assert config.engine.model == f"/models/{sub}"
        mounts = {m["mountPath"] for m in render.server["volumeMounts"]}
        assert "/models" in mounts
    if render.values["auth"]["apiKeys"]["enabled"]:
        assert config.api_keys is not None
        mounts = {m["mountPath"]: m["name"] for m in render.server["volumeMounts"]}
        assert mounts[str(config.api_keys.parent)] == "auth"
    else:
        assert config.api_keys is None


def _secret_data(render: Render) -> dict[str, str]:
    secret = render.one("Secret")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_secret_holds_the_api_keys_file_and_admin_token(renders: dict[str, Render]) -> None:
    render = renders["upload-only"]
    data = _secret_data(render)
    assert data["admin-token"] == "admin-secret-token"
    tenants = yaml.safe_load(data["api-keys.yaml"])
    assert tenants == {"tenants": {"acme": {
        "keys_sha256": [TENANT_SHA], "adapters": ["acme-*", "shared-summarizer"],
        "requests_per_minute": 600, "max_concurrent": 16,
    }}}
    assert TENANT_KEY not in data["api-keys.yaml"]
    # The server reads that file and that token.
    (token,) = [e for e in render.server["env"] if e["name"] == "LORAMUX_ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": "admin-token"}
    (auth,) = [v for v in render.pod["spec"]["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["secretName"] == FULLNAME
    assert auth["secret"]["items"] == [{"key": "api-keys.yaml", "path": "api-keys.yaml"}]
    assert render.configmap_env()["LORAMUX_API_KEYS"] == "/etc/loramux/auth/api-keys.yaml"
    # No secret value leaks into the ConfigMap.
    assert "admin-secret-token" not in json.dumps(render.one("ConfigMap"))


def test_rendered_tenants_file_is_what_the_server_reads(renders: dict[str, Render]) -> None:
    tenants = pytest.importorskip(
        "loramux.server.tenants", reason="the server's tenants module is not built yet")
    table = tenants.parse_tenants(yaml.safe_load(_secret_data(renders["upload-only"])[
        "api-keys.yaml"]))
    tenant = table.authenticate(TENANT_KEY)
    assert tenant is not None and tenant.name == "acme"
    assert tenant.may_use("acme-sql", "base") and not tenant.may_use("other", "base")
    assert table.authenticate("sk-wrong") is None
    # The default release's empty file refuses every key (NOTES.txt says so).
    empty = tenants.parse_tenants(yaml.safe_load(_secret_data(renders["default"])[
        "api-keys.yaml"]))
    assert empty.authenticate(TENANT_KEY) is None and not empty.open


def test_default_secret_has_a_generated_token_and_no_tenant(renders: dict[str, Render]) -> None:
    data = _secret_data(renders["default"])
    assert len(data["admin-token"]) == 48
    assert yaml.safe_load(data["api-keys.yaml"]) == {"tenants": {}}


def test_open_server_has_no_api_keys_file(renders: dict[str, Render]) -> None:
    render = renders["cpu-open"]
    assert "LORAMUX_API_KEYS" not in render.configmap_env()
    assert set(_secret_data(render)) == {"admin-token"}
    assert "auth" not in {v["name"] for v in render.pod["spec"]["volumes"]}


def test_existing_secret_is_used_and_none_is_created(renders: dict[str, Render]) -> None:
    render = renders["existing-secret"]
    assert "Secret" not in render.kinds()
    (token,) = [e for e in render.server["env"] if e["name"] == "LORAMUX_ADMIN_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "loramux-auth", "key": "token"}
    (auth,) = [v for v in render.pod["spec"]["volumes"] if v["name"] == "auth"]
    assert auth["secret"]["secretName"] == "loramux-auth"
    assert auth["secret"]["items"] == [{"key": "tenants.yaml", "path": "tenants.yaml"}]
    assert render.configmap_env()["LORAMUX_API_KEYS"] == "/etc/loramux/auth/tenants.yaml"


def test_tenant_change_rolls_the_pods(render_values: Callable[[dict[str, Any]], Render]) -> None:
    a = render_values(COMBOS["upload-only"]).pod["metadata"]["annotations"]
    changed = _merge(COMBOS["upload-only"], {"auth": {"apiKeys": {"tenants": {"beta": {
        "keys_sha256": ["0" * 64], "adapters": ["*"]}}}}})
    b = render_values(changed).pod["metadata"]["annotations"]
    assert a["checksum/auth"] != b["checksum/auth"]
    assert a["checksum/config"] == b["checksum/config"]


def test_upload_only_adapters_use_an_emptydir(renders: dict[str, Render]) -> None:
    render = renders["upload-only"]
    (volume,) = [v for v in render.pod["spec"]["volumes"] if v["name"] == "adapters"]
    assert volume["emptyDir"] == {"sizeLimit": "2Gi"}
    (mount,) = [m for m in render.server["volumeMounts"] if m["name"] == "adapters"]
    assert mount["mountPath"] == render.configmap_env()["LORAMUX_ADAPTER_ROOT"] == "/adapters"
    assert not mount.get("readOnly")  # uploads are written there
    assert "PersistentVolumeClaim" not in render.kinds()


def test_pvc_adapters_and_model(renders: dict[str, Render]) -> None:
    render = renders["pvc-adapters"]
    volumes = {v["name"]: v for v in render.pod["spec"]["volumes"]}
    assert volumes["adapters"]["persistentVolumeClaim"] == {
        "claimName": "adapters-rwx", "readOnly": True}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "loramux-cache"}
    env = render.configmap_env()
    assert env["LORAMUX_ADAPTER_ROOT"] == "/srv/adapters"
    assert env["LORAMUX_ADAPTER"] == (
        "support=/srv/adapters/support-v3,sql=/srv/adapters/team/sql-v1")
    assert env["LORAMUX_MODEL"] == "/models/Llama-3.1-8B"
    assert "initContainers" not in render.pod["spec"]  # nothing to convert or fetch


def test_triton_cache_is_a_volume_at_its_directory(renders: dict[str, Render]) -> None:
    """TRITON_CACHE_DIR is a mount of its own: an emptyDir by default, the claim that
    tritonCache.existingClaim names; with a cache claim and none of its own, the kernels stay
    on the cache claim (no volume is mounted over it)."""
    for name, volume in (("default", {"emptyDir": {"sizeLimit": "2Gi"}}),
                         ("triton-pvc",
                          {"persistentVolumeClaim": {"claimName": "triton-kernels"}})):
        render = renders[name]
        env = render.configmap_env()
        mounts = {m["name"]: m["mountPath"] for m in render.server["volumeMounts"]}
        assert mounts["triton-cache"] == env["TRITON_CACHE_DIR"] == "/var/cache/loramux/triton"
        assert mounts["cache"] == env["LORAMUX_CACHE"]
        (found,) = [v for v in render.pod["spec"]["volumes"] if v["name"] == "triton-cache"]
        assert {k: v for k, v in found.items() if k != "name"} == volume
    render = renders["pvc-adapters"]  # cache.existingClaim, no Triton claim
    assert "triton-cache" not in {v["name"] for v in render.pod["spec"]["volumes"]}
    assert "triton-cache" not in {m["name"] for m in render.server["volumeMounts"]}
    env = render.configmap_env()
    assert env["TRITON_CACHE_DIR"] == env["LORAMUX_CACHE"] + "/triton"


def test_embedded_model_is_converted_by_an_init_container(renders: dict[str, Render]) -> None:
    render = renders["default"]
    (init,) = render.pod["spec"]["initContainers"]
    assert init["command"] == ["loramux", "model", "convert"]
    assert init["image"] == render.server["image"]
    assert {m["name"] for m in init["volumeMounts"]} >= {"cache"}
    assert "LORAMUX_MODEL" not in render.configmap_env()


def test_model_init_container_fills_the_model_volume(renders: dict[str, Render]) -> None:
    render = renders["model-init"]
    (init,) = render.pod["spec"]["initContainers"]
    assert init["image"] == "example.com/model-fetcher:1"
    assert {"name": "MODEL_DIR", "value": "/models/qwen"} in init["env"]
    assert {m["mountPath"]: m.get("readOnly", False) for m in init["volumeMounts"]}["/models"] \
        is False
    model_mount = [m for m in render.server["volumeMounts"] if m["name"] == "model"]
    assert model_mount == [{"name": "model", "mountPath": "/models", "readOnly": True}]


def test_router_pool_selects_the_pods(renders: dict[str, Render]) -> None:
    render = renders["router"]
    pool = render.one("InferencePool")
    pod_labels = render.pod["metadata"]["labels"]
    selector = pool["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": render.server["ports"][0]["containerPort"]}]
    assert pool["spec"]["endpointPickerRef"] == {
        "kind": "Service", "name": "llm-d-epp", "port": {"number": 9002},
        "failureMode": "FailClose"}
    route = render.one("HTTPRoute")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io",
                                   "kind": "InferencePool", "name": pool["metadata"]["name"]}]
    assert route["spec"]["parentRefs"] == [{"name": "inference-gateway",
                                           "namespace": "gateway-system"}]
    assert render.one("Deployment")["spec"]["replicas"] == 3
    claim = render.one("PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (adapters,) = [v for v in render.pod["spec"]["volumes"] if v["name"] == "adapters"]
    assert adapters["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_autoscaler_scales_the_deployment_on_queue_depth(renders: dict[str, Render]) -> None:
    render = renders["autoscaler"]
    hpa = render.one("HorizontalPodAutoscaler")
    deployment = render.one("Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}


@pytest.mark.parametrize("name", ["servicemonitor", "autoscaler"])
def test_service_monitor_scrapes_the_metrics_port(renders: dict[str, Render], name: str) -> None:
    render = renders[name]
    monitor = render.one("ServiceMonitor")
    service = render.one("Service")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    if name == "servicemonitor":
        assert endpoint["interval"] == "5s"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_metrics_token_reaches_the_server_and_the_service_monitor(
        renders: dict[str, Render]) -> None:
    """With auth.metricsToken on, the pod reads LORAMUX_METRICS_TOKEN from the Secret and the
    ServiceMonitor sends the same Secret key as a bearer token; off, neither appears."""
    render = renders["metrics-token"]
    env = {e["name"]: e for e in render.server["env"]}
    ref = env["LORAMUX_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = render.one("Secret")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
    assert len(base64.b64decode(secret["data"][ref["key"]])) >= 32
    (endpoint,) = render.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": ref}
    for name in ("default", "servicemonitor"):
        assert "LORAMUX_METRICS_TOKEN" not in {e["name"] for e in renders[name].server["env"]}
        assert "metrics-token" not in renders[name].one("Secret")["data"]
    (endpoint,) = renders["servicemonitor"].one("ServiceMonitor")["spec"]["endpoints"]
    assert "authorization" not in endpoint


def test_service_and_pdb_select_the_pods(renders: dict[str, Render]) -> None:
    for name, render in renders.items():
        labels = render.pod["metadata"]["labels"]
        deployment = render.one("Deployment")["spec"]
        assert deployment["selector"]["matchLabels"].items() <= labels.items(), name
        assert render.one("Service")["spec"]["selector"].items() <= labels.items(), name
        pdb = render.one("PodDisruptionBudget")["spec"]
        assert pdb["selector"]["matchLabels"].items() <= labels.items(), name
        assert ("minAvailable" in pdb) != ("maxUnavailable" in pdb)
    assert renders["cpu-open"].one("PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_cpu_only_release_requests_no_gpu(renders: dict[str, Render]) -> None:
    render = renders["cpu-open"]
    assert render.configmap_env()["LORAMUX_DEVICE"] == "cpu"
    assert "tolerations" not in render.pod["spec"]
    assert "lifecycle" not in render.server  # preStopSleepSeconds 0
    assert render.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}


def test_notes_render(helm: Any, renders: dict[str, Render]) -> None:
    if not isinstance(helm, _SdkHelm):
        pytest.skip("`helm template` does not render NOTES.txt")
    notes = renders["default"].templates["loramux/templates/NOTES.txt"]
    assert f"port-forward service/{FULLNAME} 8000:8000" in notes
    assert "no tenant is configured" in notes
    notes = renders["router"].templates["loramux/templates/NOTES.txt"]
    assert "InferencePool" in notes and "llm-d-epp:9002" in notes


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "loramux"
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}.0-0"  # validated against that one
    # The image tag defaults to appVersion, which must be the package's version.
    from loramux import __version__

    assert chart["appVersion"] == __version__


def _iter_templates() -> Iterator[Path]:
    yield from sorted((CHART / "templates").glob("*"))


def test_templates_use_only_known_values_keys(defaults: dict[str, Any]) -> None:
    """Every .Values.a.b path a template reads exists in values.yaml (no silent typo)."""
    missing = []
    for path in _iter_templates():
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", path.read_text()):
            node: Any = defaults
            for part in ref.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(f"{path.name}: .Values.{ref}")
                    break
                node = node[part]
    assert missing == []



def test_pods_get_the_hub_switches(renders: dict[str, Render]) -> None:
    """The server and its init containers read the ConfigMap: no hub code or requests."""
    from loramux.offline import HUB_SWITCHES

    env = renders["default"].configmap_env()
    for name, (value, _) in HUB_SWITCHES.items():
        assert env.get(name) == value, name
