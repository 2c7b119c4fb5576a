"""Hostile adapter configs (issue 15, items 1, 6 and 7): each ends in AdapterRefused, promptly.

A regex that backtracks without bound, a scale or weights that overflow the output, and config
fields of the wrong type or size: before, these froze the process, served NaN logits, or
raised an exception that is not an AdapterError (a 500 from the server).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_factory import (
    CONFIG_FILE,
    base_spec,
    copy_adapter,
    make_adapter,
    read_config,
    rewrite_tensors,
    tiny_llama_config,
)
from config_strategies import BIG_INT, DEEP, LONE_SURROGATE, LONG_INT, Raw, dumps

from loramux.adapters.peft import (
    AdapterRefused,
    PeftAdapter,
    Rule,
    ValidationLimits,
    module_key,
    read_adapter,
)

CFG = tiny_llama_config(layers=2)
SPEC = base_spec(CFG)
LIMITS = ValidationLimits(max_lora_rank=16)
KEY_Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
BACKTRACKS = r"(\w|.)*o"  # exponential in re, and in regex too, on every module key


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid rank-4 adapter on q, v and down_proj over 2 layers."""
    return make_adapter(tmp_path_factory.mktemp("pristine") / "good", CFG, rank=4,
                        target_modules=("q_proj", "v_proj", "down_proj"), seed=1)


@pytest.fixture
def adapter(tmp_path: Path, pristine: Path) -> Path:
    return copy_adapter(pristine, tmp_path / "hostile")


def configure(path: Path, **changes: Any) -> Path:
    """Set fields of adapter_config.json; `Raw` values are written verbatim."""
    (path / CONFIG_FILE).write_text(dumps({**read_config(path), **changes}))
    return path


def refused(path: Path, rule: str, *needles: str,
            dtype: torch.dtype | None = None) -> AdapterRefused:
    with pytest.raises(AdapterRefused) as info:
        read_adapter(path, SPEC, LIMITS, dtype=dtype)
    message = str(info.value)
    assert info.value.rule == rule, message
    assert len(message) < 1_000, "a refusal quotes hostile values briefly"
    for needle in needles:
        assert needle in message, message
    return info.value


# ----------------------------------------------------------------------------- 1. backtracking


@pytest.mark.parametrize(("field", "changes"), [
    ("target_modules", {"target_modules": BACKTRACKS}),
    ("exclude_modules", {"exclude_modules": BACKTRACKS}),
    ("layers_pattern", {"layers_to_transform": [0, 1], "layers_pattern": r"(\w|.)*[a-z]\.[a-z]"}),
    ("rank_pattern", {"rank_pattern": {BACKTRACKS: 4}}),
    ("alpha_pattern", {"alpha_pattern": {BACKTRACKS: 4}}),
])
def test_backtracking_pattern_is_refused(adapter: Path, field: str,
                                         changes: dict[str, Any]) -> None:
    refused(configure(adapter, **changes), Rule.CONFIG, field, "budget")


def test_issue_patterns_get_peft_s_answer(adapter: Path) -> None:
    """`(.*)*z` and `(a+)+$` hang re; the bounded matcher answers what re would: no match."""
    refused(configure(adapter, target_modules="(.*)*z"), Rule.UNTARGETED)
    configure(adapter, target_modules=["q_proj", "v_proj", "down_proj"],
              rank_pattern={"(.*)*z": 8}, alpha_pattern={"(a+)+$": 1})
    result = read_adapter(adapter, SPEC, LIMITS)
    assert {(m.rank, m.alpha) for m in result.modules} == {(4, 16)}


