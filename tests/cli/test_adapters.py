"""``lorakit eval`` / ``merge`` / ``info`` on any adapter: saved by PEFT (no metrics.json) with string
labels and the base model's ``id2label``, extracted with ``--task``, or read from the Hugging Face
cache by Hub id (a model id for ``train``, the adapter's base id for ``eval``), offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_fixtures import sentiment_rows, write_rows
from hub_cache import cache_repo, offline_hub

from lorakit.cli.main import main

pytestmark = pytest.mark.slow  # builds and trains tiny models

LABELS = {0: "neg", 1: "pos"}


@pytest.fixture(scope="module")
def models(cli_files: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier base whose config names its classes, a PEFT adapter on it, and a full fine-tune."""
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("adapters")
    tokenizer = AutoTokenizer.from_pretrained(cli_files / "bert")
    kwargs = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(cli_files / "bert", **kwargs)
    base.save_pretrained(root / "bert-cls")
    tokenizer.save_pretrained(root / "bert-cls")
    tuned = AutoModelForSequenceClassification.from_pretrained(root / "bert-cls")
    with torch.no_grad():
        for layer in tuned.bert.encoder.layer:
            layer.attention.self.query.weight += 0.1 * torch.randn(16, 1) @ torch.randn(1, 16)
        tuned.classifier.weight += 0.5
    tuned.save_pretrained(root / "tuned")
    tokenizer.save_pretrained(root / "tuned")
    model = AutoModelForSequenceClassification.from_pretrained(root / "bert-cls")
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["query", "value"], init_lora_weights=False
    )
    peft.get_peft_model(model, config).save_pretrained(root / "peft-adapter")
    write_rows(sentiment_rows(20, seed=3), root / "other.jsonl")
    (root / "other.jsonl").write_text(
        (root / "other.jsonl").read_text().replace('"sentence"', '"text"').replace('"sentiment"', '"label"')
    )
    return root


def test_eval_and_merge_a_peft_adapter_with_string_labels(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForSequenceClassification

    assert not (models / "peft-adapter" / "metrics.json").exists()
    monkeypatch.chdir(tmp_path)  # any working directory
    assert main(["eval", str(models / "peft-adapter"), "--data", str(models / "other.jsonl"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"accuracy", "loss"}  # 'neg' / 'pos' read through the base's id2label
    assert main(["merge", "--adapter", str(models / "peft-adapter"), "--out", "merged"]) == 0
    assert AutoModelForSequenceClassification.from_pretrained("merged").config.id2label == LABELS


def test_labels_the_model_does_not_know_are_one_line(
    cli_files: Path, models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import peft
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(cli_files / "bert", num_labels=2)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "adapter")  # base config: LABEL_0, LABEL_1
    assert main(["eval", str(tmp_path / "adapter"), "--data", str(models / "other.jsonl")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "are not classes of the model: 'neg' (row 1)" in line and "its classes: 'LABEL_0', 'LABEL_1'" in line
    )


def test_extract_with_a_task_gives_an_adapter_eval_and_merge_take(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "extracted"
    argv = ["extract", "--base", str(models / "bert-cls"), "--tuned", str(models / "tuned"), "--rank", "1"]
    assert main([*argv, "--task", "seq-cls", "--out", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert main(["eval", str(out), "--data", str(models / "other.jsonl")]) == 0
    assert main(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    tuned = AutoModelForSequenceClassification.from_pretrained(models / "tuned")
    torch.testing.assert_close(merged.classifier.weight, tuned.classifier.weight)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2  # never written over
    assert "exists; give a new folder" in capsys.readouterr().err


def test_hub_ids_from_the_cache_offline(
    cli_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cache = tmp_path / "hf"
    cache_repo(cache, "org/tiny-bert", cli_files / "bert")
    data = [
        "--data",
        str(cli_files / "sentiment.csv"),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
    ]
    with offline_hub(monkeypatch, cache):
        argv = ["train", "--model", "org/tiny-bert", *data, "--max-steps", "2", "--eval-steps", "0"]
        assert main([*argv, "--threads", "1", "--out", str(tmp_path / "run")]) == 0
        config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "org/tiny-bert"
        cache_repo(cache, "org/sentiment-lora", tmp_path / "run")
        capsys.readouterr()
        assert main(["eval", "org/sentiment-lora", "--data", str(cli_files / "sentiment.csv"), "--json"]) == 0
        assert set(json.loads(capsys.readouterr().out)) == {"accuracy", "loss"}  # base: org/tiny-bert
        assert main(["info", "org/sentiment-lora"]) == 0
        assert "org/sentiment-lora (" in capsys.readouterr().out
        assert main(["inspect", "org/tiny-bert"]) == 0
        assert "BertModel from org/tiny-bert" in capsys.readouterr().out
