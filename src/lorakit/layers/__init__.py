"""LoRA layer kinds and the dispatch table from a base module's type to its LoRA layer.

A new kind registers here (``register_layer``); nothing subclasses a template per model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lorakit.layers.base import BASE_ROWS, LoraLayer
from lorakit.layers.conv import Conv
from lorakit.layers.embedding import Embedding
from lorakit.layers.linear import Linear, is_conv1d, linear_shape
from lorakit.layers.modules_to_save import ModulesToSaveWrapper

__all__ = [
    "BASE_ROWS",
    "LoraLayer",
    "Linear",
    "Embedding",
    "Conv",
    "ModulesToSaveWrapper",
    "lora_layer_for",
    "register_layer",
    "supported_kinds",
    "is_conv1d",
    "linear_shape",
]

# (predicate on the base module, LoRA layer class, human-readable kind); first match wins.
_DISPATCH: list[tuple[Callable[[nn.Module], bool], type[LoraLayer], str]] = [
    (lambda m: isinstance(m, nn.Linear), Linear, "torch.nn.Linear"),
    (is_conv1d, Linear, "transformers Conv1D"),
    (lambda m: isinstance(m, nn.Embedding), Embedding, "torch.nn.Embedding"),
    (
        lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == 1,
        Conv,
        "torch.nn.Conv1d/2d/3d (groups=1)",
    ),
]


def register_layer(predicate: Callable[[nn.Module], bool], layer: type[LoraLayer], kind: str) -> None:
    """Teach lorakit a new base-layer kind; earlier registrations win over later ones."""
    _DISPATCH.append((predicate, layer, kind))


def lora_layer_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap ``module``, or ``None``."""
    for predicate, layer, _ in _DISPATCH:
        if predicate(module):
            return layer
    return None


def supported_kinds() -> list[str]:
    return [kind for _, _, kind in _DISPATCH]