def test_validation_keeps_the_process_responsive(adapter: Path) -> None:
    """In a child process: validating a backtracking config in one thread while another thread
    counts; the validation ends (refused) and the counter ran meanwhile. Before, the match held
    the interpreter lock and the child froze until killed."""
    configure(adapter, target_modules=BACKTRACKS)
    child = textwrap.dedent(f"""
        import sys, threading, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from adapter_factory import base_spec, tiny_llama_config
        from loramux.adapters.peft import AdapterRefused, ValidationLimits, read_adapter
        spec = base_spec(tiny_llama_config(layers=2))
        outcome, beats = [], [0]
        def validate():
            try:
                read_adapter(Path(sys.argv[1]), spec, ValidationLimits(max_lora_rank=16))
                outcome.append("accepted")
            except AdapterRefused as refused:
                outcome.append(refused.rule)
        def beat():
            while not outcome:
                beats[0] += 1
                time.sleep(0.001)
        counter = threading.Thread(target=beat, daemon=True)
        worker = threading.Thread(target=validate, daemon=True)
        counter.start(); worker.start(); worker.join(30)
        print(repr((worker.is_alive(), outcome, beats[0])))
    """)
    try:
        done = subprocess.run([sys.executable, "-c", child, str(adapter)], capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("validating a backtracking pattern froze the process")
    assert done.returncode == 0, done.stderr
    alive, outcome, beats = eval(done.stdout.strip().splitlines()[-1])  # noqa: S307
    assert not alive and outcome == [Rule.CONFIG]
    assert beats > 1, "the other thread did not run while the pattern was matched"


@pytest.mark.parametrize(("pattern", "needle"), [
    ("(" * 600 + ")" * 600, "RecursionError"),  # re.compile itself recursed: a 500 before
    ("x" * 5_000, "5000 characters"),
    (r"(?:a{1000}){1000}", "repeat counts"),  # regex expands counted repeats when compiling
    (r".*q_prog{e<=1}", "fuzzy"),  # re: a literal "{e<=1}"; regex: a fuzzy match
    ("[[:alpha:]._]+", "POSIX"),  # re: a set holding "[", ":" ...; regex: a POSIX class
])
def test_pattern_that_cannot_be_matched_safely_is_refused(adapter: Path, pattern: str,
                                                          needle: str) -> None:
    refused(configure(adapter, target_modules=pattern), Rule.CONFIG, "target_modules", needle)


def test_pattern_key_valid_only_inside_peft_s_template(adapter: Path) -> None:
    """PEFT compiles `(.*\\.)?(KEY)$`, not KEY: `q_proj)|(zzz` is valid there (and matches
    every key that starts with a q_proj suffix), so it must not be refused as a bad regex."""
    from peft.utils.other import get_pattern_key

    key = "q_proj)|(zzz"
    result = read_adapter(configure(adapter, rank_pattern={key: 4}), SPEC, LIMITS)
    assert result.modules
    for layer, module in result.applied:
        assert get_pattern_key([key], module_key(layer, module)) == (
            key if module == "q_proj" else module_key(layer, module))


# ----------------------------------------------------------------------------- 6. delta range


@pytest.mark.parametrize("changes", [
    {"lora_alpha": 1e308},
    {"alpha_pattern": {"q_proj": 1e308}},
    {"lora_alpha": -1e6},
    {"lora_alpha": 1e5, "use_rslora": True},
], ids=str)
def test_scale_out_of_range_is_refused(adapter: Path, changes: dict[str, Any]) -> None:
    refused(configure(adapter, **changes), Rule.RANGE, "scale", "limit")


def test_huge_finite_weights_are_refused(adapter: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[KEY_Q0_B][0, 0] = 1e30  # finite in float32; the delta is ~1e30 * x

    rewrite_tensors(adapter, poison)
    refused(adapter, Rule.RANGE, "model.layers.0.self_attn.q_proj", "max|B|")


def test_weights_at_the_fp16_limit_are_refused(adapter: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[KEY_Q0_A].fill_(6e4)  # each finite in float16, their product is not
        t[KEY_Q0_B].fill_(6e4)

    rewrite_tensors(adapter, poison)
    refused(adapter, Rule.RANGE, "q_proj", dtype=torch.float16)


def test_real_looking_adapter_is_far_from_the_limits(pristine: Path) -> None:
    result = read_adapter(pristine, SPEC, LIMITS, dtype=torch.float16)
    assert isinstance(result, PeftAdapter) and len(result.modules) == 6


# ----------------------------------------------------------------------------- 7. malformed


MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("target_modules int", {"target_modules": 5}, "target_modules must be"),
    ("target_modules [int]", {"target_modules": [5]}, "target_modules must be"),
    ("target_modules object", {"target_modules": {"q_proj": 1}}, "target_modules must be"),
    ("unclosed target_modules", {"target_modules": "(q_proj"}, "target_modules pattern"),
    ("unclosed exclude_modules", {"exclude_modules": "[x"}, "exclude_modules pattern"),
    ("unclosed layers_pattern", {"layers_to_transform": [0, 1], "layers_pattern": "(layers"},
     "layers_pattern pattern"),
    ("unclosed rank_pattern key", {"rank_pattern": {"(q": 4}}, "rank_pattern pattern"),
    ("layers_to_transform str", {"layers_to_transform": "0"}, "layers_to_transform must be"),
    ("layers_to_transform [str]", {"layers_to_transform": ["a"]}, "layers_to_transform must be"),
    ("layers_to_transform float", {"layers_to_transform": 0.5}, "layers_to_transform must be"),
    ("layers_to_transform bool", {"layers_to_transform": True}, "layers_to_transform must be"),
    ("layers_to_transform with a regex", {"target_modules": ".*proj",
                                          "layers_to_transform": [0]}, "PEFT refuses"),
    ("layers_pattern alone", {"layers_pattern": "layers"}, "PEFT refuses"),
    ("100,000 levels deep", {"x": DEEP}, "nested"),
    ("40 levels deep", {"x": Raw("[" * 40 + "]" * 40)}, "nested over 32"),
    ("peft_type 900 levels deep", {"peft_type": Raw('{"a":' * 900 + "1" + "}" * 900)},
     "nested"),
    ("5,000-digit r", {"r": LONG_INT}, "not JSON"),
    ("5,000-digit lora_alpha", {"lora_alpha": LONG_INT}, "not JSON"),
    ("400-digit r", {"r": BIG_INT}, "r must be"),
    ("400-digit lora_alpha", {"lora_alpha": BIG_INT}, "lora_alpha must be"),
    ("400-digit rank_pattern value", {"rank_pattern": {"q_proj": BIG_INT}}, "rank_pattern["),
    ("huge rank_pattern value", {"rank_pattern": {"q_proj": 10**7}}, "rank_pattern["),
    ("NaN alpha_pattern value", {"alpha_pattern": {"q_proj": Raw("NaN")}}, "alpha_pattern["),
    ("Infinity lora_alpha", {"lora_alpha": Raw("Infinity")}, "lora_alpha must be"),
    ("rank_pattern list", {"rank_pattern": [1]}, "rank_pattern must be"),
    ("use_rslora str", {"use_rslora": "yes"}, "use_rslora"),
    ("use_rslora list", {"use_rslora": [1]}, "use_rslora"),
    ("use_rslora int", {"use_rslora": 1}, "use_rslora"),
    ("exclude_modules int", {"exclude_modules": 5}, "exclude_modules must be"),
    ("exclude_modules [int]", {"exclude_modules": [5]}, "exclude_modules must be"),
    ("lone surrogate target", {"target_modules": ["q_proj", LONE_SURROGATE]}, "Unicode"),
    ("lone surrogate peft_type", {"peft_type": LONE_SURROGATE}, "Unicode"),
    ("100 KB regex", {"target_modules": "x" * 100_000}, "100000 characters"),
]


@pytest.mark.parametrize(("changes", "needle"), [(c, n) for _, c, n in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
def test_malformed_config_is_refused(adapter: Path, changes: dict[str, Any], needle: str) -> None:
    refused(configure(adapter, **changes), Rule.CONFIG, needle)


@pytest.mark.parametrize("peft_type", [5, ["LORA"], {"LORA": 1}, True, 1.5])
def test_peft_type_of_odd_type_is_refused(adapter: Path, peft_type: Any) -> None:
    refused(configure(adapter, peft_type=peft_type), Rule.PEFT_TYPE)


def test_config_round_trips_through_json(adapter: Path) -> None:
    """What is accepted can be written back as strict JSON (no NaN, no lone surrogates)."""
    result = read_adapter(configure(adapter, lora_dropout=0.0), SPEC, LIMITS)
    json.dumps(result.config, allow_nan=False).encode("utf-8")
