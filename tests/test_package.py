"""The distribution: one `loramux` package, no bare top-level packages, a working CLI."""

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


SUBPACKAGES = ("server", "engine", "adapters", "kernels", "loadtest")


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_subpackages_import_from_their_folders(where: str, tmp_path: Path) -> None:
    """From the root too: the root's folders never shadow Hugging Face's `kernels` package."""
    code = (
        "import importlib, importlib.util, sys\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    mod = importlib.import_module('loramux.' + name)\n"
        "    print(name, list(mod.__path__)[0])\n"
        "import kernels\n"  # HF's own, which transformers now depends on
        "print('hf-kernels', kernels.__file__)\n"
        "import transformers.integrations.hub_kernels, bitsandbytes\n"  # what broke at the root
        "from loramux.kernels.ops import sgmv_shrink\n"
        "print('bare', [n for n in ('server', 'engine', 'adapters', 'loadtest')"
        " if (s := importlib.util.find_spec(n)) is not None and s.origin is not None])\n"
    )
    result = _run(sys.executable, "-c", code, cwd=REPO if where == "repo-root" else tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    for name in SUBPACKAGES:
        # The path static tools see (loramux/<name>), which is the top-level folder itself.
        assert Path(lines[name]) == REPO / "loramux" / name
        assert Path(lines[name]).resolve() == REPO / name
    assert "site-packages" in lines["hf-kernels"], "the root's kernels/ shadowed HF's package"
    assert lines["bare"] == "[]", "a top-level folder became an importable package"


def test_top_level_folders_are_not_packages() -> None:
    """An __init__.py in a top-level folder would make it shadow a site-packages namesake."""
    for name in SUBPACKAGES:
        assert not (REPO / name / "__init__.py").exists(), name
        link = REPO / "loramux" / name
        assert link.is_symlink() and link.readlink() == Path("..") / name


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
    for name in SUBPACKAGES:  # the symlinked folders' files are in the wheel as files
        sources = {p.name for p in (REPO / name).glob("*.py")}
        assert sources and sources <= {n.rsplit("/", 1)[-1] for n in names
                                       if n.startswith(f"loramux/{name}/")}, name
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "loramux = loramux.server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_engine_entry_points_are_exported_lazily() -> None:
    code = (
        "import sys, loramux\n"
        "print('torch' in sys.modules)\n"
        "from loramux import EngineConfig, LLMEngine, SamplingParams\n"
        "print(LLMEngine.__module__)\n"
    )
    result = _run(sys.executable, "-c", code, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "loramux.engine.engine"]


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


def _locked() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "requirements" / "lock.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith((" ", "#")):
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_installed_dependencies_are_the_locked_set() -> None:
    """make installs with -c requirements/lock.txt: what the tests run on is what is locked."""
    from importlib.metadata import PackageNotFoundError, version

    pins = _locked()
    assert len(pins) > 50 and "torch" not in pins  # torch's build is TORCH_SPEC's choice
    wrong = {}
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            wrong[name] = (pinned, installed)
    assert not wrong, f"installed set differs from the lock (pinned, installed): {wrong}"


def test_lock_satisfies_the_declared_ranges() -> None:
    """A range changed in pyproject.toml without `make lock` fails here, not on a user's machine."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _locked()
    for text in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch" or (req.marker and not req.marker.evaluate()):
            continue
        assert name in pins, f"{name} is declared but not locked: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name])
