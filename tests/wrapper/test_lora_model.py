"""LoraModel, PEFT's tuner: built directly, attribute forwarding without recursion, the tuner API
(set_adapter, enable/disable, set_requires_grad, delete, targeted names) against PEFT's."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from zoo import ids, logits, toy

import lorakit
from lorakit import AdapterError, LoraConfig, LoraModel


def _grads(model) -> dict[str, bool]:
    return {n.replace("base_model.", "", 1): p.requires_grad for n, p in model.named_parameters()}


def test_built_directly_it_injects_like_peft_and_records_the_configs_on_the_model():
    model = toy()
    lora = LoraModel(model, LoraConfig(target_modules=["lin", "conv1"]), "a")
    assert lora.targeted_module_names == ["lin", "conv1"]
    assert lora.active_adapter == "a" and lora.active_adapters == ["a"]
    assert model.peft_config is lora.peft_config
    assert lora.prefix == "lora_" and lora.targeted_parameter_names == []
    assert lora.lin is model.lin and lora.head is model.head  # forwarded to the model
    lora.unload()
    assert not hasattr(model, "peft_config")


def test_attribute_lookup_never_recurses():
    lora = LoraModel.__new__(LoraModel)  # nothing initialised, as DeepSpeed's init wrappers see it
    with pytest.raises(AttributeError):
        _ = lora.anything
    peft_model = lorakit.PeftModel.__new__(lorakit.PeftModel)
    assert not hasattr(peft_model, "anything")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"])).nope


@pytest.mark.parity
def test_tuner_calls_change_trainability_and_state_as_peft():
    kw = {"target_modules": ["lin", "c1d"], "modules_to_save": ["head"], "init_lora_weights": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lorakit.get_peft_model(toy(), LoraConfig(**kw))
        theirs = peft.get_peft_model(toy(), peft.LoraConfig(**kw))
        for model, cls in ((ours, LoraConfig), (theirs, peft.LoraConfig)):
            model.add_adapter("b", cls(target_modules=["lin"], modules_to_save=["head"]))
    steps = [
        lambda m: m.base_model.set_adapter("b"),
        lambda m: m.base_model.set_adapter("default", inference_mode=True),
        lambda m: m.set_requires_grad("b"),
        lambda m: m.set_requires_grad(["b"], requires_grad=False),
        lambda m: m.disable_adapter_layers(),
        lambda m: m.enable_adapter_layers(),
        lambda m: m.set_adapter("b"),
        lambda m: m.delete_adapter("b"),
    ]
    x = ids(seq=4)
    for i, step in enumerate(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's deletion notice; checked elsewhere
            step(ours)
            step(theirs)
        assert _grads(ours) == _grads(theirs), i
        assert ours.active_adapters == theirs.active_adapters, i
        torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-5)


def test_disable_layers_warns_for_a_trained_bias():
    model = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"], bias="all"))
    assert model.has_active_enabled_adapter
    with pytest.warns(UserWarning, match="bias configured to be 'all'"):
        model.disable_adapter_layers()
    assert not model.has_active_enabled_adapter  # derived from the layers (PEFT's flag would say True)
    model.enable_adapter_layers()
    with model.disable_adapter():
        assert not model.has_active_enabled_adapter
    assert model.has_active_enabled_adapter


def test_a_second_adapter_with_a_bias_is_refused_and_changes_nothing():
    model = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"], bias="all"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"only 1 adapter with bias.*\['default'\].*'lora_only'"):
        model.add_adapter("b", LoraConfig(target_modules=["lin"], bias="lora_only"))
    assert list(model.peft_config) == ["default"]
    assert model.state_dict().keys() == state.keys()
    model.add_adapter("b", LoraConfig(target_modules=["lin"]))  # bias="none" is fine


def test_pissa_beside_other_adapters_warns():
    model = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"], init_lora_weights="pissa"))
    with pytest.warns(UserWarning, match="PiSSA changes the base weights"):
        model.add_adapter("b", LoraConfig(target_modules=["lin"]))
