"""get_layer_status / get_model_status: the same report as PEFT's for the same model and state,
and "irregular" where layers disagree."""

from __future__ import annotations

import dataclasses
import warnings

import peft
import pytest
from zoo import toy

import lorakit
from lorakit import AdapterError, LoraConfig, get_layer_status, get_model_status


def _pair():
    kw = {"target_modules": ["lin", "conv1"], "modules_to_save": ["head"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lorakit.get_peft_model(toy(), LoraConfig(**kw))
        theirs = peft.get_peft_model(toy(), peft.LoraConfig(**kw))
        for model, cls in ((ours, LoraConfig), (theirs, peft.LoraConfig)):
            model.add_adapter("b", cls(target_modules=["lin"]))
            model.merge_adapter(["b"])
    return ours, theirs


@pytest.mark.parity
def test_layer_and_model_status_match_peft():
    ours, theirs = _pair()
    mine = [dataclasses.asdict(s) for s in ours.get_layer_status()]
    ref = [dataclasses.asdict(s) for s in theirs.get_layer_status()]
    for row in mine + ref:
        row.pop("module_type")  # lorakit's convolution class is lora.Conv, PEFT's lora.Conv1d
    assert mine == ref
    assert dataclasses.asdict(get_model_status(ours)) == dataclasses.asdict(peft.get_model_status(theirs))


def test_irregular_states_are_reported():
    model, _ = _pair()
    model.get_base_model().lin.enable_adapters(False)
    model.get_base_model().conv1.set_adapter("b")
    status = model.get_model_status()
    assert status.enabled == "irregular"
    assert status.active_adapters == "irregular"
    assert status.merged_adapters == ["b"]  # merged wherever it exists (conv1 holds no b)
    assert status.requires_grad["default"] == "irregular"


def test_a_model_without_adapters_is_an_error():
    with pytest.raises(AdapterError, match="No adapter layers found"):
        get_layer_status(toy())
