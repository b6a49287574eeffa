"""``lorakit train --quantize`` (QLoRA from the command line) and ``lorakit merge --base`` of a
QLoRA adapter into the full-precision model, on the CLI tests' tiny models."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

import lorakit
from lorakit.cli.main import main
from lorakit.cli.settings import QUANTIZE, TrainSettings

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

pytestmark = pytest.mark.slow  # every test trains

FAST = ["--max-steps", "12", "--eval-steps", "6", "--save-steps", "6", "--logging-steps", "3"]
FAST += ["--lr", "5e-2", "--threads", "1"]


def seq_cls_args(files: Path) -> list[str]:
    return ["--model", str(files / "bert"), "--data", str(files / "sentiment.csv")] + [
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
    ]


def _causal(files: Path) -> list[str]:
    return ["--task", "causal-lm", "--model", str(files / "llama"), "--data", str(files / "qa.jsonl")]


@pytest.mark.parametrize("scheme", ["nf4", "int8", "int8-ao"])
def test_train_quantized_reports_base_memory_and_the_usual_metrics(
    cli_files: Path, tmp_path: Path, scheme: str, capsys
) -> None:
    out = tmp_path / scheme
    assert main(["train", *_causal(cli_files), *FAST, "--quantize", scheme, "--out", str(out)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["quantize"] == scheme and record["config"]["quantize"] == scheme
    assert set(record["after"]) == {"perplexity", "exact_match", "loss"}
    assert record["after"]["loss"] < record["before"]["loss"]
    assert record["base_memory_bytes"] > 0  # (measured on real models by benchmarks/quantized.py)
    assert "base model memory" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file()


def test_seq_cls_keeps_its_new_head_out_of_quantization(cli_files: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", *seq_cls_args(cli_files), *FAST, "--quantize", "nf4", "--out", str(out)]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["after"]["accuracy"] >= 0 and record["quantize"] == "nf4"


def test_the_setting_offers_the_library_quantizations() -> None:
    assert ("none", *lorakit.QUANTIZATIONS) == QUANTIZE
    hint = typing.get_type_hints(TrainSettings)["quantize"]
    assert typing.get_args(hint) == QUANTIZE and TrainSettings().quantize == "none"


def test_unknown_quantization_is_refused_with_the_choices(cli_files: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", *_causal(cli_files), "--quantize", "int3", "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert "'int3'" in err and all(name in err for name in lorakit.QUANTIZATIONS)


def test_merge_a_qlora_adapter_into_the_full_precision_base(cli_files: Path, tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "qlora"
    assert main(["train", *_causal(cli_files), *FAST, "--quantize", "nf4", "--out", str(adapter)]) == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert (
        main(["merge", "--adapter", str(adapter), "--base", str(cli_files / "llama"), "--out", str(merged)])
        == 0
    )
    out = capsys.readouterr().out
    assert "quantized (nf4) base" in out and "adapter's own effect" in out
    assert (merged / "config.json").is_file()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert not getattr(model, "is_quantized", False) and "quantization_config" not in model.config.to_dict()

    # the quantization comes from the run's config.yaml; --quantize none skips the comparison
    plain = tmp_path / "plain"
    assert main(["merge", "--adapter", str(adapter), "--out", str(plain), "--quantize", "none"]) == 0
    out = capsys.readouterr().out
    assert "max |merged - adapted|" in out and "quantized" not in out
