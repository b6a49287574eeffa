"""The fused LoRA linear path equals the plain reference, and dropout costs no saved activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit import functional as LF

DTYPES = [torch.float32, torch.bfloat16]


def _reference(result, x, a, b, s, p, keep, bias):
    xc = x.to(LF.compute_dtype(x))
    xd = LF.apply_dropout(xc, keep, p) if p > 0 else xc
    dtype = xc.dtype
    out = F.linear(F.linear(xd, a.to(dtype)), b.to(dtype), None if bias is None else bias.to(dtype))
    return result + out * s


def _leaves(dtype, bias, shape=(3, 5, 16)):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    w = torch.randn(24, shape[-1], dtype=dtype)
    a = torch.randn(4, shape[-1], requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    bb = torch.randn(24, requires_grad=True) if bias else None
    return x, w, a, b, bb


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 16), (7, 16)], ids=["3d", "2d"])
def test_fast_equals_reference_outputs_and_gradients(dtype, p, bias, shape):
    grads = []
    for fast in (True, False):
        x, w, a, b, bb = _leaves(dtype, bias, shape)
        torch.manual_seed(123)
        if fast:
            out = LF.lora_linear_accumulate_(F.linear(x, w), x, a, b, 2.0, p, True, bb)
        else:
            keep = LF.dropout_keep_mask(x, p) if p > 0 else None  # the same draw as the fast path
            out = _reference(F.linear(x, w), x, a, b, 2.0, p, keep, bb)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
        out.backward(g)
        grads.append([out.detach(), x.grad, a.grad, b.grad] + ([bb.grad] if bias else []))
    for fast_t, ref_t in zip(*grads, strict=True):
        assert fast_t.dtype == ref_t.dtype
        torch.testing.assert_close(fast_t, ref_t, rtol=0, atol=0)


def test_dropout_really_drops_and_is_reproducible():
    x = torch.ones(64, 32)
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        masks.append(LF.dropout_keep_mask(x, 0.5))
    y1, y2 = (LF.apply_dropout(x, m, 0.5) for m in masks)
    assert torch.equal(y1, y2)
    zero_fraction = (y1 == 0).float().mean().item()
    assert 0.4 < zero_fraction < 0.6
    assert set(y1.unique().tolist()) == {0.0, 2.0}


def test_inference_path_matches_reference_without_graph():
    x, w, a, b, bb = _leaves(torch.float32, True)
    with torch.no_grad():
        fast = LF.lora_linear_accumulate_(F.linear(x, w), x, a, b, 0.5, 0.3, False, bb)
        ref = _reference(F.linear(x, w), x, a, b, 0.5, 0.0, None, bb)
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)


def test_autocast_computes_in_the_autocast_dtype():
    x, w, a, b, _ = _leaves(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = F.linear(x, w)
        out = LF.lora_linear_accumulate_(result, x, a, b, 2.0, 0.0, True)
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
        model = get_peft_model(nn.Sequential(*[nn.Linear(64, 64) for _ in range(2)]).to(dtype),
                               LoraConfig(r=4, target_modules=["0", "1"], lora_dropout=p))
        model.train()
        sizes[p] = _saved_bytes(lambda m=model: m(x))
    # two LoRA layers, each keeping its mask packed 8 elements a byte (PEFT keeps x ⊙ mask and the mask)
    assert sizes[0.1] - sizes[0.0] == 2 * x.numel() // 8
    assert sizes[0.1] - sizes[0.0] <= 2 * x.numel() * x.element_size() / 16


@pytest.mark.parametrize("shape", [(3, 5, 16), (7,), (9, 3)])
def test_mask_packing_round_trips(shape):
    keep = torch.rand(shape) > 0.5
    bits = LF.pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    assert torch.equal(LF.unpack_mask(bits, keep.shape), keep)


def test_layer_forward_uses_fast_path_and_matches_lora_branch():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)),
                           LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    layer = model.get_base_model()[0]
    x = torch.randn(5, 16)
    fused = layer(x)
    plain = layer.base_layer(x) + layer.lora_branch(x, "default")
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)


def test_stacked_mixed_batch_equals_per_adapter_groups():
    from lorakit.layers import LoraLayer

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(16, 8)),
                           LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("wide", LoraConfig(r=6, lora_alpha=3, target_modules=["0"], init_lora_weights=False,
                                         lora_bias=True))
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
        alone = torch.stack([base[i] if n == "__base__" else
                             base[i] + layer.lora_branch(x[i:i + 1], n)[0] for i, n in enumerate(names)])
    torch.testing.assert_close(stacked, grouped, rtol=0, atol=1e-6)
    torch.testing.assert_close(stacked, alone, rtol=0, atol=1e-6)
    assert not torch.allclose(stacked[1], stacked[0])
