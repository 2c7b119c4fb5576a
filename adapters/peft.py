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
  float dtype, finite values (also after conversion to the serving dtype), a scale and weights
  whose delta stays in range, size limit.

Nothing in an adapter can hold the process: the config's size, nesting depth, field types and
numbers are checked before use, and its regexes are matched under one time budget per
validation (`PatternMatcher`); every failure is an `AdapterRefused`, never another exception.

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
import reprlib
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import torch

from loramux.adapters.types import MODULE_PARENTS, MODULES, AdapterError, BaseSpec

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20  # a PEFT config is a few KB; anything larger is not one
MAX_CONFIG_DEPTH = 32  # PEFT writes at most 3 levels; json.loads itself fails near 1,000
MAX_CONFIG_RANK = 1 << 20  # r / rank_pattern values; the operator's rank limit applies later
PATTERN_SECONDS = 0.5  # compiling and matching all of one adapter's regexes
MAX_PATTERN_CHARS = 4096  # one regex; real ones are under 200 characters
MAX_REPEAT_PRODUCT = 10_000  # product of all {m,n} counts in one regex (regex expands them)
MAX_LORA_SCALE = 1e4  # |lora_alpha / r|; real adapters use 0.25 to 64
MAX_DELTA_GAIN = 1e8  # |scale| * r * in * max|A| * max|B|; real adapters stay under ~1e5

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
    RANGE = "LoRA delta out of range"  # a scale or weights that could overflow the output
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
    pattern_seconds: float = PATTERN_SECONDS  # budget for all of one adapter's regexes


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


# ----------------------------------------------------------------------------- bounded patterns

_SHOW = reprlib.Repr()  # a config value in a message: short, and safe for any nesting
_SHOW.maxlevel, _SHOW.maxdict, _SHOW.maxlist = 2, 4, 4
_SHOW.maxstring = _SHOW.maxother = 80


def _show(value: Any) -> str:
    return _SHOW.repr(value)


# How PEFT embeds a user's pattern (peft 0.21, verbatim) and which call it makes on a key.
_WHOLE = ("{}", "fullmatch")  # target_modules / exclude_modules given as one string
_SUFFIX = (r"(.*\.)?({})$", "match")  # rank_pattern / alpha_pattern keys
_LAYERS = (r"(?:^|.*?\.){}\.(?P<idx>\d+)\.", "match")  # layers_pattern
_Form = tuple[str, str]

# No quantifier, group, alternation or backreference: every atom matches one character or is
# zero-width, so re cannot backtrack more than key length times pattern length.
_BACKTRACK_FREE = re.compile(r"(?:[^\\*+?{}|()]|\\[^0-9])*")
# Syntax the regex module reads differently from re even in VERSION0: fuzzy constraints
# ("x{e<=1}", a literal to re) and POSIX classes ("[[:alpha:]]", a plain set to re).
_DIVERGENT = re.compile(r"\{[^}]*[eids]|\[:\^?\w*:\]", re.IGNORECASE)
_REPEAT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def _repeat_product(fragment: str) -> int:
    product = 1
    for low, high in _REPEAT.findall(fragment):
        counts = [int(d) if len(d) <= 6 else MAX_REPEAT_PRODUCT + 1 for d in (low, high) if d]
        product *= max([1, *counts])
    return product


