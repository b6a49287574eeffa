"""LoRA layers: hand-computed outputs and ΔW for every layer kind, plus each layer's own invariants."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import AdapterError
from lorakit.layers import Conv, Embedding, Linear, lora_layer_for

W = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # (d=3, k=2)
BIAS = torch.tensor([1.0, 0.0, -1.0])
A = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # (r=2, k=2)
B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (d=3, r=2); B·A = [[1,2],[0,1],[1,3]]
X = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
# W·x + b = [4, 7, 10], [1, 2, 3]; with alpha=4, r=2 (s=2): s·B·A·x = [6, 2, 8], [0, -2, -2]
BASE_OUT = torch.tensor([[4.0, 7.0, 10.0], [1.0, 2.0, 3.0]])
LORA_OUT = torch.tensor([[10.0, 9.0, 18.0], [1.0, 0.0, 1.0]])


def add(layer, name="a", r=2, alpha=4.0, *, rslora=False, dropout=0.0, init=False, lora_bias=False):
    layer.add_adapter(name, r, alpha, use_rslora=rslora, dropout=dropout, init=init, lora_bias=lora_bias)
    layer.set_active([name])
    return layer


def linear_layer(kind: str, **kwargs) -> Linear:
    if kind == "linear":
        base = nn.Linear(2, 3)
        base.weight.data.copy_(W)
    else:
        base = Conv1D(3, 2)  # weight stored (k, d)
        base.weight.data.copy_(W.T)
    base.bias.data.copy_(BIAS)
    layer = add(Linear(base), **kwargs)
    layer.lora_A["a"].weight.data.copy_(A)
    layer.lora_B["a"].weight.data.copy_(B)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers"])
def test_linear_hand_computed(kind):
    layer = linear_layer(kind)
    assert torch.equal(layer.base_layer(X), BASE_OUT)
    assert torch.equal(layer(X), LORA_OUT)
    expected_delta = 2 * torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 3.0]])
    if kind != "linear":
        expected_delta = expected_delta.T  # Conv1D's weight is (k, d)
    assert layer.delta_weight("a").shape == layer.base_layer.weight.shape
    assert torch.equal(layer.delta_weight("a"), expected_delta)
    layer.merge()
    assert torch.equal(layer.base_layer.weight, layer._original_weight + expected_delta)
    assert torch.equal(layer(X), LORA_OUT)


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers"])
def test_rslora_scaling(kind):
    layer = linear_layer(kind, rslora=True)
    assert layer.scaling["a"] == pytest.approx(4 / math.sqrt(2))
    expected = BASE_OUT + (LORA_OUT - BASE_OUT) / 2 * (4 / math.sqrt(2))
    assert torch.allclose(layer(X), expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers"])
def test_lora_bias_forward_and_merge(kind):
    layer = linear_layer(kind, lora_bias=True)
    layer.lora_B["a"].bias.data.copy_(torch.tensor([1.0, 2.0, 3.0]))
    expected = LORA_OUT + 2 * torch.tensor([1.0, 2.0, 3.0])  # the bias is scaled like B·A·x
    assert torch.equal(layer(X), expected)
    layer.merge()
    assert torch.equal(layer.base_layer.bias, BIAS + 2 * torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(layer(X), expected)
    layer.unmerge()
    assert torch.equal(layer.base_layer.bias, BIAS)


def test_lora_bias_is_zero_initialised():
    layer = add(Linear(nn.Linear(4, 4)), init=True, lora_bias=True)
    assert torch.count_nonzero(layer.lora_B["a"].bias) == 0


def test_lora_bias_merged_after_plain_adapter_unmerges_bias():
    """A second merge that brings the first lora_bias must still restore the bias on unmerge."""
    layer = linear_layer("linear")
    layer.add_adapter("b", 1, 1.0, use_rslora=False, dropout=0.0, init=False, lora_bias=True)
    layer.lora_B["b"].bias.data.fill_(1.0)
    layer.merge(["a"])
    layer.merge(["b"])
    assert not torch.equal(layer.base_layer.bias, BIAS)
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, W)
    assert torch.equal(layer.base_layer.bias, BIAS)


def embedding_layer(**kwargs) -> Embedding:
    base = nn.Embedding(3, 2)
    base.weight.data.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))  # (V=3, D=2)
    layer = add(Embedding(base), r=2, alpha=2.0, **kwargs)  # s = 1
    layer.lora_embedding_A["a"].data.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]))  # (r, V)
    layer.lora_embedding_B["a"].data.copy_(torch.tensor([[1.0, 1.0], [0.0, 2.0]]))  # (D, r)
    return layer


def test_embedding_hand_computed():
    layer = embedding_layer()
    # ΔW = (B·A)ᵀ = [[1, 0], [1, 2], [3, 2]]  (V, D)
    assert torch.equal(layer.delta_weight("a"), torch.tensor([[1.0, 0.0], [1.0, 2.0], [3.0, 2.0]]))
    ids = torch.tensor([[2, 0], [1, 1]])
    expected = torch.tensor([[[8.0, 8.0], [2.0, 2.0]], [[4.0, 6.0], [4.0, 6.0]]])
    assert torch.equal(layer(ids), expected)
    layer.merge()
    assert torch.equal(layer(ids), expected)


def test_embedding_repr_and_keys():
    layer = embedding_layer()
    text = repr(layer)
    assert "lora_embedding_A" in text and "lora_embedding_B" in text
    keys = set(layer.state_dict())
    assert {"lora_embedding_A.a", "lora_embedding_B.a", "base_layer.weight"} <= keys


def test_embedding_rejects_lora_bias():
    with pytest.raises(ValueError, match="lora_bias"):
        add(Embedding(nn.Embedding(3, 2)), lora_bias=True)


def test_conv1d_hand_computed():
    base = nn.Conv1d(1, 2, 2, bias=False)
    base.weight.data.copy_(torch.tensor([[[1.0, 2.0]], [[0.0, 1.0]]]))  # (C_out=2, C_in=1, 2)
    layer = add(Conv(base), r=1, alpha=1.0)
    layer.lora_A["a"].weight.data.copy_(torch.tensor([[[1.0, -1.0]]]))  # (r, C_in, 2)
    layer.lora_B["a"].weight.data.copy_(torch.tensor([[[1.0]], [[2.0]]]))  # (C_out, r, 1)
    x = torch.tensor([[[1.0, 2.0, 4.0]]])  # (N=1, C_in=1, L=3)
    assert torch.equal(base(x), torch.tensor([[[5.0, 10.0], [2.0, 4.0]]]))
    assert torch.equal(layer.delta_weight("a"), torch.tensor([[[1.0, -1.0]], [[2.0, -2.0]]]))
    assert torch.equal(layer(x), torch.tensor([[[4.0, 8.0], [0.0, 0.0]]]))
    layer.merge()
    assert torch.equal(layer(x), torch.tensor([[[4.0, 8.0], [0.0, 0.0]]]))


def test_conv2d_hand_computed():
    base = nn.Conv2d(1, 1, 2, bias=True)
    base.weight.data.copy_(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
    base.bias.data.fill_(1.0)
    layer = add(Conv(base), r=1, alpha=2.0)  # s = 2
    layer.lora_A["a"].weight.data.copy_(torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]]))
    layer.lora_B["a"].weight.data.fill_(3.0)
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # base: 1+4+9+16 + 1 = 31; ΔW = 6·I → 6·1 + 6·4 = 30
    assert torch.equal(layer.delta_weight("a"), torch.tensor([[[[6.0, 0.0], [0.0, 6.0]]]]))
    assert torch.equal(layer(x), torch.tensor([[[[61.0]]]]))
    layer.merge()
    assert torch.equal(layer(x), torch.tensor([[[[61.0]]]]))


def test_conv2d_strided_padded_merge_matches_branch():
    torch.manual_seed(0)
    layer = add(Conv(nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)), r=2, alpha=3.0, lora_bias=True)
    nn.init.normal_(layer.lora_B["a"].bias)
    x = torch.randn(2, 3, 7, 7)
    unmerged = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=1e-5)


# -- every kind: init, dropout, invariants --------------------------------------------------------
def make(kind: str, dtype: torch.dtype = torch.float32, **kwargs):
    """(layer with adapter 'a' active and non-zero, input) for each layer kind."""
    torch.manual_seed(0)
    bases = {
        "linear": (nn.Linear(8, 6), torch.randn(4, 3, 8)),
        "conv1d_transformers": (Conv1D(6, 8), torch.randn(4, 3, 8)),
        "embedding": (nn.Embedding(20, 6), torch.randint(0, 20, (4, 3))),
        "conv1d": (nn.Conv1d(3, 4, 3, padding=1), torch.randn(4, 3, 9)),
        "conv2d": (nn.Conv2d(3, 4, 3, padding=1), torch.randn(4, 3, 5, 5)),
        "conv3d": (nn.Conv3d(2, 3, 2, stride=2), torch.randn(4, 2, 4, 4, 4)),
    }
    base, x = bases[kind]
    base = base.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    cls = lora_layer_for(base)
    assert cls is not None
    layer = add(cls(base), r=2, alpha=4.0, **{"init": False, **kwargs})
    return layer, x


KINDS = ["linear", "conv1d_transformers", "embedding", "conv1d", "conv2d", "conv3d"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("kind", KINDS)
def test_dispatch(kind):
    layer, _ = make(kind)
    expected = {"linear": Linear, "conv1d_transformers": Linear, "embedding": Embedding}.get(kind, Conv)
    assert type(layer) is expected


def test_dispatch_unsupported():
    assert lora_layer_for(nn.LayerNorm(4)) is None
    assert lora_layer_for(nn.Conv2d(4, 4, 3, groups=2)) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_default_inits_start_as_identity(kind, init):
    layer, x = make(kind, init=init)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.delta_weight("a")) == 0


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers", "conv1d", "conv2d", "conv3d"])
@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_b_zero_a_random(kind, init):
    layer, _ = make(kind, init=init)
    assert torch.count_nonzero(layer.lora_B["a"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["a"].weight) == layer.lora_A["a"].weight.numel()


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_embedding_a_zero_b_random(init):
    layer, _ = make("embedding", init=init)
    assert torch.count_nonzero(layer.lora_embedding_A["a"]) == 0
    assert torch.count_nonzero(layer.lora_embedding_B["a"]) == layer.lora_embedding_B["a"].numel()


def test_init_gaussian_on_large_layer():
    torch.manual_seed(0)
    layer = add(Linear(nn.Linear(2048, 16)), r=4, init="gaussian")
    assert layer.lora_A["a"].weight.std().item() == pytest.approx(1 / 4, rel=0.03)


@pytest.mark.parametrize("kind", KINDS)
def test_init_false_changes_output(kind):
    layer, x = make(kind)
    assert not torch.allclose(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d_transformers", "conv1d", "conv2d"])
def test_dropout_train_stochastic_eval_exact(kind):
    layer, x = make(kind, dropout=0.5)
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
    layer, _ = make("linear")
    assert isinstance(layer.lora_dropout["a"], nn.Identity)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged(kind):
    layer, x = make(kind)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["a"]
    assert torch.allclose(layer(x), unmerged, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_twice_is_merge_once(kind):
    layer, x = make(kind)
    layer.merge()
    once = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.merge(["a"])
    assert torch.equal(layer.base_layer.weight, once)
    assert layer.merged_adapters == ["a"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_restores_bit_for_bit(kind, dtype):
    layer, _ = make(kind, dtype, lora_bias=kind != "embedding")
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
    layer, _ = make("linear", dtype)
    original = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, (original.float() + layer.delta_weight("a")).to(dtype))
    assert layer.lora_A["a"].weight.dtype == torch.float32  # adapters stay float32 on a low-precision base


@pytest.mark.parametrize("kind", KINDS)
def test_two_adapters_merge_in_sequence_equals_both(kind):
    layer, x = make(kind)
    layer.add_adapter("b", 3, 2.0, use_rslora=False, dropout=0.0, init=False, lora_bias=False)
    layer.set_active(["a", "b"])
    both = layer(x)
    layer.merge(["a"])
    assert torch.allclose(layer(x), both, atol=1e-5)
    layer.merge(["b"])
    assert layer.merged_adapters == ["a", "b"]
    assert torch.allclose(layer(x), both, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_disable_flag_gives_base(kind):
    layer, x = make(kind)
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_rows(kind):
    layer, x = make(kind)
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
    layer, x = make("linear")
    with pytest.raises(AdapterError, match="4 rows"):
        layer(x, adapter_names=["a"])
    layer.merge()
    with pytest.raises(AdapterError, match="merged"):
        layer(x, adapter_names=["a"] * 4)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_adapter_leaves_no_trace(kind):
    layer, x = make(kind)
    base_keys = set(layer.state_dict())
    layer.add_adapter("b", 3, 2.0, use_rslora=False, dropout=0.1, init=False, lora_bias=False)
    layer.set_active(["a", "b"])
    layer.delete_adapter("b")
    assert set(layer.state_dict()) == base_keys
    assert not any("b" in n.split(".") for n, _ in layer.named_parameters())
    assert layer.adapter_names == ["a"] and layer.active_adapters == ["a"]
    assert "b" not in layer.lora_dropout and "b" not in layer.scaling


def test_delete_merged_adapter_refused():
    layer, _ = make("linear")
    layer.merge()
    with pytest.raises(AdapterError, match="unmerge"):
        layer.delete_adapter("a")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merged", [False, True])
def test_pickle_and_deepcopy(kind, merged):
    layer, x = make(kind)
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


@pytest.mark.parametrize("kind", KINDS)
def test_forward_does_not_change_state(kind):
    layer, x = make(kind)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x)
    layer(x, adapter_names=["a"] * x.shape[0])
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


def test_repr_shows_lora_parts():
    layer, _ = make("linear", dropout=0.1)
    text = repr(layer)
    for part in ("lora_A", "lora_B", "lora_dropout", "base_layer"):
        assert part in text


def test_lora_bias_on_bias_free_layer_refuses_to_merge():
    layer = add(Linear(nn.Linear(2, 3, bias=False)), lora_bias=True)
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(AdapterError, match="no bias"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, weight) and not layer.merged


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mixed", [False, True])
def test_gradients_equal_the_plain_reference(kind, mixed):
    """Gradients of x, A and B through the layer equal those of ``base(x) + lora_branch(x)``."""
    layer, x = make(kind, lora_bias=kind != "embedding")
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
