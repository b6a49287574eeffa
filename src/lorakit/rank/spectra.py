"""The spectrum of a LoRA update, computed from its factors.

``ΔW = s · B A`` with B (d × r), A (r × k) has rank ≤ r. With the thin QR decompositions
``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (R_B, R_A r × r),

    ΔW = Q_B (s · R_B R_Aᵀ) Q_Aᵀ = (Q_B U) Σ (Q_A V)ᵀ,  where  s · R_B R_Aᵀ = U Σ Vᵀ,

so the singular values of the d × k matrix are those of an r × r core: O((d + k) r²) work, and the
d × k matrix is never formed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = [
    "Spectrum",
    "lowrank_svd",
    "spectrum",
    "effective_rank",
    "stable_rank",
    "rank_for_energy",
    "energy_curve",
    "rank_keeping",
    "relative_error",
    "split_svd",
]

ENERGY_LEVELS = (0.90, 0.95, 0.99)


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """Singular values of one module's ΔW and the numbers derived from them.

    ``energy[i]`` is the share of ‖ΔW‖_F² kept by the best rank-(i+1) approximation;
    ``ranks_for_energy[e]`` the smallest rank keeping at least ``e`` of it.
    """

    singular_values: list[float]
    energy: list[float]
    effective_rank: float
    stable_rank: float
    ranks_for_energy: dict[float, int]

    @property
    def rank(self) -> int:
        return len(self.singular_values)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["ranks_for_energy"] = {f"{k:.2f}": v for k, v in self.ranks_for_energy.items()}
        return out


def lowrank_svd(
    lora_a: torch.Tensor, lora_b: torch.Tensor, s: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ΔW = s · B A = U diag(σ) Vᵀ`` from the factors, in float64.

    A: (r, k), B: (d, r) → U (d, r), σ (r,) descending, V (k, r). Conv factors are flattened to
    A (r, C_in·kh·kw) and B (C_out, r).
    """
    a = lora_a.detach().to(torch.float64).flatten(1)  # (r, k)
    b = lora_b.detach().to(torch.float64).flatten(1)  # (d, r)
    q_b, r_b = torch.linalg.qr(b)  # (d, r), (r, r)
    q_a, r_a = torch.linalg.qr(a.T)  # (k, r), (r, r)
    u, sigma, vh = torch.linalg.svd(s * (r_b @ r_a.T))
    return q_b @ u, sigma, q_a @ vh.T


def effective_rank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli (2007): ``exp(H(p))`` with ``p_i = σ_i / Σ σ``; 0 for a zero update."""
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(math.exp(float(-(p * p.log()).sum())))


def stable_rank(sigma: torch.Tensor) -> float:
    """``‖ΔW‖_F² / ‖ΔW‖_2²`` (0 for a zero update)."""
    top = float(sigma.max()) if sigma.numel() else 0.0
    return float((sigma**2).sum()) / top**2 if top > 0 else 0.0


def rank_for_energy(energy: list[float], level: float) -> int:
    """The smallest rank whose share of ‖ΔW‖_F² is at least ``level`` (0 for a zero update)."""
    if not energy or energy[-1] <= 0:
        return 0
    for i, e in enumerate(energy):
        if e >= level - 1e-12:
            return i + 1
    return len(energy)


def energy_curve(sigma: torch.Tensor) -> list[float]:
    """Share of ``Σ σ_i²`` kept by the best rank-1, rank-2, … approximation (zeros if σ = 0)."""
    sq = sigma**2
    total = float(sq.sum())
    return (sq.cumsum(0) / total).tolist() if total > 0 else [0.0] * sigma.numel()


def rank_keeping(sigma: torch.Tensor, energy: float) -> int:
    """The smallest rank (at least 1) keeping ``energy`` of ``Σ σ_i²``."""
    return max(1, rank_for_energy(energy_curve(sigma), energy))


def relative_error(sigma: torch.Tensor, k: int) -> float:
    """``sqrt(Σ_{i>k} σ_i² / Σ_i σ_i²)``: the relative Frobenius error of the best rank-k
    approximation (Eckart & Young 1936); 0 for a zero matrix or k ≥ rank."""
    total = float((sigma**2).sum())
    return math.sqrt(float((sigma[k:] ** 2).sum()) / total) if total > 0 else 0.0


def split_svd(
    u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, k: int, s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of ``U diag(σ) Vᵀ`` for scaling ``s``: A (k, n) and B (m, k) with
    ``s · B A`` the best rank-k approximation; ``B = U_k Σ_k^{1/2} / √s``, ``A = Σ_k^{1/2} V_kᵀ / √s``.
    Past the rank, rows of A and columns of B are zero (growing is lossless). float64."""
    keep = min(k, sigma.numel())
    root = (sigma[:keep].double() / s).sqrt()
    a = torch.zeros(k, v.shape[0], dtype=torch.float64)
    b = torch.zeros(u.shape[0], k, dtype=torch.float64)
    a[:keep] = root[:, None] * v[:, :keep].double().T
    b[:, :keep] = u[:, :keep].double() * root[None, :]
    return a, b


def spectrum(lora_a: torch.Tensor, lora_b: torch.Tensor, s: float) -> Spectrum:
    """Singular values, energy curve, effective and stable rank of ``s · B A``."""
    _, sigma, _ = lowrank_svd(lora_a, lora_b, s)
    energy = energy_curve(sigma)
    return Spectrum(
        singular_values=sigma.tolist(),
        energy=energy,
        effective_rank=effective_rank(sigma),
        stable_rank=stable_rank(sigma),
        ranks_for_energy={level: rank_for_energy(energy, level) for level in ENERGY_LEVELS},
    )
