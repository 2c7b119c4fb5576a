"""The command line for a newcomer (issue 14): grouped --help with defaults, the ready banner,
`loramux adapter demo`."""

from __future__ import annotations

import argparse
import io
import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from adapter_factory import tiny_base, tiny_llama_config

from loramux.server import cli
from loramux.server.config import ServerConfig

GROUPS = ("model", "adapters", "scheduling and capacity", "HTTP and security",
          "lifecycle and logging")


@pytest.fixture(autouse=True)
def _no_loramux_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults are read when the parser is built: start from an unconfigured environment."""
    import os

    for name in list(os.environ):
        if name.startswith("LORAMUX_") or name == "OPENAI_API_KEY":
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "100")


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]  # type: ignore[no-any-return]


def _serve_help() -> str:
    return _sub(cli.build_parser(), "serve").format_help()


def _option_help(text: str, flag: str) -> str:
    """The help text of one option, its wrapped lines joined."""
    match = re.search(rf"^  {re.escape(flag)}\b.*?(?=^  -|^\S|\Z)", text,
                      re.MULTILINE | re.DOTALL)
    assert match, flag
    return " ".join(match.group(0).split())


# ============================================================================ --help


def test_serve_help_groups_every_flag_with_its_default() -> None:
    parser = _sub(cli.build_parser(), "serve")
    text = parser.format_help()
    titles = [g.title for g in parser._action_groups if g._group_actions]
    assert [t for t in titles if t in GROUPS] == list(GROUPS)
    for title in GROUPS:
        assert f"\n{title}:\n" in text
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 25
    for action in flags:
        flag = action.option_strings[0]
        line = _option_help(text, flag)
        assert "(default: " in line, line
        assert line.endswith(f"[env {cli._env_name(flag)}]"), line
    assert "(default: 8000)" in _option_help(text, "--port")
    assert "(default: 127.0.0.1)" in _option_help(text, "--host")
    assert "(default: off)" in _option_help(text, "--allow-pickle")
    assert "(default: none: the admin API is off)" in _option_help(text, "--admin-token")
    assert "the embedded SmolLM2-135M-Instruct" in _option_help(text, "--model")


def test_env_tags_stay_whole_on_a_narrow_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Dockerfile and Helm tests grep `[env LORAMUX_X]` from --help: wrapping never
    splits one, whatever the width."""
    parser = _sub(cli.build_parser(), "serve")
    names = {cli._env_name(a.option_strings[0]) for a in parser._actions
             if a.option_strings and a.dest != "help"}
    for columns in ("40", "60", "83", "120"):
        monkeypatch.setenv("COLUMNS", columns)
        text = _sub(cli.build_parser(), "serve").format_help()
        assert set(re.findall(r"\[env (LORAMUX_[A-Z0-9_]+)\]", text)) == names, columns


def test_defaults_from_the_environment_are_shown_but_secrets_are_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAMUX_PORT", "9001")
    monkeypatch.setenv("LORAMUX_ADMIN_TOKEN", "s3cret-admin")
    monkeypatch.setenv("LORAMUX_METRICS_TOKEN", "s3cret-metrics")
    text = _serve_help()
    assert "(default: 9001, from LORAMUX_PORT; else 8000)" in _option_help(text, "--port")
    assert "s3cret" not in text
    assert "(default: set, from LORAMUX_ADMIN_TOKEN; else none" in _option_help(
        text, "--admin-token")
    args = cli.build_parser().parse_args(["serve"])  # the behaviour is unchanged
    assert (args.port, args.admin_token) == (9001, "s3cret-admin")


def test_log_level_also_after_serve() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["serve"]).log_level == "INFO"
    assert parser.parse_args(["--log-level", "debug", "serve"]).log_level == "DEBUG"
    assert parser.parse_args(["serve", "--log-level", "warning"]).log_level == "WARNING"
    # The sub-command does not overwrite a level given before it.
    assert parser.parse_args(["--log-level", "ERROR", "serve", "--port", "1"]).log_level == "ERROR"


