"""Hub ids wherever a folder is taken: ``PeftModel.from_pretrained(model, "org/adapter", revision=...,
subfolder=...)``, ``load_adapter``, ``LoraConfig.from_pretrained`` and the rank tools, read from a real
Hugging Face cache layout with the Hub offline (tests/hub_cache.py); a missing id gets one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_cache import cache_repo, offline_hub
from zoo import perturb_trainable, tiny, tiny_inputs

import lorakit
from lorakit import AdapterFileError, LoraConfig, PeftModel, get_peft_model
from lorakit.hub import is_hub_id, local_folder


def _adapter(folder: Path, r: int, seed: int, name: str = "default") -> torch.Tensor:
    """Save a perturbed rank-``r`` adapter of :func:`tiny` in ``folder``; its output on tiny_inputs."""
    torch.manual_seed(seed)
    model = get_peft_model(tiny(), LoraConfig(r=r, target_modules=["fc1"]), adapter_name=name)
    perturb_trainable(model)
    model.save_pretrained(folder)
    with torch.no_grad():
        return model.eval()(tiny_inputs())


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``org/adapter`` in an offline HF cache: main (r=2), tag v2 (r=4), and a subfolder ``other``."""
    cache = tmp_path / "hf" / "hub"
    main_out = _adapter(tmp_path / "main", 2, seed=1)
    v2_out = _adapter(tmp_path / "v2", 4, seed=2)
    _adapter(tmp_path / "v2" / "other", 3, seed=3)
    cache_repo(cache, "org/adapter", tmp_path / "main", "main")
    cache_repo(cache, "org/adapter", tmp_path / "v2", "v2")
    with offline_hub(monkeypatch, cache):
        yield {"main": main_out, "v2": v2_out, "root": tmp_path}


def test_the_cache_is_one_huggingface_hub_reads(hub) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    info = scan_cache_dir(hub["root"] / "hf" / "hub")
    repo = next(r for r in info.repos if r.repo_id == "org/adapter")
    assert {ref for rev in repo.revisions for ref in rev.refs} == {"main", "v2"}
    assert Path(str(try_to_load_from_cache("org/adapter", "adapter_config.json"))).is_file()


def test_from_pretrained_reads_a_hub_id_at_a_revision(hub) -> None:  # type: ignore[no-untyped-def]
    for revision, r in ((None, 2), ("v2", 4)):
        model = PeftModel.from_pretrained(tiny(), "org/adapter", revision=revision)
        assert model.peft_config["default"].r == r
        with torch.no_grad():
            torch.testing.assert_close(model(tiny_inputs()), hub["main" if revision is None else "v2"])


def test_subfolder_load_adapter_and_config(hub) -> None:  # type: ignore[no-untyped-def]
    model = PeftModel.from_pretrained(tiny(), "org/adapter", revision="v2", subfolder="other")
    assert model.peft_config["default"].r == 3
    model.load_adapter("org/adapter", "second", revision="v2")
    assert model.peft_config["second"].r == 4
    config = LoraConfig.from_pretrained("org/adapter", revision="v2")
    assert config.r == 4 and config.revision is None  # revision chose the files; it is no config field
    assert lorakit.rank_report("org/adapter").modules[0].rank == 2


def test_a_local_folder_wins_over_a_hub_id(hub, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _adapter(hub["root"] / "org" / "adapter", 5, seed=4)
    monkeypatch.chdir(hub["root"])
    assert PeftModel.from_pretrained(tiny(), "org/adapter").peft_config["default"].r == 5


@pytest.mark.parametrize(
    "name, revision, expected",
    [
        ("org/missing", None, "adapter 'org/missing' is not a local folder; HF_HUB_OFFLINE is set"),
        ("org/adapter", "v9", "adapter 'org/adapter' at revision 'v9' is not a local folder"),
        ("no/such/dir", None, "no adapter at 'no/such/dir': the path does not exist"),
    ],
)
def test_missing_ids_and_paths_are_one_line(hub, name: str, revision: str | None, expected: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AdapterFileError) as info:
        PeftModel.from_pretrained(tiny(), name, revision=revision)
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, hub_id",
    [
        ("org/name", True),
        ("gpt2", True),
        ("runs/minilm-vader", True),
        ("./org/name", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("~/adapter", False),
        ("org--x/y", False),
    ],
)
def test_is_hub_id(name: str, hub_id: bool) -> None:
    assert is_hub_id(name) is hub_id


def test_local_folder_of_a_model_fetches_only_the_files_asked_for(tmp_path: Path) -> None:
    assert local_folder(tmp_path) == tmp_path
    assert local_folder(tmp_path / "nothing") == tmp_path / "nothing"  # the caller reports it


@pytest.mark.slow
def test_hf_home_and_hf_hub_offline_in_a_fresh_process(tmp_path: Path, subprocess_env: dict) -> None:
    """The variables users set, read by huggingface_hub at import: HF_HOME's cache, offline."""
    _adapter(tmp_path / "adapter", 2, seed=1)
    cache_repo(tmp_path / "home" / "hub", "org/adapter", tmp_path / "adapter")
    code = (
        "import json, lorakit\n"
        "print(json.dumps(lorakit.LoraConfig.from_pretrained('org/adapter').r))\n"
        "try:\n    lorakit.LoraConfig.from_pretrained('org/other')\n"
        "except lorakit.AdapterFileError as e:\n    print(e)\n"
    )
    env = {**subprocess_env, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.strip().splitlines()
    assert json.loads(first) == 2
    assert "'org/other' is not a local folder; HF_HUB_OFFLINE is set" in second
    assert str(tmp_path / "home" / "hub") in second
