"""The fused LoRA linear path equals the plain reference, and dropout costs no saved activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.functional import dropout as LD
from lorakit.functional import fused

DTYPES = [torch.float32, torch.bfloat16]


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


@pytest.mark.parametrize("kind", ["accumulate", "with_base"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16)], ids=["3d", "2d"])
def test_fast_equals_reference_outputs_and_gradients(kind, dtype, p, bias, shape):
    """float32: bit for bit. bfloat16: the fast path accumulates the rank-r product inside the GEMM
    (one rounding where the reference rounds twice), so it is compared with the float64 truth and
    must be at least as close as the reference (plus one rounding step)."""
    fast_ts, ref_ts = _run(kind, dtype, p, bias, shape, True), _run(kind, dtype, p, bias, shape, False)
    for fast_t, ref_t in zip(fast_ts, ref_ts, strict=True):
        assert fast_t.dtype == ref_t.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(fast_t, ref_t, rtol=0, atol=0)
    if dtype == torch.bfloat16:
        truth = _run(kind, torch.float64, p, bias, shape, False, values=dtype)
        for fast_t, ref_t, true_t in zip(fast_ts, ref_ts, truth, strict=True):
            ulp = true_t.abs().max().item() * 2.0**-7
            fast_err = (fast_t.double() - true_t).abs().max().item()
            ref_err = (ref_t.double() - true_t).abs().max().item()
            assert fast_err <= ref_err + ulp


def test_dropout_really_drops_and_is_reproducible():
    x = torch.ones(64, 32)
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        masks.append(LD.dropout_keep_mask(x, 0.5))
    y1, y2 = (LD.apply_dropout(x, m, 0.5) for m in masks)
    assert torch.equal(y1, y2)
    zero_fraction = (y1 == 0).float().mean().item()
    assert 0.4 < zero_fraction < 0.6
    assert set(y1.unique().tolist()) == {0.0, 2.0}


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


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves while running ``fn``."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_keeps_one_bit_per_element_not_a_copy(dtype):
    x = torch.randn(8, 32, 64, dtype=dtype, requires_grad=True)
    sizes = {}
    for p in (0.0, 0.1):
        torch.manual_seed(0)
        model = get_peft_model(
            nn.Sequential(*[nn.Linear(64, 64) for _ in range(2)]).to(dtype),
            LoraConfig(r=4, target_modules=["0", "1"], lora_dropout=p),
        )
        model.train()
        sizes[p] = _saved_bytes(lambda m=model: m(x))
    # two LoRA layers, each keeping its mask packed 8 elements a byte (PEFT keeps x ⊙ mask and the mask)
    assert sizes[0.1] - sizes[0.0] == 2 * x.numel() // 8
    assert sizes[0.1] - sizes[0.0] <= 2 * x.numel() * x.element_size() / 16


@pytest.mark.parametrize("shape", [(3, 5, 16), (7,), (9, 3)])
def test_mask_packing_round_trips(shape):
    keep = torch.rand(shape) > 0.5
    bits = LD.pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    assert torch.equal(LD.unpack_mask(bits, keep.shape), keep)


def test_mask_packing_is_exact_for_every_byte_and_bit_order():
    every_byte = torch.arange(256).to(torch.uint8)
    keep = LD.unpack_mask(every_byte, torch.Size([256 * 8]))
    expected = torch.tensor([[(byte >> (7 - j)) & 1 for j in range(8)] for byte in range(256)]).bool()
    assert torch.equal(keep, expected.reshape(-1))  # element j of a group is bit 7 − j
    assert torch.equal(LD.pack_mask(keep), every_byte)
    offset = torch.rand(37) > 0.5
    assert torch.equal(LD.unpack_mask(LD.pack_mask(offset[3:]), torch.Size([34])), offset[3:])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_dropout_rate_is_p_within_sampling_error(p):
    torch.manual_seed(1)
    n = 1 << 21
    dropped = 1.0 - LD.dropout_keep_mask(torch.empty(n), p).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5
    # the words are uniform: a quarter and three quarters of their range are hit in those shares
    hist = torch.stack([LD.dropout_keep_mask(torch.empty(n), q).double().mean() for q in (0.25, 0.75)])
    torch.testing.assert_close(hist, torch.tensor([0.75, 0.25], dtype=torch.float64), atol=2e-3, rtol=0)


def test_dropout_mask_extremes():
    torch.manual_seed(0)
    assert LD.dropout_keep_mask(torch.empty(10_000), 0.0).all()
    assert LD.dropout_keep_mask(torch.empty(10_000), 1e-12).all()
    assert not LD.dropout_keep_mask(torch.empty(10_000), 1.0 - 1e-12).any()
    assert LD.dropout_keep_mask(torch.empty(2, 3, 5), 0.5).shape == (2, 3, 5)  # odd count of elements


def test_layer_forward_uses_fast_path_and_matches_lora_branch():
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 8)), LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)
    )
    layer = model.get_base_model()[0]
    x = torch.randn(5, 16)
    fused = layer(x)
    plain = layer.base_layer(x) + layer.lora_branch(x, "default")
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)


def test_stacked_mixed_batch_equals_per_adapter_groups():
    from lorakit.layers import LoraLayer

    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 8)), LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)
    )
    model.add_adapter(
        "wide", LoraConfig(r=6, lora_alpha=3, target_modules=["0"], init_lora_weights=False, lora_bias=True)
    )
    layer = model.get_base_model()[0]
    with torch.no_grad():
        layer.lora_B["wide"].bias.normal_()
    model.eval()
    x = torch.randn(4, 3, 16)
    names = ["wide", "__base__", "default", "wide"]
    with torch.no_grad():
        base = layer.base_layer(x)
        stacked = layer.add_mixed_(base.clone(), x, names)
        grouped = LoraLayer.add_mixed_(layer, base.clone(), x, names)
        alone = torch.stack(
            [
                base[i] if n == "__base__" else base[i] + layer.lora_branch(x[i : i + 1], n)[0]
                for i, n in enumerate(names)
            ]
        )
    torch.testing.assert_close(stacked, grouped, rtol=0, atol=1e-6)
    torch.testing.assert_close(stacked, alone, rtol=0, atol=1e-6)
    assert not torch.allclose(stacked[1], stacked[0])


def _one_linear(**cfg):
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(16, 8)), LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, **cfg)
    )
    model.train()
    return model, model.get_base_model()[0]


def _forward_backward(model, x):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(5)
    out = model(x)
    out.backward(torch.ones_like(out))
    a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    grads = (out.detach(), x.grad, a.grad.clone())
    model.zero_grad(set_to_none=True)
    return out.grad_fn, grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_plain_frozen_linear_runs_base_and_adapter_as_one_node_equal_to_the_general_path(dropout):
    model, layer = _one_linear(lora_dropout=dropout)
    x = torch.randn(3, 5, 16)
    node, fused_grads = _forward_backward(model, x)
    assert type(node).__name__ == "_LoraLinearWithBaseBackward"
    calls = []
    layer.base_layer.register_forward_pre_hook(lambda *_: calls.append(1))  # forces the general path
    node, general_grads = _forward_backward(model, x)
    assert calls and type(node).__name__ != "_LoraLinearWithBaseBackward"
    for u, v in zip(fused_grads, general_grads, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "case", ["two_adapters", "dora", "lora_bias", "trainable_base", "autocast", "hooked", "mixed_rows"]
)
def test_general_path_whenever_one_node_would_skip_something(case):
    model, layer = _one_linear(use_dora=case == "dora", lora_bias=case == "lora_bias")
    x = torch.randn(2, 5, 16, requires_grad=True)
    kwargs = {}
    if case == "two_adapters":
        model.add_adapter("other", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        model.base_model.set_adapter(["default", "other"])
    elif case == "trainable_base":
        layer.base_layer.weight.requires_grad_(True)
    elif case == "hooked":
        layer.base_layer.register_forward_hook(lambda m, i, o: o * 2)
    elif case == "mixed_rows":
        model.add_adapter("other", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
        kwargs = {"adapter_names": ["default", "other"]}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = model(x, **kwargs) if not kwargs else model(input=x, **kwargs)
    assert "WithBase" not in type(out.grad_fn).__name__
    out.float().sum().backward()
    assert x.grad is not None
    if case == "trainable_base":
        assert layer.base_layer.weight.grad is not None
    if case == "hooked":
        torch.testing.assert_close(
            out,
            (layer.base_layer.weight @ x.detach()[..., None])[..., 0] * 2
            + layer.base_layer.bias * 2
            + layer.lora_branch(x.detach(), "default"),
            rtol=1e-5,
            atol=1e-5,
        )


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
