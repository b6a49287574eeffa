"""The fast path of a Linear LoRA layer (lorakit.layers.linear_fast): a plain frozen linear runs base
and adapter as one autograd node equal to the general path, which every other case takes; stacked
mixed batches equal per-adapter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model


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


# -- the general path whenever one node would skip something ------------------------------------------
def _general_path_output(model, x, *, autocast=False, **kwargs):
    """The output of ``model``, checked to come from the general path (not the one-node
    ``_LoraLinearWithBase``) and to backpropagate to ``x``."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, **kwargs) if not kwargs else model(input=x, **kwargs)
    assert "WithBase" not in type(out.grad_fn).__name__
    out.float().sum().backward()
    assert x.grad is not None
    return out


def _x():
    return torch.randn(2, 5, 16, requires_grad=True)


@pytest.mark.parametrize("variant", ["dora", "lora_bias"])
def test_general_path_with_dora_or_a_lora_bias(variant):
    model, _ = _one_linear(use_dora=variant == "dora", lora_bias=variant == "lora_bias")
    _general_path_output(model, _x())


def test_general_path_with_two_active_adapters():
    model, _ = _one_linear()
    x = _x()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    _general_path_output(model, x)


def test_general_path_with_adapters_per_row():
    model, _ = _one_linear()
    x = _x()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    _general_path_output(model, x, adapter_names=["default", "other"])


def test_general_path_under_autocast():
    model, _ = _one_linear()
    _general_path_output(model, _x(), autocast=True)


def test_general_path_with_a_trainable_base_gives_it_its_gradient():
    model, layer = _one_linear()
    x = _x()
    layer.base_layer.weight.requires_grad_(True)
    _general_path_output(model, x)
    assert layer.base_layer.weight.grad is not None


def test_general_path_with_a_hooked_base_keeps_the_hooks_output():
    model, layer = _one_linear()
    x = _x()
    layer.base_layer.register_forward_hook(lambda m, i, o: o * 2)
    out = _general_path_output(model, x)
    torch.testing.assert_close(
        out,
        (layer.base_layer.weight @ x.detach()[..., None])[..., 0] * 2
        + layer.base_layer.bias * 2
        + layer.lora_branch(x.detach(), "default"),
        rtol=1e-5,
        atol=1e-5,
    )
