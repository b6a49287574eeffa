"""Snapshots of a model's state and the checks that nothing changed, and a helper that moves every
trainable tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every state-dict tensor (compare with :func:`assert_same_state`)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def structure(model: nn.Module) -> list[tuple[str, str]]:
    """Every module's name and type."""
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    """The same state-dict keys in the same order, every tensor identical (dtype included; NaN equal
    to NaN in the same place)."""
    after = model.state_dict()
    assert list(after) == list(before)
    changed = [k for k, v in before.items() if not _identical(v, after[k])]
    assert not changed, f"tensors changed: {changed}"


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN equal to NaN in the same place."""
    if a.is_floating_point() and b.is_floating_point():
        return a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return torch.equal(a, b)


def snapshot_all(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor], dict[str, bool]]:
    """Structure (module names and types), every tensor, and every requires_grad flag (compare with
    :func:`assert_unchanged`)."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return structure(model), tensors, grads


def assert_unchanged(model: nn.Module, before: Any) -> None:
    """The structure, the state-dict keys, every tensor and every requires_grad flag as in ``before``
    (a :func:`snapshot_all`)."""
    structure_now, tensors, grads = snapshot_all(model)
    assert structure_now == before[0], "the model's structure changed"
    assert tensors.keys() == before[1].keys(), "the model's state-dict keys changed"
    for key, value in tensors.items():
        assert torch.equal(value, before[1][key]), f"{key} changed"
    assert grads == before[2], "requires_grad flags changed"


def perturb_trainable(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Move every trainable tensor (LoRA factors, modules-to-save copies, trained biases) so that
    each kind visibly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen).to(param.dtype) * scale)
