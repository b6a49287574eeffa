"""Configs written for transformers 4 on the mixture-of-experts families that transformers 5 fused.

transformers 4 gave Mixtral-like and Qwen2-MoE-like models one ``nn.Linear`` per expert (``w1``,
``w2``, ``w3`` / ``gate_proj``, ``up_proj``, ``down_proj``) and a linear router (``gate``);
transformers 5 stacks the experts into 3-D parameters (``gate_up_proj``, ``down_proj``) and makes
the router a module holding a ``weight``. PEFT 0.21 rewrites a config before targeting so that it
still selects the same layers, and lorakit does the same, so that a config selects the same tensors
(and writes the same files) in both libraries:

* ``target_modules="all-linear"`` (or a regex) is first resolved to leaf names, the old expert and
  router names included (they were linear layers);
* each old name moves to ``target_parameters`` (``w1``/``w3``/``gate_proj``/``up_proj`` →
  ``gate_up_proj``, ``w2``/``down_proj`` → ``down_proj``, ``gate`` → ``gate.weight``);
* gate and up fused into one parameter get rank and alpha doubled (``rank_pattern`` /
  ``alpha_pattern`` on ``.*\\.gate_up_proj``), the two adapters side by side; naming only one of them
  is refused, as the other half of the fused weight would have no adapter.

A model type is rewritten when transformers has a checkpoint conversion for it and maps it to the
Mixtral or Qwen2-MoE pattern (PEFT's rule). Configs with ``target_modules=None`` are left to the
default table.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.errors import ConfigError
from lorakit.model.targeting import model_type_of, register_config_rewrite, resolve_config

__all__ = ["OLD_NAMES", "FUSED", "rewritten_type", "rewrite"]

# pattern → {transformers-4 leaf name: transformers-5 parameter} and the names fused into one
OLD_NAMES: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "mixtral": {"gate_up_proj": ("w1", "w3")},
    "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")},
}


def rewritten_type(model_type: str | None) -> str | None:
    """The pattern (``"mixtral"`` / ``"qwen2_moe"``) whose rewrite applies to ``model_type``, or ``None``."""
    if model_type is None:
        return None
    try:
        from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN as patterns
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4: nothing was fused
        return None
    pattern = "mixtral" if model_type == "mixtral" else patterns.get(model_type)
    if pattern not in OLD_NAMES or get_checkpoint_conversion_mapping(model_type) is None:
        return None
    return pattern


def _leaf_names(model: nn.Module, config: LoraConfig, old: dict[str, str]) -> list[str]:
    """A string ``target_modules`` as the leaf names it selects, old expert / router names included."""
    targets = config.target_modules
    assert isinstance(targets, str)
    if targets == ALL_LINEAR:
        plain = dataclasses.replace(config, target_parameters=None)
        resolved = resolve_config(plain, model, rewrite=False).target_modules
        assert isinstance(resolved, list)
        return sorted({n.rsplit(".", 1)[-1] for n in resolved} | set(old))
    keys = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    leaves = {k.rsplit(".", 1)[-1] for k in keys if re.fullmatch(targets, k)}
    containers: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        container, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old_name, new_name in old.items():  # the fused experts exist only inside their new parameter
        if any(re.fullmatch(targets, f"{c}.{old_name}") for c in containers.get(new_name, ())):
            leaves.add(old_name)
    return sorted(leaves)


def rewrite(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """``config`` with transformers-4 expert and router names moved to ``target_parameters``."""
    pattern = rewritten_type(model_type_of(model))
    if pattern is None or config.target_modules is None:
        return config
    old, fused = OLD_NAMES[pattern], FUSED[pattern]
    targets: Any = config.target_modules
    if isinstance(targets, str):
        targets = _leaf_names(model, config, old)
        if not targets:
            return config  # the usual "matches nothing" error follows
    parameters = list(config.target_parameters or [])
    kept: list[str] = []
    matched: dict[str, set[str]] = {}
    for target in targets:
        old_name = next((o for o in old if target == o or target.endswith("." + o)), None)
        if old_name is None:
            kept.append(target)
            continue
        parameters.append(old[old_name])
        matched.setdefault(old[old_name], set()).add(old_name)
    if not matched:
        return config
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new_name, parts in fused.items():
        present = matched.get(new_name, set())
        if present and len(present) < len(parts):
            raise ConfigError(
                f"target_modules names {sorted(present)} but not {sorted(set(parts) - present)}: in "
                f"transformers 5 they are one parameter, {new_name}, which cannot be half adapted; "
                f"name all of {list(parts)}, or use target_parameters=['experts.{new_name}']"
            )
        if len(present) == len(parts) > 1:
            key = rf".*\.{re.escape(new_name)}"
            rank_pattern[key] = config.r * len(parts)
            alpha_pattern[key] = config.lora_alpha * len(parts)
    return dataclasses.replace(
        config,
        target_modules=sorted(set(kept)),
        target_parameters=sorted(set(parameters)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


register_config_rewrite(rewrite)
