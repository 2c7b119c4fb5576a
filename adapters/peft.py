"""PEFT LoRA adapters: read the two files, validate them against the base, compute scaling.

`read_adapter` is the only way an adapter enters loramux. It either returns a `PeftAdapter`
whose every tensor is applied to a (layer, module) of the base with PEFT's own scaling, or
raises `AdapterRefused` naming the rule that failed. It touches no registry state, so a refused
adapter leaves everything as it was.

The rules, each with its own `Rule` name in the error:
  name syntax, path confinement (after resolving symlinks), the PEFT file pair, pickle refused
  unless allowed, well-formed config and weights, unsupported PEFT features refused by name,
  every tensor mapped to a (layer, module) of the base and targeted by the config, both A and B
  present, rank consistent with `r` / `rank_pattern` and within the limit, shapes as the base,
  float dtype, finite values (also after conversion to the serving dtype), size limit.

PEFT's matching rules are reproduced from peft 0.21 (`peft.utils.other.get_pattern_key` for
rank/alpha patterns, `peft.tuners.tuners_utils.check_target_module_exists` for
target_modules); the tests compare against a real `PeftModel`. Module keys are the names PEFT
matches against: `model.layers.{i}.{self_attn|mlp}.{module}`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loramux.adapters.types import MODULE_PARENTS, MODULES, AdapterError, BaseSpec

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20  # a PEFT config is a few KB; anything larger is not one

# Used with fullmatch only: `$` with re.match also accepts a trailing newline ("acme-x\n").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Rule:
    """The validation rules; each refusal's message starts with one of these."""

    NAME = "name syntax"
    PATH = "path outside adapter root"
    FILES = "not a PEFT adapter"
    PICKLE = "pickle weights refused"
    CONFIG = "invalid adapter_config.json"
    PEFT_TYPE = "unsupported peft_type"
    FEATURE = "unsupported feature"
    SIZE = "size limit"
    CORRUPT = "corrupt weights"
    UNMAPPED = "tensor maps to no module of the base"
    LAYER = "layer out of range"
    MODULE = "module not in base"
    DUPLICATE = "duplicate tensor"
    UNTARGETED = "tensor not targeted by config"
    INCOMPLETE = "missing lora_A or lora_B"
    EMPTY = "no LoRA tensors"
    RANK_LIMIT = "rank limit"
    RANK = "rank mismatch"
    SHAPE = "shape mismatch"
    DTYPE = "unsupported dtype"
    NONFINITE = "non-finite values"
    DIGEST = "weights changed on disk"
    PIN = "pin limit"  # registry: pinning would leave no slot for unpinned adapters


class AdapterRefused(AdapterError):
    """An adapter broke one validation rule; `rule` is one of `Rule`'s names (413 for SIZE)."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule


@dataclass(frozen=True)
class ValidationLimits:
    """The operator's limits an adapter is checked against."""

    max_lora_rank: int = 64
    max_adapter_bytes: int = 2 << 30
    allow_pickle: bool = False


@dataclass(frozen=True)
class ModuleLora:
    """One applied (layer, module): delta(x) = scale * (x @ a.T) @ b.T."""

    layer: int
    module: str  # one of MODULES
    rank: int
    alpha: float
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    a: torch.Tensor  # [rank, in], as stored in the file
    b: torch.Tensor  # [out, rank]


@dataclass(frozen=True)
class PeftAdapter:
    """A validated adapter: every tensor of the file is in exactly one `ModuleLora`."""

    path: Path  # the adapter directory, symlinks resolved
    weights_file: Path
    digest: str  # sha256 hex of the weights file bytes: the adapter's identity
    config_digest: str  # sha256 hex of adapter_config.json (scaling lives there)
    file_bytes: int
    config: Mapping[str, Any]
    modules: tuple[ModuleLora, ...]  # sorted by (layer, MODULES index)

    @property
    def applied(self) -> tuple[tuple[int, str], ...]:
        """(layer, module) pairs the adapter changes."""
        return tuple((m.layer, m.module) for m in self.modules)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The distinct ranks used, ascending (several with rank_pattern)."""
        return tuple(sorted({m.rank for m in self.modules}))

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules)


# ----------------------------------------------------------------------------- names and paths


def check_name(name: str) -> None:
    """Refuse names that are not safe as a path component, URL segment or metric label."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise AdapterRefused(
            Rule.NAME, f"{name!r} must match {NAME_RE.pattern} and not contain '..'"
        )


