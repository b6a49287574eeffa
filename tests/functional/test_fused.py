"""The fused LoRA linear path (lorakit.functional.fused) equals the plain reference: outputs and
gradients, with and without dropout, under autocast and without a graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.functional import dropout as LD
from lorakit.functional import fused


def _reference(result, x, a, b, s, p, keep, bias):
    xc = x.to(fused.compute_dtype(x))
    xd = LD.apply_dropout(xc, keep, p) if p > 0 else xc
    dtype = xc.dtype
    out = F.linear(F.linear(xd, a.to(dtype)), b.to(dtype), None if bias is None else bias.to(dtype))
    return result + out * s


def _leaves(dtype, bias, shape=(3, 5, 16), values=None):
    """x and W in ``dtype``, holding numbers representable in ``values`` (default: ``dtype``)."""
    torch.manual_seed(0)
    x = torch.randn(*shape).to(values or dtype).to(dtype).requires_grad_(True)
    w = torch.randn(24, shape[-1]).to(values or dtype).to(dtype)
    a = torch.randn(4, shape[-1], requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    bb = torch.randn(24, requires_grad=True) if bias else None
    return x, w, a, b, bb


def _run(kind, dtype, p, bias, shape, fast, values=None, s=2.0):
    """Outputs and gradients (x, A, B[, b_B]) of one path: ``fast`` is lorakit.fused's ``kind``."""
    x, w, a, b, bb = _leaves(dtype, bias and kind == "accumulate", shape, values)
    base_bias = None
    if kind == "with_base" and bias:
        base_bias = torch.randn(w.shape[0]).to(values or dtype).to(dtype)
    torch.manual_seed(123)
    if fast and kind == "accumulate":
        out = fused.lora_linear_accumulate_(F.linear(x, w), x, a, b, s, p, True, bb)
    elif fast:
        out = fused.lora_linear_with_base(x, w, base_bias, a, b, s, p, True)
    else:
        keep = LD.dropout_keep_mask(x, p) if p > 0 else None  # the same draw as the fast path
        out = _reference(F.linear(x, w, base_bias), x, a, b, s, p, keep, bb)
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    out.backward(g)
    return [out.detach(), x.grad, a.grad, b.grad] + ([bb.grad] if bb is not None else [])


FAST_CASES = pytest.mark.parametrize(
    ("kind", "p", "bias", "shape"),
    [
        pytest.param(kind, p, bias, shape, id=f"{shape_id}-{bias}-{p}-{kind}")
        for shape, shape_id in (((3, 5, 16), "3d"), ((7, 16), "2d"))
        for bias in (False, True)
        for p in (0.0, 0.25)
        for kind in ("accumulate", "with_base")
    ],
)


@FAST_CASES
def test_fast_equals_reference_outputs_and_gradients_bit_for_bit_in_float32(kind, p, bias, shape):
    """In float32 with s = 2 (a power of two: ``s · (h Bᵀ)`` is exact) the fast path's outputs and
    gradients are the reference's, bit for bit."""
    dtype = torch.float32
    fast_ts, ref_ts = _run(kind, dtype, p, bias, shape, True), _run(kind, dtype, p, bias, shape, False)
    for fast_t, ref_t in zip(fast_ts, ref_ts, strict=True):
        assert fast_t.dtype == ref_t.dtype
        torch.testing.assert_close(fast_t, ref_t, rtol=0, atol=0)


@FAST_CASES
def test_fast_is_as_close_to_the_float64_truth_as_the_reference_in_bfloat16(kind, p, bias, shape):
    """In bfloat16 the fast path accumulates the rank-r product inside the GEMM (one rounding where
    the reference rounds twice), so it is compared with the float64 truth and must be at least as
    close as the reference (plus one rounding step)."""
    dtype = torch.bfloat16
    fast_ts, ref_ts = _run(kind, dtype, p, bias, shape, True), _run(kind, dtype, p, bias, shape, False)
    for fast_t, ref_t in zip(fast_ts, ref_ts, strict=True):
        assert fast_t.dtype == ref_t.dtype
    truth = _run(kind, torch.float64, p, bias, shape, False, values=dtype)
    for fast_t, ref_t, true_t in zip(fast_ts, ref_ts, truth, strict=True):
        ulp = true_t.abs().max().item() * 2.0**-7
        fast_err = (fast_t.double() - true_t).abs().max().item()
        ref_err = (ref_t.double() - true_t).abs().max().item()
        assert fast_err <= ref_err + ulp


def test_inference_path_matches_reference_without_graph():
    x, w, a, b, bb = _leaves(torch.float32, True)
    with torch.no_grad():
        fast = fused.lora_linear_accumulate_(F.linear(x, w), x, a, b, 0.5, 0.3, False, bb)
        ref = _reference(F.linear(x, w), x, a, b, 0.5, 0.0, None, bb)
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)


