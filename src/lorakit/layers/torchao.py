"""LoRA on a linear layer whose weight is a torchao int8 tensor (``Int8WeightOnlyConfig``, and the
int8 dynamic-activation configs that store the same ``Int8Tensor``).

PEFT's ``lora.TorchaoLoraLinear`` (same layout and file keys). The base product is torchao's own,
``y = (x · Cᵀ) ⊙ scale (+ b)`` with int8 codes ``C`` (d × k) and one scale per row, so
``deq(Q) = C ⊙ scale``. Its backward is :func:`lorakit.functional.quantized.recomputed_linear`:
torchao's autograd would keep ``C`` cast to the activation dtype (a dense copy of the weight) for
backward; lorakit rebuilds ``deq(Q)`` when backward needs it. Merging and unloading follow
:mod:`lorakit.layers.quantized` (PEFT re-quantizes on every merge; lorakit only on request).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from lorakit.functional.quantized import recomputed_linear
from lorakit.layers.quantized import QuantizedLinear

__all__ = ["TorchaoLoraLinear", "is_torchao_linear"]


def _torchao_tensor_class(name: str) -> type | None:
    """``torchao.quantization.<name>`` if torchao is imported (its tensors can exist only then)."""
    torchao = sys.modules.get("torchao")
    quantization = getattr(torchao, "quantization", None) if torchao is not None else None
    return getattr(quantization, name, None) if quantization is not None else None


def _is_torchao_tensor(tensor: Any) -> bool:
    base = sys.modules.get("torchao.utils")
    cls = getattr(base, "TorchAOBaseTensor", None) if base is not None else None
    return cls is not None and isinstance(tensor, cls)


def is_torchao_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight is a torchao quantized tensor (any format: the kind refuses
    the ones it does not handle, with their name)."""
    return isinstance(module, nn.Linear) and _is_torchao_tensor(module.weight)


class TorchaoLoraLinear(QuantizedLinear):
    """LoRA around an ``nn.Linear`` holding a torchao ``Int8Tensor`` weight."""

    @classmethod
    def option_problems(cls, base: nn.Module, **kwargs: Any) -> list[str]:
        problems = super().option_problems(base, **kwargs)
        int8 = _torchao_tensor_class("Int8Tensor")
        weight = getattr(base, "weight", None)
        if int8 is None or not isinstance(weight, int8):
            problems.append(
                f"torchao weight {type(weight).__name__}: lorakit supports torchao's int8 weights "
                "(Int8Tensor, e.g. Int8WeightOnlyConfig) only"
            )
        if kwargs.get("lora_bias"):
            problems.append("lora_bias=True on a torchao base (PEFT refuses it too)")
        return problems

    def holds_quantized_weight(self) -> bool:
        return _is_torchao_tensor(self.base_layer.weight)

    @property
    def compute_dtype(self) -> torch.dtype:
        weight: Any = self.base_layer.weight
        return weight.dtype  # the logical dtype torchao computes in

    @staticmethod
    def dequantize(base: nn.Module) -> torch.Tensor:
        weight: Any = base.weight
        return weight.dequantize(torch.float32)

    def base_output(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged_weight is not None or args or kwargs or not self.holds_quantized_weight():
            return super().base_output(x, *args, **kwargs)
        return recomputed_linear(x, self.base_layer, self.dequantized)

    def quantize_like(self, weight: torch.Tensor) -> nn.Module:
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerBlock

        base: Any = self.base_layer
        old = base.weight
        new = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        quantized = Int8Tensor.from_hp(
            weight.detach().to(old.dtype),
            PerBlock(tuple(old.block_size)),
            act_quant_kwargs=old.act_quant_kwargs,
        )
        new.weight = nn.Parameter(quantized, requires_grad=False)
        new.bias = base.bias
        new.train(base.training)
        return new
