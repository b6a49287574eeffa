"""The dispatch tables: which LoRA layer kind wraps a base module, and which variant a config asks for.

A new layer kind is one line in :data:`_KINDS` (or a :func:`register_layer` call from outside), and
a new variant one line in :data:`_VARIANTS`: nothing else tests types. Earlier entries win, so a
specific kind (a quantized linear, say) goes before the general one it subclasses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lorakit.layers.base import LoraLayer
from lorakit.layers.conv import Conv
from lorakit.layers.conv_grouped import GroupedConv, is_grouped_conv
from lorakit.layers.dora import DORA
from lorakit.layers.embedding import Embedding
from lorakit.layers.linear import Linear, is_conv1d
from lorakit.layers.mha import MultiheadAttention
from lorakit.layers.variant import LoraVariant

__all__ = ["register_layer", "lora_layer_for", "supported_kinds", "variant_for", "variants"]

# (predicate on the base module, LoRA layer class, human-readable kind); first match wins.
_KINDS: list[tuple[Callable[[nn.Module], bool], type[LoraLayer], str]] = [
    (lambda m: isinstance(m, nn.Linear), Linear, "torch.nn.Linear"),
    (is_conv1d, Linear, "transformers Conv1D"),
    (lambda m: isinstance(m, nn.Embedding), Embedding, "torch.nn.Embedding"),
    (
        lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.groups == 1,
        Conv,
        "torch.nn.Conv1d/2d/3d (groups=1)",
    ),
    (is_grouped_conv, GroupedConv, "torch.nn.Conv1d/2d/3d (groups>1)"),
    (lambda m: isinstance(m, nn.MultiheadAttention), MultiheadAttention, "torch.nn.MultiheadAttention"),
]

_VARIANTS: list[LoraVariant] = [DORA]


def register_layer(
    predicate: Callable[[nn.Module], bool], layer: type[LoraLayer], kind: str, *, first: bool = False
) -> None:
    """Teach lorakit a new base-layer kind. ``first=True`` puts it before the built-in kinds (for a
    subclass of a module they already handle); otherwise earlier registrations win."""
    entry = (predicate, layer, kind)
    if first:
        _KINDS.insert(0, entry)
    else:
        _KINDS.append(entry)


def lora_layer_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap ``module``, or ``None``."""
    for predicate, layer, _ in _KINDS:
        if predicate(module):
            return layer
    return None


def supported_kinds() -> list[str]:
    return [kind for _, _, kind in _KINDS]


def variants() -> list[LoraVariant]:
    return list(_VARIANTS)


def variant_for(config: Any) -> LoraVariant | None:
    """The variant ``config`` (a :class:`~lorakit.config.LoraConfig`) asks for, or ``None``."""
    chosen = [v for v in _VARIANTS if v.applies(config)]
    return chosen[0] if chosen else None
