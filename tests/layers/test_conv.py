"""The convolution LoRA layer: hand-computed Conv1d and Conv2d outputs and ΔW, and a strided, padded
Conv2d whose merge equals the branch."""

from __future__ import annotations

import torch
from torch import nn
from zoo import add_adapter

from lorakit.layers import Conv


def test_conv1d_hand_computed():
    base = nn.Conv1d(1, 2, 2, bias=False)
    base.weight.data.copy_(torch.tensor([[[1.0, 2.0]], [[0.0, 1.0]]]))  # (C_out=2, C_in=1, 2)
    layer = add_adapter(Conv(base), r=1, alpha=1.0)
    layer.lora_A["a"].weight.data.copy_(torch.tensor([[[1.0, -1.0]]]))  # (r, C_in, 2)
    layer.lora_B["a"].weight.data.copy_(torch.tensor([[[1.0]], [[2.0]]]))  # (C_out, r, 1)
    x = torch.tensor([[[1.0, 2.0, 4.0]]])  # (N=1, C_in=1, L=3)
    assert torch.equal(base(x), torch.tensor([[[5.0, 10.0], [2.0, 4.0]]]))
    assert torch.equal(layer.delta_weight("a"), torch.tensor([[[1.0, -1.0]], [[2.0, -2.0]]]))
    assert torch.equal(layer(x), torch.tensor([[[4.0, 8.0], [0.0, 0.0]]]))
    layer.merge()
    assert torch.equal(layer(x), torch.tensor([[[4.0, 8.0], [0.0, 0.0]]]))


def test_conv2d_hand_computed():
    base = nn.Conv2d(1, 1, 2, bias=True)
    base.weight.data.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
    base.bias.data.fill_(1.0)
    layer = add_adapter(Conv(base), r=1, alpha=2.0)  # s = 2
    layer.lora_A["a"].weight.data.copy_(torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]))
    layer.lora_B["a"].weight.data.fill_(3.0)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # base: 1+4+9+16 + 1 = 31; ΔW = 6·I → 6·1 + 6·4 = 30
    assert torch.equal(layer.delta_weight("a"), torch.tensor([[[[6.0, 0.0], [0.0, 6.0]]]]))
    assert torch.equal(layer(x), torch.tensor([[[[61.0]]]]))
    layer.merge()
    assert torch.equal(layer(x), torch.tensor([[[[61.0]]]]))


def test_conv2d_strided_padded_merge_matches_branch():
    torch.manual_seed(0)
    layer = add_adapter(
        Conv(nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)), r=2, alpha=3.0, lora_bias=True
    )
    nn.init.normal_(layer.lora_B["a"].bias)
    x = torch.randn(2, 3, 7, 7)
    unmerged = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
