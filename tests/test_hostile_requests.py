"""Hostile requests against a live server (issue 15, items 7, 8, 9 and 11).

- Bodies that break the JSON reader: nesting deeper than the limit, integers longer than
  Python converts, lone UTF-16 surrogates in any string (model, prompt, messages, stop,
  user, keys): each a 400 with the OpenAI body and a message that says what is wrong.
- Cheap checks first: a tenant over its request or token rate, or a prompt far longer than
  the context could hold, is refused before the tokenizer sees the text.
- Connections that never finish their request head are closed after the header timeout, and
  past the connection cap new ones are closed at once, so /health keeps answering; repeated
  identical log records are rate-limited.
- Request ids are the server's; the client's travels apart (X-Client-Request-Id), escaped and
  bounded in the log; a stream cut by a drain ends with a `shutting_down` error event.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability_world import (
    BASE,
    KEYS,
    TENANTS,
    World,
    assert_error,
    auth,
    build_world,
    scrape,
    sse_events,
    value,
    wait_for,
)
from server_harness import LiveServer
from server_model import make_model_dir

from loramux.server.tenants import hash_key

CONTEXT = 256
CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
# Tenants of this module only: one request per minute, and a small token budget.
LIMITED = {"limited": ("sk-hostile-limited", {"adapters": ["*"], "requests_per_minute": 1}),
           "stingy": ("sk-hostile-stingy", {"adapters": ["*"], "tokens_per_minute": 60})}


def key_auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {LIMITED[tenant][0]}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("hostile"), max_positions=CONTEXT)


@pytest.fixture(scope="module")
def keys_file(world: World) -> Path:
    tenants = {name: {"keys_sha256": [hash_key(KEYS[name])], **spec}
               for name, spec in TENANTS.items()}
    tenants.update({name: {"keys_sha256": [hash_key(key)], **spec}
                    for name, (key, spec) in LIMITED.items()})
    path = world.keys_file.with_name("hostile-keys.json")
    path.write_text(json.dumps({"tenants": tenants}))
    return path


@pytest.fixture(scope="module")
def live(world: World, keys_file: Path) -> Iterator[LiveServer]:
    with world.serve(api_keys=keys_file) as server:
        yield server


# ============================================================================ item 7: bodies


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


CHAT_HEAD = b'{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],'
# (id, path, raw body, param, fragment of the message)
BODIES: list[tuple[str, str, bytes, str | None, str]] = [
    ("nested-2000", CMPL, b'{"model":"tiny-llama","prompt":' + nested(2000) + b"}", None,
     "nested deeper than"),
    ("nested-2000-object", CHAT, CHAT_HEAD + b'"chat_template_kwargs":' + deep_object(2000)
     + b"}", None, "nested deeper than"),
    ("nested-200-object", CHAT, CHAT_HEAD + b'"chat_template_kwargs":' + deep_object(200)
     + b"}", None, "nested deeper than"),
    ("integer-5000-digits", CMPL, b'{"model":"tiny-llama","prompt":"x","seed":' + b"7" * 5000
     + b"}", None, "4300 digits"),
    ("integer-5000-digits-in-ids", CMPL, b'{"model":"tiny-llama","prompt":[1,' + b"9" * 5000
     + b"]}", None, "4300 digits"),
    ("surrogate-model", CMPL, b'{"model":"\\ud800","prompt":"x"}', "model", "surrogate"),
    ("surrogate-model-chat", CHAT, b'{"model":"acme-\\udfff","messages":[{"role":"user",'
     b'"content":"hi"}]}', "model", "surrogate"),
    ("surrogate-prompt", CMPL, b'{"model":"tiny-llama","prompt":"x\\ud800"}', "prompt",
     "surrogate"),
    ("surrogate-prompt-list", CMPL, b'{"model":"tiny-llama","prompt":["ok","\\udc00"]}',
     "prompt.1", "surrogate"),
    ("surrogate-message", CHAT, b'{"model":"tiny-llama","messages":[{"role":"user",'
     b'"content":"a\\ud83d"}]}', "messages.0.content", "surrogate"),
    ("surrogate-content-part", CHAT, b'{"model":"tiny-llama","messages":[{"role":"user",'
     b'"content":[{"type":"text","text":"\\ude00"}]}]}', "messages.0.content.0.text",
     "surrogate"),
    ("surrogate-role", CHAT, b'{"model":"tiny-llama","messages":[{"role":"\\ud800",'
     b'"content":"hi"}]}', "messages.0.role", "surrogate"),
    ("surrogate-stop", CMPL, b'{"model":"tiny-llama","prompt":"x","stop":["\\udc00"]}',
     "stop.0", "surrogate"),
    ("surrogate-user", CMPL, b'{"model":"tiny-llama","prompt":"x","user":"\\udbff"}', "user",
     "surrogate"),
    ("surrogate-key", CMPL, b'{"model":"tiny-llama","prompt":"x","\\ud800":1}', None,
     "surrogate"),
]


@pytest.mark.parametrize(("path", "field"), [(CMPL, "max_tokens"), (CHAT, "max_tokens"),
                                             (CHAT, "max_completion_tokens")])
@pytest.mark.parametrize("digits", [20, 4300])
def test_a_max_tokens_too_long_to_print_is_a_400(live: LiveServer, path: str, field: str,
                                                 digits: int) -> None:
    """4,300 digits parse (the body check refuses from 4,301) but cannot be formatted back:
    the context-length message raised ValueError, a 500."""
    head = b'{"model":"tiny-llama","prompt":"x",' if path == CMPL else CHAT_HEAD
    raw = head + f'"{field}":'.encode() + b"9" * digits + b"}"
    err = assert_error(httpx.post(live.url + path, content=raw, headers=auth("acme"),
                                  timeout=30), 400)
    assert err["param"] == field and str(CONTEXT) in err["message"], err


def test_log_lines_cannot_be_forged_or_grown_through_the_model(
        live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    """U+0085 and U+2028 end a line for str.splitlines and some log shippers; a huge `model`
    was logged and echoed whole (14 MB per request)."""
    caplog.set_level(logging.INFO, logger="loramux.access")
    for model in ("acme-x\u0085INFO loramux.access: forged", "acme-x\u2028forged",
                  "a" * 1_000_000):
        response = httpx.post(live.url + CMPL, headers=auth("acme"), timeout=30,
                              json={"model": model, "prompt": "x"})
        err = assert_error(response, 404)
        assert len(response.content) < 2_000, len(response.content)
        assert "a" * 300 not in err["message"]
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "loramux.access"
                and "POST /v1/completions 404" in r.getMessage()]

    wait_for(lambda: len(lines()) >= 3, timeout=10, what="access lines")
    for line in lines():
        assert len(line.splitlines()) == 1 and len(line) < 1_000, line[:300]
    assert any("\\x85INFO" in line for line in lines()), lines()


@pytest.mark.parametrize(("path", "raw", "param", "fragment"), [b[1:] for b in BODIES],
                         ids=[b[0] for b in BODIES])
def test_hostile_bodies_are_400s(live: LiveServer, path: str, raw: bytes, param: str | None,
                                 fragment: str) -> None:
    response = httpx.post(live.url + path, content=raw, headers=auth("acme"), timeout=30)
    err = assert_error(response, 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert fragment in err["message"], err


def test_hostile_admin_body_is_400(live: LiveServer) -> None:
    response = httpx.post(live.url + "/admin/adapters", content=b'{"name":"\\ud800"}',
                          headers={"Authorization": "Bearer reliability-admin-token"},
                          timeout=30)
    assert assert_error(response, 400)["param"] == "name"


def test_valid_pairs_and_shallow_bodies_still_pass(live: LiveServer) -> None:
    """A surrogate pair is one character (an emoji), not a lone surrogate; 30 levels of
    template arguments are within the limit."""
    response = httpx.post(live.url + CMPL, content=b'{"model":"tiny-llama","prompt":"x",'
                          b'"stop":["\\ud83d\\ude00"],"max_tokens":2}', headers=auth("acme"),
                          timeout=30)
    assert response.status_code == 200, response.text
    response = httpx.post(live.url + CHAT, content=CHAT_HEAD + b'"max_tokens":2,'
                          b'"chat_template_kwargs":' + deep_object(30) + b"}",
                          headers=auth("acme"), timeout=30)
    assert response.status_code == 200, response.text
    # A key that is not latin-1 text is a 401, not a 500.
    response = httpx.get(live.url + "/v1/models", headers={"Authorization": b"Bearer \xff\xfe"})
    assert_error(response, 401)


# ============================================================================ item 8: order


class Counted:
    """Counts calls of the engine's tokenizing methods (the app calls them by attribute)."""

    def __init__(self, live: LiveServer) -> None:
        self.engine = live.app.state.loramux.engine
        self.calls = 0
        self.saved = {name: getattr(self.engine, name) for name in ("encode", "chat_prompt")}

    def __enter__(self) -> Counted:  # noqa: PYI034 - py310 has no typing.Self
        for name, method in self.saved.items():
            setattr(self.engine, name, self._counting(method))
        return self

    def _counting(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return method(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc: object) -> None:
        for name in self.saved:
            delattr(self.engine, name)


HUGE = "x" * (4 << 20)  # 4 MiB of prompt text


def test_tenant_over_its_request_rate_is_refused_before_tokenizing(live: LiveServer) -> None:
    ok = httpx.post(live.url + CMPL, headers=key_auth("limited"), timeout=30,
                    json={"model": BASE, "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    with Counted(live) as counted:
        for path, body in ((CMPL, {"prompt": HUGE}),
                           (CHAT, {"messages": [{"role": "user", "content": HUGE}]})):
            response = httpx.post(live.url + path, headers=key_auth("limited"), timeout=60,
                                  json={"model": BASE, **body})
            err = assert_error(response, 429)
            assert "requests per minute" in err["message"]
            assert int(response.headers["retry-after"]) >= 1
        assert counted.calls == 0


def test_tenant_without_tokens_left_is_refused_before_tokenizing(live: LiveServer) -> None:
    # 60 tokens a minute: a 50-token completion leaves about 9 (1 refills per second).
    ok = httpx.post(live.url + CMPL, headers=key_auth("stingy"), timeout=30, json={
        "model": BASE, "prompt": "x", "max_tokens": 50, "ignore_eos": True})
    assert ok.status_code == 200, ok.text
    with Counted(live) as counted:
        response = httpx.post(live.url + CMPL, headers=key_auth("stingy"), timeout=60,
                              json={"model": BASE, "prompt": HUGE, "max_tokens": 40})
        err = assert_error(response, 429)
        assert "tokens per minute" in err["message"]
        assert counted.calls == 0


def test_prompt_far_over_the_context_is_refused_before_tokenizing(live: LiveServer) -> None:
    with Counted(live) as counted:
        for path, body in ((CMPL, {"prompt": HUGE}), (CMPL, {"prompt": ["x", HUGE]}),
                           (CHAT, {"messages": [{"role": "user", "content": HUGE}]})):
            response = httpx.post(live.url + path, headers=auth("acme"), timeout=60,
                                  json={"model": BASE, **body})
            err = assert_error(response, 400)
            assert err["param"] in ("prompt", "messages"), err
            assert f"{CONTEXT} tokens" in err["message"], err
        assert counted.calls == 0


# ============================================================================ item 11: ids


def test_request_ids_are_the_servers_and_the_clients_travels_apart(
        live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loramux.access")
    response = httpx.post(live.url + CMPL, headers={**auth("acme"), "X-Request-Id": "abc-1"},
                          json={"model": BASE, "prompt": "x", "max_tokens": 2}, timeout=30)
    assert response.status_code == 200, response.text
    server_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", server_id), server_id
    assert response.headers["x-client-request-id"] == "abc-1"
    assert response.json()["id"] == f"cmpl-{server_id}"
    # OpenAI's own header name works too, and errors carry both ids.
    response = httpx.post(live.url + CMPL, headers={**auth("acme"),
                                                    "X-Client-Request-Id": "mine-2"},
                          json={"model": "no-such", "prompt": "x"}, timeout=30)
    assert_error(response, 404)
    assert response.headers["x-client-request-id"] == "mine-2"
    assert response.headers["x-request-id"] != "mine-2"
    # An id that is not printable ASCII, or too long, is not echoed; the log escapes and
    # bounds it.
    odd = "tab\there" + "y" * 1000
    response = httpx.get(live.url + "/v1/models", headers={**auth("acme"),
                                                           "X-Request-Id": odd})
    assert response.status_code == 200
    assert "x-client-request-id" not in response.headers
    def lines() -> list[str]:  # the access line is written after the body has gone out
        return [r.getMessage() for r in caplog.records if r.name == "loramux.access"]

    wait_for(lambda: any(line.startswith(server_id + " ") for line in lines()) and any(
        "client_id=tab" in line for line in lines()), timeout=10, what="access lines")
    line = next(line for line in lines() if line.startswith(server_id + " "))
    assert "POST /v1/completions 200" in line and line.endswith(" client_id=abc-1"), line
    logged = next(line for line in lines() if "client_id=tab" in line)
    assert "\t" not in logged and "tab\\x09here" in logged and len(logged) < 400


# ============================================================================ the CLI


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cli:
    """`loramux serve` in a subprocess on a free port, its log in a file."""

    def __init__(self, model_dir: Path, tmp: Path, env: dict[str, str], *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        self._log = self.log_path.open("w")
        exe = Path(sys.executable).with_name("loramux")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--model", str(model_dir), "--port", str(self.port),
             *args],
            env={**os.environ, "LORAMUX_DEVICE": "cpu", "LORAMUX_DTYPE": "float32", **env},
            stdout=self._log, stderr=subprocess.STDOUT, text=True, cwd=tmp)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                if httpx.get(self.url + "/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready"
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Cli]]:
    """The module's `loramux serve` (started again if a drain test ended it): a model with a
    4,096-token context, a 1 s header timeout, 6 connections at most, a 1 s shutdown grace."""
    tmp = tmp_path_factory.mktemp("cli")
    model_dir, _, _ = make_model_dir(tmp / "long", max_positions=4096)
    servers: list[Cli] = []

    def running() -> Cli:
        if not servers or servers[-1].proc.poll() is not None:
            # Environment variables, not flags: without the fix they are ignored, not refused.
            servers.append(Cli(model_dir, tmp, {
                "LORAMUX_HEADER_TIMEOUT_SECONDS": "1", "LORAMUX_MAX_CONNECTIONS": "6",
                "LORAMUX_SHUTDOWN_GRACE_SECONDS": "1"}))
        return servers[-1]

    yield running
    for server in servers:
        server.close()


def stalled(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if head:
        sock.sendall(head)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_stalled_request_heads_are_closed_after_the_header_timeout(
        cli: Callable[[], Cli]) -> None:
    server = cli()
    socks = [stalled(server.port, b""),  # connects and says nothing
             stalled(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n"),  # no blank line
             stalled(server.port, b"POST /v1/compl")]  # half a request line
    # A keep-alive connection whose second request head stalls.
    keep = stalled(server.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    keep.settimeout(5)
    assert keep.recv(4096).startswith(b"HTTP/1.1 200")
    keep.sendall(b"GET /health HTTP/1.1\r\n")
    socks.append(keep)
    start = time.monotonic()
    assert all(closed_within(sock, 5.0) for sock in socks)
    assert time.monotonic() - start < 5.0
    assert httpx.get(server.url + "/health").status_code == 200


def test_connections_past_the_cap_are_closed_and_health_recovers(
        cli: Callable[[], Cli]) -> None:
    server = cli()
    held = [stalled(server.port, b"GET /he") for _ in range(6)]
    time.sleep(0.2)  # all six accepted
    extra = stalled(server.port, b"")
    assert closed_within(extra, 0.8)  # before the 1 s header timeout
    assert all(closed_within(sock, 5.0) for sock in held)
    wait_for(lambda: httpx.get(server.url + "/health").status_code == 200, 5.0, "health")
    log = server.log_path.read_text()
    assert "connection cap" in log


def test_drain_that_cuts_requests_ends_them_with_shutting_down(cli: Callable[[], Cli]) -> None:
    """With a 1 s grace, SIGTERM cuts a stream of 4,000 tokens (several seconds here): it
    ends with an error event and [DONE], a non-streamed request gets a 503, the exit is 0."""
    server = cli()
    try:
        body = {"model": "long", "prompt": "x", "max_tokens": 4000, "ignore_eos": True,
                "temperature": 0.0}
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(httpx.post, server.url + CMPL, json=body, timeout=60)
            wait_for(lambda: value(scrape(server.url), "vllm:num_requests_running") == 1,
                     30.0, "the plain request running")
            with httpx.stream("POST", server.url + CMPL, json={**body, "stream": True},
                              timeout=60) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                first = next(sse_events(lines))
                assert isinstance(first, dict) and "choices" in first
                server.proc.send_signal(signal.SIGTERM)
                events = list(sse_events(lines))
            cut = plain.result()
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        assert events and events[-1] == "[DONE]", events[-3:]
        assert len(errors) == 1 and errors[0] is events[-2], errors
        assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
        assert errors[0]["error"]["code"] == "shutting_down", errors
        assert assert_error(cut, 503)["code"] == "shutting_down"
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.close()


# ============================================================================ the log filter


def test_repeated_identical_log_records_are_rate_limited() -> None:
    from loramux.server.limits import RepeatedLogFilter

    now = [0.0]
    flt = RepeatedLogFilter(burst=3, interval_s=10.0, clock=lambda: now[0])

    def record(msg: str, level: int = logging.ERROR, *args: Any) -> logging.LogRecord:
        return logging.LogRecord("asyncio", level, __file__, 1, msg, args, None)

    passed = [flt.filter(record("accept failed: %s", logging.ERROR, "EMFILE"))
              for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert flt.filter(record("accept failed: %s", logging.ERROR, "ENFILE"))  # another text
    assert flt.filter(record("another message"))
    assert all(flt.filter(record("access line", logging.INFO)) for _ in range(10))  # INFO: all
    now[0] = 11.0
    resumed = record("accept failed: %s", logging.ERROR, "EMFILE")
    assert flt.filter(resumed)
    assert "7 similar messages suppressed" in resumed.getMessage()
    assert resumed.getMessage().startswith("accept failed: EMFILE")
