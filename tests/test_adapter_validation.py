"""Every validation rule, each with a real malformed adapter on disk.

Each test asserts the refusal names its own rule AND that the registry is exactly as before
(the previously loaded adapter still current and serving, nothing added, no memory taken).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from adapter_factory import (
    WEIGHTS_FILE,
    base_spec,
    copy_adapter,
    edit_config,
    make_adapter,
    read_tensors,
    rewrite_tensors,
    tiny_llama_config,
)

from loramux.adapters.config import RegistryConfig
from loramux.adapters.peft import AdapterRefused, Rule
from loramux.adapters.registry import AdapterRegistry
from loramux.adapters.types import AdapterError, AdapterNotFound
from loramux.adapters.types import MODULES

CFG = tiny_llama_config(layers=2)
SPEC = base_spec(CFG)
KEY_Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid rank-4 adapter on q, v and down_proj; tests copy it before breaking it."""
    return make_adapter(tmp_path_factory.mktemp("pristine") / "good", CFG, rank=4,
                        target_modules=("q_proj", "v_proj", "down_proj"), seed=1)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def _registry(root: Path, **overrides: Any) -> AdapterRegistry:
    config = RegistryConfig(adapter_root=root, max_gpu_adapters=2, max_cpu_adapters=4,
                            max_lora_rank=16, **overrides)
    return AdapterRegistry(config, SPEC, "cpu", torch.float32)


@pytest.fixture
def registry(root: Path, pristine: Path) -> Iterator[AdapterRegistry]:
    with _registry(root) as reg:
        reg.load("keep", copy_adapter(pristine, root / "keep"))
        yield reg


@pytest.fixture
def bad(root: Path, pristine: Path) -> Path:
    """A fresh copy of the good adapter under the root, for a test to break."""
    return copy_adapter(pristine, root / "bad")


def _snapshot(reg: AdapterRegistry) -> tuple[Any, ...]:
    rows = [(i.name, i.version, i.digest, i.current, i.pinned) for i in reg.list()]
    return (reg.names(), rows, reg.memory(), reg.resolve("keep"), reg.stats.loads)


def refused(reg: AdapterRegistry, rule: str, path: Path, *, name: str = "bad",
            match: str = "", trusted: bool = False) -> AdapterRefused:
    """Load `path` under `name` and also as a reload of "keep"; both must fail on `rule`
    and leave the registry unchanged (a failed reload leaves the old version serving)."""
    before = _snapshot(reg)
    failures = reg.stats.load_failures
    errors = []
    for target in (name, "keep"):
        with pytest.raises(AdapterRefused) as info:
            reg.load(target, path, trusted=trusted)
        assert info.value.rule == rule, str(info.value)
        assert str(info.value).startswith(f"{rule}: ")
        assert match.lower() in str(info.value).lower(), str(info.value)
        errors.append(info.value)
        assert _snapshot(reg) == before
    assert reg.stats.load_failures == failures + 2
    slot = reg.acquire_wait(reg.resolve("keep"), 10)  # the old version still serves
    reg.release(reg.resolve("keep"))
    assert slot is not None
    return errors[0]


def _rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {new if k == old else k: v for k, v in t.items()}


# ----------------------------------------------------------------------------- weights file


def test_truncated_safetensors(registry: AdapterRegistry, bad: Path) -> None:
    data = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    refused(registry, Rule.CORRUPT, bad, match=WEIGHTS_FILE)


def test_garbage_safetensors_header(registry: AdapterRegistry, bad: Path) -> None:
    (bad / WEIGHTS_FILE).write_bytes(b"\xff" * 8 + b"not a header at all")
    refused(registry, Rule.CORRUPT, bad)


def test_pickle_refused_by_default(registry: AdapterRegistry, bad: Path) -> None:
    torch.save(read_tensors(bad), bad / "adapter_model.bin")
    (bad / WEIGHTS_FILE).unlink()
    refused(registry, Rule.PICKLE, bad, match="adapter_model.bin")


