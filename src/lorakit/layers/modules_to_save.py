"""A module trained in full beside the adapters (a classification head, say): one trainable copy
per adapter, the original kept frozen, selected by the active adapter.

State-dict layout is PEFT's: ``<path>.original_module.*`` and ``<path>.modules_to_save.<name>.*``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.layers.rows import rows_for


class ModulesToSaveWrapper(nn.Module):
    """``forward`` runs the active adapter's copy, or the original when disabled or none is active."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

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
        self.active_adapters = list(names)  # the model's whole list; active_module picks ours

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    @property
    def active_module(self) -> nn.Module:
        present = [n for n in self.active_adapters if n in self.modules_to_save]
        if self.disable_adapters or not present:
            return self.original_module
        return self.modules_to_save[present[0]]

    @property
    def weight(self) -> torch.Tensor:
        weight: torch.Tensor = self.active_module.weight  # type: ignore[assignment]
        return weight

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        adapter_names = rows_for(x, adapter_names)
        if adapter_names is None or self.disable_adapters:
            return self.active_module(x, *args, **kwargs)
        if len(adapter_names) != x.shape[0]:
            raise AdapterError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows"
            )
        groups = list(dict.fromkeys(adapter_names))
        copies = dict(self.modules_to_save.items())  # nn.ModuleDict has no .get()
        outputs, order = [], []
        for name in groups:
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            module = copies.get(name, self.original_module)
            outputs.append(module(x[rows], *args, **kwargs))
            order.extend(rows)
        out = torch.cat(outputs, dim=0)
        inverse = torch.empty(len(order), dtype=torch.long, device=out.device)
        inverse[torch.tensor(order, device=out.device)] = torch.arange(len(order), device=out.device)
        return out.index_select(0, inverse)
