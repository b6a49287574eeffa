"""``adapter_config.json``: PEFT 0.21's LoRA config as JSON, written and read by lorakit.

Writing: every key PEFT 0.21.2's ``LoraConfig().to_dict()`` has is present, with PEFT's value types;
lorakit's fields carry the config's values, every other key its neutral (feature-off) value;
``peft_type`` is ``"LORA"`` and ``inference_mode`` is ``true``, as PEFT writes them.

Reading: a key lorakit implements becomes a :class:`~lorakit.config.LoraConfig` field. A PEFT key
lorakit does not implement is accepted at its neutral value and refused otherwise, with an error
naming the key and its value (e.g. ``use_qalora=true``): silently dropping it would load an adapter
that computes something else than it did in PEFT.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from lorakit.config.inits import INIT_NAMES, parse_init
from lorakit.config.task_type import TaskType
from lorakit.errors import ConfigError

__all__ = [
    "PEFT_LORA_KEYS",
    "PEFT_FORMAT_VERSION",
    "config_to_peft_dict",
    "config_kwargs",
    "dumps",
    "peft_task_type",
]

PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose file format lorakit writes (``peft_version``)

# peft.LoraConfig().to_dict() of PEFT 0.21.2, as JSON values (taken at development time; data only).
PEFT_LORA_KEYS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "LORA",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "r": 8,
    "target_modules": None,
    "exclude_modules": None,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "fan_in_fan_out": False,
    "bias": "none",
    "use_rslora": False,
    "modules_to_save": None,
    "init_lora_weights": True,
    "layers_to_transform": None,
    "layers_pattern": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}

# Keys that only describe the file; any value is accepted and none changes the adapter.
_INFORMATIONAL = ("peft_type", "auto_mapping", "peft_version", "megatron_core", "qalora_group_size")

# PEFT features lorakit does not implement: the values that mean "off", and what the key enables.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "megatron_config": ((None,), "Megatron tensor-parallel LoRA layers"),
    "trainable_token_indices": ((None, [], {}), "trainable token embeddings"),
    "loftq_config": ((None, {}), "LoftQ initialisation (changes the base weights)"),
    "eva_config": ((None,), "EVA initialisation"),
    "corda_config": ((None,), "CorDA initialisation (changes the base weights)"),
    "lora_ga_config": ((None,), "LoRA-GA initialisation"),
    "velora_config": ((None,), "VeLoRA"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (aLoRA)"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "monteclora_config": ((None,), "MonteCLoRA"),
    "layer_replication": ((None, []), "layer replication (changes the model's structure)"),
    "target_parameters": ((None, []), "LoRA on nn.Parameter targets"),
    "use_bdlora": ((None, False), "BD-LoRA"),
    "arrow_config": ((None,), "Arrow routing"),
    "kasa_config": ((None,), "KaSA"),
    "ensure_weight_tying": ((False, None), "weight tying of adapted embeddings"),
}

# lorakit task types PEFT 0.21 does not know, saved as the PEFT type that loads the same model.
_PEFT_TASK: dict[TaskType, str | None] = {
    TaskType.TRANSLATION: TaskType.SEQ_2_SEQ_LM.value,
    TaskType.SPEECH_SEQ_2_SEQ: TaskType.SEQ_2_SEQ_LM.value,
    TaskType.MULTIPLE_CHOICE: None,
    TaskType.IMAGE_CLASSIFICATION: None,
    TaskType.OTHER: None,
}
_INIT_CHOICES = ", ".join(repr(c) for c in INIT_NAMES)


class ConfigData(Protocol):
    """What writing needs of a config (``LoraConfig`` has it)."""

    @property
    def task_type(self) -> TaskType | str | None: ...

    @property
    def lora_dropout(self) -> float: ...

    def to_dict(self) -> dict[str, Any]: ...


def peft_task_type(task: TaskType | str | None) -> str | None:
    """The ``task_type`` PEFT 0.21 accepts for lorakit's ``task``."""
    if task is None:
        return None
    task = TaskType(task)
    return _PEFT_TASK.get(task, task.value)


def config_to_peft_dict(
    config: ConfigData,
    *,
    auto_mapping: Mapping[str, str] | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """``adapter_config.json`` content for ``config``: every PEFT 0.21 key, PEFT's value types."""
    out = dict(PEFT_LORA_KEYS)
    out.update(config.to_dict())
    out["task_type"] = peft_task_type(config.task_type)
    out["peft_type"] = "LORA"
    out["inference_mode"] = True
    out["lora_dropout"] = float(config.lora_dropout)
    if out["base_model_name_or_path"] is None:
        out["base_model_name_or_path"] = base_model_name_or_path
    if out["task_type"] is None and auto_mapping is not None:
        out["auto_mapping"] = dict(auto_mapping)
    return out


def dumps(data: Mapping[str, Any]) -> str:
    """JSON text as PEFT writes it (sorted keys, two-space indent)."""
    return json.dumps(data, indent=2, sort_keys=True)


def _init_problem(value: Any) -> str | None:
    if isinstance(value, (bool, str)) and parse_init(value) is not None:
        return None
    return (
        f"init_lora_weights={value!r}: lorakit implements {_INIT_CHOICES}; {value!r} initialisations "
        "(LoftQ, EVA, CorDA, ...) are not implemented, and some of them change the base weights"
    )


def _key_problem(key: str, value: Any) -> str | None:
    if key in _UNSUPPORTED:
        neutral, feature = _UNSUPPORTED[key]
        if any(value == n and type(value) is type(n) for n in neutral):
            return None
        return (
            f"{key}={json.dumps(value)} enables {feature}, which lorakit does not implement "
            f"(lorakit reads this key only as {' or '.join(json.dumps(n) for n in neutral)})"
        )
    if value in (None, False, {}, []):
        return None
    return (
        f"{key}={json.dumps(value)}: unknown key (not in PEFT 0.21's LoraConfig); "
        "lorakit cannot tell what it changes"
    )


def config_kwargs(data: Any, fields: Sequence[str], source: str = "adapter_config.json") -> dict[str, Any]:
    """The keyword arguments of the config's ``fields`` in a PEFT ``adapter_config.json`` mapping.

    Every problem is collected and raised once as :class:`ConfigError` naming ``source``, each
    offending key and its value.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object of config keys, got {type(data).__name__}")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConfigError(
            f"{source}: peft_type={json.dumps(peft_type)}; lorakit reads only LoRA "
            'adapters (peft_type "LORA")'
        )
    known = set(fields)
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _INFORMATIONAL:
            continue
        if key in known and key not in _UNSUPPORTED:
            kwargs[key] = value
            continue
        problem = _key_problem(key, value)
        if problem:
            problems.append(problem)
    if "init_lora_weights" in kwargs and (problem := _init_problem(kwargs["init_lora_weights"])):
        problems.append(problem)
    if problems:
        raise ConfigError(
            f"{source}: this adapter uses features lorakit cannot load:\n  - " + "\n  - ".join(problems)
        )
    return kwargs
