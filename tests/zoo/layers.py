"""Single LoRA layers of every kind lorakit adapts, for the layer tests."""

from __future__ import annotations

import torch
from torch import nn

LAYER_KINDS = ["linear", "conv1d_transformers", "embedding", "conv1d", "conv2d", "conv3d"]


def add_adapter(layer, name="a", r=2, alpha=4.0, *, rslora=False, dropout=0.0, init=False, lora_bias=False):
    """Add adapter ``name`` to a LoRA layer and make it the only active one; returns the layer."""
    layer.add_adapter(name, r, alpha, use_rslora=rslora, dropout=dropout, init=init, lora_bias=lora_bias)
    layer.set_active([name])
    return layer


def lora_layer(kind: str, dtype: torch.dtype = torch.float32, **kwargs):
    """(layer with adapter 'a' active and non-zero, input) for each of :data:`LAYER_KINDS` (seed 0);
    ``kwargs`` go to :func:`add_adapter`."""
    from transformers.pytorch_utils import Conv1D

    from lorakit.layers import lora_layer_for

    torch.manual_seed(0)
    bases = {
        "linear": (nn.Linear(8, 6), torch.randn(4, 3, 8)),
        "conv1d_transformers": (Conv1D(6, 8), torch.randn(4, 3, 8)),
        "embedding": (nn.Embedding(20, 6), torch.randint(0, 20, (4, 3))),
        "conv1d": (nn.Conv1d(3, 4, 3, padding=1), torch.randn(4, 3, 9)),
        "conv2d": (nn.Conv2d(3, 4, 3, padding=1), torch.randn(4, 3, 5, 5)),
        "conv3d": (nn.Conv3d(2, 3, 2, stride=2), torch.randn(4, 2, 4, 4, 4)),
    }
    base, x = bases[kind]
    base = base.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    cls = lora_layer_for(base)
    assert cls is not None
    layer = add_adapter(cls(base), r=2, alpha=4.0, **{"init": False, **kwargs})
    return layer, x
