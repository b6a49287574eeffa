"""The fast LoRA linear path: two autograd functions that agree with :func:`lorakit.functional.lora_linear`.

Notation as in :mod:`lorakit.functional`: x (…, k), A (r, k), B (d, r), scaling ``s``, the rank-r
intermediate ``h = A · dropout(x)`` (…, r) and the output gradient ``g`` (…, d); ``N`` is the number
of rows of the flattened input.

- :class:`_LoraLinearAccumulate` adds ``s · B h (+ s · b_B)`` to any base output in place.
- :class:`_LoraLinearWithBase` also owns a frozen ``nn.Linear``'s product, so that both directions
  accumulate the low-rank term inside a GEMM: ``y = x Wᵀ + b`` then ``y += s · h Bᵀ`` (``addmm_``)
  and ``∂x = g W`` then ``∂x += (s · g B) A``. Neither builds an activation-sized temporary, and
  autograd no longer sums a base ``∂x`` and an adapter ``∂x``: on a CPU these bandwidth-bound passes
  cost as much as the rank-r products themselves.

Both save for backward only ``x`` (the tensor the caller already holds), ``h`` and, with dropout,
the keep-mask packed 8 elements a byte (1/32 of ``x`` in float32) where PEFT keeps ``dropout(x)``.
Regenerating the mask from a seed would save those bits but draw every random number twice, and the
draw is most of what dropout costs on a CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorakit.functional.dropout import apply_dropout, dropout_keep_mask, mask_values, pack_mask, unpack_mask
from lorakit.functional.lora import lora_linear

__all__ = ["compute_dtype", "lora_linear_accumulate_", "lora_linear_with_base"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA branch computes in: autocast's if active, else the input's.

    Computing in the input's dtype (casting the small A and B, never the large x) avoids the
    activation-sized casts PEFT makes for a bf16 base with float32 adapters.
    """
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else torch.float32


_NO_MASK = torch.empty(0, dtype=torch.uint8)


def _low_rank_in(x: torch.Tensor, a: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = A · dropout(x)`` in x's compute dtype, and the packed keep-mask (empty without dropout)."""
    xc = x.to(compute_dtype(x))
    if p == 0:
        return F.linear(xc, a.to(xc.dtype)), _NO_MASK
    keep = dropout_keep_mask(xc, p)
    return F.linear(apply_dropout(xc, keep, p), a.to(xc.dtype)), pack_mask(keep)


def _add_low_rank_(
    result: torch.Tensor, h: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, s: float
) -> torch.Tensor:
    """``result += s · (h Bᵀ + b_B)``; without a bias the product is accumulated by the GEMM itself.

    In float32 this equals :func:`lorakit.functional.lora_linear` added to ``result`` bit for bit
    when ``s`` is a power of two (``s · p`` is then exact) and to within one rounding otherwise (a
    multiply-add); in bfloat16/float16 the GEMM accumulates in float32 and rounds once, not twice."""
    b = b.to(h.dtype)
    if bias is None and result.dtype == h.dtype and result.is_contiguous() and result.dim() >= 1:
        result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.T, alpha=s)
        return result
    return result.add_(F.linear(h, b, None if bias is None else bias.to(h.dtype)), alpha=s)


