"""Reading and writing adapter files: safely, atomically, with errors that name the file.

Guarantees:

* **Atomic directories.** :func:`atomic_directory` builds the complete new content in a hidden
  temporary sibling and then swaps it into place with one rename (Linux ``renameat2`` with
  ``RENAME_EXCHANGE`` when the directory already exists). A process killed at any instant leaves
  either the previous complete content or the new complete content at the path. Files already in
  the directory that the save does not replace (a trainer's ``optimizer.pt``, other adapters'
  subfolders) are carried over as hard links, so nothing else in the directory is lost. A
  directory that cannot be swapped (a mount point, the working directory, a read-only parent) has
  each file replaced atomically on its own instead.
* **Nothing is unpickled** except through ``torch.load(weights_only=True)`` for a legacy
  ``adapter_model.bin``; a pickle that carries code is refused and never runs.
* **Clear errors.** A missing, truncated or corrupt file, or invalid JSON, raises
  :class:`~lorakit.errors.AdapterFileError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import AdapterFileError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "LEGACY_WEIGHTS_NAME",
    "atomic_directory",
    "atomic_write_text",
    "read_json",
    "write_safetensors",
    "read_safetensors",
    "read_safetensors_metadata",
    "read_legacy_bin",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_STAGING_TAG = ".lorakit-staging-"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


# -- atomic writes --------------------------------------------------------------------------------
def _check_writable_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise AdapterFileError(
            f"cannot save an adapter to {str(target)!r}: it is an existing file, not a directory; "
            "choose a directory path (it is created if missing)"
        )


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _link_tree(src: Path, dst: Path, skip: set[Path]) -> None:
    """Mirror ``src`` into ``dst`` with hard links (copies where links fail), leaving out ``skip``;
    entries ``dst`` already has (the new content) win."""
    for entry in src.iterdir():
        if entry in skip:
            continue
        out = dst / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if not out.exists():
                out.mkdir()
            if out.is_dir() and not out.is_symlink():
                _link_tree(entry, out, skip)
        elif out.exists() or out.is_symlink():
            continue
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), out)
        else:
            try:
                os.link(entry, out)
            except OSError:
                shutil.copy2(entry, out)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _staging_dirs(target: Path) -> Iterator[tuple[Path, int]]:
    """Staging directories of saves to ``target``: siblings, and (in-place mode) children."""
    places = [(target.parent, f".{target.name}{_STAGING_TAG}"), (target, _STAGING_TAG)]
    for folder, prefix in places:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(prefix):
                pid = entry.name[len(prefix) :].split("-", 1)[0]
                yield entry, int(pid) if pid.isdigit() else -1


def recover(target: Path) -> None:
    """Finish or clean up after a save that was killed: remove staging directories of dead
    processes, and if ``target`` vanished between the two renames of the fallback swap, put the
    previous content back."""
    for staging, pid in list(_staging_dirs(target)):
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if not target.exists() and staging.name.endswith("-old"):
            os.rename(staging, target)
        else:
            shutil.rmtree(staging, ignore_errors=True)


def _in_place(target: Path) -> bool:
    """Whether ``target`` cannot be swapped as a whole: a mount point, the working directory (or
    one above it), or a directory whose parent is not writable."""
    if not target.is_dir():
        return False
    cwd = Path.cwd().resolve()
    return (
        os.path.ismount(target)
        or cwd == target
        or target in cwd.parents
        or not os.access(target.parent, os.W_OK)
    )


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str], replaced: list[str]) -> Iterator[Path]:
    """Yield an empty staging directory; on normal exit it becomes ``target`` atomically.

    ``replaced`` lists the paths (relative to ``target``) that the new content supersedes; every
    other entry already in ``target`` is carried over unchanged. If the block raises, ``target``
    is untouched and the staging directory is removed. Where the directory cannot be swapped as a
    whole (see :func:`_in_place`), each file is replaced atomically on its own instead.
    """
    target = Path(target).resolve()
    _check_writable_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tag = f"{_STAGING_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    in_place = _in_place(target)
    staging = target / tag if in_place else target.parent / f".{target.name}{tag}"
    staging.mkdir()
    try:
        yield staging
        if in_place:
            _replace_files(staging, target, replaced)
            return
        if target.exists():
            _link_tree(target, staging, {target / r for r in replaced})
        _fsync_dir(staging)
        _swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_files(staging: Path, target: Path, replaced: list[str]) -> None:
    """In-place mode: move every staged file over its destination (one atomic rename per file),
    then remove the superseded paths the new content does not rewrite."""
    staged = sorted(p for p in staging.rglob("*") if p.is_file())
    for path in staged:
        dest = target / path.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
    written = {target / p.relative_to(staging) for p in staged}
    for rel in replaced:
        stale = target / rel
        if stale not in written and stale.is_file():
            stale.unlink()
    _fsync_dir(target)


def _swap_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
    elif not _exchange(staging, target):
        # Fallback: move the old content aside, then the new in; recover() undoes a crash between.
        old = staging.with_name(staging.name + "-old")
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write one text file atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    if path.is_dir():
        raise AdapterFileError(f"cannot write {str(path)!r}: it is a directory")
    tmp = path.with_name(f".{path.name}{_STAGING_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# -- JSON -----------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a missing file or invalid JSON is an error naming the file and position."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterFileError(f"{str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"cannot read {str(path)!r}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(
            f"{str(path)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None


# -- safetensors ----------------------------------------------------------------------------------
def _unshared(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (tied or shared weights are cloned:
    safetensors stores each key's bytes on its own)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for key, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        storage = (t.untyped_storage().data_ptr(), t.device) if t.numel() else None
        if storage is not None and storage in seen:
            t = t.clone()
        elif storage is not None:
            seen.add(storage)
        out[key] = t
    return out


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Write ``tensors`` to ``path`` with string ``metadata`` in the header (not atomic by itself:
    call it inside :func:`atomic_directory`)."""
    from safetensors.torch import save_file

    bad = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise AdapterFileError(f"cannot save {bad}: not tensors")
    save_file(_unshared(tensors), str(path), metadata=dict(metadata))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _header(path: Path) -> dict[str, Any]:
    """The parsed safetensors header; checks that the file holds every byte the header promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise AdapterFileError(
                    f"{str(path)!r} is truncated or not a safetensors file ({size} bytes, no header)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise AdapterFileError(
                    f"{str(path)!r} is truncated or corrupt: its header claims "
                    f"{n} bytes but the file has {size}"
                )
            header = json.loads(handle.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise AdapterFileError(f"{str(path)!r} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError(f"{str(path)!r} is corrupt: its header is not valid JSON") from None
    except OSError as exc:
        raise AdapterFileError(f"cannot read {str(path)!r}: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{str(path)!r} is corrupt: its header is not a JSON object")
    ends = [
        v.get("data_offsets", [0, 0])[1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict)
    ]
    if ends and 8 + n + max(ends) > size:
        raise AdapterFileError(
            f"{str(path)!r} is truncated: the tensors need {8 + n + max(ends)} bytes, the file has {size}"
        )
    return header


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header's ``__metadata__`` (string → string), read without loading any tensor."""
    metadata = _header(Path(path)).get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the metadata of a safetensors file."""
    from safetensors.torch import load_file

    metadata = read_safetensors_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types; name the file instead
        raise AdapterFileError(f"{str(path)!r} is corrupt and cannot be read as safetensors: {exc}") from None
    return tensors, metadata


# -- legacy pickle --------------------------------------------------------------------------------
def write_legacy_bin(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``adapter_model.bin`` as PEFT does with ``safe_serialization=False``: ``torch.save`` of
    a dict of plain CPU tensors, which :func:`read_legacy_bin` (``weights_only=True``) and PEFT read
    back. Only tensors are pickled, never code. Not atomic by itself (see :func:`atomic_directory`)."""
    bad = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise AdapterFileError(f"cannot save {bad}: not tensors")
    # Clones, so that a view does not drag its whole (shared) storage into the pickle.
    torch.save({k: t.clone() for k, t in _unshared(tensors).items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def read_legacy_bin(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a legacy ``adapter_model.bin``, read with ``torch.load(weights_only=True)``:
    only tensors and plain containers are accepted; a pickle carrying code is refused unrun."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterFileError(f"{str(path)!r} does not exist") from None
    except Exception as exc:  # pickle / zip / torch errors alike: name the file, never unpickle more
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterFileError(
            f"{str(path)!r} cannot be loaded safely (read with torch.load(weights_only=True), which "
            f"allows only tensors): {first}"
        ) from None
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise AdapterFileError(f"{str(path)!r} does not hold a mapping of names to tensors")
    return dict(data)
