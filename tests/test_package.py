"""The distribution: one `loramux` namespace, no bare top-level packages, a working CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
        timeout=300,
    )


def test_subpackages_import_from_their_folders(tmp_path: Path) -> None:
    code = (
        "import importlib, importlib.util\n"
        "for name in ('server', 'engine', 'adapters', 'kernels', 'loadtest'):\n"
        "    mod = importlib.import_module('loramux.' + name)\n"
        "    print(name, mod.__file__)\n"
        "print('bare', [n for n in ('kernels', 'server', 'adapters')"
        " if importlib.util.find_spec(n) is not None])\n"
    )
    result = _run(sys.executable, "-c", code, cwd=tmp_path)  # cwd outside the repo
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for name in ("server", "engine", "adapters", "kernels", "loadtest"):
        assert Path(lines[name]).parent == REPO / name
    assert lines["bare"] == "[]", "a bare top-level package would shadow HF's `kernels`"


def test_wheel_holds_only_the_loramux_namespace(tmp_path: Path) -> None:
    result = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(tmp_path), str(REPO), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("loramux-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"loramux"}
    for sub in ("server", "engine", "adapters", "kernels", "loadtest"):
        assert f"loramux/{sub}/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "loramux = loramux.server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_cli_help_lists_every_design_flag() -> None:
    exe = Path(sys.executable).with_name("loramux")
    result = _run(str(exe), "serve", "--help", cwd=REPO)
    assert result.returncode == 0, result.stderr
    for flag in (
        "--model", "--quantization", "--dtype", "--device", "--adapter", "--adapter-root",
        "--max-gpu-adapters", "--max-cpu-adapters", "--max-lora-rank", "--max-num-seqs",
        "--max-num-batched-tokens", "--host", "--port", "--api-keys", "--admin-token",
    ):
        assert flag in result.stdout
        assert "LORAMUX_" + flag[2:].replace("-", "_").upper() in result.stdout


def test_flags_fall_back_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from loramux.server.cli import build_parser, config_from_args

    monkeypatch.setenv("LORAMUX_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("LORAMUX_ADAPTER", "a=/x/a,b=/x/b")
    monkeypatch.setenv("LORAMUX_PORT", "9001")
    args = build_parser().parse_args(["serve", "--port", "9002"])
    config = config_from_args(args)
    assert config.engine.max_num_seqs == 7
    assert config.port == 9002  # the flag wins over the variable
    assert [name for name, _ in config.engine.registry.adapters] == ["a", "b"]
    assert config.host == "127.0.0.1"


def test_registry_and_cache_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from loramux.server.cli import build_parser, config_from_args

    monkeypatch.setenv("LORAMUX_PIN_ADAPTER", "a,b")
    monkeypatch.setenv("LORAMUX_ALLOW_PICKLE", "true")
    args = build_parser().parse_args(["serve", "--adapter-desired-set", "/etc/set.yaml",
                                      "--kv-cache-tokens", "4096", "--max-model-len", "512"])
    config = config_from_args(args)
    registry = config.engine.registry
    assert registry.pinned == ("a", "b") and registry.allow_pickle
    assert registry.desired_set == Path("/etc/set.yaml")
    assert (config.engine.kv_cache_tokens, config.engine.max_model_len) == (4096, 512)
    monkeypatch.delenv("LORAMUX_PIN_ADAPTER")
    monkeypatch.delenv("LORAMUX_ALLOW_PICKLE")
    defaults = config_from_args(build_parser().parse_args(["serve"])).engine
    assert not defaults.registry.allow_pickle and defaults.registry.pinned == ()
    assert defaults.kv_cache_tokens is None and defaults.max_model_len is None


def test_bad_flag_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from loramux.server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--adapter", "no-equals-sign"])
    assert exit_info.value.code == 2
    assert "NAME=PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--quantization", "fp3"])


def test_loadtest_is_a_loramux_subcommand() -> None:
    exe = Path(sys.executable).with_name("loramux")
    result = _run(str(exe), "loadtest", "--help", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: loramux loadtest")
    for sub in ("run", "peft", "make-adapters", "load-adapters", "compare"):
        assert sub in result.stdout
