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
)

__all__ = ["inspect", "ModelReport"]

_NO_DEFAULT = (
    "(no default for this model type: pass target_modules, e.g. names from the list below or 'all-linear')"
)


@dataclasses.dataclass
class ModelReport:
    """The targetable modules of a model (name, type, shape, params, picked by default?)."""

    model_type: str | None
    default_targets: list[str] | None
    modules: list[dict[str, Any]]

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
        return "\n".join(lines)


def inspect(model: nn.Module) -> ModelReport:
    """Every module lorakit can adapt, with type, weight shape, parameter count and whether the
    default ``target_modules`` for the model's type selects it."""
    defaults = default_targets_for(model)
    config = LoraConfig(target_modules=defaults) if defaults else None
    rows = targetable_modules(model)
    for row in rows:
        row["default"] = bool(config and matches_target(config, row["name"]))
    if not rows:
        raise TargetingError(suffix_summary(model))
    return ModelReport(model_type_of(model), defaults, rows)
