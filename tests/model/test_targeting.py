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
