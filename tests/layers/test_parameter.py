"""LoRA on parameters (``ParamWrapper``): PEFT's layout for each orientation, ΔW, exact merging,
several adapters, mixed-adapter batches and dropout against plain per-row / per-expert references,
and what is refused.

Tolerances as in tests/layers/test_lowrank_weight.py: float32, products of reduction length at most
H + R, one rounding per step; the experts' two chained products double it.
"""

from __future__ import annotations

import copy
import pickle

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import add_adapter
from zoo.experts import experts_inputs, experts_module

from lorakit.errors import AdapterError
from lorakit.functional.dropout import dropout_keep_mask
from lorakit.layers import ParamWrapper
from lorakit.layers.dora import DORA
from lorakit.layers.rows import row_adapters

R = 2
U = 2**-24
H = 16


def _close(got: torch.Tensor, want: torch.Tensor, chained: int = 2) -> bool:
    tol = chained * 4 * (H + R) * U * float(want.detach().abs().max())
    return bool(torch.allclose(got, want, rtol=0, atol=tol))


def _randomize(layer: nn.Module, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def wrapped(
    name: str = "Qwen3MoeExperts", adapters: tuple[str, ...] = ("a",), dropout: float = 0.0
) -> ParamWrapper:
    """Both stacked parameters of an experts class wrapped (gate_up inside, down outside, as PEFT)."""
    module = experts_module(name)
    inner = ParamWrapper(module, "gate_up_proj")
    outer = ParamWrapper(inner, "down_proj")
    for adapter in adapters:
        for layer in (inner, outer):
            add_adapter(layer, adapter, r=R, alpha=4.0, dropout=dropout)
            layer.set_active([adapters[0]])
    _randomize(outer)
    return outer


def dense_reference(outer: ParamWrapper, names: list[str]) -> nn.Module:
    """The experts module with ``W + Σ ΔW`` written into its parameters: what PEFT runs."""
    module = copy.deepcopy(outer.owner())
    with torch.no_grad():
        for layer in (outer, outer.base_layer):
            assert isinstance(layer, ParamWrapper)
            weight = getattr(module, layer.parameter_name)
            for name in names:
                weight += layer.delta_weight(name)
    return module


# -- layout ------------------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize(
    ("name", "parameter", "transposed"),
    [
        ("Qwen3MoeExperts", "gate_up_proj", False),  # (E, 2·I, H): out = 2·I
        ("Qwen3MoeExperts", "down_proj", False),
        ("GptOssExperts", "gate_up_proj", True),  # (E, H, 2·I): in = H
        ("GptOssExperts", "down_proj", True),
        ("Llama4TextExperts", "gate_up_proj", False),  # stored (E, in, out) without saying so: PEFT's rule
    ],
)
def test_layout_and_delta_are_peft(name, parameter, transposed):
    module = experts_module(name)
    ours = add_adapter(ParamWrapper(module, parameter), r=R)
    theirs = peft.tuners.lora.ParamWrapper(
        module,
        "default",
        parameter,
        peft.LoraConfig(r=R, lora_alpha=4, init_lora_weights=False),
        r=R,
        lora_alpha=4,
    )
    assert ours.is_transposed == transposed
    assert (ours.in_features, ours.out_features) == (theirs.in_features, theirs.out_features)
    for container in ("lora_A", "lora_B"):
        assert (
            getattr(ours, container)["a"].weight.shape == getattr(theirs, container)["default"].weight.shape
        )
    _randomize(ours)
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A["a"].weight)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B["a"].weight)
    delta = ours.delta_weight("a")
    assert delta.shape == getattr(module, parameter).shape
    assert torch.allclose(
        delta, theirs.get_delta_weight("default"), rtol=0, atol=4 * R * U * float(delta.detach().abs().max())
    )


def test_a_matrix_parameter_is_one_expert():
    """A 2-D parameter (a router's weight read by F.linear) is the plain LoRA layout."""
    layer = nn.Linear(H, 4, bias=False)
    wrapper = add_adapter(ParamWrapper(layer, "weight"), r=R)
    _randomize(wrapper)
    assert wrapper.num_experts == 1 and wrapper.lora_A["a"].weight.shape == (R, H)
    x = torch.randn(3, H)
    a, b = wrapper.factors("a")
    assert _close(wrapper(x), F.linear(x, layer.weight + 2.0 * b @ a), chained=1)


