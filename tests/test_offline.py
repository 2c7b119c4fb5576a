"""No network and no Hub code at run time (loramux.offline).

The end-to-end test runs a fresh interpreter from /tmp, so the installed packages decide, with
none of the Hub switches in its environment (conftest sets some for this process) and its
sockets blocked: any name lookup or connection to a non-loopback address is recorded and
refused. It loads a tiny model through the server's path (load_hf_model, then LLMEngine) plain
and quantized, and generates.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from loramux import offline
from loramux.engine.config import EngineConfig

# What the Hub-bound code paths print when they run (bitsandbytes' import-time kernel fetch,
# kernels' publisher check, huggingface_hub's retries).
HUB_MESSAGES = ("kernels-community", "Failed to load", "huggingface.co", "publisher trust")
# Variables that would decide the outcome instead of loramux.offline.
_DECIDING = (*offline.HUB_SWITCHES, "TRANSFORMERS_OFFLINE", "DISABLE_TELEMETRY", "DO_NOT_TRACK",
             "LOCAL_KERNELS", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
ATTEMPTS_MARK = "NETWORK-ATTEMPTS:"

# Runs before anything else in the child: every DNS lookup or connection that leaves the
# machine is recorded and refused (refused, so that a CI runner with network stays clean).
NET_GUARD = r"""
import ipaddress, json, socket, sys
ATTEMPTS = []

def _local(host):
    if host in (None, "", "localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
    except ValueError:
        return False

def _refuse(kind, target):
    ATTEMPTS.append(f"{kind} {target!r}")
    raise OSError(f"test_offline: network refused ({kind} {target!r})")

def _guard_lookup(original):
    def lookup(host, *args, **kwargs):
        if not _local(host):
            _refuse(original.__name__, host)
        return original(host, *args, **kwargs)
    return lookup

for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
    setattr(socket, _name, _guard_lookup(getattr(socket, _name)))

def _guard_connect(original):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse("connect", address)
        return original(self, address)
    return connect

socket.socket.connect = _guard_connect(socket.socket.connect)
socket.socket.connect_ex = _guard_connect(socket.socket.connect_ex)
"""

CHILD = r"""
import loramux.offline
loramux.offline.forbid_hub_code()  # a no-op once loramux/__init__ calls it

import bitsandbytes  # noqa: F401  (its import asked the Hub for a CPU kernel)
import transformers  # noqa: F401
from loramux import EngineConfig, LLMEngine, SamplingParams
from loramux.engine.model import load_hf_model

try:
    for quantization in sys.argv[2:]:
        config = EngineConfig(model=sys.argv[1], device="cpu", dtype="float32",
                              quantization=quantization, kv_cache_tokens=512)
        model, tokenizer = load_hf_model(config)
        # transformers kernelizes with Hub kernels unless told not to (on CUDA it would swap
        # RMSNorm, SiLU and RoPE forwards); on CPU there is nothing to fetch, so check the flag.
        assert not model.use_kernels, f"{quantization}: the model was kernelized"
        (out,) = LLMEngine(model, config, tokenizer=tokenizer).generate(
            [[5, 9, 13, 2]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        assert len(out.token_ids) == 4
        print(f"generated {quantization}: {out.token_ids}")
finally:
    print("NETWORK-ATTEMPTS:" + json.dumps(ATTEMPTS))
"""


def _child_env(hf_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DECIDING}
    env["HF_HOME"] = str(hf_home)  # not the developer's cache: an earlier download changes nothing
    return env


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from server_model import make_model_dir

    path, _, _ = make_model_dir(tmp_path_factory.mktemp("offline") / "model")
    return path


def test_serving_path_makes_no_network_attempt_and_prints_no_hub_message(
        model_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", NET_GUARD + CHILD, str(model_dir), "none", "nf4", "int8"],
        cwd="/tmp", env=_child_env(tmp_path / "hf"), capture_output=True, text=True,
        timeout=300, check=False)
    output = proc.stdout + proc.stderr
    marks = [line for line in proc.stdout.splitlines() if line.startswith(ATTEMPTS_MARK)]
    assert marks, output
    assert json.loads(marks[-1][len(ATTEMPTS_MARK):]) == [], output
    assert proc.returncode == 0, output
    assert [m for m in HUB_MESSAGES if m in output] == [], output
    assert output.count("generated ") == 3, output


def test_switches_yield_to_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """setdefault semantics: an explicit value stays, the rest is filled in and reported."""
    for name in offline.HUB_SWITCHES:
        monkeypatch.setenv(name, "")  # so that teardown restores (or removes) each one
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    set_here = offline.forbid_hub_code()
    assert os.environ["HF_HUB_OFFLINE"] == "0" and "HF_HUB_OFFLINE" not in set_here
    assert set_here == {name: value for name, (value, _) in offline.HUB_SWITCHES.items()
                        if name != "HF_HUB_OFFLINE"}
    assert os.environ["USE_HUB_KERNELS"] == "NO" and os.environ["KERNELS_CACHE"] == os.devnull
    assert offline.forbid_hub_code() == {}  # idempotent


def test_only_the_refusal_warnings_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    offline.forbid_hub_code()
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "offline")
        log.warning("some other bitsandbytes warning")
    kept = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert kept == ["some other bitsandbytes warning"]


def test_a_missing_model_directory_is_a_local_error(tmp_path: Path) -> None:
    from loramux.engine.model import load_hf_model

    for missing in (str(tmp_path / "no-such-model"), "some-org/some-model"):
        with pytest.raises(FileNotFoundError, match="no model directory at"):
            load_hf_model(EngineConfig(model=missing, device="cpu"))


def test_importing_transformers_first_from_the_root_is_quiet() -> None:
    """Users start Python in the repository root and import transformers before loramux: no
    warning on stderr (the late switches are an INFO line, seen only with logging set up)."""
    repo = Path(__file__).resolve().parents[1]
    code = "import transformers\nimport loramux\nfrom loramux import LLMEngine\nprint('ok')\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "before loramux" not in result.stderr and "kernels-community" not in result.stderr
