"""LoraConfig and TaskType: PEFT's fields and defaults, validation messages, JSON round trip, and
validated assignment."""

from __future__ import annotations

import dataclasses

import peft
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit import ConfigError, LoraConfig, TaskType

DESIGN_DEFAULTS = {
    "r": 8,
    "lora_alpha": 8,
    "target_modules": None,
    "exclude_modules": None,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_dora": False,
    "lora_bias": False,
    "task_type": None,
    "inference_mode": False,
    "base_model_name_or_path": None,
    "revision": None,
}


def test_the_design_fields_come_first_in_order():
    names = [f.name for f in dataclasses.fields(LoraConfig)]
    assert names[: len(DESIGN_DEFAULTS)] == list(DESIGN_DEFAULTS)


PEFT_FIELDS = [f for f in dataclasses.fields(peft.LoraConfig)]


def _peft_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


@pytest.mark.parametrize("field", PEFT_FIELDS, ids=[f.name for f in PEFT_FIELDS])
def test_every_peft_field_is_accepted_at_peft_default(field):
    """Walks PEFT's own field list at test time: a field PEFT adds later fails here, not for a user."""
    ours = {f.name for f in dataclasses.fields(LoraConfig)}
    assert field.name in ours, f"PEFT's LoraConfig has {field.name!r}; lorakit's does not"
    default = _peft_default(field)
    if field.name == "runtime_config":
        LoraConfig(runtime_config={"ephemeral_gpu_offload": default.ephemeral_gpu_offload})
        return
    config = LoraConfig(**{field.name: default})
    if field.name not in ("peft_type", "peft_version"):  # PEFT fills these in __post_init__
        assert config.to_dict()[field.name] == peft.LoraConfig().to_dict()[field.name]


def test_assignment_validates_and_changes_nothing_on_error():
    cfg = LoraConfig()
    cfg.r = 16
    cfg.init_lora_weights = "gaussian"  # PEFT's PiSSA conversion recipe assigns fields
    assert (cfg.r, cfg.init_lora_weights) == (16, "gaussian")
    with pytest.raises(ConfigError, match="r=0"):
        cfg.r = 0
    assert cfg.r == 16
    cfg.target_modules = {"v", "q"}
    assert cfg.target_modules == ["q", "v"]  # normalised like at construction


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"use_qalora": True}, "use_qalora=True asks for QA-LoRA"),
        ({"layer_replication": [(0, 2)]}, "layer_replication="),
        ({"init_lora_weights": "corda"}, "init_lora_weights='corda' is not supported by lorakit: CorDA"),
        ({"megatron_config": {"tp": 2}}, "megatron_config="),
    ],
)
def test_features_lorakit_lacks_are_refused_at_construction(kwargs, shown):
    with pytest.raises(ConfigError, match="(does not support|is not supported)") as info:
        LoraConfig(**kwargs)
    assert shown in str(info.value)


def test_target_parameters_are_names_as_in_peft():
    assert LoraConfig(target_parameters={"experts.down_proj", "experts.gate_up_proj"}).target_parameters == [
        "experts.down_proj",
        "experts.gate_up_proj",
    ]
    with pytest.raises(ConfigError, match="target_parameters='experts.gate_up_proj': must be a list"):
        LoraConfig(target_parameters="experts.gate_up_proj")  # PEFT refuses a string too


@pytest.mark.parity
@pytest.mark.parametrize("field", list(DESIGN_DEFAULTS))
def test_default_matches_design_and_peft(field):
    ours = getattr(LoraConfig(), field)
    assert ours == DESIGN_DEFAULTS[field]
    assert type(ours) is type(DESIGN_DEFAULTS[field])
    assert ours == getattr(peft.LoraConfig(), field)


def test_mutable_defaults_are_not_shared():
    a, b = LoraConfig(), LoraConfig()
    assert a.rank_pattern is not b.rank_pattern
    assert a.alpha_pattern is not b.alpha_pattern


# (kwargs, the field named in the error, the offending value as repr, a valid choice it lists)
BAD = [
    ({"r": 0}, "r", "0", "positive integer"),
    ({"r": -3}, "r", "-3", "positive integer"),
    ({"r": 2.5}, "r", "2.5", "positive integer"),
    ({"r": True}, "r", "True", "positive integer"),
    ({"lora_alpha": 0}, "lora_alpha", "0", "positive number"),
    ({"lora_alpha": float("nan")}, "lora_alpha", "nan", "positive number"),
    ({"lora_alpha": "16"}, "lora_alpha", "'16'", "positive number"),
    ({"lora_dropout": 1.0}, "lora_dropout", "1.0", "[0, 1)"),
    ({"lora_dropout": -0.1}, "lora_dropout", "-0.1", "[0, 1)"),
    ({"bias": "some"}, "bias", "'some'", "lora_only"),
    ({"init_lora_weights": "pissa_bogus"}, "init_lora_weights", "'pissa_bogus'", "gaussian"),
    ({"init_lora_weights": 1.5}, "init_lora_weights", "1.5", "gaussian"),
    ({"layers_pattern": "layers"}, "layers_pattern", "'layers'", "layers_to_transform"),
    (
        {"target_modules": r".*\.q_proj", "layers_to_transform": [0]},
        "layers_to_transform",
        r"'.*\\.q_proj'",
        "list of names",
    ),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern", "0", "positive int"),
    ({"rank_pattern": {"q_proj": 2.0}}, "rank_pattern", "2.0", "positive int"),
    ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern", "-1", "positive float"),
    ({"alpha_pattern": ["q_proj"]}, "alpha_pattern", "['q_proj']", "dict"),
    ({"rank_pattern": {"q_proj(": 4}}, "rank_pattern", "'q_proj('", "regular expression"),
    ({"alpha_pattern": {"*o_proj": 4}}, "alpha_pattern", "'*o_proj'", "regular expression"),
    ({"task_type": "CAUSAL"}, "task_type", "'CAUSAL'", "QUESTION_ANSWERING"),
    ({"target_modules": 3}, "target_modules", "3", "list of module names"),
    ({"target_modules": "q_proj("}, "target_modules", "'q_proj('", "regular expression"),
    ({"layers_to_transform": [-1]}, "layers_to_transform", "[-1]", "non-negative int"),
    ({"fan_in_fan_out": "yes"}, "fan_in_fan_out", "'yes'", "True or False"),
]


