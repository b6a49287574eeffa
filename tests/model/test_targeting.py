"""Which modules a config selects (compared with PEFT's choices) and the no-match errors."""

from __future__ import annotations

import warnings

import peft
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn
from zoo import MODELS, bert_cls, llama, toy

import lorakit
from lorakit import LoraConfig, TargetingError, TaskType
from lorakit.layers import LoraLayer
from lorakit.model.targeting import rank_and_alpha, resolve_config, select_targets


def ours(build, **kwargs) -> dict[str, LoraLayer]:
    model = lorakit.inject_adapter_in_model(LoraConfig(**kwargs), build())
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def theirs(build, **kwargs) -> dict[str, PeftLoraLayer]:
    model = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), build())
    return {n: m for n, m in model.named_modules() if isinstance(m, PeftLoraLayer)}


SELECTIONS = [
    ("llama", {"target_modules": ["q_proj", "v_proj"]}),
    ("llama", {"target_modules": ["self_attn.o_proj", "mlp.up_proj"]}),
    ("llama", {"target_modules": r".*layers\.1\.self_attn\.(q|k)_proj"}),
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": "all-linear", "exclude_modules": ["down_proj"]}),
    ("llama", {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*\.0\.self_attn\.k_proj"}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
    ("llama", {"target_modules": ["q_proj"], "layers_to_transform": [1], "layers_pattern": ["h", "layers"]}),
    ("llama", {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]}),
    ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    ("gpt2", {"target_modules": ["c_attn"]}),
    ("gpt2", {"target_modules": "all-linear"}),
    ("gpt2", {"target_modules": ["c_attn", "c_proj"], "layers_to_transform": [0], "layers_pattern": "h"}),
    ("gpt2", {"target_modules": ["c_fc", "wte"], "exclude_modules": ["h.1.mlp.c_fc"]}),
    ("llama", {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]}),
]


@pytest.mark.parity
@pytest.mark.parametrize(("model", "kwargs"), SELECTIONS, ids=[f"{m}-{k}" for m, k in SELECTIONS])
def test_selection_matches_peft(model, kwargs):
    build = MODELS[model]
    assert sorted(ours(build, **kwargs)) == sorted(theirs(build, **kwargs))


@pytest.mark.parity
@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_default_targets_match_peft(model):
    build = MODELS[model]
    mine = ours(build)
    assert mine and sorted(mine) == sorted(theirs(build))


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_all_linear_excludes_lm_head(model):
    selected = ours(MODELS[model], target_modules="all-linear")
    assert "lm_head" not in selected
    assert all(
        isinstance(m.base_layer, nn.Linear) or type(m.base_layer).__name__ == "Conv1D"
        for m in selected.values()
    )


@pytest.mark.parity
def test_all_linear_excludes_classifier_for_seq_cls():
    selected = ours(bert_cls, target_modules="all-linear", task_type=TaskType.SEQ_CLS)
    assert "classifier" not in selected
    assert "bert.pooler.dense" in selected
    assert sorted(selected) == sorted(theirs(bert_cls, target_modules="all-linear", task_type="SEQ_CLS"))


def test_all_linear_resolves_to_full_names():
    cfg = resolve_config(LoraConfig(target_modules="all-linear"), llama())
    assert isinstance(cfg.target_modules, list)
    assert "model.layers.0.self_attn.q_proj" in cfg.target_modules
    assert "lm_head" not in cfg.target_modules


def test_all_linear_second_adapter_targets_wrapped_layers():
    model = lorakit.get_peft_model(llama(), LoraConfig(target_modules="all-linear"))
    model.add_adapter("other", LoraConfig(target_modules="all-linear"))
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14
    assert all(m.adapter_names == ["default", "other"] for m in layers)


def test_all_linear_with_layers_to_transform():
    selected = ours(llama, target_modules="all-linear", layers_to_transform=[1])
    assert selected and all(".layers.1." in n for n in selected)
    assert len(selected) == 7  # q, k, v, o, gate, up, down


