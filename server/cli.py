"""The `loramux` command: `serve`, `model path`, `model convert`, `adapter demo`.

Every `serve` flag can also be set by an environment variable `LORAMUX_<FLAG>` (upper case,
dashes as underscores), which is how the container image and the Helm chart configure it.
A flag on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramux import __version__
from loramux.adapters.config import RegistryConfig
from loramux.engine.config import DEVICES, DTYPES, QUANTIZATIONS, EngineConfig
from loramux.server.config import ServerConfig

log = logging.getLogger("loramux.server")

# The flags whose values are secrets: --help says whether their variable is set, never its value.
_SECRETS = frozenset({"--admin-token", "--metrics-token"})
_ENV_TAG = re.compile(r"\[env [^\]]+\]")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# lora_B's std for `adapter demo`: large enough that the demo adapter visibly changes the
# default model's greedy text (the load tester's 0.02 barely does on SmolLM2-135M).
DEMO_B_STD = 0.1
_ANY_HOST = ("", "0.0.0.0", "::")


class HelpFormatter(argparse.HelpFormatter):
    """Wraps help text without splitting an `[env LORAMUX_X]` tag, so each variable's name
    stays whole (and greppable) on one line."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        # As argparse wraps, but a tag is one unbreakable word (a no-break space inside, and
        # no splitting of words longer than the line).
        text = re.sub(r"[ \t\n\r\f\v]+", " ", text).strip()
        glued = _ENV_TAG.sub(lambda m: m.group(0).replace(" ", "\xa0"), text)
        lines = textwrap.wrap(glued, width, break_long_words=False)
        return [line.replace("\xa0", " ") for line in lines]


def _env_name(flag: str) -> str:
    return "LORAMUX_" + flag.lstrip("-").replace("-", "_").upper()


def _shown(value: object) -> str:
    """A default as --help says it: lists comma-separated, an empty or unset one as `none`."""
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def _add(parser: Any, flag: str, *, help: str, default_text: str | None = None,
         **kwargs: Any) -> None:
    """Add a flag whose default comes from its LORAMUX_ variable when that is set.

    Its help ends `(default: X) [env LORAMUX_X]`: `default_text` says in words what an unset
    flag means; a default taken from the variable is shown as such (a secret's only as set).
    """
    name = _env_name(flag)
    builtin = default_text or _shown(kwargs.get("default"))
    env = os.environ.get(name)
    if env is None:
        default = builtin
    else:
        if kwargs.get("action") == "append":
            kwargs["default"] = [item for item in env.split(",") if item]
        elif kwargs.get("action") == "store_true":
            kwargs["default"] = env.lower() in ("1", "true", "yes", "on")
        else:
            kwargs["default"] = env
        value = "set" if flag in _SECRETS else _shown(kwargs["default"])
        default = f"{value}, from {name}; else {builtin}"
    # argparse %-formats help text: a literal % in a default must not start a placeholder.
    kwargs["help"] = f"{help} (default: {default})".replace("%", "%%") + f" [env {name}]"
    parser.add_argument(flag, **kwargs)


