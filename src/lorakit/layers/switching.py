"""PEFT's activation rule for the wrappers whose adapters each own whole parameters (a module to
save's copy, trainable token rows): ``set_adapter`` activates the named adapters, which train unless
``inference_mode`` while the others are frozen; disabling freezes every adapter and enabling
re-applies the active set."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from torch import nn

__all__ = ["AdapterSwitching"]


class AdapterSwitching(abc.ABC):
    """Mixed into an ``nn.Module`` wrapper, which says what its adapters are and own."""

    active_adapters: list[str]
    disable_adapters: bool

    @property
    @abc.abstractmethod
    def adapter_names(self) -> list[str]:
        """Every adapter this wrapper holds."""

    @abc.abstractmethod
    def set_active(self, names: Sequence[str]) -> None:
        """Make ``names`` (those this wrapper holds) the active adapters, or refuse them."""

    @abc.abstractmethod
    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters adapter ``name`` owns here (trained when it is active)."""

    def base_parameters(self) -> list[nn.Parameter]:
        """Parameters no adapter owns that must stay frozen (by default none: a wrapped weight is
        not the wrapper's to freeze)."""
        return []

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate ``adapter_names``; their parameters train unless ``inference_mode``, the other
        adapters' are frozen (PEFT's rule)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.set_active(names)
        for param in self.base_parameters():
            param.requires_grad_(False)
        for name in self.adapter_names:
            self.set_requires_grad(name, name in names and not inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        """As PEFT: disabling freezes every adapter; enabling re-applies :meth:`set_adapter`."""
        if enabled:
            self.set_adapter(self.active_adapters)
        else:
            self.set_requires_grad(self.adapter_names, False)
        self.disable_adapters = not enabled

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(requires_grad)
