"""The math of LoRA on experts: PEFT's stacked factor layout, ΔW per expert, and the grouped low-rank
term, against hand-built layouts and a plain per-row reference."""

from __future__ import annotations

import pytest
import torch

from lorakit.functional import experts as FE
from lorakit.functional.dropout import dropout_keep_mask

E, R, K, D = 3, 2, 5, 4  # experts, rank, in, out


def _factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E * R, K, generator=gen), torch.randn(D, R * E, generator=gen)


def test_expert_factors_read_peft_layout():
    """A: expert-major rows (row e·r + j); B: rank-major columns (column j·E + e)."""
    lora_a, lora_b = _factors()
    a, b = FE.expert_factors(lora_a, lora_b, E)
    assert a.shape == (E, R, K) and b.shape == (E, D, R)
    for e in range(E):
        for j in range(R):
            assert torch.equal(a[e, j], lora_a[e * R + j])
            assert torch.equal(b[e, :, j], lora_b[:, j * E + e])
    assert a.data_ptr() == lora_a.data_ptr() and b.data_ptr() == lora_b.data_ptr()  # views


def test_expert_delta_is_peft_einsum():
    lora_a, lora_b = _factors()
    # PEFT 0.21.2 ParamWrapper.get_delta_weight, for weights stored (experts, out, in)
    ref = torch.einsum("o r e, e r i -> e o i", lora_b.reshape(D, R, E), lora_a.reshape(E, R, K)) * 0.5
    assert torch.allclose(FE.expert_delta(lora_a, lora_b, E, 0.5), ref, rtol=0, atol=8 * R * 2**-24 * 10)


def test_group_counts_from_offsets():
    assert FE.group_counts(torch.tensor([2, 2, 5], dtype=torch.int32)) == [2, 0, 3]


def _reference(x, a, b, s, row_expert, keep=None, p=0.0):
    """Row by row: s · B_e (A_e · dropout(x_i)) for the row's expert e (float64)."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for i, e in enumerate(row_expert):
        if e < 0:
            continue
        xi = x[i].double() if keep is None else x[i].double() * keep[i] / (1 - p)
        out[i] = s * b[e].double() @ (a[e].double() @ xi)
    return out


@pytest.mark.parametrize("ordered", [False, True])
def test_grouped_lora_equals_rows_and_its_gradients(ordered):
    gen = torch.Generator().manual_seed(1)
    counts = [3, 0, 4]  # a group without rows; 1 row past the groups (an expert-parallel sentinel)
    n = sum(counts) + 1
    x = torch.randn(n, K, generator=gen, requires_grad=True)
    a = torch.randn(E, R, K, generator=gen, requires_grad=True)
    b = torch.randn(E, D, R, generator=gen, requires_grad=True)
    if ordered:
        order = torch.randperm(n - 1, generator=gen)
        row_expert = [-1] * n
        for pos, row in enumerate(order.tolist()):
            row_expert[row] = 0 if pos < 3 else 2
    else:
        order, row_expert = None, [0, 0, 0, 2, 2, 2, 2, -1]
    term = FE.grouped_lora(x, a, b, 0.5, counts, order=order)
    ref = _reference(x.detach(), a.detach(), b.detach(), 0.5, row_expert)
    # float32 against float64: two products of lengths K and R, one rounding each (Higham §3.1)
    tol = (K + R) * 2**-24 * 4 * ref.abs().max().item()
    assert torch.allclose(term.double(), ref, rtol=0, atol=tol)
    g = torch.randn(term.shape, generator=gen)
    grads = torch.autograd.grad((term * g).sum(), (x, a, b))
    xr, ar, br = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    ref_grads = torch.autograd.grad(
        (_reference_autograd(xr, ar, br, 0.5, row_expert) * g.double()).sum(), (xr, ar, br)
    )
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got.double(), want, rtol=0, atol=(D + K) * 2**-24 * 8 * want.abs().max().item())
    assert grads[0][-1].abs().sum() == 0  # the sentinel row gets nothing


def _reference_autograd(x, a, b, s, row_expert):
    rows = [
        s * b[e] @ (a[e] @ x[i]) if e >= 0 else torch.zeros(b.shape[1], dtype=x.dtype)
        for i, e in enumerate(row_expert)
    ]
    return torch.stack(rows)


def test_grouped_lora_dropout_is_the_reference_on_the_masked_input():
    """With dropout the term is the reference on ``x ⊙ keep / (1 − p)``, ``keep`` drawn from the
    global generator as :func:`dropout_keep_mask` draws it (reseeding redraws the same mask), and
    ∂x is zero exactly where an element was dropped."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, K, generator=gen, requires_grad=True)
    a = torch.randn(E, R, K, generator=gen, requires_grad=True)
    b = torch.randn(E, D, R, generator=gen, requires_grad=True)
    torch.manual_seed(7)
    term = FE.grouped_lora(x, a, b, 1.0, [2, 2, 2], dropout_p=0.5)
    torch.manual_seed(7)
    keep = dropout_keep_mask(x.detach(), 0.5)
    assert 0 < keep.float().mean() < 1
    ref = _reference(x.detach(), a.detach(), b.detach(), 1.0, [0, 0, 1, 1, 2, 2], keep.double(), 0.5)
    assert torch.allclose(term.double(), ref, rtol=0, atol=(K + R) * 2**-24 * 8 * ref.abs().max().item())
    term.sum().backward()
    assert torch.equal(x.grad == 0, ~keep)


def test_grouped_lora_without_autograd_keeps_nothing():
    x, (a, b) = torch.randn(4, K), (torch.randn(E, R, K), torch.randn(E, D, R))
    term = FE.grouped_lora(x, a, b, 2.0, [1, 1, 2])
    assert term.grad_fn is None
    ref = _reference(x, a, b, 2.0, [0, 1, 2, 2])
    assert torch.allclose(term.double(), ref, rtol=0, atol=(K + R) * 2**-24 * 4 * ref.abs().max().item())