def test_pickle_allowed_loads_weights_only(root: Path, pristine: Path) -> None:
    bad = copy_adapter(pristine, root / "pickled")
    torch.save(read_tensors(bad), bad / "adapter_model.bin")
    (bad / WEIGHTS_FILE).unlink()
    with _registry(root, allow_pickle=True) as reg:
        result = reg.load("pickled", bad)
        good = reg.load("good", copy_adapter(pristine, root / "good"))
        assert result.applied == good.applied
        slot_p = reg.acquire_wait(result.ref)
        slot_g = reg.acquire_wait(good.ref)
        t = reg.tables
        for layer, module in result.applied:
            m = MODULES.index(module)
            n = int(t.ranks[layer, m, slot_p]) * SPEC.shapes[module][0]
            a_p, a_g = int(t.a_offsets[layer, m, slot_p]), int(t.a_offsets[layer, m, slot_g])
            assert torch.equal(t.pool[a_p:a_p + n], t.pool[a_g:a_g + n])


def test_pickle_with_code_is_refused_even_when_allowed(root: Path, pristine: Path) -> None:
    bad = copy_adapter(pristine, root / "evil")
    (bad / WEIGHTS_FILE).unlink()

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, bad / "adapter_model.bin")
    with _registry(root, allow_pickle=True) as reg:
        with pytest.raises(AdapterRefused) as info:
            reg.load("evil", bad)
        assert info.value.rule == Rule.CORRUPT
        assert reg.names() == []


def test_missing_files(registry: AdapterRegistry, bad: Path) -> None:
    (bad / WEIGHTS_FILE).unlink()
    refused(registry, Rule.FILES, bad, match=WEIGHTS_FILE)


def test_missing_config(registry: AdapterRegistry, bad: Path) -> None:
    (bad / "adapter_config.json").unlink()
    refused(registry, Rule.FILES, bad, match="adapter_config.json")


def test_invalid_json_config(registry: AdapterRegistry, bad: Path) -> None:
    (bad / "adapter_config.json").write_text("{ not json")
    refused(registry, Rule.CONFIG, bad, match="not JSON")


def test_empty_weights(registry: AdapterRegistry, bad: Path) -> None:
    rewrite_tensors(bad, lambda t: {})
    refused(registry, Rule.EMPTY, bad)


def test_integer_tensor(registry: AdapterRegistry, bad: Path) -> None:
    rewrite_tensors(bad, lambda t: {**t, KEY_Q0_A: t[KEY_Q0_A].to(torch.int32)})
    refused(registry, Rule.DTYPE, bad, match="int32")


# ----------------------------------------------------------------------------- mapping


