"""Pure tensor math of DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024).

DoRA splits the adapted weight into a per-output-channel magnitude ``m`` and a direction:

    W' = m · (W + ΔW) / ‖W + ΔW‖_c        (paper eq. 5, ΔW = s · B A)

where ``‖·‖_c`` is the L2 norm of each output channel (a row of a Linear weight, a filter of a
convolution, a column of an embedding table). As §4.3 recommends, the norm is treated as a constant
(detached): gradients flow into ``m`` and, through the direction, into ``A`` and ``B``. ``m``
starts at ``‖W + ΔW‖_c``, so a fresh adapter leaves the output unchanged.

For an input ``x`` the output of a layer with bias ``b`` is therefore

    y = f ⊙ (W x + s · B A x) + b,     f = m / ‖W + ΔW‖_c   (one factor per output channel)

which the layers compute from the base layer's output ``W x + b`` they already have: no second
matmul with ``W``. With dropout on the low-rank branch (as in LoRA) the dropped-out input only
enters ``B A``: ``y = f ⊙ (W x + s · B A dropout(x)) + b``; its expectation is the DoRA output
without dropout. (PEFT instead feeds ``dropout(x)`` through ``W`` a second time; same expectation,
one full base matmul more and higher variance.)

Weights are given in their stored layout; ``out_axis`` names the axis that indexes output
channels: 0 for ``nn.Linear`` (d × k) and convolutions (C_out × C_in × …), 1 for transformers'
``Conv1D`` (k × d) and for ``nn.Embedding`` (V × D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_norm", "magnitude_init", "dora_factor", "dora_delta", "dora_linear"]


def channel_norm(weight: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
    """``‖W‖_c``: the L2 norm of every output channel of ``weight`` in float32 → (C_out,)."""
    w = weight.float().movedim(out_axis, 0)
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1)


@torch.no_grad()
def magnitude_init(weight: torch.Tensor, delta: torch.Tensor, out_axis: int = 0) -> torch.Tensor:
    """The initial magnitude ``m₀ = ‖W + ΔW‖_c`` (paper §4.1) → (C_out,), float32."""
    return channel_norm(weight.float() + delta.float(), out_axis)


def dora_factor(
    magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, out_axis: int = 0
) -> torch.Tensor:
    """``f = m / ‖W + ΔW‖_c`` → (C_out,), differentiable in ``m`` only (the norm is detached, §4.3).

    ``magnitude`` may have any shape with C_out elements (a convolution stores (1, C_out, 1, …)).
    """
    with torch.no_grad():
        norm = channel_norm(weight.float() + delta.float(), out_axis)
    return magnitude.reshape(-1) / norm.to(magnitude.dtype)


def _along(v: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape (C,) ``v`` to broadcast along ``axis`` of ``like``."""
    shape = [1] * like.dim()
    shape[axis] = -1
    return v.reshape(shape)


@torch.no_grad()
def dora_delta(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, out_axis: int = 0
) -> torch.Tensor:
    """The change DoRA makes to ``W``, in float32: ``f ⊙ (W + ΔW) − W`` (shaped like ``weight``).

    Merging writes ``W + dora_delta`` into the weight; summing the changes of several adapters (all
    taken relative to the same ``W``) merges exactly what their forward passes add up to.
    """
    w = weight.float()
    f = dora_factor(magnitude.float(), w, delta, out_axis)
    return _along(f, w, out_axis) * (w + delta.float()) - w


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    s: float,
    fan_in_fan_out: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain reference of a DoRA linear layer: ``y = f ⊙ (W x + s · B A x̃) + b``.

    x: (…, k); weight: (d, k) or (k, d) with ``fan_in_fan_out``; A: (r, k); B: (d, r);
    magnitude: (d,); ``x̃ = x ⊙ dropout_mask`` (the mask already holds ``1/(1-p)``) or ``x``.
    Computed in float32 from the definition (paper eq. 5), not from the layers' fused path; tests
    compare the two.
    """
    w = (weight.T if fan_in_fan_out else weight).float()  # (d, k)
    delta = (lora_b.float() @ lora_a.float()) * s  # (d, k)
    f = dora_factor(magnitude.float(), w, delta)  # (d,)
    xf = x.float()
    xd = xf if dropout_mask is None else xf * dropout_mask.float()
    out = f * (F.linear(xf, w) + F.linear(F.linear(xd, lora_a.float()), lora_b.float()) * s)
    return out if bias is None else out + bias.float()
