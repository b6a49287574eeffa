"""PEFT 0.21.2's ``LoraConfig`` fields for features lorakit does not implement (yet).

Every such field is accepted at its "off" value, so PEFT code and PEFT files that do not use the
feature work unchanged. A value that turns the feature on is refused when the config is built, with
one line naming the field and the feature: silently ignoring it would train or load an adapter that
computes something else than the user asked for.

When a feature is implemented, its row leaves :data:`NOT_IMPLEMENTED`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NOT_IMPLEMENTED", "INITS_NOT_IMPLEMENTED", "feature_problems", "init_problem"]

# field → (the values that mean "off", the feature a different value asks for)
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "megatron_config": ((None,), "Megatron tensor-parallel LoRA layers"),
    "trainable_token_indices": ((None, [], {}), "trainable token embeddings"),
    "loftq_config": ((None, {}), "LoftQ initialisation"),
    "eva_config": ((None,), "EVA initialisation"),
    "corda_config": ((None,), "CorDA initialisation"),
    "lora_ga_config": ((None,), "LoRA-GA initialisation"),
    "velora_config": ((None,), "VeLoRA"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (aLoRA)"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "monteclora_config": ((None,), "MonteCLoRA"),
    "layer_replication": ((None, []), "layer replication"),
    "use_bdlora": ((None, False), "BD-LoRA"),
    "arrow_config": ((None,), "Arrow routing"),
    "kasa_config": ((None,), "KaSA"),
    "ensure_weight_tying": ((False, None), "weight tying of adapted embeddings"),
}

# init_lora_weights values PEFT accepts and lorakit does not implement (yet)
INITS_NOT_IMPLEMENTED: dict[str, str] = {
    "eva": "EVA initialisation (data-driven)",
    "corda": "CorDA initialisation (changes the base weights)",
    "loftq": "LoftQ initialisation (for quantized bases)",
    "mica": "MiCA initialisation",
}


def _is_off(value: Any, neutral: tuple[Any, ...]) -> bool:
    return any(value == n and type(value) is type(n) for n in neutral)


def feature_problems(config: Any) -> list[str]:
    """One line per field of ``config`` that turns on a feature lorakit lacks."""
    problems = []
    for field, (neutral, feature) in NOT_IMPLEMENTED.items():
        value = getattr(config, field, None)
        if not _is_off(value, neutral):
            problems.append(
                f"{field}={value!r} asks for {feature}, which lorakit does not support "
                f"(it accepts {' or '.join(repr(n) for n in neutral)})"
            )
    return problems


def init_problem(init: Any) -> str | None:
    """The line for an ``init_lora_weights`` PEFT knows and lorakit does not implement, else ``None``."""
    if isinstance(init, str) and init.lower() in INITS_NOT_IMPLEMENTED:
        return (
            f"init_lora_weights={init!r} asks for {INITS_NOT_IMPLEMENTED[init.lower()]}, which lorakit "
            "does not support"
        )
    return None
