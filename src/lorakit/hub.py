"""A folder path or a Hugging Face Hub id, as a local folder: the one place lorakit meets the Hub.

PEFT and transformers take ``"org/name"`` wherever they take a folder; so does every lorakit reader
(:func:`lorakit.config.files.adapter_folder`, hence ``PeftModel.from_pretrained`` / ``load_adapter``,
``LoraConfig.from_pretrained``, the rank tools and the command). Nothing here downloads by itself:
``huggingface_hub.snapshot_download`` does, so the HF cache (``HF_HOME`` / ``HF_HUB_CACHE``),
``HF_HUB_OFFLINE``, revisions, tokens and partial downloads behave exactly as in transformers.

A path that exists on disk always wins over a Hub id of the same spelling (``runs/my-run`` is read
from disk when it is there), as in PEFT. ``huggingface_hub`` is imported only for a Hub id, so that
reading local folders needs nothing beyond torch and safetensors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from lorakit.errors import AdapterFileError

__all__ = ["ADAPTER_FILES", "is_hub_id", "local_folder"]

#: the files of a PEFT adapter folder (in the folder itself or in a ``subfolder``)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# huggingface_hub's rule for repo ids (validate_repo_id): "name" or "namespace/name", no "--" / ".."
_REPO_ID = re.compile(r"^(?:[\w\-.]{1,96}/)?[\w\-.]{1,96}$")


def is_hub_id(name: str | os.PathLike[str]) -> bool:
    """Whether ``name`` is spelled like a Hub repository id (``"name"`` or ``"org/name"``) and is not
    an absolute or explicitly relative path."""
    text = os.fspath(name)
    if text.startswith((".", "/", "~")) or "\\" in text:
        return False
    return bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text and not text.endswith(".git")


def local_folder(
    name_or_path: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    files: Sequence[str] | None = None,
    what: str = "folder",
) -> Path:
    """The local folder holding ``name_or_path`` (and its ``subfolder``).

    A path that exists is returned as is (``revision`` and ``token`` are then ignored, as in PEFT). A
    Hub id is fetched with ``snapshot_download`` into the HF cache, or found there when offline;
    ``files`` (names inside ``subfolder``, glob patterns allowed) limits what is downloaded, e.g.
    :data:`ADAPTER_FILES` or ``["config.json"]``. Anything else is returned unchanged, for the
    caller to report as a missing folder. Every Hub failure is one :class:`AdapterFileError` line
    that says what to do (log in, go online, fix the revision); ``what`` names the thing sought
    ("adapter", "model") in it.
    """
    path = Path(name_or_path)
    if path.exists() or not is_hub_id(name_or_path):
        return path / subfolder if subfolder else path
    repo_id = os.fspath(name_or_path)
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [prefix + f for f in files] if files is not None else ([prefix + "*"] if prefix else None)
    snapshot = _snapshot(repo_id, revision, token, patterns, what)
    return snapshot / subfolder if subfolder else snapshot


def _snapshot(
    repo_id: str, revision: str | None, token: str | bool | None, patterns: list[str] | None, what: str
) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError as exc:
        raise AdapterFileError(
            f"{what} {repo_id!r} is not a local folder; reading it from the Hugging Face Hub needs "
            "huggingface_hub (pip install huggingface_hub)"
        ) from exc
    at = f" at revision {revision!r}" if revision else ""
    where = f"{what} {repo_id!r}{at}"
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=patterns
        )
    except errors.GatedRepoError as exc:
        raise AdapterFileError(
            f"{where}: the Hub repository is gated; accept its terms on the Hub and log in "
            "(`hf auth login`, or pass token=...)"
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        raise AdapterFileError(
            f"{where}: no such local folder, and no Hub repository of that name (or it is private: "
            "log in with `hf auth login`, or pass token=...)"
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise AdapterFileError(f"{where}: the Hub repository has no such revision") from exc
    except errors.LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set, and the Hugging Face cache has no copy of it"
        else:
            reason = "the Hub could not be reached, and the Hugging Face cache has no copy of it"
        raise AdapterFileError(f"{where} is not a local folder; {reason} ({constants.HF_HUB_CACHE})") from exc
    except (errors.HfHubHTTPError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdapterFileError(f"{where}: could not be fetched from the Hub: {first}") from exc
    return Path(folder)