_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(text: str | int) -> int:
    """Bytes from `123`, `512M`, `8G`, `8GiB` or `1.5G` (suffixes are powers of 1024)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a size like 8G or 1073741824, got {text!r}")
    value = int(float(match.group(1)) * _SIZE_SUFFIXES[match.group(2).upper()])
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return value


def _adapter_pair(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramux", description="Multi-tenant LoRA inference server.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"loramux {__version__}")
    _add(parser, "--log-level", default="INFO", type=str.upper, metavar="LEVEL",
         help="log level: " + ", ".join(_LOG_LEVELS))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve the OpenAI-compatible API", formatter_class=HelpFormatter,
        description="Serve the OpenAI-compatible API: one base model, many LoRA adapters. "
        "Once the model is loaded it prints where it listens and a curl to try.")
    model = serve.add_argument_group("model")
    _add(model, "--model", metavar="DIR", help="model directory",
         default_text="the embedded SmolLM2-135M-Instruct, converted on first use")
    _add(model, "--served-model-name", metavar="NAME", help="name clients use for the base model",
         default_text="the model folder's name")
    _add(model, "--quantization", choices=QUANTIZATIONS, default="none",
         help="bitsandbytes quantization of the base")
    _add(model, "--dtype", choices=DTYPES, default="auto",
         help="compute dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    _add(model, "--device", choices=DEVICES, default="auto", help="where the model runs")

    adapters = serve.add_argument_group("adapters")
    _add(adapters, "--adapter", action="append", default=[], metavar="NAME=PATH",
         help="a PEFT adapter to load at start (repeatable)")
    _add(adapters, "--adapter-root", metavar="DIR",
         help="directory where unknown adapter names are resolved")
    _add(adapters, "--adapter-desired-set", metavar="FILE",
         help="YAML/JSON file of adapters to load (and pin) at start, reconciled declaratively")
    _add(adapters, "--adapter-state", metavar="FILE",
         help="file where runtime adapter changes (admin loads, reloads, uploads, pins, "
              "unloads) are kept and re-applied at start; without it a restart loses them")
    _add(adapters, "--pin-adapter", action="append", default=[], metavar="NAME",
         help="adapter name kept resident on the accelerator (repeatable)")
    _add(adapters, "--allow-pickle", action="store_true", default=False,
         help="accept adapter_model.bin pickle files (unsafe: pickles can run code)")
    _add(adapters, "--max-gpu-adapters", type=int, metavar="N",
         help="cap on the adapters resident on the accelerator at once (its slots)",
         default_text="no cap: as many as the adapter pool's bytes hold")
    _add(adapters, "--adapter-pool-bytes", type=_byte_size, metavar="BYTES",
         help="accelerator adapter pool size, each adapter taking bytes in proportion to its "
              "ranks (a number, or with a K/M/G/T suffix: 8G)",
         default_text="--adapter-pool-fraction of free memory on CUDA; on CPU 2 GiB, at most "
                      "1/8 of host memory")
    _add(adapters, "--adapter-pool-fraction", type=float, default=0.10, metavar="F",
         help="CUDA: share of the memory free after the weights that the adapter pool takes, "
              "before the KV cache is sized from what is left")
    _add(adapters, "--max-cpu-adapters", type=int, default=64, metavar="N",
         help="adapters kept in host memory")
    _add(adapters, "--max-lora-rank", type=int, default=64, metavar="R",
         help="largest accepted adapter rank")

    capacity = serve.add_argument_group("scheduling and capacity")
    _add(capacity, "--max-num-seqs", type=int, default=64, metavar="N",
         help="sequences per step")
    _add(capacity, "--max-num-batched-tokens", type=int, default=2048, metavar="N",
         help="tokens per step")
    _add(capacity, "--max-model-len", type=int, metavar="N", help="context length",
         default_text="the model's")
    _add(capacity, "--kv-cache-tokens", type=int, metavar="N", help="KV cache budget in tokens",
         default_text="from free memory on CUDA, 64k on CPU")
    _add(capacity, "--enforce-eager", action="store_true", default=False,
         help="run every step eagerly: no CUDA graphs for decode steps")
    _add(capacity, "--max-queue", type=int, default=256, metavar="N",
         help="requests that may wait beyond --max-num-seqs before new ones get 503")

    http = serve.add_argument_group("HTTP and security")
    _add(http, "--host", default="127.0.0.1", help="address to listen on")
    _add(http, "--port", type=int, default=8000, help="port to listen on")
    _add(http, "--api-keys", metavar="FILE",
         help="YAML file of tenants, hashed keys and allowed adapters",
         default_text="none: the server is open to anyone who reaches it")
    _add(http, "--admin-token", metavar="TOKEN", help="token for the admin API",
         default_text="none: the admin API is off")
    _add(http, "--metrics-token", metavar="TOKEN", help="bearer token /metrics requires (the "
         "admin token also works); without one /metrics is open, so keep tenants off its port",
         default_text="none: /metrics is open")
    _add(http, "--header-timeout-seconds", type=float, default=10.0, metavar="SECONDS",
         help="close a connection whose request head is not complete this long after it "
         "opened or after its previous response")
    _add(http, "--max-connections", type=int, metavar="N",
         help="open HTTP connections; past it a new one is closed at once",
         default_text="the open-files limit less a reserve")

    lifecycle = serve.add_argument_group("lifecycle and logging")
    _add(lifecycle, "--shutdown-grace-seconds", type=float, metavar="SECONDS", default=30.0,
         help="after SIGTERM, how long running requests may take to finish")
    _add(lifecycle, "--log-prompts", action="store_true", default=False,
         help="log prompts and messages at DEBUG level")
    # Also after `serve`, where a newcomer puts it; SUPPRESS keeps a `loramux --log-level X
    # serve` in effect (a sub-command's defaults would overwrite the top-level value).
    level = os.environ.get("LORAMUX_LOG_LEVEL")
    shown = "INFO" if level is None else f"{level.upper()}, from LORAMUX_LOG_LEVEL; else INFO"
    lifecycle.add_argument(
        "--log-level", type=str.upper, metavar="LEVEL", default=argparse.SUPPRESS,
        help=f"log level: {', '.join(_LOG_LEVELS)}; the same as `loramux --log-level LEVEL "
        f"serve` (default: {shown}) [env LORAMUX_LOG_LEVEL]".replace("%", "%%"))

    # Listed here for --help; main() hands its arguments to the load tester's own parser.
    commands.add_parser("loadtest", help="load generator and benchmarks (loramux loadtest -h)",
                        add_help=False)

    model_parser = commands.add_parser("model", help="the embedded default model",
                                       formatter_class=HelpFormatter)
    model_commands = model_parser.add_subparsers(dest="model_command", required=True)
    model_commands.add_parser("path", help="print where the converted default model lives")
    model_commands.add_parser("convert", help="convert the default model now (normally lazy)")

    adapter_parser = commands.add_parser("adapter", help="adapter tools",
                                         formatter_class=HelpFormatter)
    adapter_commands = adapter_parser.add_subparsers(dest="adapter_command", required=True)
    demo = adapter_commands.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="write a random PEFT LoRA adapter to try the server with",
        description="Write an untrained PEFT LoRA adapter with random weights (lora_B too, so "
        "it changes the text) for a base model into DIR, and print DIR.")
    demo.add_argument("dir", type=Path, metavar="DIR",
                      help="folder for adapter_config.json and adapter_model.safetensors")
    demo.add_argument("--model", metavar="DIR", help="base model folder (default: the "
                      "embedded default model, converted if needed)")
    demo.add_argument("--rank", type=int, default=8, metavar="R",
                      help="LoRA rank r; lora_alpha is 2r (default: 8)")
    demo.add_argument("--targets", default="q_proj,v_proj", metavar="LIST",
                      help="target modules, comma-separated; 'all': every Llama projection "
                      "(default: q_proj,v_proj)")
    demo.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seed of the random weights (default: 0)")
    demo.add_argument("--b-std", type=float, default=DEMO_B_STD, metavar="STD",
                      help="std of the random lora_B: how far the adapter moves the output "
                      f"(default: {DEMO_B_STD})")
    demo.add_argument("--force", action="store_true",
                      help="write into DIR even if it is not empty: replaces the adapter's two "
                      "files there, leaves any other (default: off)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Turn parsed `serve` arguments into the frozen configuration, validating it once."""
    adapters = tuple(
        item if isinstance(item, tuple) else _adapter_pair(item) for item in args.adapter
    )
    registry = RegistryConfig(
        adapters=adapters,
        adapter_root=Path(args.adapter_root) if args.adapter_root else None,
        max_gpu_adapters=int(args.max_gpu_adapters) if args.max_gpu_adapters else None,
        gpu_pool_bytes=_byte_size(args.adapter_pool_bytes) if args.adapter_pool_bytes else None,
        gpu_pool_fraction=float(args.adapter_pool_fraction),
        max_cpu_adapters=int(args.max_cpu_adapters),
        max_lora_rank=int(args.max_lora_rank),
        desired_set=Path(args.adapter_desired_set) if args.adapter_desired_set else None,
        state_file=Path(args.adapter_state) if args.adapter_state else None,
        pinned=tuple(args.pin_adapter),
        allow_pickle=bool(args.allow_pickle),
    )
    engine = EngineConfig(
        model=args.model,
        quantization=args.quantization,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=int(args.max_num_seqs),
        max_num_batched_tokens=int(args.max_num_batched_tokens),
        max_model_len=int(args.max_model_len) if args.max_model_len else None,
        kv_cache_tokens=int(args.kv_cache_tokens) if args.kv_cache_tokens else None,
        enforce_eager=bool(args.enforce_eager),
        registry=registry,
    )
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=int(args.port),
        api_keys=Path(args.api_keys) if args.api_keys else None,
        admin_token=args.admin_token or None,  # an empty variable means off
        metrics_token=args.metrics_token or None,
        served_model_name=args.served_model_name or None,
        max_queue=int(args.max_queue),
        shutdown_grace_seconds=float(args.shutdown_grace_seconds),
        log_prompts=bool(args.log_prompts),
        header_timeout_seconds=float(args.header_timeout_seconds),
        max_connections=int(args.max_connections) if args.max_connections else None,
    )


