"""The `loramux` command: `serve`, `model path`, `model convert`.

Every `serve` flag can also be set by an environment variable `LORAMUX_<FLAG>` (upper case,
dashes as underscores), which is how the container image and the Helm chart configure it.
A flag on the command line wins over the variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loramux import __version__
from loramux.adapters.config import RegistryConfig
from loramux.engine.config import DEVICES, DTYPES, QUANTIZATIONS, EngineConfig
from loramux.server.config import ServerConfig

log = logging.getLogger("loramux.server")


def _env_name(flag: str) -> str:
    return "LORAMUX_" + flag.lstrip("-").replace("-", "_").upper()


def _add(parser: argparse.ArgumentParser, flag: str, **kwargs: object) -> None:
    """Add a flag whose default comes from its LORAMUX_ variable when that is set."""
    env = os.environ.get(_env_name(flag))
    if env is not None:
        if kwargs.get("action") == "append":
            kwargs["default"] = [item for item in env.split(",") if item]
        elif kwargs.get("action") == "store_true":
            kwargs["default"] = env.lower() in ("1", "true", "yes", "on")
        else:
            kwargs["default"] = env
    help_text = str(kwargs.pop("help", ""))
    kwargs["help"] = f"{help_text} [env {_env_name(flag)}]"
    parser.add_argument(flag, **kwargs)  # type: ignore[arg-type]


def _adapter_pair(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loramux", description="Multi-tenant LoRA inference server."
    )
    parser.add_argument("--version", action="version", version=f"loramux {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("LORAMUX_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible API")
    _add(serve, "--model", help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    _add(serve, "--quantization", choices=QUANTIZATIONS, default="none",
         help="bitsandbytes quantization of the base")
    _add(serve, "--dtype", choices=DTYPES, default="auto", help="compute dtype")
    _add(serve, "--device", choices=DEVICES, default="auto", help="where the model runs")
    _add(serve, "--adapter", action="append", default=[],
         help="NAME=PATH of a PEFT adapter to load at start (repeatable)")
    _add(serve, "--adapter-root", help="directory where unknown adapter names are resolved")
    _add(serve, "--adapter-desired-set", help="YAML/JSON file of adapters to load (and pin) "
         "at start, reconciled declaratively")
    _add(serve, "--pin-adapter", action="append", default=[],
         help="adapter name kept resident on the accelerator (repeatable)")
    _add(serve, "--allow-pickle", action="store_true", default=False,
         help="accept adapter_model.bin pickle files (unsafe: pickles can run code)")
    _add(serve, "--max-gpu-adapters", type=int, default=16, help="accelerator adapter slots")
    _add(serve, "--max-cpu-adapters", type=int, default=64, help="adapters kept in host memory")
    _add(serve, "--max-lora-rank", type=int, default=64, help="largest accepted adapter rank")
    _add(serve, "--max-num-seqs", type=int, default=64, help="sequences per step")
    _add(serve, "--max-num-batched-tokens", type=int, default=2048, help="tokens per step")
    _add(serve, "--max-model-len", type=int, help="context length (default: the model's)")
    _add(serve, "--kv-cache-tokens", type=int,
         help="KV cache budget in tokens (default: from free memory on CUDA, 64k on CPU)")
    _add(serve, "--host", default="127.0.0.1", help="address to listen on")
    _add(serve, "--port", type=int, default=8000, help="port to listen on")
    _add(serve, "--api-keys", help="YAML file of tenants, hashed keys and allowed adapters")
    _add(serve, "--admin-token", help="token for the admin API (off without one)")
    _add(serve, "--metrics-token", help="bearer token /metrics requires (the admin token "
         "also works); without one /metrics is open, so keep tenants off its port")
    _add(serve, "--served-model-name", help="name clients use for the base model "
         "(default: the model folder's name)")
    _add(serve, "--max-queue", type=int, default=256,
         help="requests that may wait beyond --max-num-seqs before new ones get 503")
    _add(serve, "--shutdown-grace-seconds", type=float, default=30.0,
         help="after SIGTERM, how long running requests may take to finish")
    _add(serve, "--log-prompts", action="store_true", default=False,
         help="log prompts and messages at DEBUG level (off by default)")

    # Listed here for --help; main() hands its arguments to the load tester's own parser.
    commands.add_parser("loadtest", help="load generator and benchmarks (loramux loadtest -h)",
                        add_help=False)

    model = commands.add_parser("model", help="the embedded default model")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    model_commands.add_parser("path", help="print where the converted default model lives")
    model_commands.add_parser("convert", help="convert the default model now (normally lazy)")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Turn parsed `serve` arguments into the frozen configuration, validating it once."""
    adapters = tuple(
        item if isinstance(item, tuple) else _adapter_pair(item) for item in args.adapter
    )
    registry = RegistryConfig(
        adapters=adapters,
        adapter_root=Path(args.adapter_root) if args.adapter_root else None,
        max_gpu_adapters=int(args.max_gpu_adapters),
        max_cpu_adapters=int(args.max_cpu_adapters),
        max_lora_rank=int(args.max_lora_rank),
        desired_set=Path(args.adapter_desired_set) if args.adapter_desired_set else None,
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
    )


def _serve(config: ServerConfig, log_level: str = "INFO") -> int:
    """Build the engine, serve the app with uvicorn, drain on SIGTERM, exit.

    The HTTP server starts at once (/health answers, /ready is 503) while the model loads in
    the background. On SIGTERM (or Ctrl-C) /ready turns 503, the listening socket closes, and
    running requests get `shutdown_grace_seconds` to finish before they are cut off.
    """
    import math

    import uvicorn

    from loramux.server.app import create_app
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
    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, lifespan="on", access_log=False,
        log_config=None, log_level=log_level.lower(),
        timeout_graceful_shutdown=math.ceil(config.shutdown_grace_seconds),
    )

    class DrainingServer(uvicorn.Server):
        """Marks the app as draining (/ready says 503) on the first SIGTERM or SIGINT."""

        exit_code = 0

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

    state.on_fatal = fatal
    server.run()
    if server.exit_code == 0 and not server.started:
        return 1  # e.g. the port was taken: uvicorn logged why
    return server.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadtest"]:
        from loramux.loadtest import main as loadtest_main

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
    try:
        config = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as err:
        parser.error(str(err))
    return _serve(config, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
