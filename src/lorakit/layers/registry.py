"""The dispatch tables: which LoRA layer kind wraps a base module, and which variant a config asks for.

A new layer kind is one line in :data:`_KINDS` (or a :func:`register_layer` call from outside), and
a new variant one line in :data:`_VARIANTS`: nothing else tests types. Earlier entries win, so a
specific kind (a quantized linear, say) goes before the general one it subclasses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lorakit.layers import bnb
from lorakit.layers.base import LoraLayer
from lorakit.layers.bnb import Linear4bit, Linear8bitLt, is_bnb_4bit, is_bnb_8bit
from lorakit.layers.conv import Conv
from lorakit.layers.conv_grouped import GroupedConv, is_grouped_conv
from lorakit.layers.dora import DORA
from lorakit.layers.embedding import Embedding
from lorakit.layers.linear import Linear, is_conv1d
from lorakit.layers.mha import MultiheadAttention
from lorakit.layers.parameter import ParamWrapper, is_adaptable_parameter
from lorakit.layers.torchao import TorchaoLoraLinear, is_torchao_linear
from lorakit.layers.variant import LoraVariant

__all__ = [
    "register_layer",
    "lora_layer_for",
    "parameter_layer_for",
    "supported_kinds",
    "supported_parameter_kinds",
    "variant_for",
    "variants",
    "prepare_model",
]

# (predicate on the base module, LoRA layer class, human-readable kind); first match wins.
_KINDS: list[tuple[Callable[[nn.Module], bool], type[LoraLayer], str]] = [
    (is_bnb_4bit, Linear4bit, "bitsandbytes Linear4bit (NF4/FP4)"),  # subclasses nn.Linear
    (is_bnb_8bit, Linear8bitLt, "bitsandbytes Linear8bitLt (int8)"),  # subclasses nn.Linear
    (is_torchao_linear, TorchaoLoraLinear, "torch.nn.Linear with a torchao int8 weight"),
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

# Parameters (``target_parameters``): (predicate on (owning module, parameter name), layer, kind).
_PARAMETER_KINDS: list[tuple[Callable[[nn.Module, str], bool], type[ParamWrapper], str]] = [
    (
        is_adaptable_parameter,
        ParamWrapper,
        "a floating 2-D matrix or 3-D stack of experts nn.Parameter (not a bias)",
    ),
]

_VARIANTS: list[LoraVariant] = [DORA]

# Whole-model preparations a kind needs beyond its own targets, run by every injection.
_MODEL_PREPARATIONS: list[Callable[[nn.Module], None]] = [bnb.prepare_base]


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


def prepare_model(model: nn.Module) -> None:
    """Run every kind's whole-model preparation (bitsandbytes 4-bit: see
    :func:`lorakit.layers.bnb.prepare_base`); idempotent, and a no-op for models without such layers."""
    for prepare in _MODEL_PREPARATIONS:
        prepare(model)


def supported_kinds() -> list[str]:
    return [kind for _, _, kind in _KINDS]


def parameter_layer_for(owner: nn.Module, name: str) -> type[ParamWrapper] | None:
    """The LoRA layer class that can adapt parameter ``name`` of ``owner``, or ``None``."""
    for predicate, layer, _ in _PARAMETER_KINDS:
        if predicate(owner, name):
            return layer
    return None


def supported_parameter_kinds() -> list[str]:
    return [kind for _, _, kind in _PARAMETER_KINDS]


def variants() -> list[LoraVariant]:
    return list(_VARIANTS)


def variant_for(config: Any) -> LoraVariant | None:
    """The variant ``config`` (a :class:`~lorakit.config.LoraConfig`) asks for, or ``None``."""
    chosen = [v for v in _VARIANTS if v.applies(config)]
    return chosen[0] if chosen else None