def _display_host(host: str) -> str:
    """The host part of a URL a client on this machine can open."""
    if host in _ANY_HOST:
        return "127.0.0.1"  # listening on every interface: loopback is one of them
    return f"[{host}]" if ":" in host else host


def _names(names: Sequence[str], limit: int = 8) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f", ... ({more} more)" if more > 0 else "")


def ready_banner(*, url: str, model: str, adapters: Sequence[str], adapter_root: Path | None,
                 on_demand: Sequence[str], admin: bool, tenants: int | None,
                 listening: str = "") -> str:
    """The lines printed once the server is ready: what it serves, to whom, and a curl to try.

    `adapters`: the names loaded; `on_demand`: adapter folders under `adapter_root` that load
    on their first request; `tenants`: how many the API-keys file names, None for an open
    server.
    """
    loaded = f"{len(adapters)} loaded: {_names(adapters)}" if adapters else "none loaded"
    if adapter_root is None:
        lazy = "no --adapter-root"
    elif on_demand:
        lazy = f"{len(on_demand)} under {adapter_root} load on first use: {_names(on_demand)}"
    else:
        lazy = f"none yet under {adapter_root} (each folder there loads on first use)"
    if tenants is None:
        access = "OPEN: no --api-keys, anyone who reaches the port may call it"
    else:
        access = (f"API key required ({tenants} tenant{'' if tenants == 1 else 's'}): "
                  "export LORAMUX_API_KEY=<a tenant's key> for the curl below")
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 16,
                       "temperature": 0})
    curl = [f"curl -s {url}/v1/completions -H 'Content-Type: application/json'"]
    if tenants is not None:
        curl.append('-H "Authorization: Bearer $LORAMUX_API_KEY"')  # a tenant's key, exported
    curl.append(f"-d {shlex.quote(body)}")
    lines = [
        f"loramux is ready at {url}" + (f" (listening on {listening})" if listening else ""),
        f"  model      {model}",
        f"  adapters   {loaded}",
        f"  on demand  {lazy}",
        f"  admin API  {'on (--admin-token)' if admin else 'off (no --admin-token)'}",
        f"  access     {access}",
        "  try:",
        "    " + " \\\n      ".join(curl),
    ]
    return "\n".join(lines)