@pytest.mark.parametrize(("kwargs", "field", "value", "choice"), BAD, ids=[b[1] + "-" + b[2] for b in BAD])
def test_bad_value_error_names_field_value_and_choices(kwargs, field, value, choice):
    with pytest.raises(ConfigError) as info:
        LoraConfig(**kwargs)
    message = str(info.value)
    assert field in message
    assert value in message
    assert choice in message


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        LoraConfig(r=0)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        LoraConfig(r=0, lora_alpha=-1, lora_dropout=2.0, bias="x", init_lora_weights="y")
    message = str(info.value)
    for part in ("r=0", "lora_alpha=-1", "lora_dropout=2.0", "bias='x'", "init_lora_weights='y'"):
        assert part in message
    assert message.count("\n  - ") == 5


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_valid_init_choices(init):
    assert LoraConfig(init_lora_weights=init).init_lora_weights == init


def test_layers_pattern_with_layers_to_transform_is_valid():
    cfg = LoraConfig(layers_to_transform=[0, 1], layers_pattern="layers")
    assert cfg.layers_to_transform == [0, 1]


def test_all_linear_is_normalised_and_allows_layers_to_transform():
    cfg = LoraConfig(target_modules="ALL-LINEAR", layers_to_transform=1)
    assert cfg.target_modules == "all-linear"


def test_module_sets_become_sorted_lists():
    cfg = LoraConfig(target_modules={"v_proj", "q_proj"}, modules_to_save=("lm_head",))
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.modules_to_save == ["lm_head"]


def test_replace_derives_a_new_config():
    cfg = LoraConfig()
    new = dataclasses.replace(cfg, r=16)
    assert (cfg.r, new.r) == (8, 16)


def test_replace_validates():
    with pytest.raises(ConfigError, match="r=0"):
        dataclasses.replace(LoraConfig(), r=0)


# -- dict round trip -------------------------------------------------------------------------------
names = st.lists(
    st.sampled_from(["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "c_attn"]),
    min_size=1,
    max_size=4,
    unique=True,
)
configs = st.builds(
    LoraConfig,
    r=st.integers(1, 256),
    lora_alpha=st.one_of(st.integers(1, 512), st.floats(0.01, 512, allow_nan=False)),
    target_modules=st.one_of(st.none(), names, st.just("all-linear"), st.just(r".*\.(q|v)_proj")),
    exclude_modules=st.one_of(st.none(), names),
    lora_dropout=st.floats(0.0, 0.99),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    use_rslora=st.booleans(),
    modules_to_save=st.one_of(st.none(), st.just(["lm_head"])),
    init_lora_weights=st.sampled_from([True, False]),  # the others refuse lora_bias (config/test_inits.py)
    rank_pattern=st.dictionaries(st.sampled_from(["q_proj", "layers.0.v_proj"]), st.integers(1, 64)),
    alpha_pattern=st.dictionaries(st.sampled_from(["q_proj", "o_proj"]), st.integers(1, 64)),
    lora_bias=st.booleans(),
    task_type=st.one_of(st.none(), st.sampled_from([t.value for t in TaskType])),
    inference_mode=st.booleans(),
    base_model_name_or_path=st.one_of(st.none(), st.text(max_size=10)),
)


@settings(max_examples=60, deadline=None)
@given(configs)
def test_dict_round_trip(cfg):
    data = cfg.to_dict()
    again = LoraConfig.from_dict(data)
    assert again == cfg
    assert again.to_dict() == data
    assert data["task_type"] is None or isinstance(data["task_type"], str)


def test_from_dict_unknown_key_lists_known_fields():
    with pytest.raises(ConfigError) as info:
        LoraConfig.from_dict({"r": 4, "rnak": 3})
    assert "rnak" in str(info.value)
    assert "lora_alpha" in str(info.value)


def test_to_dict_copies_containers():
    cfg = LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    data = cfg.to_dict()
    data["target_modules"].append("v_proj")
    data["rank_pattern"]["v_proj"] = 4
    assert cfg.target_modules == ["q_proj"]
    assert cfg.rank_pattern == {"q_proj": 2}


@pytest.mark.parametrize(("use_rslora", "expected"), [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_for(use_rslora, expected):
    assert LoraConfig(use_rslora=use_rslora).scaling_for(4, 16) == expected


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize("patterns", [{"rank_pattern": {"q": 2}}, {"alpha_pattern": {"q": 2}}])
def test_rslora_patterns_with_a_weight_rewriting_init_warn_once(init, patterns, recwarn):
    """PEFT's warning: such an adapter cannot be converted back to plain LoRA at save time. It is
    given once per config, not again when a field is assigned."""
    config = LoraConfig(init_lora_weights=init, use_rslora=True, **patterns)
    config.r = 4
    messages = [str(w.message) for w in recwarn.list]
    assert len(messages) == 1 and "Rank-Stabilized LoRA with rank_pattern/alpha_pattern" in messages[0]
    LoraConfig(init_lora_weights=init, **patterns)  # without rsLoRA: fine
    LoraConfig(use_rslora=True, **patterns)  # without PiSSA/OLoRA: fine
    assert len(recwarn.list) == 1
