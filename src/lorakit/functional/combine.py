"""Pure tensor math for combining task tensors (adapter factors or weight deltas) into one.

``tensors`` is a list of n same-shaped tensors T_i, ``weights`` n floats w_i. Each method returns
one tensor of the same shape:

* ``linear`` (task arithmetic, Ilharco et al. 2023): ``Σ w_i T_i``.
* ``magnitude_prune``: keep the ``density`` fraction of entries of largest |T_i| in each T_i, then
  ``Σ w_i T_i``.
* ``ties`` (TIES-merging, Yadav et al. 2023, §3): trim as ``magnitude_prune``; elect a sign per
  entry (``"total"``: the sign of Σ T_i; ``"frequency"``: the sign most T_i have, ties → +); the
  result is the mean of the weighted entries ``w_i T_i`` that agree with it (disjoint merge).
* ``dare_linear`` (DARE, Yu et al. 2024, §3): drop each entry with probability ``1 − density`` and
  rescale the kept ones by ``1/density`` (so ``E[T̃_i] = T_i``), then ``Σ w_i T̃_i``.
* ``dare_ties``: DARE's random drop and rescale, then TIES' sign election and disjoint merge.

Random drops draw from the global generator (``torch.manual_seed`` makes them reproducible) in the
order of ``tensors``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.errors import ConfigError

__all__ = ["METHODS", "SIGN_METHODS", "combine", "magnitude_mask", "random_mask", "majority_sign_mask"]

METHODS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """1 for the ``⌊density · numel⌋`` entries of largest |t|, else 0 (shape of ``t``)."""
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k).indices] = 1
    return mask.reshape(t.shape)


def random_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Bernoulli(``density``) keep-mask shaped like ``t`` (one draw from the global generator)."""
    return torch.bernoulli(torch.full_like(t, density))


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """``stacked`` (n, …) → boolean (n, …): where each T_i agrees with the elected sign."""
    sign = stacked.sign()
    votes = stacked.sum(0) if method == "total" else sign.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return sign == elected


def _sparsify(t: torch.Tensor, method: str, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    if method in ("magnitude_prune", "ties"):
        return t * magnitude_mask(t, density)
    return t * random_mask(t, density) / density  # DARE: drop and rescale


def combine(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    density: float = 1.0,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """Combine ``tensors`` with ``weights`` by ``method`` (one of :data:`METHODS`); see the module
    docstring for the math. ``density`` ∈ (0, 1] is the fraction kept by the pruning methods."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: must be one of {', '.join(METHODS)}")
    if method != "linear":
        tensors = [_sparsify(t, method, density) for t in tensors]
    stacked = torch.stack(list(tensors))  # (n, …)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    weighted = stacked * w.reshape((-1,) + (1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        keep = majority_sign_mask(stacked, majority_sign_method)
        return (weighted * keep).sum(0) / keep.sum(0).clamp(min=1)
    return weighted.sum(0)
