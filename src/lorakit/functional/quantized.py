"""A frozen quantized linear product whose backward recomputes the dense weight.

``y = base(x)`` for a frozen base whose weight is stored quantized (``Q``), and ``∂x = g · deq(Q)``
with ``deq(Q)`` rebuilt from ``Q`` in backward (g: (…, d), deq(Q): (d, k), ∂x: (…, k)). Autograd
through a quantized tensor's own ops may keep a dense copy of the weight for backward (torchao's
int8 weight-only linear keeps ``Q`` cast to the activation dtype: 4 bytes per element in float32);
this keeps nothing but the callables, so the memory held for backward is the quantized floor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["recomputed_linear"]


class _RecomputedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        product: Callable[[torch.Tensor], torch.Tensor],
        dequantize: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        ctx.dequantize = dequantize
        ctx.x_dtype = x.dtype
        y = product(x)
        # A view returned from a custom Function cannot be modified in place (LoRA adds into it).
        return y if y._base is None else y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.dequantize().to(grad.dtype)  # (d, k), freed when backward returns
        return (grad @ weight).to(ctx.x_dtype), None, None


def recomputed_linear(
    x: torch.Tensor,
    product: Callable[[torch.Tensor], torch.Tensor],
    dequantize: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """``product(x)`` (the frozen base's forward, run without autograd) with the input gradient
    ``g · dequantize()`` computed in backward. The base's weight and bias get no gradient."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return product(x)
    return _RecomputedLinear.apply(x, product, dequantize)
