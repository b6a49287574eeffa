"""The initialisation math (lorakit.functional.init): PiSSA is the best rank-r part of W, OLoRA and
orthogonal factors."""

from __future__ import annotations

import torch

from lorakit.functional import init as LI


def test_pissa_is_the_best_rank_r_part():
    torch.manual_seed(0)
    w = torch.randn(12, 9) @ torch.diag(torch.logspace(0, -2, 9))
    a, b, residual = LI.pissa(w, 3, 2.0)
    sv = torch.linalg.svdvals(w)
    torch.testing.assert_close(residual + 2.0 * b @ a, w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.linalg.norm(residual) ** 2, (sv[3:] ** 2).sum(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a @ a.T, b.T @ b, atol=1e-5, rtol=1e-5)  # the singular values split evenly
    torch.manual_seed(1)
    _, _, fast = LI.pissa(w, 3, 2.0, niter=4)
    assert torch.linalg.norm(fast) <= 1.01 * torch.linalg.norm(residual)


def test_olora_and_orthogonal():
    torch.manual_seed(0)
    w = torch.randn(10, 7)
    a, b, residual = LI.olora(w, 3, 0.5)
    torch.testing.assert_close(b.T @ b, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(residual + 0.5 * b @ a, w, atol=1e-6, rtol=1e-6)
    a, b = LI.orthogonal(10, 7, 4)
    assert a.shape == (4, 7) and b.shape == (10, 4) and a.abs().min() > 0
    torch.testing.assert_close(b @ a, torch.zeros(10, 7), atol=1e-7, rtol=0)


def _gradient(
    d: int, k: int, sv: list[float], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G = U diag(sv) Vᵀ with known orthonormal U (d × n), V (k × n)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, len(sv), generator=g))
    v, _ = torch.linalg.qr(torch.randn(k, len(sv), generator=g))
    return u @ torch.diag(torch.tensor(sv)) @ v.T, u, v


def test_lora_ga_takes_a_from_the_top_r_and_b_from_the_next_r_directions():
    """ArB2r / unit: A's rows span G's top-r right singular vectors, B's columns are G's next r left
    singular vectors times their singular values; the residual keeps W = W_res + s·B A. (G has rank
    2r ≤ q = 4r, so the randomized SVD is exact.)"""
    d, k, r, s = 12, 10, 2, 0.5
    grad, u, v = _gradient(d, k, [8.0, 4.0, 2.0, 1.0])
    w = torch.randn(d, k, generator=torch.Generator().manual_seed(3))
    a, b, residual = LI.lora_ga(w, grad, r, s, direction="ArB2r", scale="unit")
    torch.testing.assert_close(a.T @ a, v[:, :r] @ v[:, :r].T, atol=1e-5, rtol=0)  # same subspace
    torch.testing.assert_close(b.norm(dim=0), torch.tensor([2.0, 1.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close((b / b.norm(dim=0)).abs(), (u[:, r:]).abs(), atol=1e-5, rtol=0)
    torch.testing.assert_close(residual + s * b @ a, w, atol=1e-6, rtol=1e-6)


def test_lora_ga_scales():
    """stable: B ·= d^¼/√γ; gd_scale: both / s; weight_svd: B's first column gets σ₁(W)."""
    d, k, r, s = 16, 12, 2, 4.0
    grad, _, _ = _gradient(d, k, [8.0, 4.0, 2.0, 1.0])
    w = torch.randn(d, k, generator=torch.Generator().manual_seed(3))
    _, unit, _ = LI.lora_ga(w, grad, r, s, scale="unit")
    a_unit, _, _ = LI.lora_ga(w, grad, r, s, scale="unit")
    _, stable, _ = LI.lora_ga(w, grad, r, s, scale="stable", stable_gamma=4)
    torch.testing.assert_close(stable, unit * (d**0.25 / 2), atol=1e-6, rtol=1e-6)
    a, b, _ = LI.lora_ga(w, grad, r, s, scale="gd_scale")
    torch.testing.assert_close((a, b), (a_unit / s, unit / s), atol=1e-6, rtol=1e-6)
    low_rank, _, _ = _gradient(d, k, [9.0, 3.0], seed=5)  # rank r: the q = r randomized SVD is exact
    _, b, _ = LI.lora_ga(low_rank, grad, r, s, scale="weight_svd")
    torch.testing.assert_close(b[:, 0].norm(), torch.tensor(9.0), atol=1e-5, rtol=1e-5)


def test_lora_ga_refuses_a_rank_above_half_the_smaller_side():
    import pytest

    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="2r ≤ min"):
        LI.lora_ga(torch.zeros(6, 5), torch.ones(6, 5), 3, 1.0)