class ReadyAnnouncer:
    """Prints `ready_banner` once, the first time the server would answer /ready with 200."""

    def __init__(self, config: ServerConfig, state: Any, stream: Any = None) -> None:
        self.config = config
        self.state = state  # the app's AppState
        self.stream = stream
        self.done = False
        self._lock = threading.Lock()  # the tick and /ready may both get here

    def ready(self) -> bool:
        """What /ready checks (server/app.py): not draining, started, the engine ready."""
        state = self.state
        return bool(not state.draining and state.start_error is None
                    and state.engine.is_ready())

    def check(self, port: int | None = None) -> bool:
        """Print the banner if the server just became ready; True once it has been printed."""
        with self._lock:
            if self.done or not self.ready():
                return self.done
            if log.isEnabledFor(logging.INFO):  # --log-level WARNING and up: quiet
                print(self.banner(port), file=self.stream or sys.stderr, flush=True)
            self.done = True
            return True

    def banner(self, port: int | None = None) -> str:
        config, state = self.config, self.state
        engine = state.engine
        port = config.port if port is None else port
        return ready_banner(
            url=f"http://{_display_host(config.host)}:{port}", model=state.base_name,
            adapters=list(engine.adapter_names()),
            adapter_root=config.engine.registry.adapter_root,
            on_demand=list(engine.lazy_adapter_names()), admin=config.admin_token is not None,
            tenants=None if state.tenants.open else len(state.tenants.tenants),
            listening="every interface" if config.host in _ANY_HOST else "")


# After the grace the app ends each running request with a `shutting_down` error (in a stream,
# an SSE event before [DONE]); uvicorn cancels what is left only this much later, so that
# those errors reach the clients.
DRAIN_FLUSH_SECONDS = 2


def uvicorn_config(app: Any, config: ServerConfig, log_level: str = "INFO") -> Any:
    """uvicorn's settings for `app`: the h11 protocol with a request-head timeout and a
    connection cap (server/limits.py), uvicorn's keep-alive timeout, and the drain time."""
    import math

    import uvicorn

    from loramux.server.limits import bounded_protocol, default_max_connections

    max_connections = config.max_connections
    if max_connections is None:
        max_connections = default_max_connections()
    return uvicorn.Config(
        app, host=config.host, port=config.port, lifespan="on", access_log=False,
        log_config=None, log_level=log_level.lower(),
        http=bounded_protocol(config.header_timeout_seconds, max_connections),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=math.ceil(config.shutdown_grace_seconds)
        + DRAIN_FLUSH_SECONDS,
    )


