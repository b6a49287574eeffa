"""Trainable token rows on single modules: the outputs and gradients of the replaced table
``E'`` (E with rows I replaced by Δ) without building it, exact merges, tied heads, mixed batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import AdapterError
from lorakit.layers import TrainableTokensWrapper
from lorakit.layers.rows import row_adapters

V, D = 12, 4


class Scaled(nn.Embedding):
    """An embedding that scales its rows in forward, as Gemma's does."""

    def __init__(self) -> None:
        super().__init__(V, D, padding_idx=0)
        self.register_buffer("embed_scale", torch.tensor(3.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


def _wrapped(module: nn.Module, indices: dict[str, list[int]], seed: int = 0) -> TrainableTokensWrapper:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
        module.requires_grad_(False)
    wrapper = TrainableTokensWrapper(module)
    for name, rows in indices.items():
        wrapper.add_adapter(name, rows)
        with torch.no_grad():
            wrapper.rows(name).add_(torch.randn(len(rows), D))  # "trained"
    wrapper.set_active(list(indices)[:1])
    return wrapper


def _assert_dot_products_close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """Two float32 evaluations of the same length-D dot products (+ bias) differ by at most
    2·D·eps·Σ|xᵢwᵢ| each (the GEMMs may sum in different orders)."""
    bound = 2 * D * torch.finfo(torch.float32).eps * (x.abs() @ weight.abs().T) + 1e-30
    assert ((out - ref).abs() <= bound).all()


def _replaced(wrapper: TrainableTokensWrapper, name: str) -> torch.Tensor:
    """E' as PEFT builds it (autograd reaches Δ through it)."""
    index = torch.tensor(wrapper.token_indices[name])
    return wrapper.weight.index_copy(0, index, wrapper.rows(name))


IDS = torch.tensor([[0, 1, 2, 3, 5], [3, 3, 0, 7, 1]])  # row 0 is padding, rows 1 and 3 trained


@pytest.mark.parametrize("module", [nn.Embedding(V, D, padding_idx=0), Scaled()], ids=["embedding", "scaled"])
def test_embedding_rows_equal_the_replaced_table_in_value_and_gradient(module):
    wrapper = _wrapped(module, {"a": [1, 3, 0]})  # the padding row too: it gets no gradient
    out = wrapper(IDS)
    scale = 3.0 if isinstance(module, Scaled) else 1.0
    ref = F.embedding(IDS, _replaced(wrapper, "a"), padding_idx=0) * scale
    assert torch.equal(out, ref)  # copies and one product: bit for bit
    (grad,) = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), wrapper.rows("a"))
    (ref_grad,) = torch.autograd.grad((ref * torch.arange(ref.numel()).view_as(ref)).sum(), wrapper.rows("a"))
    assert torch.equal(grad, ref_grad) and not grad[2].any()


def test_head_columns_equal_the_replaced_weight():
    head = nn.Linear(D, V, bias=True)
    wrapper = _wrapped(head, {"a": [2, 9]})
    x = torch.randn(2, 3, D)
    out = wrapper(x)
    ref = F.linear(x, _replaced(wrapper, "a"), head.bias)
    # each entry is one length-D dot product (+ bias), computed by two different GEMM calls
    _assert_dot_products_close(out.detach(), ref.detach(), x, _replaced(wrapper, "a").detach())
    (grad,) = torch.autograd.grad(out.sum(), wrapper.rows("a"))
    torch.testing.assert_close(grad, x.sum(dim=(0, 1)).expand(2, D))


def test_merge_writes_the_rows_and_unmerge_restores_them_bit_for_bit():
    wrapper = _wrapped(nn.Embedding(V, D), {"a": [1, 3], "b": [4, 5]})
    wrapper.set_active(["a", "b"])
    original = wrapper.weight.detach().clone()
    before = wrapper(IDS).detach()
    wrapper.merge()
    assert wrapper.merged_adapters == ["a", "b"]
    assert torch.equal(wrapper.weight[[1, 3, 4, 5]], torch.cat([wrapper.rows("a"), wrapper.rows("b")]))
    assert torch.equal(wrapper(IDS), before)
    wrapper.unmerge()
    assert torch.equal(wrapper.weight, original) and not wrapper.merged


def test_adapters_on_the_same_row_cannot_be_used_together():
    wrapper = _wrapped(nn.Embedding(V, D), {"a": [1, 3], "b": [3, 4]})
    with pytest.raises(AdapterError, match="both train token row 3"):
        wrapper.set_active(["a", "b"])
    wrapper.merge(["a"])
    with pytest.raises(AdapterError, match="both train token row 3"):
        wrapper.merge(["b"])
    assert wrapper.merged_adapters == ["a"]


def test_tied_head_shares_rows_owns_nothing_and_follows_the_embeddings_merge():
    embedding = _wrapped(nn.Embedding(V, D), {"a": [1, 3]})
    head_module = nn.Linear(D, V, bias=False)
    head_module.weight = embedding.base_layer.weight  # tied
    head = TrainableTokensWrapper(head_module, tied_to=embedding)
    head.set_active(["a"])
    assert head.rows("a") is embedding.rows("a") and head.adapter_parameters("a") == []
    h = torch.randn(2, D)
    before = head(h).detach()
    weight = _replaced(embedding, "a").detach()
    _assert_dot_products_close(before, h @ weight.T, h, weight)
    head.merge()  # a tied wrapper writes nothing
    assert not head.merged
    embedding.merge()
    assert head.merged
    _assert_dot_products_close(head(h).detach(), before, h, weight)
    head.unmerge()  # nothing of its own to restore
    assert head.merged
    embedding.unmerge()
    assert not head.merged


def test_mixed_batch_rows_get_their_adapters():
    wrapper = _wrapped(nn.Embedding(V, D), {"a": [1, 3], "b": [5, 7]})
    alone = {}
    for name in ("a", "b"):
        wrapper.set_active([name])
        alone[name] = wrapper(IDS)
    wrapper.set_active([])
    with row_adapters(["b", "a"]):
        mixed = wrapper(IDS)
    assert torch.equal(mixed[0], alone["b"][0]) and torch.equal(mixed[1], alone["a"][1])
    with row_adapters(["__base__", "a"]):
        assert torch.equal(wrapper(IDS)[0], wrapper.base_layer(IDS)[0])


def test_disabled_and_deleted_adapters_leave_the_base():
    wrapper = _wrapped(nn.Embedding(V, D), {"a": [1, 3]})
    wrapper.disable_adapters = True
    assert torch.equal(wrapper(IDS), wrapper.base_layer(IDS))
    wrapper.disable_adapters = False
    wrapper.delete_adapter("a")
    assert wrapper.adapter_names == [] and len(wrapper.token_adapter.trainable_tokens_delta) == 0
