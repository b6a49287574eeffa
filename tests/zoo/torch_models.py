"""The plain-torch models of the test suite (seeded where a builder function is given)."""

from __future__ import annotations

import torch
from torch import nn

from zoo.transformers_models import SMALL_VOCAB, VOCAB


class Toy(nn.Module):
    """One module of every kind lorakit adapts: Embedding → Linear → Conv1D → Conv1d → Conv2d → head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(SMALL_VOCAB, 8)
        self.lin = nn.Linear(8, 8)
        self.c1d = Conv1D(8, 8)  # (nf=out, nx=in)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T) token ids
        h = self.emb(x)  # (B, T, 8)
        h = torch.tanh(self.lin(h))
        h = self.c1d(h)  # (B, T, 8)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)  # (B, T, 8)
        b, t, _ = h.shape
        h = self.conv2(h.reshape(b, 2, t, 4)).reshape(b, t, 8)  # (B, 2, T, 4) → (B, T, 8)
        return self.head(h)


TOY_TARGETS = ["emb", "lin", "c1d", "conv1", "conv2"]


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


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


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


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


class MLP(nn.Module):
    """Small custom model with Embedding, Conv2d and Linear layers.

    forward(input_ids: (B, S) long, pixel_values: (B, 3, 6, 6) float) -> (B, 8)
    """

    def __init__(self, vocab: int = VOCAB, emb_dim: int = 16, conv_out: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb_dim)
        self.conv = nn.Conv2d(3, conv_out, kernel_size=3, padding=1)
        self.lin0 = nn.Linear(emb_dim + conv_out, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, 8)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        tok = self.emb(input_ids).mean(dim=1)
        img = self.conv(pixel_values).mean(dim=(2, 3))
        h = self.act(self.lin0(torch.cat([tok, img], dim=-1)))
        return self.lin1(h)


class ConvGroups(nn.Module):
    """Linear → grouped Conv2d (groups 2) → grouped Conv1d (groups 4) → Linear, as PEFT's
    ``ModelConv2DGroups`` tests a grouped convolution between linear layers.

    forward(x: (B, 12) float) → (B, 2)
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 4 * 9)
        self.conv2d = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # weight (8, 2, 3, 3)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1, groups=4)  # weight (8, 2, 3)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(8 * 9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(x).reshape(-1, 4, 3, 3)  # (B, 4, 3, 3)
        h = self.act(self.conv2d(h))  # (B, 8, 3, 3)
        h = self.act(self.conv1d(h.flatten(2)))  # (B, 8, 9)
        return self.lin1(h.flatten(1))


def conv_groups(seed: int = 0) -> ConvGroups:
    torch.manual_seed(seed)
    return ConvGroups().eval()


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (E=8, 2 heads, sequence first) → Linear, as PEFT's ``ModelMha``.

    forward(x: (T, B, 8) float) → (T, B, 3)
    """

    def __init__(self, batch_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first)
        self.lin0 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.mha(x, x, x)
        return self.lin0(torch.tanh(h))


def attention(seed: int = 0, **kwargs: bool) -> Attention:
    torch.manual_seed(seed)
    return Attention(**kwargs).eval()


def fake_engine(class_name: str) -> type[nn.Module]:
    """A wrapper module class named like a distributed engine's (``DistributedDataParallel``, ...):
    lorakit recognises engines by class name. ``fake_engine(name)(model)`` holds ``model`` as
    ``.module`` and forwards to it."""

    def forward(self: nn.Module, *args: object, **kwargs: object) -> object:
        return self.module(*args, **kwargs)

    def init(self: nn.Module, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self.module = module

    return type(class_name, (nn.Module,), {"__init__": init, "forward": forward})
