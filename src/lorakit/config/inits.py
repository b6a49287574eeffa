"""The names ``init_lora_weights`` accepts, and how to read them (shared by the config, the layers and
the file reader; the initialisations themselves are in :mod:`lorakit.functional.init`)."""

from __future__ import annotations

import re

__all__ = ["INIT_NAMES", "LOAD_ONLY_INITS", "LORA_GA_GRAD", "parse_init", "moves_base_weight", "load_only"]

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
    "mica",
)
_NITER = re.compile(r"pissa_niter_(\d+)")

# Inits whose factors come from a computation lorakit does not run, and that leave the base weight
# as it is: once trained, such an adapter is plain LoRA factors, so its files load (the factors are
# filled from the file); a *new* adapter with such an init is refused, since it would silently start
# as a default LoRA instead.
LOAD_ONLY_INITS: dict[str, str] = {
    "mica": (
        "MiCA sets B from the minor singular vectors of each weight and trains A only, which "
        "lorakit does not implement for new adapters"
    ),
}


def parse_init(init: bool | str) -> tuple[str, int | None] | None:
    """``(kind, niter)`` for a valid ``init_lora_weights`` value, ``None`` if it is not one.

    kind ∈ {"default", "none", "gaussian", "pissa", "olora", "orthogonal", "eva", "lora_ga",
    "mica"}; niter only for ``"pissa_niter_N"``.
    """
    if init is True:
        return "default", None
    if init is False:
        return "none", None
    if not isinstance(init, str):
        return None
    name = init.lower()
    if name in ("gaussian", "pissa", "olora", "orthogonal", "eva", "lora_ga", *LOAD_ONLY_INITS):
        return name, None
    match = _NITER.fullmatch(name)
    return ("pissa", int(match.group(1))) if match else None


def moves_base_weight(init: bool | str) -> bool:
    """Whether the init replaces the base weight by a residual (PiSSA, OLoRA, LoRA-GA)."""
    parsed = parse_init(init)
    return parsed is not None and parsed[0] in ("pissa", "olora", "lora_ga")


def load_only(init: bool | str) -> bool:
    """Whether adapters with this init can be loaded from files but not created (MiCA)."""
    parsed = parse_init(init)
    return parsed is not None and parsed[0] in LOAD_ONLY_INITS
