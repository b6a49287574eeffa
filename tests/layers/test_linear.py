"""The Linear LoRA layer (nn.Linear and transformers Conv1D): hand-computed outputs and ΔW, rsLoRA
scaling, and lora_bias."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from zoo import add_adapter

from lorakit.errors import AdapterError
from lorakit.layers import Linear

W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (d=3, k=2)
BIAS = torch.tensor([1.0, 0.0, -1.0])
A = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # (r=2, k=2)
B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (d=3, r=2); B·A = [[1,2],[0,1],[1,3]]
X = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
# W·x + b = [4, 7, 10], [1, 2, 3]; with alpha=4, r=2 (s=2): s·B·A·x = [6, 2, 8], [0, -2, -2]
BASE_OUT = torch.tensor([[4.0, 7.0, 10.0], [1.0, 2.0, 3.0]])
LORA_OUT = torch.tensor([[10.0, 9.0, 18.0], [1.0, 0.0, 1.0]])


def linear_layer(kind: str, **kwargs) -> Linear:
    if kind == "linear":
        base = nn.Linear(2, 3)
        base.weight.data.copy_(W)
    else:
        base = Conv1D(3, 2)  # weight stored (k, d)
        base.weight.data.copy_(W.T)
    base.bias.data.copy_(BIAS)
    layer = add_adapter(Linear(base), **kwargs)
    layer.lora_A["a"].weight.data.copy_(A)
    layer.lora_B["a"].weight.data.copy_(B)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers"])
def test_linear_hand_computed(kind):
    layer = linear_layer(kind)
    assert torch.equal(layer.base_layer(X), BASE_OUT)
    assert torch.equal(layer(X), LORA_OUT)
    expected_delta = 2 * torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 3.0]])
    if kind != "linear":
        expected_delta = expected_delta.T  # Conv1D's weight is (k, d)
    assert layer.delta_weight("a").shape == layer.base_layer.weight.shape
    assert torch.equal(layer.delta_weight("a"), expected_delta)
    layer.merge()
    assert torch.equal(layer.base_layer.weight, layer._original_weight + expected_delta)
    assert torch.equal(layer(X), LORA_OUT)


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers"])
def test_rslora_scaling(kind):
    layer = linear_layer(kind, rslora=True)
    assert layer.scaling["a"] == pytest.approx(4 / math.sqrt(2))
    expected = BASE_OUT + (LORA_OUT - BASE_OUT) / 2 * (4 / math.sqrt(2))
    assert torch.allclose(layer(X), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers"])
def test_lora_bias_forward_and_merge(kind):
    layer = linear_layer(kind, lora_bias=True)
    layer.lora_B["a"].bias.data.copy_(torch.tensor([1.0, 2.0, 3.0]))
    expected = LORA_OUT + 2 * torch.tensor([1.0, 2.0, 3.0])  # the bias is scaled like B·A·x
    assert torch.equal(layer(X), expected)
    layer.merge()
    assert torch.equal(layer.base_layer.bias, BIAS + 2 * torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(layer(X), expected)
    layer.unmerge()
    assert torch.equal(layer.base_layer.bias, BIAS)


def test_lora_bias_is_zero_initialised():
    layer = add_adapter(Linear(nn.Linear(4, 4)), init=True, lora_bias=True)
    assert torch.count_nonzero(layer.lora_B["a"].bias) == 0


def test_lora_bias_merged_after_plain_adapter_unmerges_bias():
    """A second merge that brings the first lora_bias must still restore the bias on unmerge."""
    layer = linear_layer("linear")
    layer.add_adapter("b", 1, 1.0, use_rslora=False, dropout=0.0, init=False, lora_bias=True)
    layer.lora_B["b"].bias.data.fill_(1.0)
    layer.merge(["a"])
    layer.merge(["b"])
    assert not torch.equal(layer.base_layer.bias, BIAS)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, W)
    assert torch.equal(layer.base_layer.bias, BIAS)


def test_lora_bias_on_bias_free_layer_refuses_to_merge():
    layer = add_adapter(Linear(nn.Linear(2, 3, bias=False)), lora_bias=True)
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(AdapterError, match="no bias"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged
