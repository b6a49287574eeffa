"""``BaseTunerLayer``: how PEFT users recognise and drive an adapter layer, as an abstract interface.

PEFT code finds adapter layers with ``isinstance(module, BaseTunerLayer)`` and then reads or calls
the members below. Every lorakit LoRA layer is one (:class:`lorakit.layers.base.LoraLayer`
implements them), so such code runs unchanged after ``from lorakit import BaseTunerLayer``.
Modules-to-save wrappers are not tuner layers, as in PEFT.

==========================  ======================================================================
member                      meaning
==========================  ======================================================================
``get_base_layer()``        the wrapped module (through nested adapter layers)
``active_adapters``         the names forward applies (``active_adapter``: the one name, or the list)
``merged_adapters``         the names inside the base weight; ``merged`` is ``bool`` of it
``disable_adapters``        ``True`` while the layer computes as its base layer
``enable_adapters(flag)``   switch that on or off
``set_adapter(names)``      activate ``names``; they become trainable unless ``inference_mode``
``set_requires_grad(...)``  switch the gradients of some adapters' tensors
``merge(...)`` / ``unmerge()``  fold adapters into the base weight and back
``delete_adapter(name)``    remove an adapter's tensors from this layer
``_all_available_adapter_names()``  every adapter the layer holds, sorted (PEFT's private helper,
                            which code written for PEFT calls on any tuner layer)
==========================  ======================================================================
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from torch import nn

__all__ = ["BaseTunerLayer"]


class BaseTunerLayer(abc.ABC):
    """The adapter-layer interface PEFT users program against (see the module docstring)."""

    active_adapters: list[str]
    merged_adapters: list[str]
    disable_adapters: bool

    @abc.abstractmethod
    def get_base_layer(self) -> nn.Module:
        """The module this layer adapts (unwrapping nested adapter layers)."""

    @property
    @abc.abstractmethod
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name, or the list of names when several (or none) are active."""

    @property
    @abc.abstractmethod
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weight."""

    @abc.abstractmethod
    def enable_adapters(self, enabled: bool) -> None:
        """``False``: compute as the base layer (and freeze the adapters); ``True``: undo that."""

    @abc.abstractmethod
    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; they become trainable and every other adapter frozen, or
        all are frozen with ``inference_mode``."""

    @abc.abstractmethod
    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Set ``requires_grad`` on the tensors of ``adapter_names`` held here."""

    @abc.abstractmethod
    def merge(
        self,
        adapter_names: Sequence[str] | None = None,
        *,
        safe_merge: bool = False,
        keep_original: bool = True,
    ) -> None:
        """Fold ``adapter_names`` (default: the active ones) into the base weight."""

    @abc.abstractmethod
    def unmerge(self) -> None:
        """Restore the base weight as it was before the first merge."""

    @abc.abstractmethod
    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``'s tensors from this layer."""

    def _all_available_adapter_names(self) -> list[str]:
        """Every adapter this layer holds, sorted (PEFT's helper of that name)."""
        names: list[str] = getattr(self, "adapter_names", [])
        return sorted(names)
