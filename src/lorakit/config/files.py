"""``adapter_config.json`` on disk: find an adapter folder, read its JSON, write it atomically.

What the JSON means (PEFT 0.21's keys and values) is :mod:`lorakit.config.peft_json`; turning it
into a config is :func:`lorakit.config.lora_config.config_from_peft_dict`; the atomic write and the
errors that name the file are :mod:`lorakit.fileio`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lorakit import fileio
from lorakit.errors import AdapterFileError
from lorakit.hub import ADAPTER_FILES, is_hub_id, local_folder

__all__ = ["adapter_folder", "read_config_dict", "save_config_text"]


def adapter_folder(
    path: str | os.PathLike[str],
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """The adapter folder at ``path`` (or its ``subfolder``), after finishing or undoing a save that
    a crash interrupted there; for a Hub id (``"org/adapter"``) that is not a local path, the
    adapter's files in the Hugging Face cache (fetched at ``revision`` with ``token`` if needed,
    :func:`lorakit.hub.local_folder`); an error naming the path if there is none."""
    directory = Path(path) / subfolder if subfolder else Path(path)
    if not directory.exists():
        fileio.recover(directory.absolute())
    if not directory.exists() and not Path(path).exists() and is_hub_id(path):
        directory = local_folder(
            path, subfolder=subfolder, revision=revision, token=token, files=ADAPTER_FILES, what="adapter"
        )
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise AdapterFileError(
            f"no adapter at {str(directory)!r}: the path {what}. An adapter directory (written by "
            f"save_pretrained) holds {fileio.CONFIG_NAME} and {fileio.WEIGHTS_NAME}; give its path or "
            "a Hugging Face Hub id"
        )
    return directory


def read_config_dict(
    path: str | os.PathLike[str],
    subfolder: str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[Any, str]:
    """(the parsed JSON, the file it came from) of an adapter folder's config (a path or a Hub id),
    or of an ``adapter_config.json`` path given directly."""
    candidate = Path(path) / subfolder if subfolder else Path(path)
    if candidate.is_file():
        return fileio.read_json(candidate), str(candidate)
    config_path = adapter_folder(path, subfolder, revision=revision, token=token) / fileio.CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFileError(
            f"{str(config_path)!r} does not exist; an adapter directory written by "
            "save_pretrained (lorakit or PEFT) holds it"
        )
    return fileio.read_json(config_path), str(config_path)


def save_config_text(directory: str | os.PathLike[str], text: str) -> None:
    """Write ``directory/adapter_config.json`` (atomically), creating the directory if needed."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise AdapterFileError(
            f"cannot save a config to {str(path)!r}: it is an existing file, not a directory"
        )
    path.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(path / fileio.CONFIG_NAME, text)
