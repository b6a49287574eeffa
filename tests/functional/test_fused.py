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


@pytest.mark.parametrize("kind", ["accumulate", "with_base"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fast_path_with_a_scaling_that_rounds_is_within_one_rounding(kind, p):
    """With s = 0.7 the product ``s · (h Bᵀ)`` is rounded, and the fused add (as a GEMM with alpha or
    ``add_(…, alpha=s)``) may use one multiply-add where the reference rounds twice."""
    fast_ts = _run(kind, torch.float32, p, False, (3, 5, 16), True, s=0.7)
    ref_ts = _run(kind, torch.float32, p, False, (3, 5, 16), False, s=0.7)
    for fast_t, ref_t in zip(fast_ts, ref_ts, strict=True):
        two_ulps = ref_t.abs().max().item() * 2.0**-22  # float32 ulp at the largest value, twice
        torch.testing.assert_close(fast_t, ref_t, rtol=0, atol=two_ulps)
