"""Structure changes: injection wraps exactly the targets, failed calls change nothing, unload undoes."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from zoo import MODELS, TOY_TARGETS, assert_same_state, ids, llama, logits, snapshot, structure, toy

import lorakit
from lorakit import AdapterError, ConfigError, LoraConfig, TargetingError
from lorakit.layers import LoraLayer, ModulesToSaveWrapper
from lorakit.model.injection import inject, lora_modules, plan

# (config kwargs, adapter name, error type, parts the message must contain)
FAILING = [
    ({"target_modules": ["qproj"]}, "default", TargetingError, ["qproj", "q_proj", "k_proj", "down_proj"]),
    ({"target_modules": r".*\.nothing"}, "default", TargetingError, ["nothing", "q_proj"]),
    (
        {"target_modules": ["input_layernorm"]},
        "default",
        TargetingError,
        ["input_layernorm", "LlamaRMSNorm", "torch.nn.Linear", "q_proj"],
    ),
    ({"target_modules": ["q_proj", "mlp"]}, "default", TargetingError, ["model.layers.0.mlp", "LlamaMLP"]),
    (
        {"target_modules": ["embed_tokens"], "lora_bias": True},
        "default",
        TargetingError,
        ["embed_tokens", "lora_bias"],
    ),
    (
        {"target_modules": ["q_proj"], "modules_to_save": ["scorer"]},
        "default",
        TargetingError,
        ["scorer", "lm_head"],
    ),
    (
        {"target_modules": ["q_proj"], "init_lora_weights": "mica"},
        "default",
        ConfigError,
        ["'mica'", "A only"],
    ),
    ({"target_modules": ["q_proj"]}, "a.b", AdapterError, ["'a.b'", "'.'"]),
    ({"target_modules": ["q_proj"]}, "", AdapterError, ["''", "non-empty"]),
    ({"target_modules": ["q_proj"]}, "__base__", AdapterError, ["'__base__'"]),
    ({"target_modules": ["q_proj"]}, 3, AdapterError, ["3", "string"]),
]


@pytest.mark.parametrize(
    ("kwargs", "name", "error", "parts"), FAILING, ids=[f"{k}-{n!r}" for k, n, _, _ in FAILING]
)
def test_failed_get_peft_model_changes_nothing(kwargs, name, error, parts):
    model = llama()
    state, shape = snapshot(model), structure(model)
    with pytest.raises(error) as info:
        lorakit.get_peft_model(model, LoraConfig(**kwargs), adapter_name=name)
    for part in parts:
        assert part in str(info.value), part
    assert structure(model) == shape
    assert_same_state(state, model)
    assert not hasattr(model, "peft_config")


def test_failed_add_adapter_changes_nothing():
    config = LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    peft_model = lorakit.get_peft_model(llama(), config)
    state, shape = snapshot(peft_model), structure(peft_model)
    grads = [p.requires_grad for p in peft_model.parameters()]
    configs = dict(peft_model.peft_config)
    for name, cfg in [
        ("default", LoraConfig(target_modules=["v_proj"])),
        ("other", LoraConfig(target_modules=["v_proj", "post_attention_layernorm"])),
        ("other", LoraConfig(target_modules=["vproj"])),
    ]:
        with pytest.raises(ValueError) as info:
            peft_model.add_adapter(name, cfg)
        if name == "default":
            assert "existing adapters: ['default']" in str(info.value)
        assert structure(peft_model) == shape
        assert_same_state(state, peft_model)
        assert [p.requires_grad for p in peft_model.parameters()] == grads
        assert peft_model.peft_config == configs


def test_bad_config_type_refused():
    model = llama()
    with pytest.raises(ConfigError, match="LoraConfig"):
        lorakit.get_peft_model(model, {"r": 8})  # type: ignore[arg-type]


def _plan_and_inject(model_name: str, injecting: contextlib.AbstractContextManager) -> None:
    """The plan's targets and the wrapped modules are exactly the named ones; ``inject`` runs inside
    ``injecting``."""
    model = MODELS[model_name]()
    names = {n for n, m in model.named_modules() if n.endswith(("q_proj", "c_attn", "c_fc"))}
    config = LoraConfig(target_modules=["q_proj", "c_attn", "c_fc"])
    plan_targets = {n for n, _ in plan(model, config, "default").targets}
    assert plan_targets == names
    with injecting:
        inject(model, config, "default")
    assert {n for n, m in lora_modules(model)} == names
    assert all(m.adapter_names == ["default"] for _, m in lora_modules(model))


def test_inject_wraps_exactly_the_targets():
    _plan_and_inject("llama", contextlib.nullcontext())


def test_inject_wraps_exactly_the_conv1d_targets_and_warns_of_fan_in_fan_out():
    _plan_and_inject("gpt2", pytest.warns(UserWarning))


def test_plan_is_read_only():
    model = llama()
    state, shape = snapshot(model), structure(model)
    plan(model, LoraConfig(target_modules="all-linear", modules_to_save=["lm_head"]), "x")
    assert structure(model) == shape
    assert_same_state(state, model)


def test_second_adapter_reuses_wrapper():
    model = llama()
    inject(model, LoraConfig(target_modules=["q_proj"]), "a")
    inject(model, LoraConfig(target_modules=["q_proj", "v_proj"]), "b")
    layers = dict(lora_modules(model))
    assert layers["model.layers.0.self_attn.q_proj"].adapter_names == ["a", "b"]
    assert layers["model.layers.0.self_attn.v_proj"].adapter_names == ["b"]
    assert not any(isinstance(m.base_layer, LoraLayer) for m in layers.values())


def test_fan_in_fan_out_follows_conv1d():
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        peft_model = lorakit.get_peft_model(MODELS["gpt2"](), LoraConfig(target_modules=["c_attn"]))
    assert peft_model.peft_config["default"].fan_in_fan_out is True


def test_modules_to_save_wrapped_once_and_not_lora_target():
    model = llama()
    inject(model, LoraConfig(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"]), "a")
    assert isinstance(model.lm_head, ModulesToSaveWrapper)
    assert not isinstance(model.lm_head.original_module, LoraLayer)
    inject(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "b")
    assert isinstance(model.lm_head.original_module, nn.Linear)
    assert model.lm_head.adapter_names == ["a", "b"]


def test_tied_embedding_stays_tied_after_injection():
    model = MODELS["gpt2"]()
    lorakit.inject_adapter_in_model(LoraConfig(target_modules=["wte"]), model)
    assert model.transformer.wte.base_layer.weight is model.lm_head.weight


# -- unload ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "toy"])
def test_unload_restores_original_model_bit_for_bit(model_name, merged):
    build = {**MODELS, "toy": toy}[model_name]
    model = build()
    original = snapshot(model)
    shape = structure(model)
    x = ids() if model_name != "toy" else ids(seq=4)
    expected = logits(model, x)
    targets = TOY_TARGETS if model_name == "toy" else "all-linear"
    peft_model = lorakit.get_peft_model(
        model,
        LoraConfig(
            target_modules=targets,
            init_lora_weights=False,
            modules_to_save=["lm_head"] if model_name == "llama" else None,
        ),
    )
    if merged:
        peft_model.merge_adapter()
    base = peft_model.unload()
    assert base is model
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in base.modules())
    assert structure(base) == shape
    assert_same_state(original, base)
    assert torch.equal(logits(base, x), expected)


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "toy"])
def test_merge_and_unload_equals_unmerged(model_name):
    build = {**MODELS, "toy": toy}[model_name]
    targets = TOY_TARGETS if model_name == "toy" else "all-linear"
    x = ids() if model_name != "toy" else ids(seq=4)
    model = build()
    shape = structure(model)
    peft_model = lorakit.get_peft_model(model, LoraConfig(target_modules=targets, init_lora_weights=False))
    unmerged = logits(peft_model, x)
    merged_model = peft_model.merge_and_unload()
    assert not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in merged_model.modules())
    assert structure(merged_model) == shape
    assert not any(k.startswith("_original") or "lora" in k for k in merged_model.state_dict())
    assert torch.allclose(logits(merged_model, x), unmerged, atol=1e-5)


def test_merge_and_unload_keeps_active_modules_to_save_copy():
    model = llama()
    config = LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft_model = lorakit.get_peft_model(model, config)
    with torch.no_grad():
        peft_model.get_base_model().lm_head.modules_to_save["default"].weight.add_(1.0)
    x = ids()
    expected = logits(peft_model, x)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.lm_head, nn.Linear)
    assert torch.allclose(logits(merged, x), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_injected_modules_follow_the_model_mode(mode):
    model = llama()
    getattr(model, mode)()
    config = LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.5, modules_to_save=["lm_head"])
    peft_model = lorakit.get_peft_model(model, config)
    peft_model.add_adapter("other", LoraConfig(target_modules=["q_proj", "o_proj"], lora_dropout=0.2))
    assert {m.training for m in peft_model.modules()} == {mode == "train"}


def test_eval_model_with_dropout_is_deterministic():
    model = llama()
    config = LoraConfig(target_modules=["q_proj", "v_proj"], lora_dropout=0.5, init_lora_weights=False)
    peft_model = lorakit.get_peft_model(model, config)
    x = ids()
    first = logits(peft_model, x)
    assert torch.equal(logits(peft_model, x), first)
    peft_model.train()
    peft_model.eval()
    assert torch.equal(logits(peft_model, x), first)


class _WithContainers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        self.table = torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.zeros(4))})


@pytest.mark.parametrize("name", ["blocks", "table"])
def test_modules_to_save_naming_a_container_is_refused_up_front(name):
    """A ModuleList / ParameterDict has no forward: wrapping it would break the model at its first
    forward, so it is refused (a TypeError too, as PEFT raises) before anything changes."""
    model = _WithContainers()
    before = structure(model)
    with pytest.raises(TypeError, match="modules_to_save cannot be applied to modules of type") as info:
        lorakit.get_peft_model(model, LoraConfig(target_modules=["lin"], modules_to_save=[name]))
    assert isinstance(info.value, lorakit.TargetingTypeError) and name in str(info.value)
    assert structure(model) == before


def test_modules_to_save_naming_a_lora_layer_is_refused():
    model = lorakit.get_peft_model(_WithContainers(), LoraConfig(target_modules=["lin"]))
    with pytest.raises(lorakit.TargetingError, match="already targeted by a LoRA adapter"):
        model.add_adapter("b", LoraConfig(target_modules=["blocks.0"], modules_to_save=["lin"]))
    assert list(model.peft_config) == ["default"]


def test_settings_that_select_nothing_warn():
    config = LoraConfig(target_modules=["lin"], exclude_modules=["nothing"])
    with pytest.warns(UserWarning, match=r"exclude_modules=\['nothing'\] but no modules were excluded"):
        lorakit.get_peft_model(_WithContainers(), config)
    with pytest.warns(
        RuntimeWarning, match=r"rank_pattern keys did not match any targeted module.*\['typo'\]"
    ):
        lorakit.get_peft_model(
            _WithContainers(), LoraConfig(target_modules=["lin"], rank_pattern={"typo": 2})
        )
    with pytest.warns(RuntimeWarning, match=r"alpha_pattern keys did not match.*\['typo'\]"):
        lorakit.get_peft_model(
            _WithContainers(), LoraConfig(target_modules=["lin"], alpha_pattern={"typo": 2})
        )
    no_bias = _WithContainers()
    no_bias.lin = torch.nn.Linear(4, 4, bias=False)
    with pytest.warns(lorakit.PeftWarning, match="has no bias"):
        lorakit.get_peft_model(no_bias, LoraConfig(target_modules=["lin"], lora_bias=True))
