"""The pure LoRA math: hand-computed integer cases, properties, and PEFT's initialisations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.functional import lora as LF

# W (d=3, k=2), A (r=2, k=2), B (d=3, r=2); with alpha=4, r=2: s=2, ΔW = s·B·A.
A = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
BA = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 3.0]])


@pytest.mark.parametrize(
    ("alpha", "r", "rslora", "expected"),
    [
        (8, 8, False, 1.0),
        (16, 4, False, 4.0),
        (16, 4, True, 8.0),
        (3, 9, True, 1.0),
        (1, 2, False, 0.5),
    ],
)
def test_scaling(alpha, r, rslora, expected):
    assert LF.scaling(alpha, r, rslora) == pytest.approx(expected)


def test_linear_delta_hand_computed():
    assert torch.equal(LF.linear_delta(A, B, 2.0), 2 * BA)
    assert torch.equal(LF.linear_delta(A, B, 2.0, fan_in_fan_out=True), 2 * BA.T)


def test_linear_delta_is_float32():
    delta = LF.linear_delta(A.half(), B.bfloat16(), 1.0)
    assert delta.dtype == torch.float32


def test_lora_linear_hand_computed():
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    # B·A·x = [3, 1, 4] and [0, -1, -1]; times s = 2.
    out = LF.lora_linear(x, A, B, 2.0)
    assert torch.equal(out, torch.tensor([[6.0, 2.0, 8.0], [0.0, -2.0, -2.0]]))
    bias = torch.tensor([1.0, 0.0, -1.0])
    out = LF.lora_linear(x, A, B, 2.0, lora_b_bias=bias)
    assert torch.equal(out, torch.tensor([[8.0, 2.0, 6.0], [2.0, -2.0, -4.0]]))


def test_lora_linear_dropout_train_vs_eval():
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    exact = LF.lora_linear(x, A, B, 2.0)
    assert torch.equal(LF.lora_linear(x, A, B, 2.0, dropout_p=0.5, training=False), exact)
    first = LF.lora_linear(x, A, B, 2.0, dropout_p=0.5, training=True)
    second = LF.lora_linear(x, A, B, 2.0, dropout_p=0.5, training=True)
    assert not torch.equal(first, exact)
    assert not torch.equal(first, second)


def test_conv_delta_hand_computed():
    # A: (r=1, C_in=1, 2), B: (C_out=2, r=1, 1); ΔW[o] = s·B[o]·A.
    a = torch.tensor([[[1.0, -1.0]]])
    b = torch.tensor([[[1.0]], [[2.0]]])
    assert torch.equal(LF.conv_delta(a, b, 3.0), torch.tensor([[[3.0, -3.0]], [[6.0, -6.0]]]))


@settings(max_examples=25, deadline=None)
@given(
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 3),
    r=st.integers(1, 3),
    k=st.integers(1, 3),
    dim=st.sampled_from([1, 2]),
    s=st.floats(0.1, 4.0),
)
def test_conv_delta_equals_composed_convolutions(c_in, c_out, r, k, dim, s):
    torch.manual_seed(0)
    conv = F.conv1d if dim == 1 else F.conv2d
    a = torch.randn(r, c_in, *(k,) * dim, dtype=torch.float64)
    b = torch.randn(c_out, r, *(1,) * dim, dtype=torch.float64)
    x = torch.randn(2, c_in, *(5,) * dim, dtype=torch.float64)
    composed = conv(conv(x, a), b) * s
    delta = LF.conv_delta(a, b, s).double()
    assert torch.allclose(conv(x, delta), composed, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merged_weight_rounds_once(dtype):
    torch.manual_seed(0)
    w = torch.randn(16, 16).to(dtype)
    delta = torch.randn(16, 16) * 1e-2
    merged = LF.merged_weight(w, delta)
    assert merged.dtype == dtype
    assert torch.equal(merged, (w.float() + delta).to(dtype))


@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 6), k=st.integers(1, 6), r=st.integers(1, 4), s=st.floats(0.25, 4.0))
def test_forward_of_merged_equals_base_plus_branch(d, k, r, s):
    torch.manual_seed(d * 100 + k * 10 + r)
    w, a, b, x = torch.randn(d, k), torch.randn(r, k), torch.randn(d, r), torch.randn(3, k)
    merged = LF.merged_weight(w, LF.linear_delta(a, b, s))
    assert torch.allclose(F.linear(x, merged), F.linear(x, w) + LF.lora_linear(x, a, b, s), atol=1e-5)


# -- initialisation -------------------------------------------------------------------------------
def test_init_true_is_kaiming_uniform_and_zero_b():
    a, b = torch.ones(4, 100), torch.ones(7, 4)
    LF.init_lora_linear_(a, b, True, 4)
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=√5) on fan_in k
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.8 * bound
    assert a.std() > 0


def test_init_gaussian_std_is_one_over_r():
    torch.manual_seed(0)
    a, b = torch.empty(4, 4096), torch.ones(64, 4)
    LF.init_lora_linear_(a, b, "gaussian", 4)
    assert torch.count_nonzero(b) == 0
    assert a.std().item() == pytest.approx(0.25, rel=0.03)
    assert a.mean().abs().item() < 0.01


def test_init_false_leaves_tensors():
    a, b = torch.full((2, 3), 2.0), torch.full((3, 2), 5.0)
    LF.init_lora_linear_(a, b, False, 2)
    LF.init_lora_embedding_(a, b, False)
    assert torch.equal(a, torch.full((2, 3), 2.0))
    assert torch.equal(b, torch.full((3, 2), 5.0))


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_embedding_a_zero_b_standard_normal(init):
    torch.manual_seed(0)
    a, b = torch.ones(4, 1000), torch.zeros(1000, 4)
    LF.init_lora_embedding_(a, b, init)
    assert torch.count_nonzero(a) == 0
    assert b.std().item() == pytest.approx(1.0, rel=0.05)
