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


def _grid(step: float):
    """A toy quantizer: round to multiples of ``step`` (its error is at most step / 2 per entry)."""
    return lambda w: torch.round(w / step) * step


def test_loftq_one_round_leaves_exactly_the_tail_of_the_quantization_residual():
    torch.manual_seed(0)
    w = torch.randn(12, 10)
    for s in (0.25, 1.0, 4.0):
        a, b, q = LI.loftq(w, 3, s, _grid(0.5), iters=1)
        assert a.shape == (3, 10) and b.shape == (12, 3)
        assert torch.equal(q, _grid(0.5)(w))
        tail = torch.linalg.svdvals(w - q)[3:].square().sum().sqrt()  # Eckart–Young
        assert torch.allclose((w - q - s * b @ a).norm(), tail, rtol=1e-5)


def test_loftq_accounts_for_the_scaling_and_alternating_does_not_hurt():
    torch.manual_seed(0)
    w = torch.randn(16, 16)
    products = [s * torch.mm(*LI.loftq(w, 4, s, _grid(0.5), iters=1)[1::-1]) for s in (0.5, 2.0, 8.0)]
    assert all(torch.allclose(p, products[0], atol=1e-5) for p in products)  # s·B A does not depend on s
    errors = []
    for iters in (1, 2, 4):
        a, b, q = LI.loftq(w, 4, 2.0, _grid(0.5), iters=iters)
        errors.append(float((w - q - 2.0 * b @ a).norm()))
    assert errors[-1] <= errors[0] * (1 + 1e-6) and errors[0] < float((w - _grid(0.5)(w)).norm())
