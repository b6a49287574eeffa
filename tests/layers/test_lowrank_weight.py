"""The stand-in weight ``W + Σ s·b a``: every use an experts forward makes of it equals the same use
of the dense weight ``W + ΔW`` (what PEFT forms), and every other use that would compute with the
weight is refused instead of silently dropping the adapter.

Tolerances: float32, each compared product has reduction length at most K + R (the base sum and the
rank-R term) and one rounding per step, so results differ by at most (K + R)·u·Σ|terms| (Higham
§3.1); ``_close`` allows 4× that relative to the reference's largest element.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import AdapterError
from lorakit.layers.lowrank_weight import LowRankWeight, Term

E, M, N, R = 3, 4, 8, 2  # experts, rows, columns (grouped_mm wants 16-byte rows), rank
S = 0.5
U = 2**-24


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    tol = 4 * (max(M, N) + R) * U * float(want.detach().abs().max())
    return bool(torch.allclose(got, want, rtol=0, atol=tol))


@pytest.fixture
def parts():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(E, M, N, generator=gen)
    a = torch.randn(E, R, N, generator=gen, requires_grad=True)
    b = torch.randn(E, M, R, generator=gen, requires_grad=True)
    return w, a, b


def _adapted(w, a, b):
    return LowRankWeight(w, [Term(a, b, S, 0.0)], "Experts.w")


def _dense(w, a, b):
    return w + S * b @ a  # (E, M, N)


def test_metadata_is_the_weights(parts):
    w, a, b = parts
    lw = _adapted(w, a, b)
    assert lw.shape == w.shape and lw.dtype == w.dtype and lw.device == w.device
    assert lw.size(0) == E and lw.dim() == 3 and lw.requires_grad == w.requires_grad
    assert isinstance(lw, torch.Tensor)


@pytest.mark.parametrize("index", [1, torch.tensor(2)])
def test_one_expert_through_f_linear_and_matmul(parts, index):
    w, a, b = parts
    lw, dense = _adapted(w, a, b), _dense(w, a, b)
    x = torch.randn(5, N)
    assert _close(F.linear(x, lw[index]), F.linear(x, dense[index]))
    y = torch.randn(5, M)
    for transposed in (lw[index].T, lw[index].t(), lw[index].mT, lw[index].transpose(0, 1)):
        assert _close(x @ transposed, x @ dense[index].T)
        assert _close(torch.matmul(x, transposed), x @ dense[index].T)
    assert _close(lw[index] @ x.T, dense[index] @ x.T)  # the weight on the left
    assert _close(torch.mm(y, lw[index]), y @ dense[index])


def test_casts_keep_the_adapter(parts):
    w, a, b = parts
    lw, dense = _adapted(w, a, b), _dense(w, a, b)
    x = torch.randn(5, M)
    for cast in (lw[0].float(), lw[0].to(torch.float32), lw[0].type(torch.float32), lw[0].contiguous()):
        assert _close(x @ cast, x @ dense[0])
    assert lw.type() == "torch.FloatTensor"  # a read, not a cast


def test_gathered_experts_through_bmm(parts):
    """``batched_mm``: W[ids] per row, both orientations."""
    w, a, b = parts
    lw, dense = _adapted(w, a, b), _dense(w, a, b)
    ids = torch.tensor([2, 0, 2, 1, 0])
    x = torch.randn(5, N)
    got = torch.bmm(lw[ids], x.unsqueeze(-1)).squeeze(-1)  # (S, M, N) @ (S, N, 1)
    assert _close(got, torch.bmm(dense[ids], x.unsqueeze(-1)).squeeze(-1))
    y = torch.randn(5, M)
    got = torch.bmm(y.unsqueeze(1), lw[ids]).squeeze(1)  # (S, 1, M) @ (S, M, N)
    assert _close(got, torch.bmm(y.unsqueeze(1), dense[ids]).squeeze(1))


def test_all_experts_through_bmm(parts):
    """Llama4: rows grouped by expert, bmm(x (E, T, M), W (E, M, N))."""
    w, a, b = parts
    lw, dense = _adapted(w, a, b), _dense(w, a, b)
    x = torch.randn(E, 3, M)
    assert _close(torch.bmm(x, lw), torch.bmm(x, dense))
    assert _close(x @ lw, x @ dense)
    z = torch.randn(E, 3, N)
    assert _close(torch.bmm(z, lw.transpose(1, 2)), torch.bmm(z, dense.transpose(1, 2)))


@pytest.mark.parametrize("op", ["torch._grouped_mm", "F.grouped_mm"])
def test_grouped_products_and_gradients(parts, op):
    """``grouped_mm``: rows sorted by expert with cumulative ends ``offs`` (expert 1 has none)."""
    w, a, b = parts
    product = torch._grouped_mm if op == "torch._grouped_mm" else F.grouped_mm
    counts = [3, 0, 5]
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    x = torch.randn(sum(counts), N, requires_grad=True)
    weight_t = _adapted(w, a, b).transpose(-2, -1)  # (E, N, M): x @ W_eᵀ
    got = product(x, weight_t.contiguous(), offs=offs)
    dense = _dense(w, a, b)
    want = torch.cat([x[:3] @ dense[0].T, x[3:] @ dense[2].T])
    assert _close(got, want)
    g = torch.randn(got.shape)
    grads = torch.autograd.grad((got * g).sum(), (x, a, b))
    want_grads = torch.autograd.grad((want * g).sum(), (x, a, b))
    for have, ref in zip(grads, want_grads, strict=True):
        assert _close(have, ref)


def test_transformers_fallback_grouped_product(parts):
    pytest.importorskip("transformers.integrations.moe")
    w, a, b = parts
    offs = torch.tensor([2, 4, 4], dtype=torch.int32)
    x = torch.randn(4, N)
    got = torch.ops.transformers.grouped_mm_fallback(x, _adapted(w, a, b).transpose(-2, -1), offs)
    dense = _dense(w, a, b)
    assert _close(got, torch.cat([x[:2] @ dense[0].T, x[2:] @ dense[1].T]))


def test_a_matrix_with_shared_factors():
    """A 2-D parameter (one expert): F.linear and both sides of a product."""
    gen = torch.Generator().manual_seed(1)
    w, a, b = (
        torch.randn(M, N, generator=gen),
        torch.randn(R, N, generator=gen),
        torch.randn(M, R, generator=gen),
    )
    lw, dense = LowRankWeight(w, [Term(a, b, S, 0.0)], "m.weight"), w + S * b @ a
    x = torch.randn(2, 5, N)
    assert _close(F.linear(x, lw), F.linear(x, dense))
    assert _close(F.linear(x, lw.type(torch.float32)), F.linear(x, dense))
    y = torch.randn(5, M)
    assert _close(y @ lw, y @ dense)


def test_several_adapters_add():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(M, N, generator=gen)
    terms = [
        Term(torch.randn(R, N, generator=gen), torch.randn(M, R, generator=gen), s, 0.0) for s in (1.0, 0.25)
    ]
    dense = w + sum(t.s * t.b @ t.a for t in terms)
    x = torch.randn(3, N)
    assert _close(F.linear(x, LowRankWeight(w, terms, "m.weight")), F.linear(x, dense))


@pytest.mark.parametrize(
    "use",
    [
        lambda lw: lw + 1,
        lambda lw: lw.sum(),
        lambda lw: lw.data,
        lambda lw: lw.detach(),
        lambda lw: torch.cat([lw, lw]),
        lambda lw: lw[:, 0],
        lambda lw: lw[torch.tensor([True, False, True])],
        lambda lw: lw.view(E * M, N),
        lambda lw: lw.T,  # reverses all three axes
        lambda lw: lw.to(torch.int32),
        lambda lw: F.linear(lw[0], torch.randn(2, N)),  # the weight as the input
        lambda lw: lw[0] @ lw[1].T,
        lambda lw: torch.matmul(lw[0], torch.randn(N)),
    ],
)
def test_other_uses_are_refused(parts, use):
    w, a, b = parts
    with pytest.raises(AdapterError, match=r"Experts\.w was used in .*cannot add the adapter's term"):
        use(_adapted(w, a, b))