def confine(path: Path, root: Path) -> Path:
    """`path` (relative paths are taken under `root`) with symlinks resolved, inside `root`.

    Raises AdapterRefused(PATH) when the resolved path leaves the resolved root, which catches
    `..` components, absolute paths elsewhere and symlinks pointing out.
    """
    real_root = root.resolve(strict=True)
    candidate = path if path.is_absolute() else real_root / path
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError) as exc:  # missing, or a symlink loop
        raise AdapterRefused(Rule.FILES, f"{path}: {exc}") from None
    if real != real_root and real_root not in real.parents:
        raise AdapterRefused(Rule.PATH, f"{path} resolves to {real}, outside {real_root}")
    return real


# ----------------------------------------------------------------------------- PEFT's matching


def get_pattern_key(pattern_keys: list[str], key: str) -> str:
    """PEFT's rule for rank_pattern / alpha_pattern: the first pattern that matches a
    dot-separated suffix of `key` as a regex (`re.match(rf"(.*\\.)?({p})$", key)`), else key."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def config_targets(config: Mapping[str, Any], key: str) -> bool:
    """Whether PEFT's target_modules / exclude_modules / layers_to_transform select `key`.

    Reproduces `check_target_module_exists`; `key` is `model.layers.{i}.{parent}.{module}`.
    """
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if re.fullmatch(exclude, key):
            return False
    elif exclude and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return True  # PEFT then uses its per-architecture default; the tensors decide
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return True  # every projection is linear; lm_head is refused separately
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = config.get("layers_pattern")
    match: re.Match[str] | None = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def module_key(layer: int, module: str) -> str:
    """The name PEFT gives a projection of the base (what its patterns match against)."""
    return f"model.layers.{layer}.{MODULE_PARENTS[module]}.{module}"


# ----------------------------------------------------------------------------- config


def _truthy(value: Any) -> bool:
    return bool(value) and value != "none"


# (config field, feature name, predicate that says the feature is in use). These change what a
# forward pass computes (or need weights outside the adapter), so serving them as plain LoRA
# would be silently wrong.
_FEATURES: tuple[tuple[str, str, Any], ...] = (
    ("use_dora", "DoRA (use_dora)", _truthy),
    ("modules_to_save", "modules_to_save", _truthy),
    ("bias", "bias", lambda v: v not in (None, "none")),
    ("lora_bias", "lora_bias", _truthy),
    ("fan_in_fan_out", "fan_in_fan_out", _truthy),
    ("target_parameters", "target_parameters", _truthy),
    ("trainable_token_indices", "trainable_token_indices", _truthy),
    ("layer_replication", "layer_replication", _truthy),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)", _truthy),
    ("use_qalora", "QA-LoRA (use_qalora)", _truthy),
    ("velora_config", "velora_config", _truthy),
    ("monteclora_config", "monteclora_config", _truthy),
    ("use_bdlora", "use_bdlora", _truthy),
    ("arrow_config", "arrow_config", _truthy),
    ("kasa_config", "kasa_config", _truthy),
    ("megatron_config", "megatron_config", _truthy),
    # These initialisations rewrite the base weights; unless converted at save time the
    # adapter only works on that rewritten base, which the server does not have.
    ("init_lora_weights", "init_lora_weights that modifies the base",
     lambda v: isinstance(v, str) and v.lower().split("_niter")[0]
     in ("pissa", "olora", "corda", "lora_ga", "loftq")),
)
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in")


def _check_config(raw: bytes) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRefused(Rule.CONFIG, f"not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterRefused(Rule.CONFIG, "not a JSON object")
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise AdapterRefused(Rule.PEFT_TYPE, f"{peft_type!r} (only LORA is served)")
    for field_name, feature, in_use in _FEATURES:
        value = config.get(field_name)
        if value is not None and in_use(value):
            raise AdapterRefused(Rule.FEATURE, f"{feature} = {value!r}")
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    for name in names:
        if isinstance(name, str) and name.split(".")[-1] == "lm_head":
            raise AdapterRefused(Rule.FEATURE, "lm_head LoRA (target_modules has lm_head)")
        if isinstance(name, str) and name.split(".")[-1] in _EMBEDDING_NAMES:
            raise AdapterRefused(Rule.FEATURE, f"embedding LoRA (target_modules has {name})")
    r = config.get("r", 8)  # PEFT's defaults for fields an old config may lack
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterRefused(Rule.CONFIG, f"r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterRefused(Rule.CONFIG, f"lora_alpha must be a number, got {alpha!r}")
    for field_name in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field_name) or {}
        if not isinstance(pattern, dict):
            raise AdapterRefused(Rule.CONFIG, f"{field_name} must be an object")
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterRefused(Rule.CONFIG, f"{field_name} key {key!r}: {exc}") from None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if field_name == "rank_pattern":
                ok = ok and isinstance(value, int) and value >= 1
            if not ok or not math.isfinite(value):
                raise AdapterRefused(Rule.CONFIG, f"{field_name}[{key!r}] = {value!r}")
    return config


def module_rank_alpha(config: Mapping[str, Any], key: str) -> tuple[int, float]:
    """(r, alpha) PEFT uses for module `key`, after rank_pattern / alpha_pattern."""
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), key), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), key), config.get("lora_alpha", 8))
    return int(r), float(alpha)


def scaling(config: Mapping[str, Any], r: int, alpha: float) -> float:
    """PEFT's `LoraLayer.update_layer`: alpha / sqrt(r) with rsLoRA, else alpha / r."""
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# ----------------------------------------------------------------------------- tensors

# PEFT keys: optional "base_model.model." prefix, the module path, lora_A/lora_B, the optional
# adapter name "default" (present in state dicts taken from a live PeftModel), "weight".
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(?P<layer>0|[1-9][0-9]*)\."
    r"(?P<parent>[A-Za-z_][A-Za-z0-9_]*)\.(?P<module>[A-Za-z_][A-Za-z0-9_]*)\."
    r"(?P<ab>lora_A|lora_B)\.(?:default\.)?weight$"
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _unmapped(key: str) -> AdapterRefused:
    """Name the feature when an unmapped key belongs to one we refuse, else say unmapped."""
    if "lora_magnitude_vector" in key:
        return AdapterRefused(Rule.FEATURE, f"DoRA (tensor {key})")
    if "lora_embedding_" in key or any(f".{n}." in f".{key}" for n in _EMBEDDING_NAMES):
        return AdapterRefused(Rule.FEATURE, f"embedding LoRA (tensor {key})")
    if ".lm_head." in f".{key}":
        return AdapterRefused(Rule.FEATURE, f"lm_head LoRA (tensor {key})")
    if "modules_to_save" in key:
        return AdapterRefused(Rule.FEATURE, f"modules_to_save (tensor {key})")
    if re.search(r"\.lora_B(\.default)?\.bias$", key):
        return AdapterRefused(Rule.FEATURE, f"lora_bias (tensor {key})")
    return AdapterRefused(Rule.UNMAPPED, f"{key} (expected e.g. "
                          "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)")


