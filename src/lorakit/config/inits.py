"""The names ``init_lora_weights`` accepts, and how to read them (shared by the config, the layers and
the file reader; the initialisations themselves are in :mod:`lorakit.functional.init`)."""

from __future__ import annotations

import re

__all__ = [
    "INIT_NAMES",
    "LOAD_ONLY_INITS",
    "LORA_GA_GRAD",
    "parse_init",
    "moves_base_weight",
    "load_only",
    "loftq_init_token",
    "parse_loftq",
]

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
    "loftq",
    "eva",
    "lora_ga",
    "mica",
)
_NITER = re.compile(r"pissa_niter_(\d+)")
# What a LoRA layer receives for LoftQ: the config's ``loftq_config`` folded into the init value
# (layers see ``init_lora_weights`` only), e.g. ``"loftq_4bit_1iter"``.
_LOFTQ = re.compile(r"loftq_(\d+)bit_(\d+)iter")


def loftq_init_token(bits: int, iters: int) -> str:
    """The init value a layer gets for LoftQ with ``loftq_bits=bits``, ``loftq_iter=iters``."""
    return f"loftq_{bits}bit_{iters}iter"


def parse_loftq(init: bool | str) -> tuple[int, int] | None:
    """``(bits, iters)`` of a layer's LoftQ init value (:func:`loftq_init_token`), else ``None``."""
    match = _LOFTQ.fullmatch(init) if isinstance(init, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else None


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

    kind ∈ {"default", "none", "gaussian", "pissa", "olora", "orthogonal", "loftq", "eva",
    "lora_ga", "mica"}; niter only for ``"pissa_niter_N"`` (and a layer's ``"loftq_<b>bit_<n>iter"``,
    see :func:`loftq_init_token`).
    """
    if init is True:
        return "default", None
    if init is False:
        return "none", None
    if not isinstance(init, str):
        return None
    name = init.lower()
    if name in ("gaussian", "pissa", "olora", "orthogonal", "loftq", "eva", "lora_ga", *LOAD_ONLY_INITS):
        return name, None
    loftq = parse_loftq(name)
    if loftq is not None:
        return "loftq", loftq[1]
    match = _NITER.fullmatch(name)
    return ("pissa", int(match.group(1))) if match else None


def moves_base_weight(init: bool | str) -> bool:
    """Whether the init replaces the base weight (by a residual: PiSSA, OLoRA, LoRA-GA; by its
    quantized value: LoftQ)."""
    parsed = parse_init(init)
    return parsed is not None and parsed[0] in ("pissa", "olora", "lora_ga", "loftq")


def load_only(init: bool | str) -> bool:
    """Whether adapters with this init can be loaded from files but not created (MiCA)."""
    parsed = parse_init(init)
    return parsed is not None and parsed[0] in LOAD_ONLY_INITS
