"""The Embedding LoRA layer: hand-computed outputs and ΔW, its PEFT parameter names, no lora_bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import add_adapter

from lorakit.layers import Embedding


def embedding_layer(**kwargs) -> Embedding:
    base = nn.Embedding(3, 2)
    base.weight.data.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))  # (V=3, D=2)
    layer = add_adapter(Embedding(base), r=2, alpha=2.0, **kwargs)  # s = 1
    layer.lora_embedding_A["a"].data.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]))  # (r, V)
    layer.lora_embedding_B["a"].data.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))  # (D, r)
    return layer


def test_embedding_hand_computed():
    layer = embedding_layer()
    # ΔW = (B·A)ᵀ = [[1, 0], [1, 2], [3, 2]]  (V, D)
    assert torch.equal(layer.delta_weight("a"), torch.tensor([[1.0, 0.0], [1.0, 2.0], [3.0, 2.0]]))
    ids = torch.tensor([[2, 0], [1, 1]])
    expected = torch.tensor([[[8.0, 8.0], [2.0, 2.0]], [[4.0, 6.0], [4.0, 6.0]]])
    assert torch.equal(layer(ids), expected)
    layer.merge()
    assert torch.equal(layer(ids), expected)


def test_embedding_repr_and_keys():
    layer = embedding_layer()
    text = repr(layer)
    assert "lora_embedding_A" in text and "lora_embedding_B" in text
    keys = set(layer.state_dict())
    assert {"lora_embedding_A.a", "lora_embedding_B.a", "base_layer.weight"} <= keys


def test_embedding_rejects_lora_bias():
    with pytest.raises(ValueError, match="lora_bias"):
        add_adapter(Embedding(nn.Embedding(3, 2)), lora_bias=True)