def _map_tensors(
    tensors: Mapping[str, torch.Tensor], base: BaseSpec
) -> dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]]:
    """(layer, module) -> {"lora_A"|"lora_B": (key, tensor)}; every key placed or refused."""
    found: dict[tuple[int, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise _unmapped(key)
        layer, parent, module = int(match["layer"]), match["parent"], match["module"]
        if layer >= base.num_layers:
            raise AdapterRefused(Rule.LAYER, f"{key}: the base has {base.num_layers} layers")
        if module not in base.shapes or MODULE_PARENTS.get(module) != parent:
            if module in _EMBEDDING_NAMES or module == "lm_head":
                raise _unmapped(key)
            raise AdapterRefused(
                Rule.MODULE, f"{key}: no {parent}.{module} in the base (it has "
                f"{', '.join(f'{MODULE_PARENTS[m]}.{m}' for m in MODULES if m in base.shapes)})"
            )
        slot = found.setdefault((layer, module), {})
        if match["ab"] in slot:
            raise AdapterRefused(Rule.DUPLICATE, f"{key} and {slot[match['ab']][0]}")
        slot[match["ab"]] = (key, tensor)
    return found


def _check_tensor(key: str, tensor: torch.Tensor, shape: tuple[int, int]) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise AdapterRefused(Rule.DTYPE, f"{key} is {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise AdapterRefused(Rule.SHAPE, f"{key} is {list(tensor.shape)}, the base needs "
                             f"{list(shape)}")


def _check_values(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """Finite values, also once rounded to the serving dtype (fp32 1e6 is inf in fp16).

    One pass over all values (a few hundred small tensors: per-tensor calls cost more than
    the arithmetic); the per-tensor search runs only to name the culprit.
    """
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors.values()])
    limit = torch.finfo(dtype).max if dtype is not None and dtype.is_floating_point else math.inf
    # aminmax propagates NaN and is one fast reduction (isfinite is ~20x slower on CPU).
    low, high = (float(v) for v in torch.aminmax(flat))
    if math.isfinite(low) and math.isfinite(high) and max(-low, high) <= limit:
        return
    for key, tensor in tensors.items():
        low, high = (float(v) for v in torch.aminmax(tensor.detach().reshape(-1).float()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise AdapterRefused(Rule.NONFINITE, f"{key} has NaN or Inf")
        if max(-low, high) > limit:
            raise AdapterRefused(Rule.NONFINITE, f"{key} overflows {dtype}")


def _load_weights(data: bytes, pickled: bool, name: str) -> dict[str, torch.Tensor]:
    try:
        if pickled:
            # weights_only refuses arbitrary objects: a pickle can still not run code here.
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load as load_safetensors

            loaded = load_safetensors(data)
    except Exception as exc:  # noqa: BLE001 - the parsers raise many types for damaged files
        raise AdapterRefused(Rule.CORRUPT, f"{name}: {type(exc).__name__}: {exc}") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise AdapterRefused(Rule.CORRUPT, f"{name}: not a mapping of names to tensors")
    return loaded


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise AdapterRefused(Rule.SIZE, f"{what} is {size} bytes, the limit is {limit}")
    with path.open("rb") as handle:
        data = handle.read(limit + 1)  # the file may have grown since stat
    if len(data) > limit:
        raise AdapterRefused(Rule.SIZE, f"{what} is over {limit} bytes")
    return data


def read_adapter(
    path: Path,
    base: BaseSpec,
    limits: ValidationLimits,
    *,
    root: Path | None = None,
    dtype: torch.dtype | None = None,
    expected_digest: str | None = None,
    expected_config_digest: str | None = None,
) -> PeftAdapter:
    """Read and validate the PEFT adapter in directory `path` for `base`.

    With `root`, the directory and both files must resolve inside it. `dtype` is the serving
    dtype (values that overflow it are refused). `expected_digest` and `expected_config_digest`
    make a re-read from disk fail if the weights or the config (which holds the scaling) changed
    since the adapter was accepted: a version's numbers never change under its name.
    Raises AdapterRefused; has no side effects.
    """
    directory = confine(path, root) if root is not None else _resolve(path)
    if not directory.is_dir():
        raise AdapterRefused(Rule.FILES, f"{path} is not a directory")
    files = {p.name for p in directory.iterdir()}
    if CONFIG_FILE not in files:
        raise AdapterRefused(Rule.FILES, f"{directory} has no {CONFIG_FILE}")
    if SAFETENSORS_FILE in files:
        weights_name, pickled = SAFETENSORS_FILE, False
    elif PICKLE_FILE in files:
        if not limits.allow_pickle:
            raise AdapterRefused(Rule.PICKLE, f"{directory / PICKLE_FILE}: pickle can run code; "
                                 f"convert it to {SAFETENSORS_FILE} or allow pickle explicitly")
        weights_name, pickled = PICKLE_FILE, True
    else:
        raise AdapterRefused(Rule.FILES, f"{directory} has no {SAFETENSORS_FILE}")
    config_path = directory / CONFIG_FILE
    weights_path = directory / weights_name
    for file in (config_path, weights_path):  # a file symlinked out of the root
        if root is not None:
            confine(file, root)
        if not file.resolve().is_file():
            raise AdapterRefused(Rule.FILES, f"{file} is not a regular file")

    config_raw = _read_limited(config_path, MAX_CONFIG_BYTES, CONFIG_FILE)
    config_digest = hashlib.sha256(config_raw).hexdigest()
    if expected_config_digest is not None and config_digest != expected_config_digest:
        raise AdapterRefused(Rule.DIGEST, f"{config_path} has sha256 {config_digest}, "
                             f"expected {expected_config_digest}")
    config = _check_config(config_raw)
    data = _read_limited(weights_path, limits.max_adapter_bytes, weights_name)
    digest = hashlib.sha256(data).hexdigest()
    if expected_digest is not None and digest != expected_digest:
        raise AdapterRefused(Rule.DIGEST, f"{weights_path} has sha256 {digest}, "
                             f"expected {expected_digest}")
    tensors = _load_weights(data, pickled, weights_name)
    del data
    if not tensors:
        raise AdapterRefused(Rule.EMPTY, f"{weights_name} holds no tensors")

    modules: list[ModuleLora] = []
    for (layer, module), pair in sorted(
        _map_tensors(tensors, base).items(), key=lambda kv: (kv[0][0], MODULES.index(kv[0][1]))
    ):
        key = module_key(layer, module)
        missing = {"lora_A", "lora_B"} - pair.keys()
        if missing:
            raise AdapterRefused(Rule.INCOMPLETE, f"{key} has no {', '.join(sorted(missing))}")
        if not config_targets(config, key):
            raise AdapterRefused(Rule.UNTARGETED, f"{key} is not selected by target_modules "
                                 f"{config.get('target_modules')!r}; PEFT would ignore it")
        (a_key, a), (b_key, b) = pair["lora_A"], pair["lora_B"]
        r, alpha = module_rank_alpha(config, key)
        if r > limits.max_lora_rank:
            raise AdapterRefused(Rule.RANK_LIMIT, f"{key} has rank {r}, the limit is "
                                 f"{limits.max_lora_rank}")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise AdapterRefused(
                Rule.RANK, f"{key}: lora_A {list(a.shape)}, lora_B {list(b.shape)}, but the "
                f"config says r = {r}" + (" (rank_pattern)" if config.get("rank_pattern") else "")
            )
        in_features, out_features = base.shapes[module]
        _check_tensor(a_key, a, (r, in_features))
        _check_tensor(b_key, b, (out_features, r))
        modules.append(ModuleLora(layer=layer, module=module, rank=r, alpha=alpha,
                                  scale=scaling(config, r, alpha), a=a, b=b))
    _check_values(tensors, dtype)
    return PeftAdapter(
        path=directory,
        weights_file=weights_path,
        digest=digest,
        config_digest=config_digest,
        file_bytes=weights_path.stat().st_size,
        config=config,
        modules=tuple(modules),
    )


def _resolve(path: Path) -> Path:
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise AdapterRefused(Rule.FILES, f"{path}: {exc}") from None
