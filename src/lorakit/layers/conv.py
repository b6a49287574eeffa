"""LoRA for ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A is a convolution like the base one (same kernel, stride, padding, dilation, padding mode) from
C_in to r channels; B is a 1×…×1 convolution from r to C_out channels. Their composition is one
convolution with weight ``ΔW = s · B ∘ A`` (see :func:`lorakit.functional.conv_delta`).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.functional import lora as LF
from lorakit.layers.base import LoraLayer


class Conv(LoraLayer):
    """LoRA around an ``nn.ConvNd`` with ``groups == 1``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        base = self.base_layer
        conv_type = (
            type(base)
            if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            else {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[base.weight.dim()]
        )
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[name] = conv_type(
            self.in_features,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
        )
        self.lora_B[name] = conv_type(r, self.out_features, ones, ones, bias=lora_bias)
        LF.init_lora_linear_(self.lora_A[name].weight, self.lora_B[name].weight, init, r)
        if lora_bias and init is not False:
            nn.init.zeros_(self.lora_B[name].bias)

    def magnitude_shape(self) -> tuple[int, ...]:
        """(1, C_out, 1, …): broadcasts over a (N, C_out, *spatial) output, as PEFT stores it."""
        return (1, self.out_features) + (1,) * (self.base_layer.weight.dim() - 2)

    def channel_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape((1, -1) + (1,) * (like.dim() - 2))

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x.to(weight.dtype), weight, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        return LF.conv_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(a.weight.dtype))
        return b(a(x)) * self.scaling[name]
