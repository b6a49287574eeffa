"""Which LoRA layer class wraps a module (lorakit.layers.registry), and the modules none does."""

from __future__ import annotations

import pytest
from torch import nn
from zoo import LAYER_KINDS, lora_layer

from lorakit.layers import Conv, Embedding, Linear, lora_layer_for


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_dispatch(kind):
    layer, _ = lora_layer(kind)
    expected = {"linear": Linear, "conv1d_transformers": Linear, "embedding": Embedding}.get(kind, Conv)
    assert type(layer) is expected


def test_dispatch_unsupported():
    assert lora_layer_for(nn.LayerNorm(4)) is None
    assert lora_layer_for(nn.Conv2d(4, 4, 3, groups=2)) is None
