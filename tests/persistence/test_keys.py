"""PEFT key rules: the keys a plan would create equal the keys injection creates, read-only."""

from __future__ import annotations

import pytest
import torch
from zoo import ZOO, Shared, assert_unchanged, attention, conv_groups, snapshot_all, tiny

from lorakit import LoraConfig
from lorakit.model import injection
from lorakit.persistence.keys import (
    FILE_PREFIX,
    AdapterKey,
    adapter_keys,
    from_file_keys,
    parse_key,
    planned_shapes,
    to_file_keys,
)

CASES = {
    "linear": ("tiny", {"target_modules": ["fc1", "fc2"]}),
    "embedding": ("tiny", {"target_modules": ["emb"], "r": 3}),
    "lora_bias": ("tiny", {"target_modules": ["fc1"], "lora_bias": True}),
    "bias_all+save": ("tiny", {"target_modules": ["fc1"], "bias": "all", "modules_to_save": ["fc2"]}),
    "bias_lora_only": ("tiny", {"target_modules": ["fc1", "emb"], "bias": "lora_only"}),
    "rank_pattern": ("tiny", {"target_modules": ["fc1", "fc2"], "rank_pattern": {"fc2": 2}}),
    "conv+embedding": ("mlp", {"target_modules": ["emb", "conv", "lin0"], "bias": "all"}),
    "gpt2_conv1d": (
        "gpt2",
        {"target_modules": ["c_attn", "c_fc"], "bias": "lora_only", "fan_in_fan_out": True},
    ),
    "shared_and_tied": ("shared", {"target_modules": ["proj", "out"], "modules_to_save": ["block"]}),
    "grouped_conv_dora": ("conv_groups", {"target_modules": ["conv2d", "conv1d"], "use_dora": True}),
    # the attention's out_proj is a LoRA layer inside its base: keys and biases below the nesting
    "mha": ("attention", {"target_modules": ["mha", "lin0"], "lora_bias": True}),
    "mha_bias_all": ("attention", {"target_modules": ["mha"], "bias": "all"}),
    "mha_bias_lora_only": ("attention", {"target_modules": ["mha"], "bias": "lora_only"}),
}


def _build(kind):
    if kind == "tiny":
        return tiny()
    if kind == "shared":
        torch.manual_seed(0)
        return Shared()
    if kind in ("attention", "conv_groups"):
        return attention() if kind == "attention" else conv_groups()
    return ZOO[kind].build()


@pytest.mark.parametrize("case", CASES)
def test_planned_shapes_equal_injected_keys(case):
    kind, kwargs = CASES[case]
    model = _build(kind)
    config = LoraConfig(**kwargs)
    before = snapshot_all(model)
    plan = injection.plan(model, config, "default")
    planned = planned_shapes(model, plan, "default")
    assert_unchanged(model, before)
    resolved = injection.inject(model, config, "default")
    actual = {k: tuple(t.shape) for k, t in adapter_keys(model, "default", resolved.bias).tensors.items()}
    assert planned == actual


def test_planned_shapes_for_a_second_adapter_on_wrapped_layers():
    model = tiny()
    injection.inject(model, LoraConfig(target_modules=["fc1"], r=4), "default")
    config = LoraConfig(target_modules=["fc1", "fc2"], r=2, bias="all")
    planned = planned_shapes(model, injection.plan(model, config, "other"), "other")
    injection.inject(model, config, "other")
    actual = {k: tuple(t.shape) for k, t in adapter_keys(model, "other", "all").tensors.items()}
    assert planned == actual


def test_peft_key_layout():
    model = tiny()
    injection.inject(
        model, LoraConfig(target_modules=["emb", "fc1"], modules_to_save=["fc2"], bias="lora_only", r=2), "x"
    )
    keys = set(adapter_keys(model, "x", "lora_only").tensors)
    assert keys == {
        "emb.lora_embedding_A",
        "emb.lora_embedding_B",
        "fc1.lora_A.weight",
        "fc1.lora_B.weight",
        "fc1.base_layer.bias",
        "fc2.weight",
        "fc2.bias",
    }


def test_file_prefix_roundtrip():
    state = {"a.lora_A.weight": torch.ones(1)}
    on_disk = to_file_keys(state)
    assert list(on_disk) == [FILE_PREFIX + "a.lora_A.weight"]
    assert from_file_keys(on_disk).keys() == state.keys()
    assert list(from_file_keys({"plain.key": torch.ones(1)})) == ["plain.key"]


def test_planned_shapes_for_a_second_adapter_on_a_wrapped_attention():
    model = attention()
    injection.inject(model, LoraConfig(target_modules=["mha"], r=4), "default")
    config = LoraConfig(target_modules=["mha"], r=2, bias="all")
    before = snapshot_all(model)
    planned = planned_shapes(model, injection.plan(model, config, "other"), "other")
    assert_unchanged(model, before)  # the throwaway layer is built on a copy
    injection.inject(model, config, "other")
    actual = {k: tuple(t.shape) for k, t in adapter_keys(model, "other", "all").tensors.items()}
    assert planned == actual


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("base_model.model.a.q.lora_A.weight", ("a.q", "lora_A", "weight")),
        ("a.q.lora_magnitude_vector", ("a.q", "lora_magnitude_vector", "")),
        ("emb.base_layer.weight", ("emb", "base_layer", "weight")),
        ("mha.base_layer.out_proj.lora_B.bias", ("mha.base_layer.out_proj", "lora_B", "bias")),
        ("mha.base_layer.out_proj.base_layer.bias", ("mha.base_layer.out_proj", "base_layer", "bias")),
        ("mha.base_layer.in_proj_bias", ("mha", "base_layer", "in_proj_bias")),
        ("classifier.weight", ("classifier", "", "weight")),
    ],
)
def test_parse_key_splits_at_the_last_container(key, parsed):
    assert parse_key(key) == AdapterKey(*parsed)
