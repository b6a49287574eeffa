"""EVA's math (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation", §3), as pure functions on tensors.

EVA initialises a layer's A (r × k) with the top right-singular vectors of the layer's centred input
activations X (n × k), i.e. the principal directions of its inputs, and hands the rank budget
``Σ_layers r`` to the layers whose components explain the most variance.

The SVD is incremental (Ross et al. 2008, "Incremental Learning for Robust Visual Tracking", §3.1;
the same scheme as scikit-learn's ``IncrementalPCA``): after batches ``X_1..X_t`` the state holds
only the mean μ, the per-feature variance, the count n, the top components ``V_c`` (c × k) and their
singular values ``S_c``. A new batch ``X`` (m × k) with mean ``x̄`` updates it through the SVD of

    [ diag(S_c) V_c ;  X − x̄ ;  √(n·m / (n+m)) · (μ − x̄) ]      ((c + m + 1) × k)

whose top right-singular vectors are the components of all n + m rows, centred at the new mean. No
activation is kept beyond the current batch. The SVD is randomized (Halko et al. 2011, via
``torch.svd_lowrank`` with q = 2c columns and 4 power iterations) from a fixed seed, so a run is
reproducible; the first batch is decomposed in float32, later ones in float64 (they carry the
accumulated state). This is the arithmetic of PEFT's EVA, so a seed gives PEFT's components.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping

import torch
import torch.nn.functional as F

__all__ = ["SvdState", "svd_update", "converged", "redistribute_ranks", "SVD_SEED", "SVD_NITER"]

SVD_SEED = 42  # the randomized SVD's seed (PEFT's)
SVD_NITER = 4  # its power iterations


@dataclasses.dataclass(frozen=True)
class SvdState:
    """The running decomposition of one layer's centred inputs.

    ``components`` (c × k): the top right-singular vectors as rows, sign-normalised (each row's
    largest-magnitude entry is positive); ``singular_values`` (c,); ``explained_variance_ratio``
    (c,): ``S_i² / Σ_features n·var``; ``mean`` and ``var`` (k,, float64) over the ``count`` rows seen.
    """

    components: torch.Tensor
    singular_values: torch.Tensor
    explained_variance_ratio: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    count: int


def _randomized_svd(x: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Vᵀ) of ``x`` from a randomized SVD seeded with :data:`SVD_SEED` (the global generator is
    left as it was)."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SVD_SEED)
        _, s, v = torch.svd_lowrank(x, q=q, niter=SVD_NITER)
    return s, v.mT


def _sign_normalised(vt: torch.Tensor) -> torch.Tensor:
    """Each row times the sign of its largest-magnitude entry, so that a component's sign does not
    flip between batches."""
    rows = torch.arange(vt.shape[0], device=vt.device)
    signs = torch.sign(vt[rows, vt.abs().argmax(dim=1)])
    return vt * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]


@torch.no_grad()
def svd_update(state: SvdState | None, x: torch.Tensor, n_components: int) -> SvdState:
    """The state after one more batch ``x`` (m × k) of a layer's inputs; ``state=None`` starts.

    ``n_components`` (c) must not exceed ``m`` on the first batch nor ``k``.
    """
    m = x.shape[0]
    batch_sum = x.sum(dim=0, dtype=torch.float64)  # (k,)
    batch_mean = batch_sum / m
    batch_m2 = ((x.double() - batch_mean) ** 2).sum(dim=0)  # Σ (x − x̄)², (k,)
    if state is None:
        count, mean, m2 = m, batch_mean, batch_m2
        stacked = (x.double() - mean).float()  # (m, k), the first batch in float32
    else:
        n = state.count
        count = n + m
        mean = (state.mean * n + batch_sum) / count
        # Chan et al. (1979): the spread of the union is both spreads plus the gap of the means.
        m2 = state.var * n + batch_m2 + (n * m / count) * (state.mean - batch_mean) ** 2
        correction = (n * m / count) ** 0.5 * (state.mean - batch_mean)  # (k,)
        stacked = torch.cat(
            [
                state.singular_values.double()[:, None] * state.components.double(),  # (c, k)
                x.double() - x.mean(dim=0).double(),  # (m, k)
                correction[None, :],  # (1, k)
            ]
        )
    s, vt = _randomized_svd(stacked, q=2 * n_components)
    vt = _sign_normalised(vt)
    total = m2.sum()  # Σ_features n·var
    return SvdState(
        components=vt[:n_components],
        singular_values=s[:n_components],
        explained_variance_ratio=(s[:n_components] ** 2 / total),
        mean=mean,
        var=m2 / count,
        count=count,
    )


def converged(previous: SvdState | None, current: SvdState, tau: float) -> torch.Tensor:
    """Per component (c,): whether its cosine similarity with the previous batch's is ≥ ``tau``
    (all ``False`` after the first batch)."""
    if previous is None:
        return torch.zeros(current.components.shape[0], dtype=torch.bool)
    sim = F.cosine_similarity(current.components.double(), previous.components.double(), dim=1)
    return (sim >= tau).cpu()


def redistribute_ranks(
    ratios: Mapping[str, torch.Tensor], budget: int, head_of: Mapping[str, str] | None = None
) -> dict[str, int]:
    """EVA's rank allocation (§3, "adaptive rank allocation"): pool every layer's explained variance
    ratios, keep the ``budget`` largest, and give each layer as many as it holds.

    ``ratios``: layer → its ratios (already cut to the layer's largest allowed rank), in the order
    they are pooled. Ties are broken as torch's (unstable) sort breaks them on that order, which is
    what PEFT does, so the same ratios give PEFT's ranks. ``head_of`` maps a layer to the first
    layer of its group of identical inputs: the first layer then takes the largest rank of its
    group (its SVD's convergence is checked for that many components). Returns layer → rank (0 for
    a layer that keeps none).
    """
    names = [name for name, values in ratios.items() for _ in range(len(values))]
    if not names:
        return dict.fromkeys(ratios, 0)
    pooled = torch.cat([values.double().cpu() for values in ratios.values()])
    order = torch.argsort(pooled, descending=True)[:budget]
    counts = Counter(names[i] for i in order.tolist())
    ranks = {name: counts.get(name, 0) for name in ratios}
    for name, head in (head_of or {}).items():
        if ranks[head] < ranks[name]:
            ranks[head], ranks[name] = ranks[name], ranks[head]
    return ranks
