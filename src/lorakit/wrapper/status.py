"""PEFT's status reports: one record per adapter layer, and a model-wide summary that says
``"irregular"`` wherever the layers disagree (a sign of a model in an inconsistent state).

Both are read-only and work on a ``PeftModel`` or on any model holding LoRA layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

from torch import nn

from lorakit.errors import AdapterError
from lorakit.layers import LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper
from lorakit.model import state
from lorakit.model.injection import lora_modules
from lorakit.wrapper.lora_model import LoraModel

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]
IRREGULAR: Irregular = "irregular"


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapter layer (a LoRA layer or a modules-to-save wrapper).

    ``requires_grad``/``devices``: per adapter, whether its tensors train (``"irregular"`` if only
    some do) and the device types they are on."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model: counts, and each layer field reduced to one value or ``"irregular"``."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None


def _all_or_none(flags: Iterable[bool | Irregular]) -> bool | Irregular:
    values = list(flags)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return IRREGULAR


def _user_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _layer_status(
    name: str, module: LoraLayer | ModulesToSaveWrapper | TrainableTokensWrapper
) -> TunerLayerStatus:
    adapters = module.adapter_names
    params = {a: module.adapter_parameters(a) for a in adapters}
    merged = list(module.merged_adapters) if isinstance(module, (LoraLayer, TrainableTokensWrapper)) else []
    return TunerLayerStatus(
        name=name,
        module_type=repr(module).partition("(")[0],
        enabled=not module.disable_adapters,
        active_adapters=list(module.active_adapters),
        merged_adapters=merged,
        requires_grad={a: _all_or_none(p.requires_grad for p in ps) for a, ps in params.items() if ps},
        available_adapters=sorted(adapters),
        devices={a: sorted({p.device.type for p in ps}) for a, ps in params.items() if ps},
        quantization_backend=getattr(module, "quantization_backend", None),
    )


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every LoRA layer and modules-to-save wrapper, in module order (names relative
    to the ``LoraModel``, as PEFT reports them: ``model.<path>``)."""
    root = getattr(model, "base_model", None)
    root = root if isinstance(root, LoraModel) else model
    found = [_layer_status(n, m) for n, m in lora_modules(root)]
    if not found:
        raise AdapterError(
            "No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
            "PEFT adapters injected in the model."
        )
    return found


def _merged(layers: list[TunerLayerStatus]) -> list[str] | Irregular:
    """Adapters merged somewhere; ``"irregular"`` if one of them is unmerged in a layer holding it."""
    everywhere = sorted({a for s in layers for a in s.merged_adapters})
    for s in layers:
        if (set(s.available_adapters) - set(s.merged_adapters)) & set(everywhere):
            return IRREGULAR
    return everywhere


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """The model-wide summary of :func:`get_layer_status` plus parameter counts and types."""
    layers = get_layer_status(model)
    user = _user_model(model)
    configs = getattr(model, "peft_config", None) or {}
    is_wrapper = user is not model
    trainable, total = state.count_parameters(model)
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    grads: dict[str, list[bool | Irregular]] = {}
    devices: dict[str, set[str]] = {}
    for s in layers:
        for a, flag in s.requires_grad.items():
            grads.setdefault(a, []).append(flag)
        for a, kinds in s.devices.items():
            devices.setdefault(a, set()).update(kinds)
    backends = {s.quantization_backend for s in layers}
    return TunerModelStatus(
        base_model_type=type(user).__name__ if is_wrapper or _is_transformers(user) else "other",
        adapter_model_type=type(model.base_model).__name__ if is_wrapper else "None",  # type: ignore[union-attr]
        peft_types={a: "LORA" for a in configs} if is_wrapper else {},
        trainable_params=trainable,
        total_params=total,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else IRREGULAR,
        active_adapters=list(active.pop()) if len(active) == 1 else IRREGULAR,
        merged_adapters=_merged(layers),
        requires_grad={a: _all_or_none(flags) for a, flags in grads.items()},
        available_adapters=sorted({a for s in layers for a in s.available_adapters}),
        devices={a: sorted(kinds) for a, kinds in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else IRREGULAR,
    )


def _is_transformers(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel``, recognised without importing transformers."""
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)
