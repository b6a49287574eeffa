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
    "grouped_conv_delta",
    "conv_delta_flat",
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


def grouped_conv_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, s: float, groups: int) -> torch.Tensor:
    """``ΔW`` of a LoRA convolution whose B is grouped (PEFT's layout for a base with ``groups=G``),
    in float32.

    ``A``: (r, C_in, *kernel), an ordinary convolution; ``B``: (C_out, r/G, 1, …, 1) with ``G``
    groups, so output channel ``o`` of group ``g = o // (C_out/G)`` reads A's rows
    ``g·r/G … (g+1)·r/G − 1``. The composition is one ordinary (``groups=1``) convolution:

        ΔW[o, i, …] = s · Σ_{j < r/G} B[o, j] A[g·r/G + j, i, …]      → (C_out, C_in, *kernel)

    It links every input channel to every output channel, so for ``G > 1`` it is not a weight of
    the grouped base's shape (C_out, C_in/G, *kernel): such an adapter cannot be merged.
    """
    r, c_out = lora_a.shape[0], lora_b.shape[0]
    a = lora_a.float().reshape(groups, r // groups, *lora_a.shape[1:])  # (G, r/G, C_in, *kernel)
    b = lora_b.float().reshape(groups, c_out // groups, r // groups)  # (G, C_out/G, r/G)
    delta = torch.einsum("goj,gj...->go...", b, a)  # (G, C_out/G, C_in, *kernel)
    return delta.reshape(c_out, *lora_a.shape[1:]) * s


def conv_delta_flat(
    lora_a: torch.Tensor, lora_b: torch.Tensor, s: float, shape: tuple[int, ...] | torch.Size
) -> torch.Tensor:
    """``s · (B_flat A_flat)`` reshaped to ``shape`` (the base weight's), in float32, with
    ``B_flat = B.reshape(-1, r)`` and ``A_flat = A.reshape(r, -1)``: the update PEFT's DoRA adds to a
    convolution's weight before taking channel norms.

    For an ordinary convolution this is :func:`conv_delta`. For a grouped B (C_out, r/G, 1, …) it
    is not the composite's ΔW (see :func:`grouped_conv_delta`): row ``p`` of ``B_flat`` holds the B
    rows of output channels ``pG … pG+G−1`` side by side, and the (C_out/G, C_in·k) product is
    re-read in the base weight's (C_out, C_in/G, …) shape. It is what PEFT computes, so DoRA adapters
    on grouped convolutions give PEFT's outputs.
    """
    r = lora_a.shape[0]
    return (lora_b.float().reshape(-1, r) @ lora_a.float().reshape(r, -1)).reshape(shape) * s


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
