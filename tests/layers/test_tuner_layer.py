"""BaseTunerLayer: lorakit's LoRA layers answer PEFT's layer interface the way PEFT's layers do
(checked against PEFT 0.21 on the same models and call sequences)."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer as PeftBaseTunerLayer
from zoo import TOY_TARGETS, toy

import lorakit
from lorakit import BaseTunerLayer, LoraConfig, LoraLayer


def _pair(**kwargs):
    config = {"target_modules": TOY_TARGETS, "init_lora_weights": False, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D's fan_in_fan_out notice
        ours = lorakit.get_peft_model(toy(), LoraConfig(**config))
        theirs = peft.get_peft_model(toy(), peft.LoraConfig(**config))
    return ours, theirs


def _layers(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def test_every_lora_layer_is_a_base_tuner_layer_and_nothing_else_is():
    ours, theirs = _pair(modules_to_save=["head"])
    assert _layers(ours, BaseTunerLayer).keys() == _layers(theirs, PeftBaseTunerLayer).keys()
    assert all(isinstance(m, LoraLayer) for m in _layers(ours, BaseTunerLayer).values())
    assert issubclass(LoraLayer, BaseTunerLayer)


def test_all_available_adapter_names_match_peft():
    """PEFT's private helper, called by code (and PEFT's tests) on any tuner layer."""
    ours, theirs = _pair()
    for model in (ours, theirs):
        model.add_adapter("b", (LoraConfig if model is ours else peft.LoraConfig)(target_modules=["lin"]))
    mine = {n: m._all_available_adapter_names() for n, m in _layers(ours, BaseTunerLayer).items()}
    peft_names = {n: m._all_available_adapter_names() for n, m in _layers(theirs, PeftBaseTunerLayer).items()}
    assert mine == peft_names and ["b", "default"] in mine.values()


@pytest.mark.parity
def test_layer_attributes_match_peft():
    ours, theirs = _pair()
    mine, peft_layers = _layers(ours, BaseTunerLayer), _layers(theirs, PeftBaseTunerLayer)
    for name, layer in mine.items():
        ref = peft_layers[name]
        assert (layer.in_features, layer.out_features) == (ref.in_features, ref.out_features), name
        assert layer.get_base_layer() is layer.base_layer
        assert type(layer.get_base_layer()) is type(ref.get_base_layer())
        assert layer.active_adapter == ref.active_adapter == ["default"]
        assert layer.active_adapters == ref.active_adapters
        assert layer.merged is ref.merged is False
        assert layer.disable_adapters is ref.disable_adapters is False
        assert layer.scaling == ref.scaling
        assert layer.use_dora == ref.use_dora
        assert set(layer.adapter_layer_names) == set(ref.adapter_layer_names)
        assert set(layer.other_param_names) <= set(ref.other_param_names)
        assert torch.equal(layer.weight, ref.weight)


def _grads(model):
    return {n: p.requires_grad for n, p in model.named_parameters() if ".lora_" in n}


@pytest.mark.parity
def test_layer_state_calls_match_peft():
    """enable_adapters, set_adapter (with inference_mode), set_requires_grad, merge and unmerge on
    single layers change the same flags and weights as PEFT's."""
    ours, theirs = _pair()
    for model in (ours, theirs):
        model.add_adapter("b", (LoraConfig if model is ours else peft.LoraConfig)(target_modules=["lin"]))
    steps = [
        lambda layer: layer.enable_adapters(False),
        lambda layer: layer.enable_adapters(True),
        lambda layer: layer.set_adapter("b"),
        lambda layer: layer.set_adapter(["default", "b"], inference_mode=True),
        lambda layer: layer.set_requires_grad("default"),
        lambda layer: layer.set_requires_grad(["default"], requires_grad=False),
        lambda layer: layer.merge(adapter_names=["default"]),
        lambda layer: layer.unmerge(),
    ]
    for step in steps:
        for model, cls in ((ours, BaseTunerLayer), (theirs, PeftBaseTunerLayer)):
            step(_layers(model, cls)["base_model.model.lin"])
        mine = _layers(ours, BaseTunerLayer)["base_model.model.lin"]
        ref = _layers(theirs, PeftBaseTunerLayer)["base_model.model.lin"]
        assert _grads(ours) == _grads(theirs)
        assert (mine.active_adapters, mine.merged_adapters, mine.disable_adapters) == (
            ref.active_adapters,
            ref.merged_adapters,
            ref.disable_adapters,
        )
        # One float32 rounding per product term and sum (r = 8 terms): a few ulps of the largest term.
        w = ref.base_layer.weight.detach()
        bound = 16 * torch.finfo(torch.float32).eps * (w.abs().max() + 1)
        torch.testing.assert_close(mine.base_layer.weight, w, rtol=0, atol=float(bound))


def test_merge_refuses_a_string_or_a_bool_for_adapter_names():
    ours, _ = _pair()
    layer = _layers(ours, BaseTunerLayer)["base_model.model.lin"]
    for wrong in ("default", True):
        with pytest.raises(TypeError, match="list of adapter names"):
            layer.merge(wrong)
    assert not layer.merged
