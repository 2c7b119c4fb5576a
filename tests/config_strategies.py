"""Hypothesis strategies for adapter_config.json contents, valid-looking and hostile.

`config_texts(targets)` draws the bytes of an adapter_config.json over the fields loramux reads:
a valid LoRA config for `targets` with any subset of its fields replaced by hostile values
(regexes that backtrack, odd types, huge numbers, NaN and Infinity literals, lone surrogates,
deep nesting, broken JSON). Used in process by test_adapter_config_fuzz.py and reusable against
a live server (write the bytes as adapter_config.json next to a valid weights file).

`fragments()` draws regex fragments from a grammar whose quantifiers apply to single atoms
only, so `re` itself finishes on them; the differential test compares engines with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

# Regexes people write, regexes that break things.
REAL_PATTERNS = [
    "q_proj", "self_attn.q_proj", r".*\.layers\.[01]\.self_attn\.(q|v)_proj",
    r".*(q_proj|v_proj|down_proj)", r"model\.layers\.\d+\.mlp\.down_proj", r"^(?!.*mlp).*proj$",
    "layers", r"layers\.1\..*", "proj", "all-linear", "ALL-LINEAR",
]
HOSTILE_PATTERNS = [
    r"(.*)*z", r"(a+)+$", r"(\w|.)*o", r"(\w|.)*[a-z]\.[a-z]", r"(?:.|\w|[a-z_.])*o",
    r"(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)(.*)\10o", "(q_proj", "[x", "a)|(b", "*", "\\",
    r"(?P<idx>\d)", r"x{e<=1}", "[[:alpha:]]+", r"(?:a{1000}){1000}", "a{4294967296}",
    "(" * 600 + ")" * 600, "x" * 5000, "q_proj\ud800", "(?i)Q_PROJ", r"\p{L}+", "(?<=a+)b",
    "(?x) q _ proj", "q_proj$\n",
]
_ATOMS = ["q", "_", "proj", "self_attn", "mlp", "layers", "1", r"\.", ".", r"\d", r"\w", r"\W",
          "[a-z_]", "[^.]", "[0-9]", "[[:alpha:]]", "\u212a", "\u017f", "Q"]
_ZERO_WIDTH = ["^", "$", r"\b", r"\B", r"\A", r"\Z", "(?=proj)", "(?!mlp)", r"(?<=\.)"]
_QUANTIFIERS = ["", "", "", "*", "+", "?", "*?", "{2}", "{1,3}", "{,2}", "{e<=1}", "*+", "{1 }"]


@st.composite
def fragments(draw: Any) -> str:
    """A regex fragment; quantifiers never nest, so backtracking stays polynomial."""
    def unit() -> str:
        kind = draw(st.sampled_from(["atom"] * 6 + ["zero", "group", "group", "backref"]))
        if kind == "zero":
            return draw(st.sampled_from(_ZERO_WIDTH))
        if kind == "backref":
            return draw(st.sampled_from([r"\1", r"(?P=x)"]))
        if kind == "group":  # an alternation of plain atoms, itself never quantified
            branches = draw(st.lists(st.lists(st.sampled_from(_ATOMS), min_size=1, max_size=2)
                                     .map("".join), min_size=1, max_size=3))
            opener = draw(st.sampled_from(["(", "(?:", "(?P<x>", "(?i:", "(?>"]))
            return opener + "|".join(branches) + ")"
        return draw(st.sampled_from(_ATOMS)) + draw(st.sampled_from(_QUANTIFIERS))

    prefix = draw(st.sampled_from(["", "", "", "(?i)", "(?x)", "(?a)", "(?s)"]))
    return prefix + "".join(unit() for _ in range(draw(st.integers(1, 5))))


def patterns() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(REAL_PATTERNS), st.sampled_from(HOSTILE_PATTERNS),
                     st.sampled_from(HOSTILE_PATTERNS), fragments(), st.text(max_size=12))


class Raw:
    """JSON text inserted verbatim where this stands in a config (what json.dumps cannot write)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''})"


