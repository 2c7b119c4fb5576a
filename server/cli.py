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

from loramux import __version__
from loramux.adapters.config import RegistryConfig
from loramux.engine.config import DEVICES, DTYPES, QUANTIZATIONS, EngineConfig
from loramux.server.config import ServerConfig


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
    _add(serve, "--max-gpu-adapters", type=int, default=16, help="accelerator adapter slots")
    _add(serve, "--max-cpu-adapters", type=int, default=64, help="adapters kept in host memory")
    _add(serve, "--max-lora-rank", type=int, default=64, help="largest accepted adapter rank")
    _add(serve, "--max-num-seqs", type=int, default=64, help="sequences per step")
    _add(serve, "--max-num-batched-tokens", type=int, default=2048, help="tokens per step")
    _add(serve, "--host", default="127.0.0.1", help="address to listen on")
    _add(serve, "--port", type=int, default=8000, help="port to listen on")
    _add(serve, "--api-keys", help="YAML file of tenants, hashed keys and allowed adapters")
    _add(serve, "--admin-token", help="token for the admin API (off without one)")

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
    )
    engine = EngineConfig(
        model=args.model,
        quantization=args.quantization,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=int(args.max_num_seqs),
        max_num_batched_tokens=int(args.max_num_batched_tokens),
        registry=registry,
    )
    return ServerConfig(
        engine=engine,
        host=args.host,
        port=int(args.port),
        api_keys=Path(args.api_keys) if args.api_keys else None,
        admin_token=args.admin_token,
    )


def _serve(config: ServerConfig) -> int:
    from loramux.engine.default_model import ensure_default_model

    model_dir = Path(config.engine.model) if config.engine.model else ensure_default_model()
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"loramux: loaded {model_dir} ({hf_config.model_type}, {params / 1e6:.1f}M parameters). "
        "The HTTP server is not built yet (see the server issue); stopping after the load.",
        flush=True,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
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
    return _serve(config)


if __name__ == "__main__":
    sys.exit(main())
