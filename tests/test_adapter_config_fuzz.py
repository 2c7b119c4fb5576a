"""Fuzzing adapter_config.json: every config ends in a PeftAdapter or AdapterRefused, promptly.

The configs come from `config_strategies.config_texts` (valid-looking and hostile fields over
everything loramux reads) next to a small valid weights file. A second test checks that the
bounded matcher means what `re` (PEFT's engine) means wherever it accepts a pattern.
Deterministic (derandomize) so CI sees the same examples every run.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest
from adapter_factory import CONFIG_FILE, base_spec, make_adapter, tiny_llama_config
from config_strategies import (
    BIG_INT,
    DEEP,
    LONE_SURROGATE,
    LONG_INT,
    config_texts,
    dumps,
    fragments,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from loramux.adapters.peft import (
    _LAYERS,
    _SUFFIX,
    _WHOLE,
    MAX_LORA_SCALE,
    AdapterRefused,
    PatternMatcher,
    PeftAdapter,
    Rule,
    ValidationLimits,
    module_key,
    read_adapter,
)
from loramux.adapters.types import MODULES

CFG = tiny_llama_config(layers=2)
SPEC = base_spec(CFG)
LIMITS = ValidationLimits(max_lora_rank=16)
FUZZ = settings(derandomize=True, deadline=None, max_examples=200, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid rank-4 adapter on q_proj and v_proj; each example rewrites its config."""
    folder = make_adapter(tmp_path_factory.mktemp("fuzz") / "a", CFG, rank=4,
                          target_modules=("q_proj", "v_proj"), seed=3)
    # One read first, so that the first example does not pay for cold imports and caches.
    (folder / CONFIG_FILE).write_bytes(_config(target_modules=r".*\.(q|v)_proj"))
    read_adapter(folder, SPEC, LIMITS)
    return folder


def _config(**changes: object) -> bytes:
    return dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                  "target_modules": ["q_proj", "v_proj"], **changes}).encode()


@FUZZ
@given(config=config_texts(targets=("q_proj", "v_proj"), rank=4, layers=SPEC.num_layers))
# Always run the cases, whatever the random draw covers.
@example(config=_config(target_modules=r"(\w|.)*o"))
@example(config=_config(rank_pattern={r"(\w|.)*o": 4}, alpha_pattern={"(.*)*z": 2}))
@example(config=_config(layers_to_transform=[0, 1], layers_pattern=r"(\w|.)*[a-z]\.[a-z]"))
@example(config=_config(exclude_modules=r"(a+)+$", lora_alpha=1e308))
@example(config=_config(r=LONG_INT, target_modules=5, layers_to_transform="0"))
@example(config=_config(lora_alpha=BIG_INT, peft_type=DEEP))
@example(config=_config(target_modules=["q_proj", LONE_SURROGATE], use_rslora="yes"))
def test_every_config_ends_in_an_adapter_or_a_refusal(adapter: Path, config: bytes) -> None:
    (adapter / CONFIG_FILE).write_bytes(config)
    # CPU time of this process: the bound is about the work a config can cause, which other
    # processes on a busy CI machine do not change (the matcher's own budget is wall time).
    start = time.process_time()
    try:
        result = read_adapter(adapter, SPEC, LIMITS)
    except AdapterRefused as refused:
        assert str(refused).startswith(f"{refused.rule}: ")
        assert len(str(refused)) < 1_000, "a refusal quotes values briefly"
    else:
        assert isinstance(result, PeftAdapter)
        assert all(math.isfinite(m.scale) and abs(m.scale) <= MAX_LORA_SCALE
                   for m in result.modules)
    assert time.process_time() - start < 1.0  # the bound: "ends within a second"


KEYS = [module_key(layer, module) for layer in range(12) for module in MODULES]
FORMS = {"whole": _WHOLE, "suffix": _SUFFIX, "layers": _LAYERS}


@settings(derandomize=True, deadline=None, max_examples=500, database=None)
@given(fragment=fragments(), form=st.sampled_from(sorted(FORMS)))
def test_bounded_matching_means_what_re_means(fragment: str, form: str) -> None:
    """Where PatternMatcher accepts a pattern, it matches exactly the keys `re` matches (same
    `idx` group for layers_pattern); where `re` cannot compile it, it refuses."""
    template, call = FORMS[form]
    try:
        reference = re.compile(template.format(fragment))
    except re.error:
        reference = None
    matcher = PatternMatcher(seconds=30)  # generous: this test is about meaning, not time
    try:
        matcher.compile("target_modules", fragment, FORMS[form])
    except AdapterRefused as refused:
        assert refused.rule == Rule.CONFIG
        return
    assert reference is not None, f"{fragment!r} compiled although re refuses it"
    for key in KEYS:
        ours = matcher.match("target_modules", fragment, FORMS[form], key)
        theirs = getattr(reference, call)(key)
        assert (ours is None) == (theirs is None), (fragment, key)
        if theirs is not None:
            assert ours.span() == theirs.span(), (fragment, key)
            if form == "layers":
                assert ours.group("idx") == theirs.group("idx"), (fragment, key)
