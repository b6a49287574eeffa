"""Pure tensor math of LoRA (Hu et al. 2021, §4.1): no modules, no state.

Notation: a frozen weight ``W`` (d × k) maps ``x`` (…, k) to ``W x`` (…, d). LoRA adds
``s · B A x`` with ``A`` (r × k), ``B`` (d × r) and the scaling ``s``. Merging writes
``W + s · B A`` into the weight; the layers and ``lorakit merge`` call the same functions.
"""

from __future__ import annotations

import math

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


def linear_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, s: float, fan_in_fan_out: bool = False
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


# -- what the fast path in lorakit.fused computes with: its dtype and its dropout masks --------
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the LoRA branch computes in: autocast's if active, else the input's.

    Computing in the input's dtype (casting the small A and B, never the large x) avoids the
    activation-sized casts PEFT makes for a bf16 base with float32 adapters.
    """
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.is_floating_point() else torch.float32


# 0x8040201008040201 as a signed int64: eight copies of a byte, 9 bits apart, so that one multiply
# moves bit j of each of 8 bytes (or byte j's bit of one byte) to a place where no two terms meet.
_BYTE_SPREAD = 0x8040201008040201 - (1 << 64)
_LOW_BITS = 0x0101010101010101


def dropout_keep_mask(like: torch.Tensor, p: float) -> torch.Tensor:
    """A boolean keep-mask shaped like ``like``: each element dropped with probability ``p``
    (rounded to a multiple of 2⁻³², finer than ``torch.rand``'s 2⁻²⁴).

    One uniform 32-bit word per element from the global generator (so ``torch.manual_seed``
    reproduces runs), compared with ``p · 2³²``. The words come 64 bits at a time, which on a CPU
    is 4× faster than ``bernoulli_``: the draw is most of what dropout costs.
    """
    n = like.numel()
    threshold = round(p * (1 << 32)) - (1 << 31)
    if threshold >= 1 << 31:  # p rounds to 1: every element dropped
        return torch.zeros(like.shape, dtype=torch.bool, device=like.device)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=like.device).random_(-(1 << 63), None)
    return (words.view(torch.int32)[:n] >= threshold).reshape(like.shape)


def mask_values(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask as 0/1 numbers of ``dtype``. (Read as bytes first: a bool operand makes
    ``x * keep`` take an unvectorised casting path on a CPU, 4× slower than this conversion plus a
    same-dtype multiply.)"""
    return keep.view(torch.uint8).to(dtype)


def apply_dropout(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout with a given mask: ``x ⊙ keep / (1 − p)``; ``keep`` is a bool mask or
    already :func:`mask_values` in x's dtype."""
    values = keep if keep.dtype == x.dtype else mask_values(keep, x.dtype)
    return (x * values).div_(1.0 - p)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean mask as bits, 8 per byte: (n,) bool → (⌈n/8⌉,) uint8.

    Each group of 8 bools is read as one int64 whose bytes are 0 or 1; multiplying by
    :data:`_BYTE_SPREAD` gathers the 8 low bits into the top byte (element j → bit 7 − j).
    """
    flat = keep.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    return (((words * _BYTE_SPREAD) >> 56) & 0xFF).to(torch.uint8)


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`pack_mask`: the same multiply spreads a byte's bits over 8 bytes."""
    words = ((bits.to(torch.int64) * _BYTE_SPREAD) >> 7) & _LOW_BITS
    return words.view(torch.bool)[: shape.numel()].reshape(shape)
