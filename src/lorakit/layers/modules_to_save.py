"""A module trained in full beside the adapters (a classification head, say): one trainable copy
per adapter, the original kept frozen, selected by the active adapter.

State-dict layout is PEFT's: ``<path>.original_module.*`` and ``<path>.modules_to_save.<name>.*``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.layers.rows import rows_for
from lorakit.layers.switching import AdapterSwitching


class ModulesToSaveWrapper(nn.Module, AdapterSwitching):
    """``forward`` runs the active adapter's copy, or the original when disabled or none is active.

    Attributes the wrapper does not have itself (``weight``, ``bias``, ``out_features``, a custom
    module's own fields, ...) are read from that same module, so code that reaches into the wrapped
    module keeps working; the lookup only consults ``_modules`` and so cannot recurse.
    """

    # PEFT's names: the per-adapter container, and (none) per-adapter tables
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("modules_to_save",)
    other_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapters' names, as a list (as PEFT's layers give them)."""
        return list(self.active_adapters)

    def has_adapter(self, name: str) -> bool:
        return name in self.modules_to_save

    def add_adapter(self, name: str, module: nn.Module | None = None) -> None:
        """Give adapter ``name`` its trainable copy: ``module`` (a copy that shares a tied weight,
        say), else a deep copy of the original."""
        self.modules_to_save[name] = copy.deepcopy(self.original_module) if module is None else module

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        present = [n for n in names if n in self.modules_to_save]
        if len(present) > 1:
            raise AdapterError(
                f"adapters {present} each have their own copy of a module to save; only one can be active"
            )
        self.active_adapters = present  # as PEFT: only the adapters this wrapper has a copy for

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.original_module.parameters())  # PEFT's rule: the original never trains

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    @property
    def active_module(self) -> nn.Module:
        present = [n for n in self.active_adapters if n in self.modules_to_save]
        if self.disable_adapters or not present:
            return self.original_module
        return self.modules_to_save[present[0]]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper
        except AttributeError:
            pass
        # Only ``_modules`` is read here (never an attribute that could lead back to __getattr__):
        # before __init__ has run, or for a name no module has, this raises plainly.
        modules = self.__dict__.get("_modules", {})
        copies, original = modules.get("modules_to_save"), modules.get("original_module")
        if original is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        active = self.__dict__.get("active_adapters", [])
        present = [] if copies is None else [n for n in active if n in copies]
        module = original if self.__dict__.get("disable_adapters") or not present else copies[present[0]]
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}' (nor has the wrapped "
                f"{type(module).__name__})"
            ) from None

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Call the active copy with the caller's arguments as given (positional or keyword only);
        in a mixed batch the first tensor argument's rows are split between the copies."""
        x = _batch_input(args, kwargs)
        adapter_names = rows_for(x, adapter_names) if x is not None else adapter_names
        if adapter_names is None or self.disable_adapters or x is None:
            return self.active_module(*args, **kwargs)
        if len(adapter_names) != x.shape[0]:
            raise AdapterError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0]} respectively"
            )
        groups = list(dict.fromkeys(adapter_names))
        copies = dict(self.modules_to_save.items())  # nn.ModuleDict has no .get()
        outputs, order = [], []
        for name in groups:
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            module = copies.get(name, self.original_module)
            sub_args, sub_kwargs = _rows_of(args, kwargs, x, rows)
            outputs.append(module(*sub_args, **sub_kwargs))
            order.extend(rows)
        out = torch.cat(outputs, dim=0)
        inverse = torch.empty(len(order), dtype=torch.long, device=out.device)
        inverse[torch.tensor(order, device=out.device)] = torch.arange(len(order), device=out.device)
        return out.index_select(0, inverse)


def _batch_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The tensor whose rows are the batch: the first positional argument, else the first keyword
    argument that is a tensor."""
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _rows_of(
    args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor, rows: list[int]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments with the batch tensor ``x`` cut down to ``rows``."""
    if args:
        return (x[rows], *args[1:]), kwargs
    return (), {k: (v[rows] if v is x else v) for k, v in kwargs.items()}
