"""The names ``init_lora_weights`` accepts, and how to read them (shared by the config, the layers and
the file reader; the initialisations themselves are in :mod:`lorakit.functional.init`)."""

from __future__ import annotations

import re

__all__ = ["INIT_NAMES", "LORA_GA_GRAD", "parse_init", "moves_base_weight"]

# The attribute of a base module that holds LoRA-GA's gradient estimate until the adapter is created
# (PEFT's name, so that models prepared by either library's ``preprocess_loraga`` work in both).
LORA_GA_GRAD = "_peft_loraga_grad"

INIT_NAMES: tuple[bool | str, ...] = (
    True,
    False,
    "gaussian",
    "pissa",
    "pissa_niter_<N>",
    "olora",
    "orthogonal",
    "eva",
    "lora_ga",
)
_NITER = re.compile(r"pissa_niter_(\d+)")


def parse_init(init: bool | str) -> tuple[str, int | None] | None:
    """``(kind, niter)`` for a valid ``init_lora_weights`` value, ``None`` if it is not one.

    kind ∈ {"default", "none", "gaussian", "pissa", "olora", "orthogonal", "eva", "lora_ga"}; niter
    only for ``"pissa_niter_N"``.
    """
    if init is True:
        return "default", None
    if init is False:
        return "none", None
    if not isinstance(init, str):
        return None
    name = init.lower()
    if name in ("gaussian", "pissa", "olora", "orthogonal", "eva", "lora_ga"):
        return name, None
    match = _NITER.fullmatch(name)
    return ("pissa", int(match.group(1))) if match else None


def moves_base_weight(init: bool | str) -> bool:
    """Whether the init replaces the base weight by a residual (PiSSA, OLoRA, LoRA-GA)."""
    parsed = parse_init(init)
    return parsed is not None and parsed[0] in ("pissa", "olora", "lora_ga")
