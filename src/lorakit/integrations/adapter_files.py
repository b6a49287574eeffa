"""A minimal writer and reader of PEFT adapter directories, for transformers' Trainer checkpoints.

TEMPORARY: lorakit's full adapter I/O (``PeftModel.save_pretrained`` / ``from_pretrained`` /
``load_adapter``, atomic writes, sub-folders per adapter, fingerprints; design §3) is being built
in ``lorakit/io/files.py`` and ``peft_model.py``. When it lands, these two functions are replaced by
it and the callers in :mod:`lorakit.integrations.tasks` and :mod:`lorakit.integrations.trainer`
call the real methods instead. Until then this file writes exactly PEFT's layout:

* ``adapter_model.safetensors``: :func:`lorakit.get_peft_model_state_dict`, metadata
  ``{"format": "pt"}``;
* ``adapter_config.json``: ``config.to_dict()`` plus ``"peft_type": "LORA"``.

PEFT 0.21 refuses to load a config whose ``task_type`` it does not define, so lorakit's extra task
types are written as their PEFT equivalent (see :data:`PEFT_TASK_TYPES`) and the exact one goes in
the safetensors header metadata (``lorakit_task_type``), which PEFT ignores (design §3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.config import LoraConfig, TaskType
from lorakit.errors import AdapterError
from lorakit.io.keys import get_peft_model_state_dict, set_peft_model_state_dict

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "ADAPTER_CONFIG_NAME",
    "PEFT_TASK_TYPES",
    "peft_config_dict",
    "save_adapter_dir",
    "load_adapter_weights",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"

# lorakit task type -> the task_type written for PEFT (None: PEFT's plain PeftModel, which still
# restores the head from modules_to_save). Task types PEFT knows are written unchanged.
PEFT_TASK_TYPES: dict[TaskType, TaskType | None] = {
    TaskType.TRANSLATION: TaskType.SEQ_2_SEQ_LM,
    TaskType.SPEECH_SEQ_2_SEQ: TaskType.SEQ_2_SEQ_LM,
    TaskType.MULTIPLE_CHOICE: None,
    TaskType.IMAGE_CLASSIFICATION: None,
    TaskType.OTHER: None,
}


def peft_config_dict(config: LoraConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(``adapter_config.json`` content that PEFT 0.21 loads, extra safetensors metadata)."""
    data = {**config.to_dict(), "peft_type": "LORA"}
    metadata = {"format": "pt"}
    task = config.task_type
    if isinstance(task, TaskType) and task in PEFT_TASK_TYPES:
        written = PEFT_TASK_TYPES[task]
        data["task_type"] = written.value if written is not None else None
        metadata["lorakit_task_type"] = task.value
    return data, metadata


def save_adapter_dir(model: nn.Module, save_directory: str | os.PathLike[str], adapter_name: str = "default",
                     state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write adapter ``adapter_name`` of ``model`` (a ``PeftModel``) to ``save_directory``.

    ``state_dict``: an optional full in-memory state dict (e.g. gathered by Trainer) to read the
    values from instead of the live parameters.
    """
    configs: Any = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or adapter_name not in configs:
        known = sorted(configs) if isinstance(configs, Mapping) else []
        raise AdapterError(f"no adapter named {adapter_name!r} to save; existing adapters: {known}")
    tensors = get_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    # safetensors refuses views and shared storage; an adapter file holds independent copies.
    tensors = {k: t.detach().contiguous().clone().cpu() for k, t in tensors.items()}
    config, metadata = peft_config_dict(configs[adapter_name])
    os.makedirs(save_directory, exist_ok=True)
    save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata=metadata)
    with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike[str],
                         adapter_name: str = "default") -> list[str]:
    """Load ``directory``'s ``adapter_model.safetensors`` into the existing adapter ``adapter_name``."""
    path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise AdapterError(
            f"no {ADAPTER_WEIGHTS_NAME} in {os.fspath(directory)!r}; an adapter directory is written by "
            f"model.save_pretrained(...) or by transformers.Trainer with lorakit's trainer integration"
        )
    return set_peft_model_state_dict(model, load_file(path), adapter_name=adapter_name)