DEEP = Raw("[" * 100_000 + "]" * 100_000)  # json.loads: RecursionError
LONG_INT = Raw("1" * 5_000)  # json.loads: ValueError (over 4,300 digits)
BIG_INT = Raw("9" * 400)  # parses; float() of it overflows
LONE_SURROGATE = Raw('"\\ud800"')
RAW_VALUES = [
    DEEP, Raw("[" * 2_000 + "]" * 2_000), Raw("[" * 40 + "]" * 40),
    Raw('{"a":' * 900 + "1" + "}" * 900), LONG_INT, BIG_INT, Raw("1e999"), Raw("NaN"),
    Raw("Infinity"), Raw("-Infinity"), LONE_SURROGATE, Raw('"\\udfff x"'), Raw("1e308"),
    Raw("-1e-320"), Raw("4" + "0" * 300 + ".5"),
]


def odd_values() -> st.SearchStrategy[Any]:
    """Anything a JSON field can hold, and a few things json.dumps will not write."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-10, 10), st.integers(), st.floats(),
        st.sampled_from([0, 1, 4, 8, 16, 2**31, 10**20, 1e-300, 1e308, -1e308, 0.5]),
        st.text(max_size=8), st.sampled_from(["0", "yes", "false", "none", "LORA", "lora"]),
        st.sampled_from(RAW_VALUES),
    )
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=6)


def _field_values(targets: Sequence[str], layers: int) -> dict[str, st.SearchStrategy[Any]]:
    names = st.lists(st.sampled_from([*targets, "o_proj", "lm_head", "embed_tokens"]),
                     max_size=4)
    pattern_dicts = st.dictionaries(patterns(), st.one_of(st.integers(1, 16), odd_values()),
                                    max_size=3)
    return {
        "peft_type": st.one_of(st.sampled_from(["LORA", "lora", "LOHA"]), odd_values()),
        "r": st.one_of(st.sampled_from([2, 4, 8, 64, 10**6]), odd_values()),
        "lora_alpha": st.one_of(st.sampled_from([1, 8, 16.0, -4, 1e4, 1e308]), odd_values()),
        "use_rslora": st.one_of(st.booleans(), odd_values()),
        "target_modules": st.one_of(names, patterns(), patterns(), odd_values()),
        "exclude_modules": st.one_of(names, patterns(), odd_values()),
        "layers_to_transform": st.one_of(st.lists(st.integers(-1, layers), max_size=3),
                                         st.integers(0, layers), odd_values()),
        "layers_pattern": st.one_of(st.sampled_from(["layers", "h"]), patterns(),
                                    st.lists(patterns(), max_size=2), odd_values()),
        "rank_pattern": st.one_of(pattern_dicts, odd_values()),
        "alpha_pattern": st.one_of(pattern_dicts, odd_values()),
        "use_dora": st.one_of(st.booleans(), odd_values()),
        "bias": st.one_of(st.sampled_from(["none", "all"]), odd_values()),
        "init_lora_weights": st.one_of(st.sampled_from([True, "gaussian", "pissa"]), odd_values()),
    }


def dumps(config: Any) -> str:
    """json.dumps, with every `Raw` written verbatim and NaN/Infinity as JS literals."""
    raws: list[str] = []

    def mark(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {k: mark(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mark(v) for v in value]
        return value

    text = json.dumps(mark(config))  # ensure_ascii: a lone surrogate becomes "\ud800"
    return re.sub(r'"\\u0000raw(\d+)\\u0000"', lambda m: raws[int(m.group(1))], text)


@st.composite
def config_texts(draw: Any, targets: Sequence[str] = ("q_proj", "v_proj"), rank: int = 4,
                 layers: int = 2) -> bytes:
    """adapter_config.json bytes: valid for a rank-`rank` adapter on `targets`, with some fields
    replaced (or removed) by hostile values; now and then not JSON at all."""
    config: dict[str, Any] = {"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                              "target_modules": list(targets), "bias": "none",
                              "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    values = _field_values(targets, layers)
    for name in draw(st.lists(st.sampled_from(sorted(values)), max_size=4, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            config.pop(name, None)
        else:
            config[name] = draw(values[name])
    text = dumps(config).encode()
    damage = draw(st.sampled_from(["none"] * 12 + ["truncate", "latin-1", "utf-16", "array"]))
    if damage == "truncate":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if damage == "latin-1":
        return text.replace(b"LORA", b"L\xd6RA")
    if damage == "utf-16":
        return dumps(config).encode("utf-16")
    if damage == "array":
        return b"[" + text + b"]"
    return text
