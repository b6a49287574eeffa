"""A real Hugging Face cache, offline: folders put into the cache layout that ``huggingface_hub``
downloads write, with huggingface_hub's own functions for its names, links and refs.

The layout (``models--org--name/{blobs,snapshots/<commit>,refs/<revision>}``) is what
``snapshot_download`` and transformers read under ``HF_HUB_OFFLINE=1``; :func:`offline_hub` points
this process's huggingface_hub at such a cache the way ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` do in a
fresh process (huggingface_hub reads those variables once, at import).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def cache_repo(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Put every file under ``folder`` into ``cache`` as the snapshot of ``repo_id`` at ``revision``
    (a branch or tag name, recorded in ``refs/``); returns the snapshot's commit hash."""
    from huggingface_hub.file_download import (
        _cache_commit_hash_for_specific_revision,
        _create_symlink,
        repo_folder_name,
    )

    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(
        b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)
    ).hexdigest()
    for file in files:
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / file.relative_to(folder)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(pointer), new_blob=False)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return commit


@contextmanager
def offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Iterator[Path]:
    """This process reads the Hub from ``cache`` only, as with ``HF_HUB_CACHE=cache HF_HUB_OFFLINE=1``."""
    from huggingface_hub import constants

    with monkeypatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(cache))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield cache
