"""Configuration: :class:`LoraConfig` and :class:`TaskType` (data, validated once), the names of the
initialisations and the settings of the data-driven ones (EVA, LoRA-GA), and PEFT's
``adapter_config.json`` (:mod:`.peft_json` for its keys and values, :mod:`.files` for reading and
writing it)."""

from lorakit.config.init_configs import EvaConfig, LoraGAConfig
from lorakit.config.inits import (
    INIT_NAMES,
    LOAD_ONLY_INITS,
    LORA_GA_GRAD,
    load_only,
    moves_base_weight,
    parse_init,
)
from lorakit.config.lora_config import LoraConfig, LoraRuntimeConfig, config_from_peft_dict
from lorakit.config.task_type import PeftType, TaskType
from lorakit.config.validation import ALL_LINEAR, BIAS_MODES

__all__ = [
    "LoraConfig",
    "LoraRuntimeConfig",
    "EvaConfig",
    "LoraGAConfig",
    "TaskType",
    "PeftType",
    "ALL_LINEAR",
    "BIAS_MODES",
    "INIT_NAMES",
    "LOAD_ONLY_INITS",
    "load_only",
    "LORA_GA_GRAD",
    "parse_init",
    "moves_base_weight",
    "config_from_peft_dict",
]