class PatternMatcher:
    r"""Matches an adapter's own regexes with PEFT's semantics, under one time budget.

    PEFT matches target_modules, exclude_modules, layers_pattern and the rank_pattern /
    alpha_pattern keys with `re`, which backtracks without bound and holds the interpreter
    lock while it does: one `(\w|.)*o` freezes every thread. So each pattern is compiled once
    (syntax checked by `re` itself, as PEFT would) and then matched by one of two engines:

    - `re`, when the pattern cannot backtrack (no quantifier, group, alternation or
      backreference: a plain name such as `self_attn.q_proj`): exactly PEFT's semantics, and the
      fast path for configs that list hundreds of module names;
    - otherwise the `regex` module (VERSION0, its re-compatible mode) with `timeout=` the time
      left and `concurrent=True`, so it releases the lock and gives up when the budget is spent.
      The two syntaxes regex reads differently from re (fuzzy `{e<=1}`, POSIX `[:alpha:]`) are
      refused rather than guessed at; tests compare the two engines on generated patterns.

    A restricted pattern language would refuse real configs (PEFT users write alternations and
    lookaheads) and a non-backtracking engine (RE2) would change what backreferences and
    lookarounds mean, so neither keeps PEFT's semantics. Invariants: compiling and matching
    together never take much longer than `seconds` (a pattern's compile is bounded by
    MAX_PATTERN_CHARS and MAX_REPEAT_PRODUCT, and runs only while time is left); every failure,
    the timeout included, is AdapterRefused(CONFIG) naming the field and the pattern.
    One matcher serves one validation; it holds that validation's compiled patterns.
    """

    def __init__(self, seconds: float = PATTERN_SECONDS) -> None:
        self.seconds = seconds
        self._deadline = time.monotonic() + seconds
        # (form, fragment) -> (the compiled pattern's bound match call, whether it is re's)
        self._compiled: dict[tuple[_Form, str], tuple[Callable[..., Any], bool]] = {}

    def compile(self, field: str, fragment: str, form: _Form) -> None:
        """Check `fragment` as PEFT will use it (embedded in `form`); refuses what cannot run."""
        if (form, fragment) in self._compiled:
            return
        where = f"{field} pattern {_show(fragment)}"
        if len(fragment) > MAX_PATTERN_CHARS:
            raise AdapterRefused(Rule.CONFIG, f"{where} is {len(fragment)} characters, the "
                                 f"limit is {MAX_PATTERN_CHARS}")
        if _repeat_product(fragment) > MAX_REPEAT_PRODUCT:
            raise AdapterRefused(Rule.CONFIG, f"{where}: repeat counts multiply to over "
                                 f"{MAX_REPEAT_PRODUCT}")
        pattern = form[0].format(fragment)
        self._check_time(field, fragment)
        try:
            compiled: Any = re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:
            raise AdapterRefused(Rule.CONFIG, f"{where}: {type(exc).__name__}: {exc}") from None
        backtrack_free = _BACKTRACK_FREE.fullmatch(fragment) is not None
        if not backtrack_free:
            if _DIVERGENT.search(fragment):
                raise AdapterRefused(Rule.CONFIG, f"{where}: fuzzy {{e<=n}} or POSIX [:class:] "
                                     "syntax is not supported")
            self._check_time(field, fragment)
            try:
                compiled = regex.compile(pattern, regex.VERSION0)
            except (regex.error, OverflowError, RecursionError, ValueError) as exc:
                raise AdapterRefused(Rule.CONFIG, f"{where}: {type(exc).__name__}: {exc}") from None
        self._compiled[(form, fragment)] = (getattr(compiled, form[1]), backtrack_free)

    def match(self, field: str, fragment: str, form: _Form, key: str) -> Any:
        """PEFT's `re.<call>(form with fragment, key)`: a match object or None."""
        if (form, fragment) not in self._compiled:
            self.compile(field, fragment, form)
        call, backtrack_free = self._compiled[(form, fragment)]
        left = self._check_time(field, fragment)
        if backtrack_free:
            return call(key)
        try:
            return call(key, concurrent=True, timeout=left)
        except TimeoutError:
            raise self._over(field, fragment) from None

    def _check_time(self, field: str, fragment: str) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._over(field, fragment)
        return left

    def _over(self, field: str, fragment: str) -> AdapterRefused:
        return AdapterRefused(Rule.CONFIG, f"{field} pattern {_show(fragment)}: the adapter's "
                              f"patterns did not finish within the {self.seconds:g} s budget")