@pytest.mark.parity
@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 5}},
        {
            "target_modules": ["q_proj", "v_proj"],
            "r": 4,
            "lora_alpha": 3,
            "rank_pattern": {"layers.1.self_attn.v_proj": 6, "^model.layers.0.self_attn.q_proj": 5},
            "alpha_pattern": {r"layers\.0\..*": 11},
        },
        {"target_modules": "all-linear", "rank_pattern": {"mlp.*": 3}, "alpha_pattern": {"o_proj": 2.5}},
    ],
)
def test_rank_and_alpha_patterns_match_peft(kwargs):
    mine, reference = ours(llama, **kwargs), theirs(llama, **kwargs)
    assert sorted(mine) == sorted(reference)
    for name, layer in mine.items():
        assert layer.r["default"] == reference[name].r["default"], name
        assert layer.lora_alpha["default"] == reference[name].lora_alpha["default"], name
        assert layer.scaling["default"] == pytest.approx(reference[name].scaling["default"]), name


def test_rank_and_alpha_function():
    cfg = LoraConfig(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 1})
    assert rank_and_alpha(cfg, "model.layers.0.self_attn.v_proj") == (2, 8)
    assert rank_and_alpha(cfg, "model.layers.0.self_attn.q_proj") == (4, 1)
    assert rank_and_alpha(cfg, "model.layers.0.self_attn.xv_proj") == (4, 8)


def test_no_match_error_lists_deduplicated_suffixes():
    with pytest.raises(TargetingError) as info:
        lorakit.get_peft_model(llama(), LoraConfig(target_modules=["qproj"]))
    message = str(info.value)
    assert "qproj" in message
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens", "lm_head"):
        assert suffix in message
    assert message.count("q_proj") == 1


def test_no_match_after_exclusion_says_so():
    with pytest.raises(TargetingError, match="exclude_modules"):
        lorakit.get_peft_model(llama(), LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]))


NONE_TARGETED = "No modules were targeted for adaptation"


@pytest.mark.parametrize(
    ("kwargs", "peft_sentence"),
    [
        ({"target_modules": ["qproj"]}, r"Target modules \['qproj'\] not found in the base model"),
        ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, NONE_TARGETED),
        ({"target_modules": ["nope"], "modules_to_save": ["lm_head"]}, NONE_TARGETED),
        ({"target_modules": ["q_proj"], "exclude_modules": ".*"}, "All modules were excluded"),
    ],
)
def test_no_match_is_pefts_error_with_pefts_sentence(kwargs, peft_sentence):
    """Issue 14: PEFT's NoMatchingPeftModuleError (a ValueError and a PeftError) and its sentence
    for each case, before lorakit's own detail; the model is unchanged, for a second adapter too."""
    with pytest.raises(lorakit.NoMatchingPeftModuleError, match=peft_sentence) as info:
        lorakit.get_peft_model(llama(), LoraConfig(**kwargs))
    assert isinstance(info.value, ValueError) and isinstance(info.value, lorakit.PeftError)
    assert isinstance(info.value, TargetingError)
    model = lorakit.get_peft_model(llama(), LoraConfig(target_modules=["q_proj"]))
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(lorakit.NoMatchingPeftModuleError, match=peft_sentence):
        model.add_adapter("other", LoraConfig(**kwargs))
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def test_no_default_for_unknown_model_type_lists_modules():
    with pytest.raises(TargetingError) as info:
        lorakit.inject_adapter_in_model(LoraConfig(), toy())
    assert "target_modules" in str(info.value) and "conv2" in str(info.value)


def test_select_targets_is_read_only():
    model = llama()
    before = [(n, type(m)) for n, m in model.named_modules()]
    cfg = resolve_config(LoraConfig(target_modules="all-linear"), model)
    assert len(select_targets(cfg, model)) == 14
    assert [(n, type(m)) for n, m in model.named_modules()] == before


SUFFIXES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "self_attn.q_proj",
    "layers.0.mlp.up_proj",
    "embed_tokens",
    "lm_head",
    "mlp",
    "proj",
    "model.layers.1.self_attn.v_proj",
]


