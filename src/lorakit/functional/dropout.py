"""Dropout of the LoRA branch's input without keeping a dropped copy of it.

The keep-mask is drawn as uniform 32-bit words from the global generator (``torch.manual_seed``
reproduces runs) and kept for backward packed 8 elements a byte (1/32 of a float32 input), where
``nn.Dropout`` would keep the dropped-out input itself. :mod:`lorakit.functional.fused` uses it.
"""

from __future__ import annotations

import torch

__all__ = ["dropout_keep_mask", "mask_values", "apply_dropout", "pack_mask", "unpack_mask"]

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
