"""What every LoRA layer kind shares (lorakit.layers.base), on each of Linear, transformers Conv1D,
Embedding and Conv1d/2d/3d: init, dropout, merge/unmerge, several adapters, mixed batches, delete,
pickling, and gradients equal to the plain reference."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from zoo import LAYER_KINDS, add_adapter, lora_layer

from lorakit.errors import AdapterError
from lorakit.layers import Linear

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_default_inits_start_as_identity(kind, init):
    layer, x = lora_layer(kind, init=init)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.delta_weight("a")) == 0


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_b_zero_a_random(kind, init):
    layer, _ = lora_layer(kind, init=init)
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["a"].weight) == layer.lora_A["a"].weight.numel()


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_embedding_a_zero_b_random(init):
    layer, _ = lora_layer("embedding", init=init)
    assert torch.count_nonzero(layer.lora_embedding_A["a"]) == 0
    assert torch.count_nonzero(layer.lora_embedding_B["a"]) == layer.lora_embedding_B["a"].numel()


def test_init_gaussian_on_large_layer():
    torch.manual_seed(0)
    layer = add_adapter(Linear(nn.Linear(2048, 16)), r=4, init="gaussian")
    assert layer.lora_A["a"].weight.std().item() == pytest.approx(1 / 4, rel=0.03)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_init_false_changes_output(kind):
    layer, x = lora_layer(kind)
    assert not torch.allclose(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers", "conv1d", "conv2d"])
def test_dropout_train_stochastic_eval_exact(kind):
    layer, x = lora_layer(kind, dropout=0.5)
    assert isinstance(layer.lora_dropout["a"], nn.Dropout)
    layer.eval()
    exact = layer(x)
    reference = layer.base_layer(x) + layer.lora_B["a"](layer.lora_A["a"](x)) * layer.scaling["a"]
    assert torch.allclose(exact, reference, atol=1e-6)
    assert torch.equal(layer(x), exact)
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, exact)
    assert not torch.equal(first, second)
    layer.eval()
    assert torch.equal(layer(x), exact)


def test_no_dropout_is_identity_module():
    layer, _ = lora_layer("linear")
    assert isinstance(layer.lora_dropout["a"], nn.Identity)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merged_equals_unmerged(kind):
    layer, x = lora_layer(kind)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["a"]
    assert torch.allclose(layer(x), unmerged, atol=1e-5)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_merge_twice_is_merge_once(kind):
    layer, x = lora_layer(kind)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.merge(["a"])
    assert torch.equal(layer.base_layer.weight, once)
    assert layer.merged_adapters == ["a"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_unmerge_restores_bit_for_bit(kind, dtype):
    layer, _ = lora_layer(kind, dtype, lora_bias=kind != "embedding")
    if kind != "embedding":
        nn.init.normal_(layer.lora_B["a"].bias)
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, before["weight"])
    layer.unmerge()
    assert not layer.merged
    for key, value in layer.base_layer.state_dict().items():
        assert value.dtype == dtype
        assert torch.equal(value, before[key]), key
    assert layer._original_weight is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_merge_rounds_once(dtype):
    layer, _ = lora_layer("linear", dtype)
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, (original.float() + layer.delta_weight("a")).to(dtype))
    assert layer.lora_A["a"].weight.dtype == torch.float32  # adapters stay float32 on a low-precision base


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_two_adapters_merge_in_sequence_equals_both(kind):
    layer, x = lora_layer(kind)
    layer.add_adapter("b", 3, 2.0, use_rslora=False, dropout=0.0, init=False, lora_bias=False)
    layer.set_active(["a", "b"])
    both = layer(x)
    layer.merge(["a"])
    assert torch.allclose(layer(x), both, atol=1e-5)
    layer.merge(["b"])
    assert layer.merged_adapters == ["a", "b"]
    assert torch.allclose(layer(x), both, atol=1e-5)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_disable_flag_gives_base(kind):
    layer, x = lora_layer(kind)
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_mixed_batch_rows(kind):
    layer, x = lora_layer(kind)
    layer.add_adapter("b", 3, 2.0, use_rslora=False, dropout=0.0, init=False, lora_bias=False)
    names = ["a", "__base__", "b", "a"]
    mixed = layer(x, adapter_names=names)
    alone = {}
    for name in ("a", "b"):
        layer.set_active([name])
        alone[name] = layer(x)
    alone["__base__"] = layer.base_layer(x)
    for i, name in enumerate(names):
        assert torch.allclose(mixed[i], alone[name][i], atol=1e-6), (i, name)


def test_mixed_batch_errors():
    layer, x = lora_layer("linear")
    with pytest.raises(AdapterError, match="should be the same as the number of inputs, but got 1 and 4"):
        layer(x, adapter_names=["a"])
    layer.merge()
    with pytest.raises(AdapterError, match="merged"):
        layer(x, adapter_names=["a"] * 4)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_delete_adapter_leaves_no_trace(kind):
    layer, x = lora_layer(kind)
    base_keys = set(layer.state_dict())
    layer.add_adapter("b", 3, 2.0, use_rslora=False, dropout=0.1, init=False, lora_bias=False)
    layer.set_active(["a", "b"])
    layer.delete_adapter("b")
    assert set(layer.state_dict()) == base_keys
    assert not any("b" in n.split(".") for n, _ in layer.named_parameters())
    assert layer.adapter_names == ["a"] and layer.active_adapters == ["a"]
    assert "b" not in layer.lora_dropout and "b" not in layer.scaling


def test_delete_merged_adapter_refused():
    layer, _ = lora_layer("linear")
    layer.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        layer.delete_adapter("a")


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("merged", [False, True])
def test_pickle_and_deepcopy(kind, merged):
    layer, x = lora_layer(kind)
    if merged:
        layer.merge()
    expected = layer(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert torch.equal(clone(x), expected)
        assert clone.merged_adapters == layer.merged_adapters
        clone.unmerge()
        layer_copy = copy.deepcopy(layer)
        layer_copy.unmerge()
        assert torch.equal(clone.base_layer.weight, layer_copy.base_layer.weight)


@pytest.mark.parametrize("kind", LAYER_KINDS)
def test_forward_does_not_change_state(kind):
    layer, x = lora_layer(kind)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x)
    layer(x, adapter_names=["a"] * x.shape[0])
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


def test_repr_shows_lora_parts():
    layer, _ = lora_layer("linear", dropout=0.1)
    text = repr(layer)
    for part in ("lora_A", "lora_B", "lora_dropout", "base_layer"):
        assert part in text


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("mixed", [False, True])
def test_gradients_equal_the_plain_reference(kind, mixed):
    """Gradients of x, A and B through the layer equal those of ``base(x) + lora_branch(x)``."""
    layer, x = lora_layer(kind, lora_bias=kind != "embedding")
    layer.train()
    layer.base_layer.requires_grad_(False)
    grads = []
    for use_layer in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_(x.is_floating_point())
        if use_layer:
            out = layer(xi, adapter_names=["a", "__base__", "a", "a"]) if mixed else layer(xi)
        else:
            branch = layer.lora_branch(xi, "a")
            if mixed:
                branch = branch * torch.tensor([1.0, 0.0, 1.0, 1.0]).reshape(-1, *[1] * (branch.dim() - 1))
            out = layer.base_layer(xi) + branch
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin())
        params = [p.grad.clone() for p in layer.adapter_parameters("a")]
        grads.append(([xi.grad] if xi.is_floating_point() else []) + params + [out.detach()])
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
