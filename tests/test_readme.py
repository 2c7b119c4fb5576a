"""The README's first session, run as pasted (shell blocks in order) from the repository root.

Only two things differ from a user's paste: HOME is a temporary folder (so ~/loramux-demo is
the test's own) and the port is a free one instead of 8000. The converted default model is
shared with the rest of the machine (LORAMUX_CACHE, else ~/.cache/loramux): converted once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _session_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## A first session", 1)[1].split("`GET /health`", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _json_objects(text: str) -> list[dict]:
    """The top-level JSON objects in the output (curl -s prints no newline after a body)."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def test_first_session_runs_as_pasted_from_the_repository_root(tmp_path: Path) -> None:
    blocks = _session_blocks()
    assert len(blocks) >= 5, "the README's first session lost its shell blocks"
    port = _free_port()
    script = "\n".join(blocks).replace("localhost:8000", f"localhost:{port}")
    cache = os.environ.get("LORAMUX_CACHE") or str(Path.home() / ".cache" / "loramux")
    venv_bin = str(Path(sys.executable).parent)  # as after `. .venv/bin/activate`
    env = {**os.environ, "HOME": str(tmp_path), "LORAMUX_CACHE": cache,
           "LORAMUX_PORT": str(port), "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    pid_file = tmp_path / "loramux-demo" / "server.pid"
    try:
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        if pid_file.is_file():  # the script's last line stops it; this is for a failed run
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    log = (tmp_path / "loramux-demo" / "server.log")
    detail = f"{result.stdout}\n{result.stderr}\n{log.read_text() if log.is_file() else ''}"
    assert result.returncode == 0, detail
    # The demo adapter went outside the source tree, where the session said.
    assert (tmp_path / "loramux-demo/adapters/demo/adapter_model.safetensors").is_file()
    assert not (REPO / "adapters" / "demo").exists()
    assert "curl" in result.stdout, "the banner (tail of the server log) is missing"
    objects = _json_objects(result.stdout)
    model_lists = [o for o in objects if o.get("object") == "list"]
    # The open server lists the base and the demo folder; the keyed one lists acme's models.
    assert len(model_lists) >= 2, detail
    for listing in (model_lists[0], model_lists[-1]):
        ids = {m["id"] for m in listing["data"]}
        assert {"SmolLM2-135M-Instruct", "demo"} <= ids, listing
    completions = [o for o in objects if o.get("object") == "text_completion"]
    assert completions and completions[0]["model"] == "demo"
    assert completions[0]["choices"][0]["text"].strip(), completions[0]
    assert completions[0]["usage"]["completion_tokens"] > 0
    assert not [o for o in objects if "error" in o], detail
