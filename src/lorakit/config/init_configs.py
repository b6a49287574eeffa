"""The settings of the data-driven initialisations, with PEFT 0.21.2's names, fields and defaults.

``LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(...))`` and
``LoraConfig(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(...))``. In
``adapter_config.json`` they are JSON objects of their fields (PEFT writes them so); reading one
back gives the dataclass again. Values are checked when the dataclass is built and when a field is
assigned.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from lorakit.errors import ConfigError

__all__ = ["EvaConfig", "LoraGAConfig", "sub_config"]


class _Checked:
    """Assigning a field after construction checks the new value first (PEFT code sets sub-config
    fields; an invalid value raises and leaves the config unchanged)."""

    def __setattr__(self, name: str, value: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        if name in names and all(n in self.__dict__ for n in names):  # built: not inside __init__
            dataclasses.replace(self, **{name: value})  # type: ignore[type-var]  # validates
        object.__setattr__(self, name, value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass
class EvaConfig(_Checked):
    """EVA, Explained Variance Adaptation (Paischer et al. 2024, §3).

    ``rho`` (≥ 1): a layer's rank may grow to ``round(r · rho)`` when ranks are redistributed by
    explained variance (1.0: no redistribution). ``tau`` (in [0, 1]): a layer's SVD has converged
    when every needed component's cosine similarity with the previous batch's is ≥ ``tau``.
    ``use_label_mask`` / ``label_mask_value``: positions whose label is ``label_mask_value`` are
    left out of the SVD (language modelling). ``whiten``: divide each component by the square root
    of its singular value. ``adjust_scaling_factors``: scale ``lora_alpha`` with a changed rank so
    that ``alpha / r`` stays the configured one.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not (_number(self.rho) and self.rho >= 1.0):
            problems.append(f"`rho` must be >= 1.0: rho={self.rho!r} (1.0: no rank redistribution)")
        if not (_number(self.tau) and 0.0 <= self.tau <= 1.0):
            problems.append(f"`tau` must be between 0.0 and 1.0.: tau={self.tau!r}")
        if not (isinstance(self.label_mask_value, int) and not isinstance(self.label_mask_value, bool)):
            problems.append(f"label_mask_value={self.label_mask_value!r}: must be an integer")
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r}: must be True or False")
        if problems:
            raise ConfigError("invalid EvaConfig: " + "; ".join(problems))


LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclasses.dataclass
class LoraGAConfig(_Checked):
    """LoRA-GA, gradient-aligned initialisation (Wang et al. 2024, §3.2–3.3).

    ``direction``: which of the gradient's first 2r singular vectors go to A and which to B
    (``"ArB2r"``: A ← right vectors 1..r, B ← left vectors r+1..2r, the paper's choice;
    ``"A2rBr"``; ``"ArBr"``: alternating; ``"random"``). ``scale``: ``"stable"`` multiplies B by
    ``d_out^¼ / √stable_gamma`` (§3.3); ``"weight_svd"`` matches B's top singular value to W's;
    ``"gd_scale"`` divides both by the LoRA scaling; ``"unit"`` leaves them.
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16

    def __post_init__(self) -> None:
        problems = []
        if self.direction not in LORA_GA_DIRECTIONS:
            problems.append(f"direction={self.direction!r}: must be one of {', '.join(LORA_GA_DIRECTIONS)}")
        if self.scale not in LORA_GA_SCALES:
            problems.append(f"scale={self.scale!r}: must be one of {', '.join(LORA_GA_SCALES)}")
        if not (_number(self.stable_gamma) and self.stable_gamma > 0):
            problems.append(f"stable_gamma={self.stable_gamma!r}: must be a positive number")
        if problems:
            raise ConfigError("invalid LoraGAConfig: " + "; ".join(problems))


def sub_config(field: str, value: Any, cls: type[Any], problems: list[str]) -> Any:
    """``value`` as a ``cls`` instance (a JSON object from a file becomes one), ``None`` kept; an
    unusable value adds a line to ``problems`` and gives ``None``."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        problems.append(f"{field}={value!r}: must be a {cls.__name__}, a dict of its fields, or None")
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in value if k not in names)
    if unknown:
        problems.append(f"{field}: unknown key(s) {unknown}; {cls.__name__} has {', '.join(names)}")
        return None
    try:
        return cls(**value)
    except ConfigError as exc:
        problems.append(f"{field}: {exc}")
        return None