def test_loadtest_help_shows_defaults_but_no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    from loramux.loadtest.__main__ import build_parser

    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-show")
    monkeypatch.setenv("LORAMUX_ADMIN_TOKEN", "token-should-not-show")
    parser = build_parser("loramux loadtest")
    run = _sub(parser, "run").format_help()
    assert "(default: http://127.0.0.1:8000) [env LORAMUX_URL]" in " ".join(run.split())
    for flag, default in (("--timeout", "3600"), ("--popularity", "uniform"),
                          ("--prompt-len", "128"), ("--rank", "8"), ("--b-std", "0.02"),
                          ("--targets", "q_proj,v_proj"), ("--out", "loadtest-results")):
        assert f"(default: {default})" in _option_help(run, flag), flag
    assert "(default:" not in _option_help(run, "--no-plots")  # a switch says it by its name
    assert "should-not-show" not in run
    for name, flag, default in (("make-adapters", "--prefix", "lt-"),
                                ("load-adapters", "--concurrency", "4"),
                                ("peft", "--device", "auto"),
                                ("compare", "--out", "compare.png")):
        text = _sub(parser, name).format_help()
        assert f"(default: {default})" in _option_help(text, flag), name
        assert "should-not-show" not in text


# ============================================================================ the banner


def _curl(banner: str) -> list[str]:
    """The banner's curl command, as the shell splits it after a paste."""
    command = banner.split("  try:\n", 1)[1].replace("\\\n", " ")
    return shlex.split(command)


def test_banner_of_an_open_server() -> None:
    banner = cli.ready_banner(
        url="http://127.0.0.1:8000", model="SmolLM2-135M-Instruct", adapters=["acme", "demo"],
        adapter_root=Path("/srv/adapters"), on_demand=["beta"], admin=True, tenants=None)
    lines = banner.splitlines()
    assert lines[0] == "loramux is ready at http://127.0.0.1:8000"
    assert "  model      SmolLM2-135M-Instruct" in lines
    assert "  adapters   2 loaded: acme, demo" in lines
    assert "  on demand  1 under /srv/adapters load on first use: beta" in lines
    assert "  admin API  on (--admin-token)" in lines
    assert any(line.startswith("  access     OPEN") for line in lines)
    argv = _curl(banner)
    assert argv[:3] == ["curl", "-s", "http://127.0.0.1:8000/v1/completions"]
    assert not any("Authorization" in arg for arg in argv)
    body = json.loads(argv[argv.index("-d") + 1])
    assert body["model"] == "SmolLM2-135M-Instruct" and body["max_tokens"] > 0


def test_banner_of_a_keyed_server() -> None:
    banner = cli.ready_banner(
        url="http://127.0.0.1:9000", model="it's-a-model", adapters=[], adapter_root=None,
        on_demand=[], admin=False, tenants=3, listening="every interface")
    assert banner.splitlines()[0] == ("loramux is ready at http://127.0.0.1:9000 "
                                      "(listening on every interface)")
    assert "  adapters   none loaded" in banner and "no --adapter-root" in banner
    assert "  admin API  off (no --admin-token)" in banner
    assert "  access     API key required (3 tenants)" in banner
    assert '-H "Authorization: Bearer $LORAMUX_API_KEY"' in banner
    argv = _curl(banner)
    assert "Authorization: Bearer $LORAMUX_API_KEY" in argv  # shlex does not expand it
    assert json.loads(argv[argv.index("-d") + 1])["model"] == "it's-a-model"  # quoted right


def test_banner_lists_many_adapters_briefly() -> None:
    names = [f"a{i}" for i in range(20)]
    banner = cli.ready_banner(url="http://h:1", model="m", adapters=names, adapter_root=None,
                              on_demand=[], admin=False, tenants=1)
    assert "20 loaded: a0, a1, a2, a3, a4, a5, a6, a7, ... (12 more)" in banner
    assert "(1 tenant)" in banner


class _Engine:
    def __init__(self) -> None:
        self.ready = False

    def is_ready(self) -> bool:
        return self.ready

    def adapter_names(self) -> list[str]:
        return ["acme"]

    def lazy_adapter_names(self) -> list[str]:
        return []


