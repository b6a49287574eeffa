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
