"""Pure tensor math of LoRA (Hu et al. 2021, §4.1): no modules, no state.

Notation: a frozen weight ``W`` (d × k) maps ``x`` (…, k) to ``W x`` (…, d). LoRA adds
``s · B A x`` with ``A`` (r × k), ``B`` (d × r) and the scaling ``s``. Merging writes
``W + s · B A`` into the weight; the layers and ``lorakit merge`` call the same functions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "scaling",
    "linear_delta",
    "conv_delta",
    "merged_weight",
    "lora_linear",
    "init_lora_linear_",
    "init_lora_embedding_",
]


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """``s = α / r``, or ``α / √r`` for rank-stabilised LoRA (Kalajdzievski 2023, eq. 3)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def linear_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, s: float, fan_in_fan_out: bool = False
                 ) -> torch.Tensor:
    """``ΔW = s · B A`` in float32: (d × r) @ (r × k) → (d × k), transposed to (k × d) for
    weights stored fan-in first (transformers' ``Conv1D``)."""
    delta = (lora_b.float() @ lora_a.float()) * s
    return delta.T if fan_in_fan_out else delta


def conv_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, s: float) -> torch.Tensor:
    """``ΔW`` of a LoRA convolution in float32.

    ``A``: (r, C_in, *kernel); ``B``: (C_out, r, 1, …, 1). The composition of the two convolutions
    is a single convolution with weight ``ΔW[o, i, …] = s · Σ_j B[o, j] A[j, i, …]``:
    (C_out, C_in, *kernel).
    """
    b = lora_b.float().flatten(1)  # (C_out, r)
    a = lora_a.float()
    return torch.einsum("or,r...->o...", b, a) * s


