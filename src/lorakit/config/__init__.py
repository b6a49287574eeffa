"""Configuration: :class:`LoraConfig` and :class:`TaskType` (data, validated once), the names of the
initialisations, and PEFT's ``adapter_config.json`` (:mod:`.peft_json` for its keys and values,
:mod:`.files` for reading and writing it)."""

from lorakit.config.inits import INIT_NAMES, moves_base_weight, parse_init
from lorakit.config.lora_config import ALL_LINEAR, BIAS_MODES, LoraConfig, config_from_peft_dict
from lorakit.config.task_type import TaskType

__all__ = [
    "LoraConfig",
    "TaskType",
    "ALL_LINEAR",
    "BIAS_MODES",
    "INIT_NAMES",
    "parse_init",
    "moves_base_weight",
    "config_from_peft_dict",
]
