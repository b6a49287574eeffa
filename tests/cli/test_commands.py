"""``lorakit inspect / info / merge / eval`` on an adapter trained once on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_fixtures import sentiment_rows, tiny_bert, write_rows

from lorakit.cli.main import main

pytestmark = pytest.mark.slow  # the module's fixture trains an adapter first


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("commands")
    tiny_bert(root / "bert")
    write_rows(sentiment_rows(), root / "sentiment.csv")
    assert (
        main(
            [
                "train",
                "--model",
                str(root / "bert"),
                "--data",
                str(root / "sentiment.csv"),
                "--text-column",
                "sentence",
                "--label-column",
                "sentiment",
                "--max-steps",
                "8",
                "--lr",
                "5e-2",
                "--threads",
                "1",
                "--out",
                str(root / "adapter"),
            ]
        )
        == 0
    )
    return root


def test_inspect_lists_targetable_modules_and_defaults(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(trained / "bert"), "--task", "seq-cls"]) == 0
    out = capsys.readouterr().out
    assert "BertForSequenceClassification" in out
    assert "bert.encoder.layer.0.attention.self.query" in out
    assert "default target_modules: ['query', 'value']" in out
    assert "lorakit train defaults: r=8" in out


def test_info_reports_config_targets_sizes_fingerprint(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(trained / "adapter")]) == 0
    out = capsys.readouterr().out
    weights = trained / "adapter" / "adapter_model.safetensors"
    assert "SEQ_CLS" in out and "adapted modules" in out and "sha256" in out
    assert f"{weights.stat().st_size:,}" in out
    assert "classifier" in out  # the head, saved in full
    assert "8 steps; accuracy" in out


def test_merge_gives_a_plain_model_with_the_same_outputs(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit import PeftModel

    assert main(["merge", "--adapter", str(trained / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert "max |merged - adapted|" in capsys.readouterr().out
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(trained / "bert", num_labels=2)
    adapted = PeftModel.from_pretrained(base, str(trained / "adapter")).eval()
    batch = AutoTokenizer.from_pretrained(tmp_path / "merged")(
        ["the film was good", "bad plot"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, rtol=1e-5, atol=1e-6)
    assert merged.config.id2label == {0: "neg", 1: "pos"}


def test_eval_reproduces_the_recorded_held_out_metrics(trained: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(trained / "adapter"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)  # progress bars go to stderr
    recorded = json.loads((trained / "adapter" / "metrics.json").read_text())["after"]
    assert metrics["accuracy"] == pytest.approx(recorded["accuracy"])
    assert metrics["loss"] == pytest.approx(recorded["loss"], rel=1e-4)


def test_eval_on_another_file(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_rows(
        [{"s": r["sentence"], "y": r["sentiment"]} for r in sentiment_rows(30, seed=5)],
        tmp_path / "other.jsonl",
    )
    assert (
        main(
            [
                "eval",
                str(trained / "adapter"),
                "--data",
                str(data),
                "--text-column",
                "s",
                "--label-column",
                "y",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "on 30 examples" in out and "accuracy" in out