def _selection(fn, build, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return sorted(fn(build, **kwargs))
        except ValueError:
            return "error"


@pytest.mark.parity
@settings(max_examples=20, deadline=None)
@given(
    targets=st.lists(st.sampled_from(SUFFIXES), min_size=1, max_size=4, unique=True),
    exclude=st.one_of(st.none(), st.lists(st.sampled_from(SUFFIXES), min_size=1, max_size=2, unique=True)),
    layers=st.one_of(st.none(), st.sampled_from([0, 1, [0], [1], [0, 1]])),
    pattern=st.sampled_from([None, "layers"]),
)
def test_random_selections_match_peft(targets, exclude, layers, pattern):
    kwargs = {
        "target_modules": targets,
        "exclude_modules": exclude,
        "layers_to_transform": layers,
        "layers_pattern": pattern if layers is not None else None,
    }
    # PEFT refuses non-Linear "mlp" modules with a different message; both must refuse
    assert _selection(ours, llama, kwargs) == _selection(theirs, llama, kwargs)


# -- target_parameters: parameters (the experts of mixture-of-experts layers) -------------------------
def _qwen3_moe():
    from zoo import moe

    return moe("qwen3_moe")


def _param_layers(model: nn.Module) -> set[tuple[str, str]]:
    """(path, parameter name) of every parameter wrapper, lorakit's or PEFT's."""
    return {
        (n.removeprefix("base_model.model."), m.parameter_name)
        for n, m in model.named_modules()
        if type(m).__name__ == "ParamWrapper"
    }


PARAMETER_SELECTIONS = [
    {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
    {"target_modules": [], "target_parameters": ["down_proj"]},  # a suffix of the key
    {"target_modules": [], "target_parameters": ["model.layers.1.mlp.experts.gate_up_proj"]},  # a full key
    {"target_modules": [], "target_parameters": ["mlp.gate.weight"]},  # a router's matrix
    {"target_modules": ["o_proj"], "target_parameters": ["experts.down_proj"]},  # both kinds
    {"target_parameters": ["experts.gate_up_proj"]},  # target_modules=None, no PEFT default: parameters only
    # mixtral: in PEFT's table, but PEFT's transformers-4 config conversion empties the targets first
    {"target_parameters": ["experts.gate_up_proj"], "arch": "mixtral"},
    # transformers-4 names of experts and routers move to target_parameters (integrations/moe_targets.py)
    {"target_modules": "all-linear"},
    {"target_modules": "all-linear", "arch": "mixtral"},
    {"target_modules": "all-linear", "arch": "gpt_oss"},  # never had linear experts: attention only
    {"target_modules": ["q_proj", "gate_proj", "up_proj", "down_proj"], "arch": "olmoe"},
    {"target_modules": ["w1", "w2", "w3", "gate"], "arch": "mixtral"},
    {"target_modules": r".*\.layers\.1\..*(gate_proj|up_proj|v_proj)"},
]


@pytest.mark.parity
@pytest.mark.parametrize("kwargs", PARAMETER_SELECTIONS)
def test_target_parameters_select_what_peft_selects(kwargs):
    """The same parameters, wrapped at the same paths (nested per module: file keys depend on it)."""
    from zoo import moe

    kwargs = dict(kwargs)
    arch = kwargs.pop("arch", "qwen3_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = lorakit.get_peft_model(moe(arch), LoraConfig(**kwargs))
        reference = peft.get_peft_model(moe(arch), peft.LoraConfig(**kwargs))
    assert _param_layers(mine) == _param_layers(reference)
    assert _param_layers(mine) or arch == "gpt_oss"
    for key in ("target_parameters", "rank_pattern", "alpha_pattern"):  # saved alike, so files match
        ours_value = getattr(mine.peft_config["default"], key)
        theirs_value = getattr(reference.peft_config["default"], key)
        assert sorted(ours_value or []) == sorted(theirs_value or []), key
        if isinstance(ours_value, dict):
            assert ours_value == theirs_value, key
    modules = {
        n for n, m in mine.named_modules() if isinstance(m, LoraLayer) and type(m).__name__ != "ParamWrapper"
    }
    assert modules == {
        n
        for n, m in reference.named_modules()
        if isinstance(m, PeftLoraLayer) and type(m).__name__ != "ParamWrapper"
    }


def test_half_of_a_fused_expert_is_refused():
    with pytest.raises(
        lorakit.ConfigError, match=r"names \['gate_proj'\] but not \['up_proj'\].*gate_up_proj"
    ):
        lorakit.get_peft_model(_qwen3_moe(), LoraConfig(target_modules=["q_proj", "gate_proj"]))


def test_target_parameters_nest_in_registration_order():
    model = lorakit.inject_adapter_in_model(
        LoraConfig(target_modules=[], target_parameters=["experts.down_proj", "experts.gate_up_proj"]),
        _qwen3_moe(),
    )
    experts = model.model.layers[0].mlp.experts
    assert experts.parameter_name == "down_proj" and experts.base_layer.parameter_name == "gate_up_proj"
    keys = set(lorakit.get_peft_model_state_dict(model))
    assert "model.layers.0.mlp.experts.lora_A.weight" in keys
    assert "model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys


def test_a_further_adapter_joins_the_wrappers_or_is_refused():
    config = LoraConfig(target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = lorakit.inject_adapter_in_model(config, _qwen3_moe(), "one")
    lorakit.inject_adapter_in_model(config, model, "two")
    experts = model.model.layers[0].mlp.experts
    assert experts.adapter_names == ["one", "two"] == experts.base_layer.adapter_names
    assert type(experts.base_layer.base_layer).__name__ == "Qwen3MoeExperts"  # no third level
    lorakit.inject_adapter_in_model(
        LoraConfig(target_modules=[], target_parameters=["gate_up_proj"]), model, "sub"
    )
    other = _qwen3_moe()
    lorakit.inject_adapter_in_model(
        LoraConfig(target_modules=[], target_parameters=["gate_up_proj"]), other, "one"
    )
    with pytest.raises(TargetingError, match=r"must target the same parameters \(not also \['down_proj'\]\)"):
        lorakit.inject_adapter_in_model(config, other, "two")


def test_parameter_targeting_errors():
    with pytest.raises(
        TargetingError,
        match="matches no parameter.*Parameters that could be targeted: .*experts.gate_up_proj",
    ):
        lorakit.inject_adapter_in_model(
            LoraConfig(target_modules=[], target_parameters=["expert.up"]), _qwen3_moe()
        )
    with pytest.raises(TargetingError, match="its module is also in target_modules"):
        lorakit.inject_adapter_in_model(
            LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]), _qwen3_moe()
        )
    adapted = lorakit.inject_adapter_in_model(LoraConfig(target_modules=["q_proj"]), _qwen3_moe())
    with pytest.raises(TargetingError, match="already adapted through target_modules"):
        lorakit.inject_adapter_in_model(
            LoraConfig(target_modules=[], target_parameters=["q_proj.weight"]), adapted, "second"
        )
    with pytest.raises(TargetingError, match="nothing to adapt") as nothing:
        lorakit.inject_adapter_in_model(LoraConfig(target_modules=[]), _qwen3_moe())
    # PEFT's error and sentence first, so code written for PEFT catches and matches it
    assert isinstance(nothing.value, lorakit.NoMatchingPeftModuleError)
    assert str(nothing.value).startswith("No `target_modules` passed but also no `target_parameters` found.")
    with pytest.raises(TargetingError, match=r"gate_up_proj_bias \(shape \(4, 8\): .*not a bias"):
        from zoo import moe

        lorakit.inject_adapter_in_model(
            LoraConfig(target_modules=[], target_parameters=["experts.gate_up_proj_bias"]), moe("gpt_oss")
        )
    with pytest.raises(TargetingError, match="lora_bias=True is not supported on parameters"):
        lorakit.inject_adapter_in_model(
            LoraConfig(target_modules=[], target_parameters=["down_proj"], lora_bias=True), _qwen3_moe()
        )


def test_targetable_parameters_are_experts_and_routers():
    from lorakit.model.targeting import targetable_parameters

    rows = {r["name"]: r for r in targetable_parameters(_qwen3_moe())}
    assert set(rows) == {
        f"model.layers.{i}.mlp.{p}"
        for i in (0, 1)
        for p in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")
    }
    assert rows["model.layers.0.mlp.experts.gate_up_proj"]["shape"] == (4, 8, 16)
