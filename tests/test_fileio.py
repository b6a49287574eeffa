"""lorakit.io.files: atomic directories, safetensors with clear errors, safe legacy .bin reading."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch

from lorakit import fileio as files
from lorakit.errors import AdapterFileError


def _write(dirpath, name, text):
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, name), "w") as fh:
        fh.write(text)


# -- atomic_directory -----------------------------------------------------------------------------
def test_atomic_directory_creates_new(tmp_path):
    target = tmp_path / "out"
    with files.atomic_directory(target, ["a.txt"]) as staging:
        (staging / "a.txt").write_text("new")
        assert not target.exists()  # nothing is visible before the block completes
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind


def test_atomic_directory_keeps_foreign_files_and_replaces_listed(tmp_path):
    target = tmp_path / "out"
    _write(target, "a.txt", "old")
    _write(target, "optimizer.pt", "keep me")
    _write(target / "other", "x.txt", "other adapter")
    with files.atomic_directory(target, ["a.txt", "gone.txt"]) as staging:
        (staging / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert (target / "optimizer.pt").read_text() == "keep me"
    assert (target / "other" / "x.txt").read_text() == "other adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_error_leaves_previous(tmp_path):
    target = tmp_path / "out"
    _write(target, "a.txt", "old")
    with pytest.raises(RuntimeError), files.atomic_directory(target, ["a.txt"]) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_fallback_without_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    _write(target, "a.txt", "old")
    _write(target, "keep.txt", "k")
    with files.atomic_directory(target, ["a.txt"]) as staging:
        (staging / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new" and (target / "keep.txt").read_text() == "k"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_existing_file(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("not a directory")
    with (
        pytest.raises(AdapterFileError, match="existing file, not a directory"),
        files.atomic_directory(target, []),
    ):
        pass
    assert target.read_text() == "not a directory"


def test_recover_cleans_dead_staging_and_restores_moved_aside(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    pid = int(dead.stdout)
    target = tmp_path / "out"
    (tmp_path / f".out{files._STAGING_TAG}{pid}-abcd1234").mkdir()  # a killed save's staging
    old = tmp_path / f".out{files._STAGING_TAG}{pid}-ffff0000-old"  # killed between fallback renames
    _write(old, "a.txt", "previous")
    files.recover(target.absolute())
    assert (target / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_write_text(tmp_path):
    path = tmp_path / "c.json"
    files.atomic_write_text(path, "{}")
    files.atomic_write_text(path, '{"a": 1}')
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


# -- JSON -----------------------------------------------------------------------------------------
def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "adapter_config.json"
    bad.write_text('{"r": 8,,}')
    with pytest.raises(AdapterFileError, match=r"adapter_config.json.*not valid JSON.*line 1"):
        files.read_json(bad)
    with pytest.raises(AdapterFileError, match="does not exist"):
        files.read_json(tmp_path / "missing.json")


# -- safetensors ----------------------------------------------------------------------------------
def test_safetensors_roundtrip_shared_and_noncontiguous(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "tied": base, "t": base.T, "view": base[:, 1]}
    path = tmp_path / "w.safetensors"
    files.write_safetensors(path, tensors, {"format": "pt", "x": "y"})
    loaded, metadata = files.read_safetensors(path)
    assert metadata == {"format": "pt", "x": "y"}
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key
    assert files.read_safetensors_metadata(path) == metadata


@pytest.mark.parametrize("damage", ["truncate_data", "truncate_header", "empty", "garbage", "bad_json"])
def test_safetensors_damage_is_a_clear_error(tmp_path, damage):
    path = tmp_path / "adapter_model.safetensors"
    files.write_safetensors(path, {"a": torch.ones(64)}, {"format": "pt"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    damaged = {
        "truncate_data": raw[: len(raw) - 10],
        "truncate_header": raw[: 8 + n // 2],
        "empty": b"",
        "garbage": os.urandom(200),
        "bad_json": raw[:8] + b"{" * n + raw[8 + n :],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors.*(truncated|corrupt)"):
        files.read_safetensors(path)


# -- legacy .bin ----------------------------------------------------------------------------------
def test_legacy_bin_reads_tensors(tmp_path):
    path = tmp_path / "adapter_model.bin"
    torch.save({"x.lora_A.weight": torch.ones(2, 3)}, path)
    assert torch.equal(files.read_legacy_bin(path)["x.lora_A.weight"], torch.ones(2, 3))


class _Payload:
    """Unpickling this would create a marker file: the test proves it never runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle"])
def test_legacy_bin_with_code_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "adapter_model.bin"
    payload = {"x.lora_A.weight": torch.ones(1), "evil": _Payload(str(marker))}
    if how == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(AdapterFileError, match="adapter_model.bin.*cannot be loaded safely"):
        files.read_legacy_bin(path)
    assert not marker.exists()


def test_legacy_bin_must_hold_tensors(tmp_path):
    path = tmp_path / "adapter_model.bin"
    torch.save([torch.ones(1)], path)
    with pytest.raises(AdapterFileError, match="mapping of names to tensors"):
        files.read_legacy_bin(path)


def test_working_directory_is_replaced_file_by_file(tmp_path, monkeypatch):
    target = tmp_path / "out"
    _write(target, "a.txt", "old")
    _write(target, "old.bin", "stale")
    _write(target, "keep.txt", "k")
    monkeypatch.chdir(target)  # the directory cannot be swapped away from under the process
    with files.atomic_directory(".", ["a.txt", "old.bin"]) as staging:
        assert staging.parent == target
        (staging / "a.txt").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    assert sorted(os.listdir(target)) == ["a.txt", "keep.txt", "sub"]
    assert (target / "a.txt").read_text() == "new" and (target / "sub" / "b.txt").read_text() == "b"
    assert os.getcwd() == str(target)


def test_symlinked_directory_is_written_through(tmp_path):
    real = tmp_path / "real"
    _write(real, "a.txt", "old")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with files.atomic_directory(link, ["a.txt"]) as staging:
        (staging / "a.txt").write_text("new")
    assert link.is_symlink() and (real / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
