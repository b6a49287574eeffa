"""The command as a shell runs it: ``lorakit inspect ... | head`` ends quietly, and ``--json`` output
is JSON alone on stdout even when a library prints there (DeepSpeed's accelerator notice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import sentiment_rows, write_rows


@pytest.mark.slow  # builds a model skeleton (the first BERT import costs seconds)
def test_a_closed_pipe_ends_the_command_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``lorakit inspect ... | head -1``: the reader closed the pipe; no BrokenPipeError traceback."""
    from transformers import BertConfig

    from lorakit.cli.main import SIGPIPE_EXIT, main

    config = BertConfig(num_hidden_layers=40, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    config.save_pretrained(tmp_path / "deep")  # inspect reads config.json only; 40 layers outgrow its buffer
    read, write = os.pipe()
    os.close(read)  # `head` has read its line and gone
    with capsys.disabled(), os.fdopen(write, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["inspect", str(tmp_path / "deep")]) == SIGPIPE_EXIT
        monkeypatch.undo()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter, where DeepSpeed prints its notice on first import
def test_json_output_is_only_json(cli_files: Path, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(cli_files / "bert", num_labels=2)
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"])).save_pretrained(
        tmp_path / "a"
    )
    rows = [
        {"text": r["sentence"], "label": f"LABEL_{int(r['sentiment'] == 'pos')}"} for r in sentiment_rows(8)
    ]
    write_rows(rows, tmp_path / "d.csv")
    command = [
        sys.executable,
        "-m",
        "lorakit.cli",
        "eval",
        str(tmp_path / "a"),
        "--data",
        str(tmp_path / "d.csv"),
    ]
    done = subprocess.run(
        [*command, "--json"], env=subprocess_env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(json.loads(done.stdout)) == {"accuracy", "loss"}