def test_layer_out_of_range(registry: AdapterRegistry, bad: Path) -> None:
    rewrite_tensors(bad, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    refused(registry, Rule.LAYER, bad, match="layers.7")


def test_module_the_base_lacks(registry: AdapterRegistry, bad: Path) -> None:
    rewrite_tensors(bad, lambda t: {k.replace("self_attn.v_proj", "self_attn.c_attn"): v
                                    for k, v in t.items()})
    refused(registry, Rule.MODULE, bad, match="c_attn")


def test_module_under_the_wrong_parent(registry: AdapterRegistry, bad: Path) -> None:
    rewrite_tensors(bad, lambda t: {k.replace("self_attn.q_proj", "mlp.q_proj"): v
                                    for k, v in t.items()})
    refused(registry, Rule.MODULE, bad, match="mlp.q_proj")


def test_prefix_mismatch_is_not_a_silent_no_op(registry: AdapterRegistry, bad: Path) -> None:
    # vLLM #34186: keys under another prefix matched nothing and the adapter did nothing.
    rewrite_tensors(bad, lambda t: {k.replace("base_model.model.model.", "transformer.h."): v
                                    for k, v in t.items()})
    refused(registry, Rule.UNMAPPED, bad, match="transformer.h.")


def test_missing_lora_b(registry: AdapterRegistry, bad: Path) -> None:
    rewrite_tensors(bad, lambda t: {k: v for k, v in t.items() if k != KEY_Q0_B})
    refused(registry, Rule.INCOMPLETE, bad, match="lora_B")


def test_duplicate_tensor(registry: AdapterRegistry, bad: Path) -> None:
    other = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    rewrite_tensors(bad, lambda t: {**t, other: t[KEY_Q0_A].clone()})
    refused(registry, Rule.DUPLICATE, bad)


def test_tensor_for_module_the_config_does_not_target(registry: AdapterRegistry,
                                                      bad: Path) -> None:
    edit_config(bad, target_modules=["q_proj", "down_proj"])  # file still has v_proj
    refused(registry, Rule.UNTARGETED, bad, match="v_proj")


def test_layers_to_transform_excludes_a_tensor(registry: AdapterRegistry, bad: Path) -> None:
    edit_config(bad, layers_to_transform=[0])  # file has layer 1 too
    refused(registry, Rule.UNTARGETED, bad, match="model.layers.1.")


# ----------------------------------------------------------------------------- shapes and values


def test_wrong_in_features(registry: AdapterRegistry, bad: Path) -> None:
    rewrite_tensors(bad, lambda t: {**t, KEY_Q0_A: torch.randn(4, 48)})
    refused(registry, Rule.SHAPE, bad, match="[4, 48]")


def test_wrong_out_features(registry: AdapterRegistry, bad: Path) -> None:
    rewrite_tensors(bad, lambda t: {**t, KEY_Q0_B: torch.randn(32, 4)})
    refused(registry, Rule.SHAPE, bad, match="[32, 4]")


def test_rank_disagrees_with_config(registry: AdapterRegistry, bad: Path) -> None:
    edit_config(bad, r=8)
    refused(registry, Rule.RANK, bad, match="r = 8")


def test_rank_disagrees_with_rank_pattern(registry: AdapterRegistry, bad: Path) -> None:
    edit_config(bad, rank_pattern={"down_proj": 2})
    refused(registry, Rule.RANK, bad, match="rank_pattern")


def test_rank_over_limit(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "big-rank", CFG, rank=32, target_modules=("q_proj",))
    refused(registry, Rule.RANK_LIMIT, path, match="limit is 16")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite(registry: AdapterRegistry, bad: Path, value: float) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[KEY_Q0_B][3, 1] = value

    rewrite_tensors(bad, poison)
    refused(registry, Rule.NONFINITE, bad, match=KEY_Q0_B)


def test_overflow_in_serving_dtype(root: Path, pristine: Path) -> None:
    bad = copy_adapter(pristine, root / "huge")

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[KEY_Q0_B][0, 0] = 1e6  # finite in float32, inf in float16

    rewrite_tensors(bad, poison)
    config = RegistryConfig(adapter_root=root, max_gpu_adapters=2, max_cpu_adapters=4,
                            max_lora_rank=16)
    with AdapterRegistry(config, SPEC, "cpu", torch.float16) as reg:
        with pytest.raises(AdapterRefused) as info:
            reg.load("huge", bad)
        assert info.value.rule == Rule.NONFINITE and "float16" in str(info.value)
        assert reg.names() == []


# ----------------------------------------------------------------------------- size


def test_oversize_file(root: Path, pristine: Path) -> None:
    path = copy_adapter(pristine, root / "big")
    size = (path / WEIGHTS_FILE).stat().st_size
    with _registry(root, max_adapter_bytes=size - 1) as reg:
        reg.load("keep", make_adapter(root / "small", CFG, rank=1, target_modules=("q_proj",)))
        error = refused(reg, Rule.SIZE, path, match=str(size))
        assert "limit is" in str(error)


def test_larger_than_the_device_pool(root: Path, pristine: Path) -> None:
    with _registry(root, gpu_pool_bytes=8 << 10) as reg:
        reg.load("keep", make_adapter(root / "small", CFG, rank=1, target_modules=("q_proj",)))
        refused(reg, Rule.SIZE, copy_adapter(pristine, root / "pool-big"),
                match="accelerator pool")


# ----------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "a..b", "a b", "x" * 129, "é"])
def test_name_syntax(registry: AdapterRegistry, bad: Path, name: str) -> None:
    before = _snapshot(registry)
    with pytest.raises(AdapterRefused) as info:
        registry.load(name, bad)
    assert info.value.rule == Rule.NAME
    assert _snapshot(registry) == before


def test_dotdot_escape(registry: AdapterRegistry, root: Path, pristine: Path) -> None:
    copy_adapter(pristine, root.parent / "outside")
    refused(registry, Rule.PATH, root / ".." / "outside", match="outside")
    refused(registry, Rule.PATH, Path("../outside"), match="outside")


def test_absolute_path_outside_root(registry: AdapterRegistry, root: Path,
                                    pristine: Path) -> None:
    outside = copy_adapter(pristine, root.parent / "elsewhere")
    refused(registry, Rule.PATH, outside.resolve())


def test_symlinked_directory_escape(registry: AdapterRegistry, root: Path,
                                    pristine: Path) -> None:
    outside = copy_adapter(pristine, root.parent / "secret")
    (root / "link").symlink_to(outside, target_is_directory=True)
    refused(registry, Rule.PATH, root / "link", match="secret")


def test_symlinked_file_escape(registry: AdapterRegistry, root: Path, pristine: Path) -> None:
    outside = copy_adapter(pristine, root.parent / "secret-file")
    inside = root / "half-link"
    inside.mkdir()
    (inside / "adapter_config.json").write_bytes((pristine / "adapter_config.json").read_bytes())
    (inside / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
    refused(registry, Rule.PATH, inside, match="secret-file")


def test_lazy_symlink_escape(registry: AdapterRegistry, root: Path, pristine: Path) -> None:
    outside = copy_adapter(pristine, root.parent / "lazy-secret")
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    before = _snapshot(registry)
    with pytest.raises(AdapterRefused) as info:
        registry.resolve("sneaky")
    assert info.value.rule == Rule.PATH
    assert _snapshot(registry) == before
    with pytest.raises(AdapterNotFound):
        registry.resolve("..")
    assert _snapshot(registry) == before


def test_trusted_operator_path_outside_root_is_still_validated(registry: AdapterRegistry,
                                                              root: Path, pristine: Path) -> None:
    outside = copy_adapter(pristine, root.parent / "operator")
    assert registry.load("operator", outside, trusted=True).applied
    broken = copy_adapter(pristine, root.parent / "operator-broken")
    edit_config(broken, use_dora=True)
    refused(registry, Rule.FEATURE, broken, trusted=True, match="DoRA")


def test_admin_load_without_root_is_refused(pristine: Path) -> None:
    config = RegistryConfig(max_gpu_adapters=2, max_cpu_adapters=4, max_lora_rank=16)
    with AdapterRegistry(config, SPEC) as reg:
        with pytest.raises(AdapterRefused) as info:
            reg.load("x", pristine)
        assert info.value.rule == Rule.PATH and "no adapter root" in str(info.value)


# ----------------------------------------------------------------------------- unsupported features


def test_dora(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "dora", CFG, rank=4, target_modules=("q_proj",), use_dora=True)
    refused(registry, Rule.FEATURE, path, match="DoRA")


def test_dora_tensors_without_the_flag(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "dora2", CFG, rank=4, target_modules=("q_proj",), use_dora=True)
    edit_config(path, use_dora=False)
    refused(registry, Rule.FEATURE, path, match="lora_magnitude_vector")


def test_modules_to_save(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "mts", CFG, rank=4, target_modules=("q_proj",),
                        modules_to_save=["lm_head"])
    refused(registry, Rule.FEATURE, path, match="modules_to_save")


def test_embedding_target(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "emb", CFG, rank=4, target_modules=("q_proj", "embed_tokens"))
    refused(registry, Rule.FEATURE, path, match="embedding LoRA")


def test_embedding_tensor_without_config_target(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "emb2", CFG, rank=4, target_modules=("q_proj", "embed_tokens"))
    edit_config(path, target_modules=["q_proj"])
    refused(registry, Rule.FEATURE, path, match="embedding LoRA")


def test_lm_head_target(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "head", CFG, rank=4, target_modules=("q_proj", "lm_head"))
    refused(registry, Rule.FEATURE, path, match="lm_head")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias(registry: AdapterRegistry, root: Path, bias: str) -> None:
    path = make_adapter(root / f"bias-{bias}", CFG, rank=4, target_modules=("q_proj",),
                        bias=bias)
    refused(registry, Rule.FEATURE, path, match=f"bias = '{bias}'")


def test_lora_bias(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "lbias", CFG, rank=4, target_modules=("q_proj",), lora_bias=True)
    refused(registry, Rule.FEATURE, path, match="lora_bias")


def test_fan_in_fan_out(registry: AdapterRegistry, bad: Path) -> None:
    edit_config(bad, fan_in_fan_out=True)
    refused(registry, Rule.FEATURE, bad, match="fan_in_fan_out")


def test_pissa_init_without_conversion(registry: AdapterRegistry, bad: Path) -> None:
    edit_config(bad, init_lora_weights="pissa_niter_4")
    refused(registry, Rule.FEATURE, bad, match="init_lora_weights")


@pytest.mark.parametrize("peft_type", ["LOHA", "IA3", None])
def test_non_lora_peft_type(registry: AdapterRegistry, bad: Path, peft_type: str | None) -> None:
    edit_config(bad, peft_type=peft_type)
    refused(registry, Rule.PEFT_TYPE, bad, match=str(peft_type))


# ----------------------------------------------------------------------------- accepted variants


def test_key_variants_are_accepted(registry: AdapterRegistry, root: Path, pristine: Path) -> None:
    """Keys with the adapter name `.default.` and without `base_model.model.` map the same."""
    plain = registry.load("plain", copy_adapter(pristine, root / "plain"))
    variant = copy_adapter(pristine, root / "variant")

    def rename(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for i, (key, value) in enumerate(sorted(t.items())):
            if i % 2:
                key = key.removeprefix("base_model.model.")
            if i % 3 == 0:
                key = key.replace(".weight", ".default.weight")
            out[key] = value
        return out

    rewrite_tensors(variant, rename)
    result = registry.load("variant", variant)
    assert result.applied == plain.applied
    assert result.digest != plain.digest  # the file differs, so does the identity


def test_all_linear_and_regex_targets(registry: AdapterRegistry, root: Path) -> None:
    path = make_adapter(root / "all-linear", CFG, rank=2, target_modules="all-linear")
    result = registry.load("all-linear", path)
    assert result.modules == MODULES
    assert len(result.applied) == SPEC.num_layers * len(MODULES)
    regex = make_adapter(root / "regex", CFG, rank=2,
                         target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj")
    assert registry.load("regex", regex).applied == ((1, "q_proj"), (1, "k_proj"))


def test_error_messages_are_distinct(registry: AdapterRegistry) -> None:
    names = [v for k, v in vars(Rule).items() if not k.startswith("_")]
    assert len(set(names)) == len(names)
    assert issubclass(AdapterRefused, AdapterError)


def test_config_with_extra_unknown_fields_loads(registry: AdapterRegistry, bad: Path) -> None:
    config = json.loads((bad / "adapter_config.json").read_text())
    config["some_future_field"] = {"x": 1}
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert registry.load("future", bad).applied


# ----------------------------------------------------------------------------- PEFT's matching rules

TARGET_CASES: list[dict[str, Any]] = [
    {"target_modules": ["q_proj", "down_proj"]},
    {"target_modules": ["self_attn.q_proj", "model.layers.1.mlp.up_proj"]},
    {"target_modules": r".*\.layers\.[01]\.self_attn\.(k|v)_proj"},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "o_proj"], "exclude_modules": ["model.layers.0.self_attn.o_proj"]},
    {"target_modules": ["q_proj", "o_proj"], "exclude_modules": r".*layers\.1\..*"},
    {"target_modules": "all-linear", "exclude_modules": ["gate_proj"]},
]


@pytest.mark.parametrize("fields", TARGET_CASES, ids=str)
def test_target_matching_is_peft_s(fields: dict[str, Any]) -> None:
    """`config_targets` agrees with PEFT's own `check_target_module_exists` on every module."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from loramux.adapters.peft import config_targets, module_key

    config = LoraConfig(**fields)
    if fields["target_modules"] == "all-linear":
        # PEFT expands "all-linear" against the model before matching; compare the expansion.
        config = LoraConfig(**{**fields, "target_modules": list(MODULES)})
    for layer in range(4):
        for module in MODULES:
            key = module_key(layer, module)
            assert config_targets(fields, key) == bool(
                check_target_module_exists(config, key)), key


@pytest.mark.parametrize("patterns", [
    {"q_proj": 1}, {"proj": 1}, {"self_attn.q_proj": 1, "q_proj": 2},
    {r"layers\.1\..*": 3, "v_proj": 2}, {"1.self_attn.q_proj": 5}, {"layers.1.mlp.down_proj": 4},
])
def test_pattern_key_is_peft_s(patterns: dict[str, int]) -> None:
    from peft.utils.other import get_pattern_key as peft_get_pattern_key

    from loramux.adapters.peft import get_pattern_key, module_key

    for layer in range(3):
        for module in MODULES:
            key = module_key(layer, module)
            assert get_pattern_key(list(patterns), key) == peft_get_pattern_key(patterns, key)


@pytest.mark.parametrize("name", ["acme-x\n", "acme-x\r\n", "acme\nx", "\nacme", "acme-x\x00"])
def test_names_with_control_characters_are_refused(name: str) -> None:
    """re.match with `$` accepted a trailing newline: the name reached listings and labels."""
    from loramux.adapters.peft import check_name

    with pytest.raises(AdapterRefused) as refused:
        check_name(name)
    assert refused.value.rule is Rule.NAME
    check_name(name.strip().replace("\n", "-").replace("\x00", ""))  # the clean name is fine
