"""ModulesToSaveWrapper: the wrapped module's attributes stay reachable, keyword-only calls work,
trainability follows PEFT's rule, and attribute lookup cannot recurse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, ModulesToSaveWrapper


class _Custom(nn.Module):
    """A module with its own non-tensor attribute and a keyword-only forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = 3.0

    def forward(self, *, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.lin(pixel_values) * self.scale


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.vision = _Custom()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vision(pixel_values=self.trunk(x)))


def _model(**kwargs) -> lorakit.PeftModel:
    torch.manual_seed(0)
    config = LoraConfig(target_modules=["trunk"], modules_to_save=["vision", "head"], **kwargs)
    return lorakit.get_peft_model(_Outer(), config)


def test_attributes_come_from_the_active_copy_or_the_original_when_disabled():
    model = _model()
    model.add_adapter("other", LoraConfig(target_modules=["trunk"], modules_to_save=["head"]))
    head = model.get_base_model().head
    assert isinstance(head, ModulesToSaveWrapper)
    assert head.weight is head.modules_to_save["default"].weight
    assert head.bias is head.modules_to_save["default"].bias
    assert (head.in_features, head.out_features) == (4, 2)
    assert model.get_base_model().vision.scale == 3.0  # a plain attribute of a custom module
    model.set_adapter("other")
    assert head.weight is head.modules_to_save["other"].weight
    with model.disable_adapter():
        assert head.weight is head.original_module.weight
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = head.nope


def test_lookup_before_init_raises_instead_of_recursing():
    wrapper = ModulesToSaveWrapper.__new__(ModulesToSaveWrapper)  # no __init__ ran
    with pytest.raises(AttributeError, match="original_module"):
        _ = wrapper.original_module
    assert not hasattr(wrapper, "weight")


def test_keyword_only_forward_reaches_the_active_copy():
    model = _model()
    x = torch.randn(3, 4)
    vision = model.get_base_model().vision
    with torch.no_grad():
        vision.modules_to_save["default"].lin.weight.mul_(2)
    out = model(x)
    with model.disable_adapter():
        base_out = model(x)
    assert not torch.allclose(out, base_out)
    trunk_out = model.get_base_model().trunk(x)
    expected = vision.modules_to_save["default"](pixel_values=trunk_out)
    assert torch.equal(vision(pixel_values=trunk_out), expected)


def test_keyword_only_forward_in_a_mixed_batch_splits_the_rows():
    model = _model()
    model.add_adapter("other", LoraConfig(target_modules=["trunk"], modules_to_save=["vision"]))
    vision = model.get_base_model().vision
    with torch.no_grad():
        vision.modules_to_save["other"].lin.weight.mul_(-1)
    x = torch.randn(4, 4)
    names = ["default", "other", "__base__", "other"]
    mixed = model(x, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                row = model(x[i : i + 1])
        else:
            model.set_adapter(name)
            row = model(x[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], row)


def test_set_adapter_and_enable_follow_peft_trainability():
    model = _model()
    model.add_adapter("other", LoraConfig(target_modules=["trunk"], modules_to_save=["head"]))
    head = model.get_base_model().head

    def trainable():
        return {n for n, p in head.named_parameters() if p.requires_grad}

    assert trainable() == {"modules_to_save.default.weight", "modules_to_save.default.bias"}
    head.set_adapter("other")
    assert trainable() == {"modules_to_save.other.weight", "modules_to_save.other.bias"}
    head.set_adapter("other", inference_mode=True)
    assert trainable() == set()
    head.enable_adapters(True)  # re-applies set_adapter to the active adapter
    assert trainable() == {"modules_to_save.other.weight", "modules_to_save.other.bias"}
    head.enable_adapters(False)
    assert trainable() == set() and head.disable_adapters
    assert head.active_adapter == ["other"]
