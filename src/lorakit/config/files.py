"""``adapter_config.json`` on disk: find an adapter folder, read its config, write one.

The JSON itself (PEFT 0.21's keys and values) is :mod:`lorakit.config.peft_json`; the atomic write
and the errors that name the file are :mod:`lorakit.fileio`.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit import fileio
from lorakit.config import peft_json
from lorakit.config.lora_config import LoraConfig
from lorakit.errors import AdapterFileError

__all__ = ["adapter_folder", "load_config", "save_config"]


def adapter_folder(path: str | os.PathLike[str], subfolder: str | None = None) -> Path:
    """The adapter folder at ``path`` (or its ``subfolder``), after finishing or undoing a save that
    a crash interrupted there; an error naming the path if there is none."""
    directory = Path(path) / subfolder if subfolder else Path(path)
    if not directory.exists():
        fileio.recover(directory.absolute())
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise AdapterFileError(
            f"no adapter at {str(directory)!r}: the path {what}. An adapter directory (written by "
            f"save_pretrained) holds {fileio.CONFIG_NAME} and {fileio.WEIGHTS_NAME}; lorakit reads local "
            "directories only"
        )
    return directory


def load_config(path: str | os.PathLike[str], subfolder: str | None = None) -> LoraConfig:
    """The :class:`LoraConfig` of an adapter directory (or of an ``adapter_config.json`` path)."""
    candidate = Path(path) / subfolder if subfolder else Path(path)
    if candidate.is_file():
        return peft_json.config_from_peft_dict(fileio.read_json(candidate), str(candidate))
    config_path = adapter_folder(path, subfolder) / fileio.CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(
            f"{str(config_path)!r} does not exist; an adapter directory written by "
            "save_pretrained (lorakit or PEFT) holds it"
        )
    return peft_json.config_from_peft_dict(fileio.read_json(config_path), str(config_path))


def save_config(config: LoraConfig, directory: str | os.PathLike[str]) -> None:
    """Write ``directory/adapter_config.json`` for ``config`` (atomically)."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise AdapterFileError(
            f"cannot save a config to {str(path)!r}: it is an existing file, not a directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    text = peft_json.dumps(peft_json.config_to_peft_dict(config))
    fileio.atomic_write_text(path / fileio.CONFIG_NAME, text)
