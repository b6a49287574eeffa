"""The command as a shell runs it: ``lorakit inspect ... | head`` ends quietly, and ``--json`` output
is JSON alone on stdout even when a library prints there (DeepSpeed's accelerator notice)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest


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


def test_json_output_is_only_json(capfd: pytest.CaptureFixture) -> None:
    """What a library prints while a ``--json`` command works (DeepSpeed logs its accelerator notice
    to stdout when transformers first imports it) lands on stderr: stdout holds the JSON alone."""
    from lorakit.cli.output import stdout_to_stderr

    with stdout_to_stderr():
        os.write(1, b"[WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.\n")
        print("a library's print")
    print(json.dumps({"accuracy": 1.0}))
    out, err = capfd.readouterr()
    assert json.loads(out) == {"accuracy": 1.0}
    assert "Setting accelerator to CPU" in err and "a library's print" in err