def _low_rank_grads(
    ctx: Any,
    grad: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    h: torch.Tensor,
    bits: torch.Tensor,
    a_index: int,
    has_bias: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(∂A, ∂B, ∂b_B, ``gh = s · g B`` (N, r), the keep-mask as numbers or ``None``)."""
    dtype, s, p = h.dtype, ctx.s, ctx.p
    g2 = grad.to(dtype).reshape(-1, grad.shape[-1])  # (N, d)
    grad_b = (g2.T @ h.reshape(-1, h.shape[-1])).mul_(s).to(b.dtype)  # (d, r)
    grad_bias = g2.sum(0).mul_(s).to(b.dtype) if has_bias else None
    gh = (g2 @ b.to(dtype)).mul_(s)  # (N, r)
    mask = mask_values(unpack_mask(bits, x.shape), dtype) if p > 0 else None
    grad_a = None
    if ctx.needs_input_grad[a_index]:
        xc = x.to(dtype)
        xd = xc if mask is None else apply_dropout(xc, mask, p)  # as in forward, bit for bit
        grad_a = (gh.T @ xd.reshape(-1, xd.shape[-1])).to(a.dtype)  # (r, k)
    return grad_a, grad_b, grad_bias, gh, mask


def _masked_input_grad(gh: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """The adapter's ``∂x`` with dropout: ``((gh A) / (1 − p)) ⊙ keep``, (N, k)."""
    return (gh @ a.to(gh.dtype)).div_(1.0 - p).mul_(mask.reshape(-1, mask.shape[-1]))


class _LoraLinearAccumulate(torch.autograd.Function):
    """``result += s · B (A · dropout(x)) (+ s · b_B)`` in place (see the module docstring).
    Shapes: result (…, d), x (…, k), A (r, k), B (d, r)."""

    @staticmethod
    def forward(
        ctx: Any,
        result: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        b_bias: torch.Tensor | None,
        s: float,
        p: float,
    ) -> torch.Tensor:
        h, bits = _low_rank_in(x, a, p)
        _add_low_rank_(result, h, b, b_bias, s)
        ctx.save_for_backward(x, a, b, h, bits)
        ctx.has_bias = b_bias is not None
        ctx.s, ctx.p = s, p
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b, h, bits = ctx.saved_tensors
        grad_a, grad_b, grad_bias, gh, mask = _low_rank_grads(ctx, grad, x, a, b, h, bits, 2, ctx.has_bias)
        grad_x = None
        if ctx.needs_input_grad[1]:
            gx = gh @ a.to(gh.dtype) if mask is None else _masked_input_grad(gh, a, mask, ctx.p)
            grad_x = gx.reshape(x.shape).to(x.dtype)
        return grad, grad_x, grad_a, grad_b, grad_bias, None, None


class _LoraLinearWithBase(torch.autograd.Function):
    """``y = x Wᵀ (+ b) + s · B (A · dropout(x))`` for a frozen linear base (see the module
    docstring). W (d, k) and b are constants here: the caller checks they need no gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        s: float,
        p: float,
    ) -> torch.Tensor:
        out = F.linear(x, weight, bias)
        h, bits = _low_rank_in(x, a, p)
        _add_low_rank_(out, h, b, None, s)
        ctx.save_for_backward(x, weight, a, b, h, bits)
        ctx.s, ctx.p = s, p
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, a, b, h, bits = ctx.saved_tensors
        grad_a, grad_b, _, gh, mask = _low_rank_grads(ctx, grad, x, a, b, h, bits, 3, False)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gx = grad.reshape(-1, grad.shape[-1]).mm(weight)  # the base's ∂x, (N, k)
            if mask is None:
                gx.addmm_(gh, a.to(gx.dtype))
            else:
                gx.add_(_masked_input_grad(gh, a, mask, ctx.p))
            grad_x = gx.view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def _needs_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def lora_linear_accumulate_(
    result: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: float,
    dropout_p: float = 0.0,
    training: bool = False,
    lora_b_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add the LoRA branch to ``result`` in place and return it; equal to
    ``result + lora_linear(x, A, B, s, ...)`` up to the dtype the sum is computed in.

    Without autograd (inference) this is two small GEMMs, the second accumulating into ``result``.
    With autograd it runs :class:`_LoraLinearAccumulate`. Under ``torch.compile`` the plain
    differentiable ops are used, which the compiler fuses itself.
    """
    p = dropout_p if training else 0.0
    if torch.compiler.is_compiling():
        dtype = compute_dtype(x)
        bias = None if lora_b_bias is None else lora_b_bias.to(dtype)
        return result + lora_linear(x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), s, p, p > 0, bias)
    if not _needs_graph(x, lora_a, lora_b, result):
        # train mode without autograd still drops (as nn.Dropout does), with the same masks
        h, _ = _low_rank_in(x, lora_a, p)
        return _add_low_rank_(result, h, lora_b, lora_b_bias, s)
    return _LoraLinearAccumulate.apply(result, x, lora_a, lora_b, lora_b_bias, s, p)


def lora_linear_with_base(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + lora_linear(x, A, B, s, ...)`` for a frozen base.

    The caller guarantees what makes owning the base product valid: ``weight`` and ``bias`` need no
    gradient and share x's dtype, and no autocast is active. Without autograd, or under
    ``torch.compile``, this is the base product followed by :func:`lora_linear_accumulate_`.
    """
    p = dropout_p if training else 0.0
    if torch.compiler.is_compiling() or not _needs_graph(x, lora_a, lora_b):
        return lora_linear_accumulate_(F.linear(x, weight, bias), x, lora_a, lora_b, s, p, p > 0)
    return _LoraLinearWithBase.apply(x, weight, bias, lora_a, lora_b, s, p)