def merged_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` summed in float32 and rounded once into ``weight``'s dtype."""
    return (weight.float() + delta.float()).to(weight.dtype)


def lora_linear(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: float,
    dropout_p: float = 0.0,
    training: bool = False,
    lora_b_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA branch ``s · B (A · dropout(x)) (+ s · b_B)``.

    x: (…, k), A: (r, k), B: (d, r) → (…, d), in A's dtype. This is the plain reference; the layers
    may use a faster path that must agree with it.
    """
    x = x.to(lora_a.dtype)
    if dropout_p > 0.0 and training:
        x = F.dropout(x, dropout_p, training=True)
    return F.linear(F.linear(x, lora_a), lora_b, lora_b_bias) * s


@torch.no_grad()
def init_lora_linear_(lora_a: torch.Tensor, lora_b: torch.Tensor, init: bool | str, r: int) -> None:
    """PEFT's initialisations: ``True`` → A ~ kaiming-uniform(a=√5) (nn.Linear's default), B = 0;
    ``"gaussian"`` → A ~ N(0, 1/r), B = 0; ``False`` → leave both as created (B non-zero)."""
    if init is False:
        return
    if init is True:
        torch.nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    else:
        torch.nn.init.normal_(lora_a, std=1.0 / r)
    torch.nn.init.zeros_(lora_b)


@torch.no_grad()
def init_lora_embedding_(lora_a: torch.Tensor, lora_b: torch.Tensor, init: bool | str) -> None:
    """Embedding LoRA: A = 0 and B ~ N(0, 1) (as loralib), unless ``init`` is ``False``."""
    if init is False:
        return
    torch.nn.init.zeros_(lora_a)
    torch.nn.init.normal_(lora_b)


# -- the fast LoRA linear path -------------------------------------------------------------------
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA branch computes in: autocast's if active, else the input's.

    Computing in the input's dtype (casting the small A and B, never the large x) avoids the
    activation-sized casts PEFT makes for a bf16 base with float32 adapters.
    """
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else torch.float32


def dropout_keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean keep-mask, each element kept with probability ``1 − p`` (the global generator,
    so ``torch.manual_seed`` reproduces runs)."""
    return torch.empty(like.shape, dtype=torch.bool, device=like.device).bernoulli_(1.0 - p)


def apply_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: ``x ⊙ keep / (1 − p)``."""
    return x * keep / (1.0 - p)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean mask as bits, 8 per byte: (n,) bool → (⌈n/8⌉,) uint8."""
    flat = keep.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    shifts = torch.arange(8, dtype=torch.uint8, device=keep.device)
    return (flat.reshape(-1, 8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`pack_mask`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(-1).bool()
    return flat[: shape.numel()].reshape(shape)


class _LoraLinearAccumulate(torch.autograd.Function):
    """``result += s · B (A · dropout(x)) (+ s · b_B)`` in place, with a lean backward.

    Saved for backward: ``x`` (the same tensor the caller already holds; no copy), the rank-r
    intermediate ``h = A·dropout(x)`` (…, r) and, with dropout, the keep-mask packed 8 elements a
    byte (1/32 of ``x`` in float32, 1/16 in bfloat16) instead of PEFT's dropped-out copy of ``x``.
    Regenerating the mask from a seed would save those bits but draw every random number twice, and
    on a CPU the draw costs 20× the rank-r matmul. Shapes: result (…, d), x (…, k), A (r, k), B (d, r).
    """

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                b_bias: torch.Tensor | None, s: float, p: float) -> torch.Tensor:
        dtype = compute_dtype(x)
        xc = x.to(dtype)
        if p > 0:
            keep = dropout_keep_mask(xc, p)
            xd, bits = apply_dropout(xc, keep, p), pack_mask(keep)
            del keep
        else:
            xd, bits = xc, torch.empty(0, dtype=torch.uint8)
        h = F.linear(xd, a.to(dtype))  # (…, r)
        del xd
        result.add_(F.linear(h, b.to(dtype), None if b_bias is None else b_bias.to(dtype)), alpha=s)
        ctx.save_for_backward(x, a, b, h, bits)
        ctx.has_bias = b_bias is not None
        ctx.s, ctx.p = s, p
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b, h, bits = ctx.saved_tensors
        dtype, s = h.dtype, ctx.s
        g2 = grad.to(dtype).reshape(-1, grad.shape[-1])  # (N, d)
        h2 = h.reshape(-1, h.shape[-1])  # (N, r)
        grad_b = (g2.T @ h2).mul_(s).to(b.dtype)  # (d, r)
        grad_bias = g2.sum(0).mul_(s).to(b.dtype) if ctx.has_bias else None
        gh = (g2 @ b.to(dtype)).mul_(s)  # (N, r)
        grad_x = grad_a = None
        need_x = ctx.needs_input_grad[1]
        xc = x.to(dtype)
        keep = unpack_mask(bits, x.shape) if ctx.p > 0 else None
        if ctx.needs_input_grad[2]:
            xd = xc if keep is None else apply_dropout(xc, keep, ctx.p)  # as in forward, bit for bit
            grad_a = (gh.T @ xd.reshape(-1, xd.shape[-1])).to(a.dtype)  # (r, k)
            del xd
        if need_x:
            gx = (gh @ a.to(dtype)).reshape(x.shape)
            if keep is not None:
                gx = gx / (1.0 - ctx.p) * keep
            grad_x = gx.to(x.dtype)
        return grad, grad_x, grad_a, grad_b, grad_bias, None, None


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

    Without autograd (inference) this is two small GEMMs and one in-place add. With autograd it runs
    :class:`_LoraLinearAccumulate`, which never keeps a copy of ``x`` for dropout. Under ``torch.compile`` the
    plain differentiable ops are used, which the compiler fuses itself.
    """
    p = dropout_p if training else 0.0
    needs_graph = torch.is_grad_enabled() and (
        x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or result.requires_grad
    )
    if torch.compiler.is_compiling():
        dtype = compute_dtype(x)
        bias = None if lora_b_bias is None else lora_b_bias.to(dtype)
        return result + lora_linear(x.to(dtype), lora_a.to(dtype), lora_b.to(dtype), s, p, p > 0, bias)
    if not needs_graph:
        dtype = compute_dtype(x)
        bias = None if lora_b_bias is None else lora_b_bias.to(dtype)
        xc = x.to(dtype)
        if p > 0:  # train mode without autograd still drops (as nn.Dropout does), with the same masks
            xc = apply_dropout(xc, dropout_keep_mask(xc, p), p)
        h = F.linear(xc, lora_a.to(dtype))
        return result.add_(F.linear(h, lora_b.to(dtype), bias), alpha=s)
    return _LoraLinearAccumulate.apply(result, x, lora_a, lora_b, lora_b_bias, s, p)