# ----------------------------------------------------------------------------- PEFT's matching


def get_pattern_key(pattern_keys: list[str], key: str, matcher: PatternMatcher | None = None,
                    *, field: str = "rank_pattern") -> str:
    """PEFT's rule for rank_pattern / alpha_pattern: the first pattern that matches a
    dot-separated suffix of `key` as a regex (`re.match(rf"(.*\\.)?({p})$", key)`), else key."""
    matcher = matcher or PatternMatcher()
    for pattern in pattern_keys:
        if matcher.match(field, pattern, _SUFFIX, key):
            return pattern
    return key


def config_targets(config: Mapping[str, Any], key: str,
                   matcher: PatternMatcher | None = None) -> bool:
    """Whether PEFT's target_modules / exclude_modules / layers_to_transform select `key`.

    Reproduces `check_target_module_exists`; `key` is `model.layers.{i}.{parent}.{module}`.
    `config` holds values `_check_config` accepted; its regexes run through `matcher`.
    """
    matcher = matcher or PatternMatcher()
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str):
        if exclude and matcher.match("exclude_modules", exclude, _WHOLE, key):
            return False
    elif exclude and (key in exclude or any(key.endswith(f".{e}") for e in exclude)):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return True  # PEFT then uses its per-architecture default; the tensors decide
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return True  # every projection is linear; lm_head is refused separately
        return matcher.match("target_modules", targets, _WHOLE, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    patterns = config.get("layers_pattern")
    match: Any = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = matcher.match("layers_pattern", pattern, _LAYERS, key)
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


def _parse_config(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`, no deeper than MAX_CONFIG_DEPTH, every string valid Unicode."""
    try:
        config = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ints over 4,300 digits
        raise AdapterRefused(Rule.CONFIG, f"not JSON: {exc}") from None
    except RecursionError:
        raise AdapterRefused(Rule.CONFIG, "not JSON: nested too deeply") from None
    if not isinstance(config, dict):
        raise AdapterRefused(Rule.CONFIG, "not a JSON object")
    stack: list[tuple[Any, int]] = [(config, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_CONFIG_DEPTH:
                raise AdapterRefused(Rule.CONFIG, f"nested over {MAX_CONFIG_DEPTH} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800"): unprintable, unloggable
                raise AdapterRefused(Rule.CONFIG, f"string {_show(value)} is not valid "
                                     "Unicode") from None
    return config


def _number(field: str, value: Any, *, rank: bool) -> None:
    """Refuse all but a rank (an int in [1, MAX_CONFIG_RANK]) or a number that is a finite
    float (an int up to 1.8e308 converts to one); never a bool."""
    ok = isinstance(value, int if rank else (int, float)) and not isinstance(value, bool)
    low, high = (1, MAX_CONFIG_RANK) if rank else (-sys.float_info.max, sys.float_info.max)
    if not ok or not low <= value <= high:  # exact for huge ints; False for NaN
        what = f"an integer in [1, {MAX_CONFIG_RANK}]" if rank else "a finite number"
        raise AdapterRefused(Rule.CONFIG, f"{field} must be {what}, got {_show(value)}")


def _names(field: str, value: Any) -> None:
    """PEFT's `Optional[Union[list[str], str]]`."""
    if value is not None and not isinstance(value, str) and not (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    ):
        raise AdapterRefused(Rule.CONFIG, f"{field} must be a string or a list of strings, "
                             f"got {_show(value)}")


def _check_config(raw: bytes, matcher: PatternMatcher) -> dict[str, Any]:
    """The parsed config, with every field loramux reads type-checked and every regex compiled,
    so that `config_targets`, `module_rank_alpha` and `scaling` only see values that work."""
    config = _parse_config(raw)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterRefused(Rule.PEFT_TYPE, f"{_show(peft_type)} (only LORA is served)")
    for field_name, feature, in_use in _FEATURES:
        value = config.get(field_name)
        if value is not None and in_use(value):
            raise AdapterRefused(Rule.FEATURE, f"{feature} = {_show(value)}")
    for field_name in ("target_modules", "exclude_modules", "layers_pattern"):
        _names(field_name, config.get(field_name))
    targets = config.get("target_modules")
    for name in [targets] if isinstance(targets, str) else targets or []:
        if name.split(".")[-1] == "lm_head":
            raise AdapterRefused(Rule.FEATURE, "lm_head LoRA (target_modules has lm_head)")
        if name.split(".")[-1] in _EMBEDDING_NAMES:
            raise AdapterRefused(Rule.FEATURE, f"embedding LoRA (target_modules has {name})")
    _check_layers(config)
    if isinstance(targets, str) and targets.lower() != "all-linear":
        matcher.compile("target_modules", targets, _WHOLE)
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and exclude:
        matcher.compile("exclude_modules", exclude, _WHOLE)
    layers_pattern = config.get("layers_pattern")
    for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or []:
        matcher.compile("layers_pattern", pattern, _LAYERS)
    # PEFT's defaults for fields an old config may lack
    _number("r", config.get("r", 8), rank=True)
    _number("lora_alpha", config.get("lora_alpha", 8), rank=False)
    use_rslora = config.get("use_rslora")
    if use_rslora is not None and not isinstance(use_rslora, bool):
        raise AdapterRefused(Rule.CONFIG, f"use_rslora must be true or false, got "
                             f"{_show(use_rslora)}")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field_name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterRefused(Rule.CONFIG, f"{field_name} must be an object, got "
                                 f"{_show(patterns)}")
        for key, value in patterns.items():
            matcher.compile(field_name, key, _SUFFIX)
            _number(f"{field_name}[{_show(key)}]", value, rank=field_name == "rank_pattern")
    return config


def _check_layers(config: Mapping[str, Any]) -> None:
    """layers_to_transform is an int or a list of ints, used with a list of target names only:
    the combinations PEFT's LoraConfig itself raises on are refused here."""
    indexes = config.get("layers_to_transform")
    if indexes is not None and not (
        isinstance(indexes, int) and not isinstance(indexes, bool)
        or isinstance(indexes, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in indexes)
    ):
        raise AdapterRefused(Rule.CONFIG, f"layers_to_transform must be an integer or a list of "
                             f"integers, got {_show(indexes)}")
    regex_targets = isinstance(config.get("target_modules"), str)
    if regex_targets and (indexes is not None or config.get("layers_pattern") is not None):
        raise AdapterRefused(Rule.CONFIG, "layers_to_transform and layers_pattern need "
                             "target_modules as a list (PEFT refuses this config)")
    if config.get("layers_pattern") and indexes is None:
        raise AdapterRefused(Rule.CONFIG, "layers_pattern needs layers_to_transform (PEFT "
                             "refuses this config)")


def module_rank_alpha(config: Mapping[str, Any], key: str,
                      matcher: PatternMatcher | None = None) -> tuple[int, float]:
    """(r, alpha) PEFT uses for module `key`, after rank_pattern / alpha_pattern."""
    matcher = matcher or PatternMatcher()
    rank_pattern = dict(config.get("rank_pattern") or {})
    alpha_pattern = dict(config.get("alpha_pattern") or {})
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), key, matcher), config.get("r", 8))
    alpha_key = get_pattern_key(list(alpha_pattern), key, matcher, field="alpha_pattern")
    alpha = alpha_pattern.get(alpha_key, config.get("lora_alpha", 8))
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


def _check_values(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None
                  ) -> tuple[float, float]:
    """Finite values, also once rounded to the serving dtype (fp32 1e6 is inf in fp16);
    returns (max|A|, max|B|) over all lora_A and all lora_B tensors, for `_check_delta`.

    One pass over all values (a few hundred small tensors: per-tensor calls cost more than
    the arithmetic); the per-tensor search runs only to name the culprit.
    """
    limit = torch.finfo(dtype).max if dtype is not None and dtype.is_floating_point else math.inf
    largest = []
    for role in ("lora_A", "lora_B"):  # every key matched _KEY_RE in _map_tensors
        flat = torch.cat([t.detach().reshape(-1).float() for k, t in tensors.items()
                          if _KEY_RE.match(k)["ab"] == role])  # type: ignore[index]
        # aminmax propagates NaN and is one fast reduction (isfinite is ~20x slower on CPU).
        low, high = (float(v) for v in torch.aminmax(flat))
        largest.append(max(-low, high))
    if all(math.isfinite(v) and v <= limit for v in largest):
        return largest[0], largest[1]
    for key, tensor in tensors.items():
        low, high = (float(v) for v in torch.aminmax(tensor.detach().reshape(-1).float()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise AdapterRefused(Rule.NONFINITE, f"{key} has NaN or Inf")
        if max(-low, high) > limit:
            raise AdapterRefused(Rule.NONFINITE, f"{key} overflows {dtype}")
    raise AssertionError("unreachable: some tensor is out of range")


def _check_delta(modules: list[ModuleLora], a_max: float, b_max: float) -> None:
    """Refuse weights whose delta could leave any float range.

    |delta(x)_j| = |scale * sum_k B[j,k] * sum_i A[k,i] * x_i|
                <= |scale| * r * in * max|A| * max|B| * max|x|     (the gain times max|x|)
    A gain over MAX_DELTA_GAIN is refused: with it the delta stays finite in bf16 and fp32 for
    any activation below 3e30. Real adapters are far below (B starts at zero and trains to
    ~0.01-0.1, A starts at 1/sqrt(in): a rank-16, scale-2 adapter on a 4096-wide layer is
    ~1e3). fp16's range is too narrow for a worst-case bound to prove; NaN logits are caught
    when sampling. One bound from the global maxima first; per module only when it fails.
    """
    worst = max(abs(m.scale) * m.rank * m.a.shape[1] for m in modules)
    if worst * a_max * b_max <= MAX_DELTA_GAIN:
        return
    for m in modules:
        a, b = (float(t.detach().abs().max()) for t in (m.a, m.b))
        gain = abs(m.scale) * m.rank * m.a.shape[1] * a * b
        if not gain <= MAX_DELTA_GAIN:
            raise AdapterRefused(Rule.RANGE, f"{module_key(m.layer, m.module)}: |scale| * r * "
                                 f"in * max|A| * max|B| = {gain:.3g}, the limit is "
                                 f"{MAX_DELTA_GAIN:g} (max|A| {a:.3g}, max|B| {b:.3g})")


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
    matcher = PatternMatcher(limits.pattern_seconds)  # one budget for all of its regexes
    config = _check_config(config_raw, matcher)
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
        if not config_targets(config, key, matcher):
            raise AdapterRefused(Rule.UNTARGETED, f"{key} is not selected by target_modules "
                                 f"{_show(config.get('target_modules'))}; PEFT would ignore it")
        (a_key, a), (b_key, b) = pair["lora_A"], pair["lora_B"]
        r, alpha = module_rank_alpha(config, key, matcher)
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
        scale = scaling(config, r, alpha)
        if not abs(scale) <= MAX_LORA_SCALE:
            raise AdapterRefused(Rule.RANGE, f"{key}: scale lora_alpha / "
                                 f"{'sqrt(r)' if config.get('use_rslora') else 'r'} = "
                                 f"{scale:.3g}, the limit is {MAX_LORA_SCALE:g}")
        modules.append(ModuleLora(layer=layer, module=module, rank=r, alpha=alpha,
                                  scale=scale, a=a, b=b))
    _check_delta(modules, *_check_values(tensors, dtype))
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
