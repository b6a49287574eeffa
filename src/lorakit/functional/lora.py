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