# -- forward ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Qwen3MoeExperts", "GptOssExperts"])
def test_forward_is_the_dense_reference_and_disable_is_the_base(name):
    outer = wrapped(name)
    args = experts_inputs(outer.owner())
    assert _close(outer(*args), dense_reference(outer, ["a"])(*args))
    outer.disable_adapters = outer.base_layer.disable_adapters = True
    assert torch.equal(outer(*args), outer.owner()(*args))


def test_forward_leaves_the_parameter_in_place():
    outer = wrapped()
    module = outer.owner()
    before = {n: p for n, p in module.named_parameters(recurse=False)}
    outer(*experts_inputs(module))
    after = {n: p for n, p in module.named_parameters(recurse=False)}
    assert all(after[n] is before[n] and type(after[n]) is nn.Parameter for n in before)


def test_several_active_adapters_add():
    outer = wrapped(adapters=("a", "b"))
    _randomize(outer, seed=5)
    for layer in (outer, outer.base_layer):
        layer.set_active(["a", "b"])
    args = experts_inputs(outer.owner())
    assert _close(outer(*args), dense_reference(outer, ["a", "b"])(*args))


def test_mixed_batch_is_each_row_with_its_adapter():
    """Rows are tokens: row i gets ``names[i]``, the same as running that token alone with it."""
    outer = wrapped(adapters=("a", "b"))
    hidden, index, weights = experts_inputs(outer.owner())
    names = ["a", "__base__", "b", "a", "b", "__base__"]
    with row_adapters(names):
        mixed = outer(hidden, index, weights)
    references = {
        "a": dense_reference(outer, ["a"]),
        "b": dense_reference(outer, ["b"]),
        "__base__": outer.owner(),
    }
    for i, name in enumerate(names):
        row = references[name](hidden[i : i + 1], index[i : i + 1], weights[i : i + 1])
        assert _close(mixed[i : i + 1], row), (i, name)
    assert torch.equal(outer(hidden, index, weights, adapter_names=["a"] * 6), outer(hidden, index, weights))


def test_mixed_batch_refusals():
    outer = wrapped()
    args = experts_inputs(outer.owner())
    with pytest.raises(AdapterError, match="adapter_names has 2 entries but the batch has 6 rows"):
        outer(*args, adapter_names=["a", "a"])
    llama4 = wrapped("Llama4TextExperts")
    with pytest.raises(AdapterError, match="rows are tokens"):
        llama4(*experts_inputs(llama4.owner()), adapter_names=["a"] * 24)
    for layer in (outer, outer.base_layer):
        layer.merge()
    with pytest.raises(AdapterError, match="while adapters are merged"):
        outer(*args, adapter_names=["a"] * 6)


def test_dropout_is_per_expert_on_each_product_input():
    """Train mode with dropout equals a plain loop over experts (Qwen3-MoE's eager forward) that
    drops each product's input with masks drawn in the same order from the same seed."""
    outer = wrapped(dropout=0.5)
    module = outer.owner()
    module.config._experts_implementation = "eager"
    outer.train()
    hidden, index, weights = experts_inputs(module)
    torch.manual_seed(11)
    got = outer(hidden, index, weights)
    torch.manual_seed(11)
    want = _eager_with_dropout(outer, hidden, index, weights, p=0.5)
    assert _close(got, want)
    outer.eval()
    assert _close(outer(hidden, index, weights), dense_reference(outer, ["a"])(hidden, index, weights))


def _eager_with_dropout(outer: ParamWrapper, hidden, index, weights, p: float) -> torch.Tensor:
    module, inner = outer.owner(), outer.base_layer
    assert isinstance(inner, ParamWrapper)

    def product(layer: ParamWrapper, x: torch.Tensor, expert: int) -> torch.Tensor:
        weight = getattr(module, layer.parameter_name)[expert]  # (out, in)
        a, b = layer.factors("a")
        a_e = a.reshape(layer.num_experts, R, -1)[expert]
        b_e = b.reshape(b.shape[0], R, layer.num_experts)[:, :, expert]
        dropped = x * dropout_keep_mask(x, p) / (1 - p)
        return x @ weight.T + layer.scaling["a"] * (dropped @ a_e.T) @ b_e.T

    out = torch.zeros_like(hidden)
    for expert in range(module.num_experts):
        slot, token = torch.where((index == expert).T)  # Qwen3-MoE's order: by slot, then token
        if token.numel() == 0:
            continue
        gate, up = product(inner, hidden[token], expert).chunk(2, dim=-1)
        y = product(outer, module.act_fn(gate) * up, expert)
        out.index_add_(0, token, y * weights[token, slot, None])
    return out


