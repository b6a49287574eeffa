"""LoRA for ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A is a convolution like the base one (same kernel, stride, padding, dilation, padding mode) from
C_in to r channels; B is a 1×…×1 convolution from r to C_out channels. Their composition is one
convolution with weight ``ΔW = s · B ∘ A`` (see :func:`lorakit.functional.conv_delta`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorakit.config import parse_init
from lorakit.functional import lora as LF
from lorakit.layers.base import LoraLayer
from lorakit.layers.variant import LoraVariant

# inits defined for a (d × k) matrix (the weight, or inputs of width k), not for a convolution
_WEIGHT_INITS = ("pissa", "olora", "orthogonal", "eva")


class Conv(LoraLayer):
    """LoRA around an ``nn.ConvNd`` with ``groups == 1``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features = int(base_layer.in_channels)  # type: ignore[arg-type]
        self.out_features = int(base_layer.out_channels)  # type: ignore[arg-type]

    @classmethod
    def option_problems(
        cls, base: nn.Module, *, init: bool | str, lora_bias: bool, variant: LoraVariant | None
    ) -> list[str]:
        if (parse_init(init) or ("default", None))[0] in _WEIGHT_INITS:
            return [
                f"init_lora_weights={init!r} is for linear layers; a convolution takes True, False or "
                "'gaussian'"
            ]
        return []

    def to_matrix(self, weight_like: torch.Tensor) -> torch.Tensor:
        return weight_like.flatten(1)  # (C_out, C_in·kernel)

    @property
    def _conv(self) -> nn.modules.conv._ConvNd:
        return self.base_layer  # type: ignore[return-value]  # what the registry wraps

    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        base = self._conv
        conv_type: Callable[..., nn.Module] = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[base.weight.dim()]
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
        # groups > 1 (GroupedConv): B is grouped like the base, A is not (PEFT's layout)
        self.lora_B[name] = conv_type(r, self.out_features, ones, ones, groups=base.groups, bias=lora_bias)
        a, b = self.factors(name)
        # LoRA-GA initialises linear layers only; PEFT gives other kinds the default init
        LF.init_lora_linear_(a, b, True if (parse_init(init) or ("",))[0] == "lora_ga" else init, r)
        bias = self.lora_b_bias(name)
        if bias is not None and init is not False:
            nn.init.zeros_(bias)

    def magnitude_shape(self) -> tuple[int, ...]:
        """(1, C_out, 1, …): broadcasts over a (N, C_out, *spatial) output, as PEFT stores it."""
        return (1, self.out_features) + (1,) * (self.dense_weight().dim() - 2)

    def channel_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape((1, -1) + (1,) * (like.dim() - 2))

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv._conv_forward(x.to(weight.dtype), weight, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return LF.conv_delta(a, b, self.scaling[name])

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(self.factors(name)[0].dtype))
        return b(a(x)) * self.scaling[name]
