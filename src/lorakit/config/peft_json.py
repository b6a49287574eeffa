"""``adapter_config.json``: PEFT 0.21's LoRA config as JSON, written and read by lorakit.

Writing: every key PEFT 0.21.2's ``LoraConfig().to_dict()`` has is present, with PEFT's value types
and the config's values; an adapter saved with a model says ``inference_mode: true``, as PEFT writes
it.

Reading: every key of PEFT 0.21's ``LoraConfig`` becomes a field of lorakit's, which refuses values
that turn on a feature it lacks (:mod:`lorakit.config.features`). A key PEFT 0.21 does not know (a
file from a newer PEFT) is ignored with a warning that names it, as PEFT does.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

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

# lorakit task types PEFT 0.21 does not know, saved as the PEFT type that loads the same model.
_PEFT_TASK: dict[TaskType, str | None] = {
    TaskType.TRANSLATION: TaskType.SEQ_2_SEQ_LM.value,
    TaskType.SPEECH_SEQ_2_SEQ: TaskType.SEQ_2_SEQ_LM.value,
    TaskType.MULTIPLE_CHOICE: None,
    TaskType.IMAGE_CLASSIFICATION: None,
    TaskType.OTHER: None,
}


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
    inference_mode: bool = True,
    auto_mapping: Mapping[str, str] | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """``adapter_config.json`` content for ``config``: every PEFT 0.21 key, PEFT's value types.
    ``inference_mode=True`` is what an adapter saved with its model records (PEFT's habit)."""
    out = dict(PEFT_LORA_KEYS)
    out.update(config.to_dict())
    out["task_type"] = peft_task_type(config.task_type)
    out["peft_type"] = "LORA"
    out["inference_mode"] = inference_mode
    out["lora_dropout"] = float(config.lora_dropout)
    if out["base_model_name_or_path"] is None:
        out["base_model_name_or_path"] = base_model_name_or_path
    if out["auto_mapping"] is None and out["task_type"] is None and auto_mapping is not None:
        out["auto_mapping"] = dict(auto_mapping)
    return out


def dumps(data: Mapping[str, Any]) -> str:
    """JSON text as PEFT writes it (sorted keys, two-space indent)."""
    return json.dumps(data, indent=2, sort_keys=True)


def config_kwargs(data: Any, fields: Sequence[str], source: str = "adapter_config.json") -> dict[str, Any]:
    """The keyword arguments of the config's ``fields`` in a PEFT ``adapter_config.json`` mapping;
    other keys are ignored with one warning that names them."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object of config keys, got {type(data).__name__}")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConfigError(
            f"{source}: peft_type={json.dumps(peft_type)}; lorakit reads only LoRA "
            'adapters (peft_type "LORA")'
        )
    known = set(fields)
    unknown = {k: v for k, v in data.items() if k not in known}
    if unknown:
        shown = ", ".join(f"{k}={json.dumps(v, default=str)[:60]}" for k, v in sorted(unknown.items()))
        warnings.warn(
            f"{source}: ignored key(s) that PEFT {PEFT_FORMAT_VERSION}'s LoraConfig does not have (a newer "
            f"PEFT wrote this file?): {shown}",
            stacklevel=3,
        )
    return {k: v for k, v in data.items() if k in known}
