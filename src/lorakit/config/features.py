"""PEFT 0.21.2's ``LoraConfig`` fields for features lorakit does not implement (yet).

Every such field is accepted at its "off" value, so PEFT code and PEFT files that do not use the
feature work unchanged. A value that turns the feature on is refused when the config is built, with
one line naming the field and the feature: silently ignoring it would train or load an adapter that
computes something else than the user asked for.

When a feature is implemented, its row leaves :data:`NOT_IMPLEMENTED`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NOT_IMPLEMENTED", "INITS_NOT_IMPLEMENTED", "INIT_SUBCONFIGS", "feature_problems", "init_problem"]

# field → (the values that mean "off", the feature a different value asks for)
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "megatron_config": ((None,), "Megatron tensor-parallel LoRA layers"),
    "velora_config": ((None,), "VeLoRA"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (aLoRA)"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "monteclora_config": ((None,), "MonteCLoRA"),
    # Deliberately refused (README, "Not supported"): it rebuilds the base model's layer list and its
    # per-layer config (num_hidden_layers, layer_types, layer_idx), which unload() could not restore,
    # and its copies share base weights, so no merge is exact (PEFT's fails on layer_types models).
    "layer_replication": (
        (None, []),
        "layer replication (copies of layers sharing base weights: a change to the base model "
        "that unload() cannot undo and that no merge can reproduce)",
    ),
    "target_parameters": ((None, []), "LoRA on parameters (mixture-of-experts experts)"),
    "use_bdlora": ((None, False), "BD-LoRA"),
    "arrow_config": ((None,), "Arrow routing"),
    "kasa_config": ((None,), "KaSA"),
}

# init_lora_weights values PEFT accepts and lorakit refuses, for new adapters and for files alike:
# each changes the base weights in a way the adapter file does not record, so its trained factors
# alone do not reproduce the trained model (a file converted to plain LoRA by PEFT's
# path_initial_model_for_weight_conversion has init_lora_weights=true and loads).
_CONVERT = (
    "Convert it to plain LoRA in PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)), "
    "or load it onto the modified base model that was saved with it after setting init_lora_weights to "
    "true in its adapter_config.json"
)
INITS_NOT_IMPLEMENTED: dict[str, str] = {
    "corda": (
        "CorDA replaces each targeted base weight W by W - s·B₀A₀ with B₀A₀ from "
        "the covariance of training data (PEFT's preprocess_corda); the adapter file holds only the "
        "trained factors, so that base cannot be rebuilt from it (PEFT cannot either without the "
        f"data). {_CONVERT}"
    ),
    "loftq": (
        "LoftQ replaces each targeted base weight by its quantized form Q and "
        "fits the factors to W - Q; PEFT recomputes Q from loftq_config when it loads such a file, "
        "and lorakit has no LoftQ quantizer, so the factors alone would apply to the wrong base. Load "
        "it onto the LoftQ base model saved with it after setting init_lora_weights to true in its "
        "adapter_config.json (PEFT's LoftQ example saves it so)"
    ),
}

# Sub-configs of initialisations lorakit refuses: ignored (with a warning, as PEFT does) next to
# another init, so a file PEFT converted to plain LoRA (init true, the sub-config kept) loads. (EVA's
# and LoRA-GA's are lorakit.config.init_configs.)
INIT_SUBCONFIGS: dict[str, str] = {
    "corda_config": "corda",
    "loftq_config": "loftq",
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
            f"init_lora_weights={init!r} is not supported by lorakit: {INITS_NOT_IMPLEMENTED[init.lower()]}"
        )
    return None
