"""Initialisations of the LoRA factors beyond the default, as pure functions on tensors.

All weights are given as (d × k) matrices (output × input; a ``Conv1D`` weight is transposed by the
caller) and results come back in float32: ``A`` (r × k), ``B`` (d × r) and, for the inits that move
the principal part of ``W`` into the adapter, the residual ``W_res = W − s · B A`` that replaces the
base weight, so the adapted layer starts out computing exactly ``W x``.

====================  =======================================================================
``init_lora_weights``  what it does
====================  =======================================================================
``True``               A ~ kaiming-uniform(a=√5), B = 0 (PEFT's default; in :mod:`functional`)
``"gaussian"``         A ~ N(0, 1/r), B = 0
``False``              A, B random (B ≠ 0: the adapter changes the output from the start)
``"pissa"``            PiSSA (Meng et al. 2024, §3): top-r SVD ``W ≈ U_r S_r V_rᵀ``;
                       ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ``; base ← ``W − s·B A``
``"pissa_niter_N"``    the same with a randomized SVD of N subspace iterations (Halko et al. 2011;
                       PiSSA §3.3 "fast SVD"), via ``torch.svd_lowrank``
``"olora"``            OLoRA (Büyükakyüz 2024, §3): ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``;
                       base ← ``W − s·B A``
``"orthogonal"``       A and B from complementary halves of a random orthogonal r × r matrix, so
                       ``B A = 0`` exactly while both are non-zero; base untouched (r even)
``"lora_ga"``          LoRA-GA (Wang et al. 2024, §3.2): from the SVD of an estimate G of the
                       loss gradient w.r.t. W, A and B take r of G's first 2r singular
                       directions each; base ← ``W − s·B A`` (see :func:`lora_ga`)
====================  =======================================================================
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError

__all__ = ["pissa", "olora", "orthogonal", "lora_ga"]


def _residual(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return weight.float() - s * (b @ a)


@torch.no_grad()
def pissa(
    weight: torch.Tensor, r: int, s: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA: the principal rank-r part of ``W`` (d × k) becomes ``s · B A``.

    ``W = U S Vᵀ``; ``A = diag(√(S_r/s)) V_rᵀ`` (r × k), ``B = U_r diag(√(S_r/s))`` (d × r), so
    ``s · B A = U_r S_r V_rᵀ``. With ``niter`` the SVD is randomized (``torch.svd_lowrank``,
    drawing from the global generator). Returns ``(A, B, W − s·B A)`` in float32.
    """
    w = weight.float()
    if niter is None:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], sv[:r], vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(w, q=r, niter=niter)
        vh_r = v_r.T
    root = torch.sqrt(s_r / s)
    a = (root[:, None] * vh_r).contiguous()  # (r, k)
    b = (u_r * root[None, :]).contiguous()  # (d, r)
    return a, b, _residual(w, a, b, s)


@torch.no_grad()
def olora(weight: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA: ``W = Q R`` (d × k); ``B = Q[:, :r]`` (d × r, orthonormal columns), ``A = R[:r]``
    (r × k). Returns ``(A, B, W − s·B A)`` in float32."""
    q, rr = torch.linalg.qr(weight.float())
    a, b = rr[:r].contiguous(), q[:, :r].contiguous()
    return a, b, _residual(weight, a, b, s)


@torch.no_grad()
def orthogonal(d: int, k: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal init: ``Q`` from the QR of an r × r Gaussian; ``A = (G_A Q_odd)ᵀ / 10`` with
    G_A (k × r/2) and ``B = G_B Q_even / 10`` with G_B (d × r/2), where Q_odd / Q_even are Q's
    even-/odd-indexed rows. Rows of Q are orthonormal, so ``Q_even Q_oddᵀ = 0`` and ``B A = 0``.

    Draws from the global generator in PEFT's order, so a seed gives PEFT's tensors.
    Returns ``(A (r × k), B (d × r))``.
    """
    if r % 2:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank r, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = q[0::2, :], q[1::2, :]
    a = (torch.randn(k, r // 2) @ q_odd).T / 10.0
    b = torch.randn(r // 2, d).T @ q_even / 10.0
    return a.contiguous(), b.contiguous()


@torch.no_grad()
def lora_ga(
    weight: torch.Tensor,
    grad: torch.Tensor,
    r: int,
    s: float,
    *,
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-GA's factors from ``grad`` ≈ ∂L/∂W (d × k), as PEFT 0.21.2 computes them.

    ``G ≈ U diag(S) Vᵀ`` by a randomized SVD (``torch.svd_lowrank``, q = min(4r, d, k), 4
    iterations, from the global generator) and, of the first 2r directions, ``direction`` picks
    index sets I_A and I_B of r each: ``"ArB2r"`` I_A = 1..r, I_B = r+1..2r (the paper's choice,
    §3.2); ``"A2rBr"`` the reverse; ``"ArBr"`` odd / even; ``"random"`` a random r of 2r for
    both. Then ``A = V_{I_A}ᵀ`` (r × k) and ``B = U_{I_B} diag(S_{I_B})`` (d × r), scaled by
    ``scale``: ``"stable"`` B ·= d^¼ / √stable_gamma (§3.3); ``"weight_svd"`` B ·= σ₁(W) / S_{I_B,1};
    ``"gd_scale"`` A /= s and B /= s; ``"unit"`` nothing.

    (The authors' code scales both A and B by d^¼/√γ and leaves out ``diag(S_{I_B})``; PEFT's
    choice is kept here so that a PEFT user gets the same initialisation.)

    Returns ``(A, B, W − s·B A)`` in float32.
    """
    d, k = weight.shape
    if 2 * r > min(d, k):
        raise ConfigError(f"LoRA-GA needs 2r ≤ min(d, k): r={r} for a {d} × {k} weight")
    u, sv, v = torch.svd_lowrank(grad.float(), q=min(4 * r, d, k), niter=4)
    u, sv, vh = u[:, : 2 * r], sv[: 2 * r], v.T[: 2 * r]
    if direction == "ArBr":
        ia, ib = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "A2rBr":
        ia, ib = torch.arange(r, 2 * r), torch.arange(r)
    elif direction == "ArB2r":
        ia, ib = torch.arange(r), torch.arange(r, 2 * r)
    elif direction == "random":
        ia = ib = torch.randperm(2 * r)[:r]
    else:
        raise ConfigError(f"LoRA-GA direction={direction!r}: must be ArBr, A2rBr, ArB2r or random")
    a = vh[ia].contiguous()  # (r, k)
    b = u[:, ib] * sv[ib]  # (d, r)
    if scale == "stable":
        b = b * (d**0.25 / stable_gamma**0.5)
    elif scale == "weight_svd":
        _, weight_sv, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if sv[ib][0] > 0:
            b = b * (weight_sv[0] / sv[ib][0])
    elif scale == "gd_scale":
        a, b = a / s, b / s
    elif scale != "unit":
        raise ConfigError(f"LoRA-GA scale={scale!r}: must be stable, weight_svd, gd_scale or unit")
    b = b.contiguous()
    return a, b, _residual(weight, a, b, s)