def test_autocast_computes_in_the_autocast_dtype():
    x, w, a, b, _ = _leaves(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = F.linear(x, w)
        out = fused.lora_linear_accumulate_(result, x, a, b, 2.0, 0.0, True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


# -- a scaling that rounds: within the floating-point error of the operations ---------------------------
U = 2.0**-24  # float32's unit roundoff


def _gamma(n: int) -> float:
    """γₙ = n·u / (1 − n·u): the relative error bound of n roundings (Higham, Accuracy and Stability of
    Numerical Algorithms, §3.1); a length-n dot product computed in any order is within γₙ·Σ|terms|."""
    return n * U / (1 - n * U)


def _error_bounds(kind, p, shape, s):
    """Per element of (output, ∂x, ∂A, ∂B): ``(M, n)`` such that either path computes that element
    within ``γₙ · M`` of its exact value. ``M`` is the computation redone in float64 on the absolute
    values of the actual operands; ``n`` counts the roundings along the longest chain of it.

    Shared by both paths, bit for bit (the same ops on the same tensors): the base output
    ``c = x Wᵀ``, the dropped-out input ``xd`` and ``h = xd Aᵀ`` (N × r). After them, with the
    output gradient ``g`` (N × d) and N, d, r the rows, output width and rank:

    - output ``c + s · h Bᵀ``: r products ``s · h_t · B_jt`` (one more rounding each for the scaling,
      however the GEMM applies alpha) added to ``c`` in any order: n = r + 2, M = |c| + |s|·|h| |B|ᵀ;
    - ∂B ``s · gᵀ h``: a reduction over the N rows, plus the scaling: n = N + 1, M = |s|·|g|ᵀ |h|;
    - ∂A ``(s · g B)ᵀ xd``: a reduction over d (with the scaling) then over N: n = d + 1 + N,
      M = |s|·(|g| |B|)ᵀ |xd|;
    - ∂x ``g W + ((s · g B) A) / (1 − p) ⊙ keep``: reductions over d and over r, the dropout division,
      and the sum with the base's ∂x: n = d + r + 3, M = |g| |W| + |s|/(1 − p)·(|g| |B| |A|) ⊙ keep.
    """
    x, w, a, b, _ = _leaves(torch.float32, False, shape)
    torch.manual_seed(123)
    keep = LD.dropout_keep_mask(x, p) if p > 0 else torch.ones(x.shape, dtype=torch.bool)  # as _run
    with torch.no_grad():
        xd = LD.apply_dropout(x, keep, p) if p > 0 else x
        h, c = F.linear(xd, a), F.linear(x, w)
    g = torch.randn_like(c, generator=torch.Generator().manual_seed(7))

    def mag(t):
        return t.detach().double().abs().reshape(-1, t.shape[-1])

    c_, h_, g_, xd_, w_, a_, b_ = (mag(t) for t in (c, h, g, xd, w, a, b))
    n, d, r = g_.shape[0], b_.shape[0], b_.shape[1]
    s_, keep_ = abs(s), keep.reshape(n, -1).double()
    return [
        ((c_ + s_ * h_ @ b_.T).reshape(c.shape), r + 2),
        ((g_ @ w_ + s_ / (1 - p) * (g_ @ b_ @ a_) * keep_).reshape(x.shape), d + r + 3),
        (s_ * (g_ @ b_).T @ xd_, d + 1 + n),
        (s_ * g_.T @ h_, n + 1),
    ]


def _beyond_the_bound(fast_ts, ref_ts, bounds):
    """For each tensor, the elements where |fast − reference| > 2·γₙ·M (each path may err by γₙ·M)."""
    return [
        ((fast_t.double() - ref_t.double()).abs() > 2 * _gamma(n) * m).sum().item()
        for fast_t, ref_t, (m, n) in zip(fast_ts, ref_ts, bounds, strict=True)
    ]


@pytest.mark.parametrize("kind", ["accumulate", "with_base"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fast_path_with_a_scaling_that_rounds_is_within_floating_point_error(kind, p):
    """With s = 0.7 the product ``s · (h Bᵀ)`` is rounded: the reference computes ``s · (h Bᵀ)`` (the
    GEMM's float32 accumulation over r terms, then the multiply by s) and the fast path a GEMM with
    alpha (``addmm_(…, alpha=s)``) or ``add_(…, alpha=s)``, and a GEMM's summation order is
    implementation-defined (it differs between CPUs, e.g. with AVX-512). So the bound is derived from
    the operations, not observed on one CPU: every element of the output and of each gradient
    differs from the reference by at most twice the standard error bound of its computation,
    γₙ · Σ|terms| with n the length of its reductions plus its other roundings (see
    ``_error_bounds``), computed from the actual operands.

    The bound is still tight enough for a real bug: a scaling off by 2⁻¹⁰ (a bfloat16 rounding of s)
    is caught in the output and in every gradient."""
    shape = (3, 5, 16)
    bounds = _error_bounds(kind, p, shape, 0.7)
    fast_ts = _run(kind, torch.float32, p, False, shape, True, s=0.7)
    ref_ts = _run(kind, torch.float32, p, False, shape, False, s=0.7)
    assert _beyond_the_bound(fast_ts, ref_ts, bounds) == [0, 0, 0, 0]
    wrong_scale = _run(kind, torch.float32, p, False, shape, True, s=0.7 * (1 + 2**-10))
    assert all(_beyond_the_bound(wrong_scale, ref_ts, bounds))
