"""Tiny plain models and helpers shared by the adapter-file tests (the transformers zoo is zoo.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Tiny(nn.Module):
    """Embedding → Linear → ReLU → Linear, with biases: forward((B, S) ids) → (B, S, 4)."""

    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.emb(ids))))


class Shared(nn.Module):
    """One Linear module reached through two paths, and two Linears whose weight is one Parameter
    (tied), inside a block that can be saved whole (``modules_to_save=["block"]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.again = self.proj  # the same module object at a second path
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.block[1].weight = self.block[0].weight  # tied
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.again(torch.relu(self.proj(x)))))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def tiny_inputs() -> torch.Tensor:
    return torch.arange(12).reshape(2, 6) % 20


def snapshot(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor], dict[str, bool]]:
    """Structure (module names and types), every tensor, and every requires_grad flag."""
    structure = [(n, type(m).__name__) for n, m in model.named_modules()]
    tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return structure, tensors, grads


def assert_unchanged(model: nn.Module, before: Any) -> None:
    structure, tensors, grads = snapshot(model)
    assert structure == before[0], "the model's structure changed"
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
