"""The README model card save_pretrained writes (PEFT's facts, an existing card's content kept) and
push_to_hub's upload, checked offline by recording what huggingface_hub is asked to do."""

from __future__ import annotations

import pytest
import yaml
from zoo import llama, toy

import lorakit
from lorakit import LoraConfig, TaskType


def _front(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_new_card_has_peft_facts_for_a_transformers_model(tmp_path):
    model = lorakit.get_peft_model(llama(), LoraConfig(task_type=TaskType.CAUSAL_LM))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    front = _front(text)
    assert front["library_name"] == "peft"
    assert {"lora", "transformers"} <= set(front["tags"])
    assert front["base_model"] == model.config.to_dict()["_name_or_path"]
    assert front["pipeline_tag"] == "text-generation"
    assert f"- lorakit {lorakit.__version__}" in text and len(text) > 1000


def test_existing_card_keeps_its_content_and_gains_the_facts_once(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nmeta: hello\ntags:\n- mine\npipeline_tag: fill-mask\n---\nThis is a model card\n"
    )
    model = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # twice: nothing is added a second time
    text = (tmp_path / "README.md").read_text()
    front = _front(text)
    assert front["meta"] == "hello" and front["library_name"] == "peft"
    assert front["tags"] == ["lora", "mine"]
    assert front["pipeline_tag"] == "fill-mask"  # the card's own choice is kept
    assert "base_model" not in front  # a custom model has no config to name it
    assert "This is a model card" in text
    assert text.count(f"- lorakit {lorakit.__version__}") == 1


class _Recorder:
    """Stands in for huggingface_hub.HfApi: records the calls and the files at upload time."""

    calls: list = []

    def __init__(self, endpoint=None, token=None):
        self.calls.append(("init", endpoint, token))

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        return type("Url", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        from pathlib import Path

        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, files, kwargs))
        return "commit-info"


def test_push_to_hub_uploads_the_saved_folder_in_one_commit(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    _Recorder.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _Recorder)
    model = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"]))
    model.add_adapter("other", LoraConfig(target_modules=["conv1"]))
    result = model.push_to_hub("me/adapter", private=True, token="t", commit_message="first")
    assert result == "commit-info"
    init, create, upload = _Recorder.calls
    assert init == ("init", None, "t")
    assert create == ("create_repo", "me/adapter", True, True, "model")
    assert upload[:3] == (
        "upload_folder",
        "me/adapter",
        [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "other/adapter_config.json",
            "other/adapter_model.safetensors",
        ],
    )
    assert upload[3]["commit_message"] == "first" and upload[3]["create_pr"] is False


def test_push_to_hub_that_cannot_save_creates_nothing(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    _Recorder.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _Recorder)
    model = lorakit.get_peft_model(toy(), LoraConfig(target_modules=["lin"]))
    with pytest.raises(lorakit.AdapterError, match="nope"):
        model.push_to_hub("me/adapter", selected_adapters=["nope"])
    assert [c[0] for c in _Recorder.calls] == ["init"]
