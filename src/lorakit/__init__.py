"""lorakit: LoRA adapters for PyTorch and transformers models, with PEFT's API and file format.

Migrating from PEFT is one import line::

    from lorakit import LoraConfig, get_peft_model, TaskType
"""

from lorakit._version import __version__
from lorakit.config import LoraConfig, TaskType
from lorakit.errors import (
    AdapterError,
    AdapterFileError,
    BaseModelMismatchError,
    BaseModelMismatchWarning,
    ConfigError,
    LorakitError,
    TargetingError,
)
from lorakit.inspect import inspect
from lorakit.io.keys import get_peft_model_state_dict, set_peft_model_state_dict
from lorakit.peft_model import LoraModel, PeftModel, get_peft_model, inject_adapter_in_model

__all__ = [
    "LoraConfig",
    "TaskType",
    "PeftModel",
    "LoraModel",
    "get_peft_model",
    "inject_adapter_in_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "inspect",
    "LorakitError",
    "ConfigError",
    "TargetingError",
    "AdapterError",
    "AdapterFileError",
    "BaseModelMismatchError",
    "BaseModelMismatchWarning",
    "__version__",
]