def _state(engine: _Engine) -> Any:
    from loramux.server.tenants import TenantTable

    return SimpleNamespace(engine=engine, draining=False, start_error=None,
                           base_name="tiny", tenants=TenantTable(open=True))


def test_banner_is_printed_once_when_ready(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="loramux.server")
    engine = _Engine()
    state = _state(engine)
    out = io.StringIO()
    announcer = cli.ReadyAnnouncer(ServerConfig(host="0.0.0.0"), state, stream=out)
    assert not announcer.check(port=8123) and out.getvalue() == ""  # still loading
    engine.ready = True
    state.draining = True
    assert not announcer.check(port=8123) and out.getvalue() == ""  # /ready says 503
    state.draining = False
    assert announcer.check(port=8123)
    assert announcer.check(port=8123)  # once only
    text = out.getvalue()
    assert text.count("loramux is ready") == 1
    assert text.startswith("loramux is ready at http://127.0.0.1:8123 (listening on every")
    assert "1 loaded: acme" in text and "model      tiny" in text


def test_banner_is_quiet_above_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="loramux.server")
    engine = _Engine()
    engine.ready = True
    out = io.StringIO()
    announcer = cli.ReadyAnnouncer(ServerConfig(), _state(engine), stream=out)
    assert announcer.check() and out.getvalue() == ""


# ============================================================================ adapter demo


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo-base") / "tiny"
    tiny_base(tiny_llama_config()).save_pretrained(str(path))
    return path


@torch.no_grad()
def _greedy(model: Any, prompt: list[int], new: int = 12) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         do_sample=False, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt):]]


def test_adapter_demo_changes_the_text(tiny_model: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel

    target = tmp_path / "demo"
    assert cli.main(["adapter", "demo", str(target), "--model", str(tiny_model)]) == 0
    assert capsys.readouterr().out.strip() == str(target.resolve())
    config = json.loads((target / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    prompt = [5, 17, 42, 99, 3]
    base = _greedy(tiny_base(tiny_llama_config()), prompt)
    peft_model = PeftModel.from_pretrained(tiny_base(tiny_llama_config()), str(target)).eval()
    assert _greedy(peft_model, prompt) != base


def test_adapter_demo_is_the_load_testers_first_adapter(tiny_model: Path,
                                                        tmp_path: Path) -> None:
    """One recipe, one writer: `adapter demo --seed S` is `make-adapters`' first with seed S."""
    from safetensors.torch import load_file

    from loramux.loadtest.adapters import AdapterRecipe, make_adapters

    assert cli.main(["adapter", "demo", str(tmp_path / "demo"), "--model", str(tiny_model),
                     "--rank", "4", "--targets", "all", "--seed", "7", "--b-std", "0.05"]) == 0
    made = make_adapters(tiny_model, tmp_path / "lt", 1, seed=7, progress=False,
                         recipe=AdapterRecipe(ranks=(4,), b_std=0.05,
                                              target_modules=("q_proj", "k_proj", "v_proj",
                                                              "o_proj", "gate_proj", "up_proj",
                                                              "down_proj")))
    ours = load_file(str(tmp_path / "demo" / "adapter_model.safetensors"))
    theirs = load_file(str(made["lt-000"] / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 2
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_adapter_demo_refuses_a_non_empty_folder(tiny_model: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    assert cli.main(["adapter", "demo", str(target), "--model", str(tiny_model)]) == 1
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert cli.main(["adapter", "demo", str(target), "--model", str(tiny_model),
                     "--force"]) == 0
    assert sorted(p.name for p in target.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    (tmp_path / "file").write_text("x")
    assert cli.main(["adapter", "demo", str(tmp_path / "file"), "--model",
                     str(tiny_model)]) == 1
    assert cli.main(["adapter", "demo", str(tmp_path / "bad"), "--model", str(tiny_model),
                     "--rank", "0"]) == 1
    assert "ranks must be positive" in capsys.readouterr().err
