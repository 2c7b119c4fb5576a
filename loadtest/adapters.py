"""Make N random PEFT LoRA adapters for a base model, and load them into a running server.

(`make_adapter` makes one: `loramux adapter demo` writes the README's first adapter with it.)

Making: peft builds the LoRA layout on a weightless copy of the base (the model is
instantiated from its config on the `meta` device, so a 7B base costs no memory), which gives
the exact tensor names and shapes `save_pretrained` would write. Each adapter then gets
random values from its own seed: A ~ N(0, 1/sqrt(in)) like PEFT's init, and B ~ N(0, b_std),
not PEFT's zeros, so every adapter changes the output and a server that applies the wrong
one, or none, computes something different.

Loading, through the admin API (`Authorization: Bearer <admin token>`):

    upload   PUT /admin/adapters/{name}, multipart with adapter_config.json and
             adapter_model.safetensors (the server need not see our disk)
    path     POST /v1/load_lora_adapter {"lora_name", "lora_path"} (vLLM's endpoint; loramux
             only accepts paths under its --adapter-root)
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class AdapterRecipe:
    """What each made adapter looks like; ranks cycle over the adapters (adapter i gets
    ranks[i % len(ranks)]), alpha defaults to twice the rank."""

    ranks: tuple[int, ...] = (8,)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    alpha: float | None = None
    b_std: float = 0.02
    dtype: str = "float32"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError("ranks must be positive")
        if not self.target_modules:
            raise ValueError("name at least one target module")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}")
        if not self.b_std > 0:
            raise ValueError("b_std must be positive: a zero lora_B makes a no-op adapter")


def parse_targets(text: str) -> tuple[str, ...]:
    """`q_proj,v_proj`; `all` is every Llama projection; `all-linear` is passed to peft."""
    if text.strip() == "all":
        return LLAMA_MODULES
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    if not targets:
        raise ValueError("no target modules given")
    return targets


def adapter_names(count: int, prefix: str = "lt-") -> list[str]:
    """`lt-000`, `lt-001`, ...: zero-padded so that names sort in order."""
    width = max(3, len(str(count - 1)))
    return [f"{prefix}{i:0{width}d}" for i in range(count)]


def _meta_peft_model(model_dir: str, rank: int, recipe: AdapterRecipe, alpha: float) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    targets: list[str] | str = (recipe.target_modules[0] if recipe.target_modules == (
        "all-linear",) else list(recipe.target_modules))
    # peft types lora_alpha as int; an integral alpha is written as one, like PEFT users do.
    lora_alpha: Any = int(alpha) if float(alpha).is_integer() else alpha
    lora = LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0,
                      use_rslora=recipe.use_rslora, task_type="CAUSAL_LM",
                      base_model_name_or_path=model_dir)
    return get_peft_model(base, lora)


def _layout(model_dir: str | Path, rank: int, recipe: AdapterRecipe
            ) -> tuple[dict[str, Any], Any]:
    """({tensor name: shape}, LoraConfig) of a rank-`rank` adapter for the base at `model_dir`."""
    from peft import get_peft_model_state_dict

    alpha = recipe.alpha if recipe.alpha is not None else 2.0 * rank
    peft_model = _meta_peft_model(str(model_dir), rank, recipe, alpha)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(peft_model).items()}
    config = peft_model.peft_config["default"]
    config.inference_mode = True
    return shapes, config


def _write_adapter(path: Path, shapes: Mapping[str, Any], config: Any, recipe: AdapterRecipe,
                   seed: int) -> Path:
    """Draw the adapter's tensors from `seed` and write it into `path` as PEFT does."""
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, recipe.dtype)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if ".lora_A." in key:
            value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        elif ".lora_B." in key:
            value = torch.randn(shape, generator=gen) * recipe.b_std
        else:
            raise ValueError(f"unexpected adapter tensor {key}")
        tensors[key] = value.to(dtype).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def _adapter_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def make_adapter(model_dir: str | Path, path: Path, *, recipe: AdapterRecipe = AdapterRecipe(),
                 seed: int = 0) -> Path:
    """Write one random adapter (rank `recipe.ranks[0]`) for the base at `model_dir` into
    `path`: the same files as the first adapter `make_adapters` makes with this seed."""
    shapes, config = _layout(model_dir, recipe.ranks[0], recipe)
    return _write_adapter(path, shapes, config, recipe, _adapter_seed(seed, 0))


