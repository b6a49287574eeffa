"""Which LoRA layer class wraps a module (lorakit.layers.registry), and the modules none does."""

from __future__ import annotations

import pytest
from torch import nn
from zoo import LAYER_KINDS, lora_layer

from lorakit.layers import Conv, Embedding, GroupedConv, Linear, MultiheadAttention, lora_layer_for


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_dispatch(kind):
    layer, _ = lora_layer(kind)
    expected = {"linear": Linear, "conv1d_transformers": Linear, "embedding": Embedding}.get(kind, Conv)
    assert type(layer) is expected


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d, nn.Conv3d])
def test_dispatch_grouped_conv(conv):
    assert lora_layer_for(conv(4, 4, 3, groups=2)) is GroupedConv
    assert lora_layer_for(conv(4, 4, 3)) is Conv


def test_dispatch_multihead_attention():
    assert lora_layer_for(nn.MultiheadAttention(8, 2)) is MultiheadAttention


def test_dispatch_unsupported():
    assert lora_layer_for(nn.LayerNorm(4)) is None
    assert lora_layer_for(nn.GRU(4, 4)) is None
