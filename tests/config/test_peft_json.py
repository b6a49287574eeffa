"""adapter_config.json: every PEFT 0.21 key with PEFT's types; neutral keys accepted, enabled
features lorakit lacks refused with the key and value named."""

from __future__ import annotations

import dataclasses
import json

import peft
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit import ConfigError, LoraConfig, TaskType
from lorakit.config import config_from_peft_dict
from lorakit.config.peft_json import (
    PEFT_LORA_KEYS,
    config_to_peft_dict,
    peft_task_type,
)


def _peft_json(**kwargs):
    """What PEFT 0.21 writes for LoraConfig(**kwargs)."""
    data = peft.LoraConfig(**kwargs).to_dict()
    data["peft_type"] = "LORA"
    data["inference_mode"] = True
    return json.loads(json.dumps(data, default=list))


@pytest.mark.parity
def test_key_table_is_peft_0_21s():
    reference = json.loads(json.dumps(peft.LoraConfig().to_dict(), default=str))
    reference["peft_type"] = "LORA"
    assert reference == PEFT_LORA_KEYS


@pytest.mark.parity
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"r": 4, "lora_alpha": 16, "target_modules": ["q", "v"], "lora_dropout": 0.1, "bias": "all"},
        {"target_modules": r".*\.q", "use_rslora": True, "modules_to_save": ["head"], "lora_bias": True},
        {
            "target_modules": ["q"],
            "layers_to_transform": [0, 1],
            "layers_pattern": "layers",
            "rank_pattern": {"q": 2},
            "alpha_pattern": {"q": 3},
            "init_lora_weights": "gaussian",
            "task_type": "CAUSAL_LM",
            "exclude_modules": ["k"],
        },
    ],
)
def test_written_json_matches_peft_keys_and_types(kwargs):
    ours = json.loads(json.dumps(config_to_peft_dict(LoraConfig(**kwargs))))
    theirs = _peft_json(**kwargs)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if key in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(value, list):
            assert sorted(ours[key]) == sorted(value), key
        else:
            assert ours[key] == value and type(ours[key]) is type(value), key
    assert ours["peft_type"] == "LORA" and ours["inference_mode"] is True
    assert config_from_peft_dict(ours) == LoraConfig(**kwargs).__class__(
        **{**LoraConfig(**kwargs).to_dict(), "inference_mode": True}
    )


@pytest.mark.parity
def test_written_json_is_read_by_peft(tmp_path):
    config = LoraConfig(r=4, target_modules=["q"], task_type=TaskType.SEQ_CLS, modules_to_save=["head"])
    config.save_pretrained(tmp_path)
    loaded = peft.LoraConfig.from_pretrained(tmp_path)
    assert loaded.r == 4 and set(loaded.target_modules) == {"q"} and loaded.task_type == "SEQ_CLS"
    assert LoraConfig.from_pretrained(tmp_path) == LoraConfig(
        r=4, target_modules=["q"], task_type="SEQ_CLS", modules_to_save=["head"]
    )  # a config saved on its own keeps its inference_mode, as in PEFT


@pytest.mark.parity
def test_reads_peft_written_config(tmp_path):
    peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"], bias="lora_only").save_pretrained(tmp_path)
    config = LoraConfig.from_pretrained(tmp_path / "adapter_config.json")
    assert (config.r, config.lora_alpha, sorted(config.target_modules), config.bias) == (
        2,
        4,
        ["a", "b"],
        "lora_only",
    )


@pytest.mark.parametrize(
    "task, saved",
    [
        (TaskType.CAUSAL_LM, "CAUSAL_LM"),
        (TaskType.QUESTION_ANSWERING, "QUESTION_ANS"),
        (TaskType.TRANSLATION, "SEQ_2_SEQ_LM"),
        (TaskType.SPEECH_SEQ_2_SEQ, "SEQ_2_SEQ_LM"),
        (TaskType.MULTIPLE_CHOICE, None),
        (TaskType.OTHER, None),
    ],
)
def test_task_types_are_saved_as_peft_knows_them(task, saved):
    assert config_to_peft_dict(LoraConfig(task_type=task))["task_type"] == saved


