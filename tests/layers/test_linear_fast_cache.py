"""The stacked factors of mixed batches are never stale: not after an in-place write, not after an
adapter is deleted and re-created (whose tensors may reuse the old ones' ``id``)."""

from __future__ import annotations

import torch
from torch import nn

from lorakit.layers import Linear


def _add(layer: Linear, name: str, seed: int) -> None:
    torch.manual_seed(seed)
    layer.add_adapter(name, 4, 8.0, use_rslora=False, dropout=0.0, init=False, lora_bias=False)


def _reference(layer: Linear, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Row by row through the plain branch: ``base(x_i) + lora_branch(x_i, names[i])``."""
    rows = []
    for i, name in enumerate(names):
        out = layer.base_layer(x[i : i + 1])
        rows.append(out if name == "__base__" else out + layer.lora_branch(x[i : i + 1], name))
    return torch.cat(rows)


@torch.no_grad()
def test_recreated_adapters_are_never_served_old_factors() -> None:
    torch.manual_seed(0)
    layer = Linear(nn.Linear(16, 12)).eval()
    _add(layer, "a", 1)
    _add(layer, "b", 2)
    x = torch.randn(3, 5, 16)
    names = ["a", "b", "__base__"]
    for cycle in range(300):  # the old id-keyed cache served stale rows in ~1 of 150 cycles
        torch.testing.assert_close(layer(x, adapter_names=names), _reference(layer, x, names))
        layer.delete_adapter("b")
        _add(layer, "b", 100 + cycle)  # new factors, same shapes: ids may be reused


@torch.no_grad()
def test_in_place_writes_and_rescaling_refresh_the_stacks() -> None:
    torch.manual_seed(0)
    layer = Linear(nn.Linear(8, 6)).eval()
    _add(layer, "a", 1)
    _add(layer, "b", 2)
    x = torch.randn(2, 3, 8)
    names = ["a", "b"]
    layer(x, adapter_names=names)
    layer.lora_B["a"].weight.mul_(3.0)  # an optimizer step or a load writes in place
    torch.testing.assert_close(layer(x, adapter_names=names), _reference(layer, x, names))
    layer.scaling["b"] = 0.25
    torch.testing.assert_close(layer(x, adapter_names=names), _reference(layer, x, names))


@torch.no_grad()
def test_a_layer_with_cached_stacks_pickles_and_copies() -> None:
    import copy
    import pickle

    torch.manual_seed(0)
    layer = Linear(nn.Linear(8, 6)).eval()
    _add(layer, "a", 1)
    _add(layer, "b", 2)
    x = torch.randn(2, 3, 8)
    expected = layer(x, adapter_names=["a", "b"])  # fills the cache of weak references
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        torch.testing.assert_close(clone(x, adapter_names=["a", "b"]), expected, rtol=0, atol=0)
