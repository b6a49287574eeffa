"""DoRA's math (lorakit.functional.dora): a reference computed by hand, and the weight norm detached
from the graph so that only the magnitude gets its gradient."""

from __future__ import annotations

import torch

from lorakit.functional import dora as LD


def test_reference_by_hand():
    """W = [[3, 4]], A = [[1, 0]], B = [[1]], s = 1: W + ΔW = [[4, 4]], ‖·‖ = √32; with m = 2√2 the
    direction is halved: y = 0.5 · (W x + B A x) + b."""
    w, bias = torch.tensor([[3.0, 4.0]]), torch.tensor([1.0])
    a, b, m = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0]]), torch.tensor([2 * 2**0.5])
    x = torch.tensor([[2.0, 1.0]])
    y = LD.dora_linear(x, w, bias, a, b, m, 1.0)
    torch.testing.assert_close(y, torch.tensor([[0.5 * (10.0 + 2.0) + 1.0]]))
    torch.testing.assert_close(LD.magnitude_init(w, b @ a), torch.tensor([32**0.5]))


def test_norm_is_detached_magnitude_gets_gradient():
    w = torch.randn(4, 6)
    a = torch.randn(2, 6, requires_grad=True)
    b = torch.randn(4, 2, requires_grad=True)
    m = LD.magnitude_init(w, b @ a).requires_grad_(True)
    f = LD.dora_factor(m, w, (b @ a).detach())
    f.sum().backward()
    assert m.grad is not None and a.grad is None and b.grad is None