def _serve(config: ServerConfig, log_level: str = "INFO") -> int:
    """Build the engine, serve the app with uvicorn, drain on SIGTERM, exit.

    The HTTP server starts at once (/health answers, /ready is 503) while the model loads in
    the background. On SIGTERM (or Ctrl-C) /ready turns 503, the listening socket closes, and
    running requests get `shutdown_grace_seconds` to finish before the app ends them with a
    `shutting_down` error (server/app.py).
    """
    import asyncio

    import uvicorn

    from loramux.server.app import create_app
    from loramux.server.limits import RepeatedLogFilter
    from loramux.server.local_engine import LocalEngineClient
    from loramux.server.tenants import TenantFileError, load_tenants

    try:
        tenants = load_tenants(config.api_keys)
    except TenantFileError as err:
        print(f"loramux: {err}", file=sys.stderr)
        return 2
    engine = LocalEngineClient(config.engine, served_model_name=config.served_model_name)
    app = create_app(config, engine, tenants=tenants)
    state = app.state.loramux
    uv_config = uvicorn_config(app, config, log_level)
    for handler in logging.getLogger().handlers:  # e.g. one line per refused accept()
        handler.addFilter(RepeatedLogFilter())

    announcer = ReadyAnnouncer(config, state)

    class DrainingServer(uvicorn.Server):
        """Marks the app as draining (/ready says 503) on the first SIGTERM or SIGINT, and
        prints the ready banner once the app is ready."""

        exit_code = 0

        async def on_tick(self, counter: int) -> bool:
            # uvicorn calls this every 0.1 s once it listens: the first tick on which /ready
            # would say 200 prints the banner (app.py's lifespan only logs "ready").
            should_exit = await super().on_tick(counter)
            if not should_exit and not announcer.done and announcer.ready():
                # Off the event loop: the banner lists the adapter root's folders.
                await asyncio.to_thread(announcer.check, self._port())
            return bool(should_exit)

        def _port(self) -> int | None:
            """The port actually bound (--port 0 picks a free one)."""
            for server in getattr(self, "servers", []):
                for sock in server.sockets:
                    return int(sock.getsockname()[1])
            return None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not state.draining:
                log.info("signal %d: draining for up to %.0f s (no new requests)", sig,
                         config.shutdown_grace_seconds)
            state.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after its shutdown (exit status 143, or a
            # KeyboardInterrupt traceback on Ctrl-C); a completed drain exits 0 instead.
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    server = DrainingServer(uv_config)

    def fatal(exc: BaseException) -> None:
        server.exit_code = 1
        server.should_exit = True

    async def announce() -> None:
        # /ready's first 200 comes after the banner, so a script that waits for /ready and
        # then reads the log finds it there (the README's first session does).
        if not announcer.done:
            await asyncio.to_thread(announcer.check, server._port())

    state.on_fatal = fatal
    state.before_ready = announce
    server.run()
    if server.exit_code == 0 and not server.started:
        return 1  # e.g. the port was taken: uvicorn logged why
    return server.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadtest"]:
        from loramux.loadtest.__main__ import main as loadtest_main

        return loadtest_main(argv[1:], prog="loramux loadtest")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.command == "model":
        from loramux.engine.default_model import (
            DefaultModelMissing,
            default_model_dir,
            ensure_default_model,
            is_converted,
        )

        if args.model_command == "path":
            path = default_model_dir()
            print(path if is_converted(path) else f"{path} (not converted yet)")
            return 0
        try:
            print(ensure_default_model())
        except DefaultModelMissing as err:
            print(f"loramux: {err}", file=sys.stderr)
            return 1
        return 0
    if args.command == "adapter":
        return _adapter_demo(args)
    try:
        config = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as err:
        parser.error(str(err))
    return _serve(config, args.log_level)


def _adapter_demo(args: argparse.Namespace) -> int:
    """`loramux adapter demo DIR`: one random adapter (the load tester's recipe) into DIR."""
    target: Path = args.dir
    if target.exists() and not target.is_dir():
        print(f"loramux: {target} exists and is not a folder", file=sys.stderr)
        return 1
    if target.is_dir() and any(target.iterdir()) and not args.force:
        print(f"loramux: {target} is not empty; pass --force to write the adapter there anyway",
              file=sys.stderr)
        return 1
    from loramux.engine.default_model import DefaultModelMissing, ensure_default_model
    from loramux.loadtest.adapters import AdapterRecipe, make_adapter, parse_targets

    try:
        recipe = AdapterRecipe(ranks=(args.rank,), target_modules=parse_targets(args.targets),
                               b_std=args.b_std)
        model = args.model or str(ensure_default_model())
    except (ValueError, DefaultModelMissing) as err:
        print(f"loramux: {err}", file=sys.stderr)
        return 1
    make_adapter(model, target, recipe=recipe, seed=args.seed)
    print(target.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
