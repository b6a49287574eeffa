"""LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's fan-in-first linear layer).

``y = base(x) + s · B A dropout(x)`` with x: (…, k), A: (r, k), B: (d, r), y: (…, d).
``Conv1D`` stores its weight as (k, d), so its ``ΔW`` is transposed (``fan_in_fan_out``).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit import functional as LF
from lorakit.layers.base import LoraLayer


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features k, out_features d) of a Linear or Conv1D."""
    if is_conv1d(module):
        k, d = module.weight.shape
        return int(k), int(d)
    return int(module.in_features), int(module.out_features)


class Linear(LoraLayer):
    """LoRA around a ``nn.Linear`` or ``Conv1D``; A and B are bias-free ``nn.Linear`` layers
    (B gets a bias with ``lora_bias``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias)
        LF.init_lora_linear_(self.lora_A[name].weight, self.lora_B[name].weight, init, r)
        if lora_bias and init is not False:
            nn.init.zeros_(self.lora_B[name].bias)

    def delta_weight(self, name: str) -> torch.Tensor:
        return LF.linear_delta(self.lora_A[name].weight, self.lora_B[name].weight,
                               self.scaling[name], self.fan_in_fan_out)

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(a.weight.dtype))
        return b(a(x)) * self.scaling[name]