def make_adapters(model_dir: str | Path, out_dir: Path, count: int, *,
                  recipe: AdapterRecipe = AdapterRecipe(), prefix: str = "lt-", seed: int = 0,
                  progress: bool = True) -> dict[str, Path]:
    """Write `count` random adapters for the base at `model_dir` under `out_dir/<name>`;
    returns {name: path}. Adapter i is drawn from seed (seed, i): the same call makes the same
    files."""
    from tqdm.auto import tqdm

    if count < 1:
        raise ValueError("count must be at least 1")
    layouts: dict[int, tuple[dict[str, Any], Any]] = {}
    made: dict[str, Path] = {}
    names = adapter_names(count, prefix)
    for i, name in enumerate(tqdm(names, desc="making adapters", unit="adapter",
                                  disable=None if progress else True)):
        rank = recipe.ranks[i % len(recipe.ranks)]
        if rank not in layouts:
            layouts[rank] = _layout(model_dir, rank, recipe)
        shapes, config = layouts[rank]
        made[name] = _write_adapter(out_dir / name, shapes, config, recipe,
                                    _adapter_seed(seed, i))
    return made


def find_adapters(directory: Path, prefix: str | None = None) -> dict[str, Path]:
    """{folder name: folder} for every PEFT adapter folder directly under `directory`."""
    from loramux.loadtest.generator import natural_key

    found = {p.name: p for p in directory.iterdir()
             if (p / CONFIG_FILE).is_file() and (not prefix or p.name.startswith(prefix))}
    return {name: found[name] for name in sorted(found, key=natural_key)}


def adapter_info(path: Path) -> dict[str, Any]:
    """Rank, alpha and target modules from an adapter's config."""
    config = json.loads((path / CONFIG_FILE).read_text())
    return {"r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "target_modules": config.get("target_modules")}


@dataclass(frozen=True)
class LoadOutcome:
    """What the server said to one load."""

    name: str
    status: int  # 0: no answer
    seconds: float
    message: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def _load_one(http: httpx.AsyncClient, url: str, headers: Mapping[str, str], name: str,
                    path: Path, via: str) -> LoadOutcome:
    started = time.perf_counter()
    try:
        if via == "upload":
            files = {filename: (filename, (path / filename).read_bytes(),
                                "application/octet-stream")
                     for filename in (CONFIG_FILE, WEIGHTS_FILE)}
            response = await http.put(f"{url}/admin/adapters/{name}", files=files,
                                      headers=headers)
        else:
            response = await http.post(f"{url}/v1/load_lora_adapter", headers=headers,
                                       json={"lora_name": name,
                                             "lora_path": str(path.resolve())})
    except httpx.HTTPError as exc:
        return LoadOutcome(name, 0, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
    return LoadOutcome(name, response.status_code, time.perf_counter() - started,
                       response.text[:300])


async def load_adapters_async(url: str, adapters: Mapping[str, Path], *,
                              admin_token: str | None, via: str = "upload",
                              concurrency: int = 4, timeout: float = 300.0,
                              progress: bool = True) -> list[LoadOutcome]:
    """Load every adapter into the server at `url`, `concurrency` at a time; one outcome each
    (the call itself does not raise on a refused load)."""
    from tqdm.auto import tqdm

    if via not in ("upload", "path"):
        raise ValueError("via must be 'upload' or 'path'")
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    url = url.rstrip("/")
    gate = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(adapters), desc=f"loading adapters ({via})", unit="adapter",
               disable=None if progress else True)

    async def one(http: httpx.AsyncClient, name: str, path: Path) -> LoadOutcome:
        async with gate:
            outcome = await _load_one(http, url, headers, name, path, via)
        bar.update(1)
        return outcome

    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            return list(await asyncio.gather(*(one(http, n, p) for n, p in adapters.items())))
    finally:
        bar.close()


def load_adapters(url: str, adapters: Mapping[str, Path], **kwargs: Any) -> list[LoadOutcome]:
    """Synchronous `load_adapters_async`."""
    return asyncio.run(load_adapters_async(url, adapters, **kwargs))


def unload_adapters(url: str, names: Sequence[str], *, admin_token: str | None,
                    timeout: float = 60.0) -> list[LoadOutcome]:
    """POST /v1/unload_lora_adapter for each name."""
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    outcomes = []
    with httpx.Client(timeout=timeout) as http:
        for name in names:
            started = time.perf_counter()
            response = http.post(f"{url.rstrip('/')}/v1/unload_lora_adapter", headers=headers,
                                 json={"lora_name": name})
            outcomes.append(LoadOutcome(name, response.status_code,
                                        time.perf_counter() - started, response.text[:300]))
    return outcomes


__all__ = [
    "LLAMA_MODULES", "AdapterRecipe", "LoadOutcome", "adapter_info", "adapter_names",
    "find_adapters", "load_adapters", "load_adapters_async", "make_adapter", "make_adapters",
    "parse_targets", "unload_adapters",
]