# -- merging ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_unmerged_and_unmerge_restores_bit_for_bit(dtype):
    outer = wrapped("GptOssExperts")
    outer.owner().to(dtype)
    module = outer.owner()
    originals = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
    args = [a.to(dtype) if a.is_floating_point() else a for a in experts_inputs(module)]
    unmerged = outer(*args)
    for layer in (outer, outer.base_layer):
        layer.merge()
        layer.merge()  # merging twice is merging once
    merged = outer(*args)
    if dtype == torch.float32:
        assert _close(merged, unmerged)
    else:  # one rounding of the merged weight to bfloat16 (2⁻⁸) per product, against float32 factors
        assert torch.allclose(
            merged.float(), unmerged.float(), rtol=0, atol=2 * 2**-8 * float(unmerged.abs().max()) * 4
        )
    for layer in (outer, outer.base_layer):
        layer.unmerge()
    assert all(torch.equal(p, originals[n]) for n, p in module.named_parameters(recurse=False))


# -- refused ------------------------------------------------------------------------------------------
def test_options_refused_on_parameters():
    module = experts_module("Qwen3MoeExperts")
    problems = ParamWrapper.parameter_problems(
        module, "gate_up_proj", init="pissa", lora_bias=True, variant=DORA
    )
    assert any("lora_bias=True" in p for p in problems)
    assert any("DoRA" in p for p in problems)
    assert any("init_lora_weights='pissa'" in p for p in problems)
    module._is_expert_parallel = True
    assert any(
        "expert-parallel" in p
        for p in ParamWrapper.parameter_problems(
            module, "down_proj", init=True, lora_bias=False, variant=None
        )
    )
    norm = nn.LayerNorm(4)
    assert any(
        "2-D matrix or 3-D stack" in p
        for p in ParamWrapper.parameter_problems(norm, "weight", init=True, lora_bias=False, variant=None)
    )


def test_kernel_implementations_are_refused_at_forward():
    outer = wrapped()
    outer.owner().config._experts_implementation = "deepgemm"
    with pytest.raises(AdapterError, match="experts_implementation='deepgemm'.*grouped_mm"):
        outer(*experts_inputs(outer.owner()))


def test_rank_changes_and_branch_are_refused():
    outer = wrapped()
    a, b = outer.factors("a")
    with pytest.raises(AdapterError, match="stacked"):
        outer.set_factors("a", a[:-1], b[:, :-1])
    outer.set_factors("a", a.detach() * 2, b.detach())  # same shapes: fine, rank kept
    assert outer.r["a"] == R
    with pytest.raises(AdapterError, match="acts inside"):
        outer.lora_branch(torch.randn(2, H), "a")


def test_jetmoe_parallel_experts():
    """JetMoE's experts take no config: ``JetMoeParallelExperts(num_experts, input_size, output_size)``,
    read as ``F.linear(x_e, W[e])`` for consecutive groups of rows."""
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeParallelExperts

    torch.manual_seed(0)
    module = JetMoeParallelExperts(3, H, 4)
    nn.init.normal_(module.weight)
    layer = add_adapter(ParamWrapper(module, "weight"), r=R)
    _randomize(layer)
    x, sizes = torch.randn(7, H), [2, 0, 5]
    dense = module.weight + layer.delta_weight("a")
    want = torch.cat([F.linear(x[:2], dense[0]), F.linear(x[2:], dense[2])])
    assert _close(layer(x, sizes), want, chained=1)


def test_pickle_deepcopy_and_repr():
    outer = wrapped()
    args = experts_inputs(outer.owner())
    for copied in (copy.deepcopy(outer), pickle.loads(pickle.dumps(outer))):
        assert torch.equal(copied(*args), outer(*args))
    text = repr(outer)
    assert text.startswith("lora.ParamWrapper(\n  parameter_name='down_proj',")
    assert "parameter_name='gate_up_proj'" in text