@pytest.mark.parametrize(
    "key, value",
    [
        ("megatron_core", "anything"),
        ("qalora_group_size", 64),
        ("auto_mapping", {"base_model_class": "X"}),
        ("peft_version", "0.99.0"),
        ("loftq_config", {}),
        ("loftq_config", None),
        ("use_dora", False),
        ("layer_replication", None),
        ("trainable_token_indices", None),
        ("future_key", None),
    ],
)
def test_neutral_values_are_accepted(key, value):
    assert config_from_peft_dict({**PEFT_LORA_KEYS, key: value}).r == 8


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("use_qalora", True, "use_qalora=True"),
        ("layer_replication", [[0, 2]], "layer_replication=[[0, 2]]"),
        ("megatron_config", {"tp": 2}, "megatron_config="),
        ("alora_invocation_tokens", [5], "alora_invocation_tokens=[5]"),
        ("target_parameters", ["experts.weight"], "target_parameters="),
        ("init_lora_weights", "corda", "init_lora_weights='corda'"),
        ("init_lora_weights", "loftq", "init_lora_weights='loftq'"),
    ],
)
def test_enabled_unsupported_features_are_refused(key, value, shown):
    with pytest.raises(ConfigError) as info:
        config_from_peft_dict({**PEFT_LORA_KEYS, key: value}, "dir/adapter_config.json")
    assert "dir/adapter_config.json" in str(info.value) and shown in str(info.value)


def test_keys_a_newer_peft_writes_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="future_key=3") as record:
        config = config_from_peft_dict({**PEFT_LORA_KEYS, "future_key": 3}, "dir/adapter_config.json")
    assert config.r == 8 and "dir/adapter_config.json" in str(record[0].message)


def test_all_problems_are_reported_together():
    data = {**PEFT_LORA_KEYS, "use_qalora": True, "use_bdlora": True, "init_lora_weights": "corda"}
    with pytest.raises(ConfigError) as info:
        config_from_peft_dict(data)
    assert all(k in str(info.value) for k in ("use_qalora", "use_bdlora", "init_lora_weights"))


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_dora", True),
        ("init_lora_weights", "pissa"),
        ("init_lora_weights", "pissa_niter_4"),
        ("init_lora_weights", "olora"),
        ("init_lora_weights", "orthogonal"),
        ("init_lora_weights", "eva"),
        ("init_lora_weights", "mica"),
    ],
)
def test_dora_and_initialisations_are_read(key, value):
    assert getattr(config_from_peft_dict({**PEFT_LORA_KEYS, key: value}), key) == value


@pytest.mark.parametrize(
    "data, shown",
    [
        ({**PEFT_LORA_KEYS, "peft_type": "IA3"}, 'peft_type="IA3"'),
        ([1, 2], "expected a JSON object"),
        ({**PEFT_LORA_KEYS, "r": -1}, "r=-1"),
        ({**PEFT_LORA_KEYS, "bias": "some"}, "bias='some'"),
    ],
)
def test_invalid_configs_name_the_value(data, shown):
    with pytest.raises(ConfigError, match="adapter_config.json") as info:
        config_from_peft_dict(data)
    assert shown in str(info.value)


def test_config_save_refuses_a_file_path(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        LoraConfig().save_pretrained(path)
    assert path.read_text() == "x"


names = st.lists(st.sampled_from(["q", "k", "v", "o", "fc1"]), min_size=1, max_size=4, unique=True)


@settings(max_examples=60, deadline=None)
@given(
    r=st.integers(1, 64),
    alpha=st.one_of(st.integers(1, 64), st.floats(0.5, 64)),
    dropout=st.floats(0, 0.9),
    targets=st.one_of(names, st.just("all-linear"), st.just(r".*\.q")),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    rslora=st.booleans(),
    init=st.sampled_from([True, False, "gaussian"]),
    save=st.one_of(st.none(), names),
    task=st.one_of(st.none(), st.sampled_from([t.value for t in TaskType])),
)
def test_json_roundtrip_property(r, alpha, dropout, targets, bias, rslora, init, save, task):
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias=bias,
        use_rslora=rslora,
        init_lora_weights=init,
        modules_to_save=save,
        task_type=task,
    )
    data = json.loads(json.dumps(config_to_peft_dict(config)))
    assert data.keys() == PEFT_LORA_KEYS.keys()
    back = config_from_peft_dict(data)
    expected_task = None if task is None else peft_task_type(task)
    assert back == dataclasses.replace(config, inference_mode=True, task_type=expected_task)


@pytest.mark.parametrize(
    "key, value, kept",
    [
        ("loftq_config", {"loftq_bits": 4}, {}),  # PEFT empties it too
        ("corda_config", {"cache_file": None}, {"cache_file": None}),
    ],
)
def test_an_init_sub_config_without_its_init_is_ignored_with_a_warning(key, value, kept):
    """PEFT's conversion of a CorDA adapter to plain LoRA writes init true and keeps corda_config:
    such files load, as in PEFT."""
    with pytest.warns(UserWarning, match=f"{key} is set but init_lora_weights=True"):
        config = config_from_peft_dict({**PEFT_LORA_KEYS, key: value})
    assert getattr(config, key) == kept
