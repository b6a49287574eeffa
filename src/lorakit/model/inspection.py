"""``lorakit.inspect(model)``: what could be adapted, and what the defaults pick. Read-only."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import TargetingError
from lorakit.model.targeting import (
    default_targets_for,
    matches_target,
    model_type_of,
    suffix_summary,
    targetable_modules,
    targetable_parameters,
)

__all__ = ["inspect", "ModelReport"]

_NO_DEFAULT = (
    "(no default for this model type: pass target_modules, e.g. names from the list below or 'all-linear')"
)


@dataclasses.dataclass
class ModelReport:
    """The targetable modules of a model (name, type, shape, params, picked by default?), and the
    parameters only ``target_parameters`` reaches (the experts of MoE layers, routers that are not
    ``nn.Linear``: name, owning module's type, shape, params)."""

    model_type: str | None
    default_targets: list[str] | None
    modules: list[dict[str, Any]]
    parameters: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"model_type: {self.model_type or '(none)'}",
            f"default target_modules: {self.default_targets or _NO_DEFAULT}",
        ]
        width = max((len(m["name"]) for m in self.modules), default=4)
        lines.append(f"{'module':<{width}}  {'type':<10} {'shape':<16} {'params':>10}  default")
        for m in self.modules:
            lines.append(
                f"{m['name']:<{width}}  {m['type']:<10} {str(m['shape']):<16} "
                f"{m['params']:>10,}  {'yes' if m['default'] else ''}"
            )
        if self.parameters:
            lines.append("")
            lines.append("parameters for target_parameters (experts of mixture-of-experts layers, ...):")
            pwidth = max(len(p["name"]) for p in self.parameters)
            twidth = max(len(p["type"]) for p in self.parameters)
            for p in self.parameters:
                lines.append(
                    f"{p['name']:<{pwidth}}  {p['type']:<{twidth}} {str(p['shape']):<16} {p['params']:>10,}"
                )
        return "\n".join(lines)


def inspect(model: nn.Module) -> ModelReport:
    """Every module lorakit can adapt, with type, weight shape, parameter count and whether the
    default ``target_modules`` for the model's type selects it; and every parameter only
    ``target_parameters`` can reach."""
    defaults = default_targets_for(model)
    config = LoraConfig(target_modules=defaults) if defaults else None
    rows = targetable_modules(model)
    for row in rows:
        row["default"] = bool(config and matches_target(config, row["name"]))
    parameters = targetable_parameters(model)
    if not rows and not parameters:
        raise TargetingError(suffix_summary(model))
    return ModelReport(model_type_of(model), defaults, rows, parameters)
