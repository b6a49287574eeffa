"""Converting a PiSSA / OLoRA / LoRA-GA adapter into a plain LoRA adapter for the untouched base model
(PEFT's ``path_initial_model_for_weight_conversion``).

PiSSA, OLoRA and LoRA-GA start from ``W = W_res + s · B₀ A₀`` and train on ``W_res``, so the trained adapter
(A, B) only makes sense on the residual base. Relative to the original ``W`` the trained model is

    W_res + s · B A = W + s · (B A − B₀ A₀) = W + s · [B | −B₀] [A ; A₀]

i.e. a LoRA adapter of rank 2r with ``A' = [A ; A₀]`` (2r × k), ``B' = [B | −B₀]`` (d × 2r) and the
same scaling s: α doubles with r (α·√2 with rsLoRA, since s = α/√r). It applies to the original
base and mixes with any other adapter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError
from lorakit.persistence.keys import parse_key

__all__ = ["to_plain_lora"]


def _convertible(config: LoraConfig) -> list[str]:
    problems = []
    if config.use_dora:
        problems.append("DoRA adapters cannot be converted (their magnitude is tied to the residual base)")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        problems.append(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported when "
            "using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`: the scalings "
            "cannot be kept when the ranks double"
        )
    return problems


def to_plain_lora(
    config: LoraConfig, tensors: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor], source: str
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The rank-2r plain LoRA (config, tensors) equal to the trained ``tensors`` on the residual base,
    given the ``initial`` tensors saved right after the PiSSA/OLoRA init (``source`` names where
    they came from, for errors). Keys are file keys; other tensors pass through unchanged."""
    problems = _convertible(config)
    factor_keys = [k for k in tensors if parse_key(k).rank_axis is not None]
    missing = [k for k in factor_keys if k not in initial]
    if missing:
        problems.append(f"{source} lacks {len(missing)} tensor(s) of this adapter, e.g. {missing[:3]}")
    mismatched = [
        f"{k}: {tuple(initial[k].shape)} vs {tuple(tensors[k].shape)}"
        for k in factor_keys
        if k in initial and initial[k].shape != tensors[k].shape
    ]
    if mismatched:
        problems.append(f"{source} holds tensors of other shapes: " + "; ".join(mismatched[:3]))
    if problems:
        raise AdapterError(
            "cannot convert the adapter for the initial model:\n  - " + "\n  - ".join(problems)
        )
    out = dict(tensors)
    for key in factor_keys:
        now, start = tensors[key], initial[key].to(device=tensors[key].device, dtype=tensors[key].dtype)
        if parse_key(key).role == "A":
            out[key] = torch.cat([now, start], dim=0)  # (2r, k…)
        else:
            out[key] = torch.cat([now, -start], dim=1)  # (d, 2r…)
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    plain = dataclasses.replace(
        config,
        r=2 * config.r,
        lora_alpha=config.lora_alpha * alpha_factor,
        init_lora_weights=True,
        lora_ga_config=None,  # the plain adapter no longer depends on its initialisation
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
    )
    return plain, out
