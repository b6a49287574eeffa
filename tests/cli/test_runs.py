"""Nothing lost: a run in ``--out`` is continued only with ``--resume`` (and only with its own
settings, checked before anything loads) and replaced only with ``--overwrite`` (which removes the
run's files and nothing else); Ctrl-C says how to resume; the record's paths work from anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorakit.cli.main import main

pytestmark = pytest.mark.slow  # each test trains a tiny model for a few steps


def args(files: Path, out: Path, *extra: str) -> list[str]:
    data = [
        "--data",
        str(files / "sentiment.csv"),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
    ]
    quick = ["--max-steps", "2", "--save-steps", "1", "--threads", "1", "--eval-steps", "0"]
    return ["train", "--model", str(files / "bert"), *data, *quick, *extra, "--out", str(out)]


def test_a_run_is_replaced_only_with_overwrite(
    cli_files: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(args(cli_files, out)) == 0
    (out / "my-notes.txt").write_text("mine")
    first = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(args(cli_files, out, "--seed", "1")) == 2
    assert "holds a run; pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == first  # untouched
    assert main(args(cli_files, out, "--seed", "1", "--overwrite", "--max-steps", "1")) == 0
    assert (out / "my-notes.txt").read_text() == "mine"  # not the run's: kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]  # the old ones went
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["seed"] == 1 and recorded["overwrite"] is False and recorded["out"] == "."


def test_resume_with_other_settings_is_refused_before_loading(
    cli_files: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(args(cli_files, out)) == 0
    capsys.readouterr()
    began = time.perf_counter()
    assert main(args(cli_files, out, "--resume", "--r", "4", "--target-modules", "query", "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - began < 10 and "Loading weights" not in err  # nothing loaded
    (line,) = err.strip().splitlines()
    assert "--resume with settings that differ from the run" in line
    assert "--r 8 -> 4; --target-modules None -> ['query']; --lr 0.002 -> 0.1" in line
    assert len(line) < 400
    # what may change on resume: how long it goes on, how often it reports
    assert main(args(cli_files, out, "--resume", "--max-steps", "3", "--logging-steps", "1")) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_ctrl_c_says_how_to_resume(cli_files: Path, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    # far more steps than any machine finishes in the test's time, so the signal always lands mid-run
    command = args(cli_files, out, "--max-steps", "1000000", "--save-steps", "2")
    log = tmp_path / "stderr.txt"

    def saved() -> list[int]:  # only one checkpoint is kept: wait for any complete one, not checkpoint-2
        found = (out / "checkpoints").glob("checkpoint-*/trainer_state.json")
        return sorted(int(p.parent.name.split("-")[1]) for p in found)

    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall the run
        run = subprocess.Popen(
            [sys.executable, "-m", "lorakit.cli", *command],
            env={**subprocess_env, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.monotonic() + 120
        while not saved() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        run.send_signal(signal.SIGINT)  # perhaps while a checkpoint is being written
        run.wait(timeout=60)
    err = log.read_text()
    assert run.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    hint = next(line for line in err.splitlines() if "continue the run with:" in line)
    assert hint.split("continue the run with: ")[1] == " ".join(["lorakit", *command, "--resume"])
    finish = max(saved()) + 2  # finish two steps after where Ctrl-C left it
    resumed = [*command[:-2], "--max-steps", str(finish), "--out", str(out), "--resume"]
    assert main(resumed) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == finish


def test_recorded_paths_work_from_another_directory(
    cli_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    os.symlink(cli_files / "bert", "bert")
    os.symlink(cli_files / "sentiment.csv", "sentiment.csv")
    relative = ["--model", "bert", "--data", "sentiment.csv", "--text-column", "sentence"]
    argv = ["train", *relative, "--label-column", "sentiment", "--max-steps", "4", "--eval-steps", "0"]
    assert main([*argv, "--threads", "1", "--out", "run"]) == 0
    recorded = json.loads(Path("run/metrics.json").read_text())
    assert recorded["config"]["data"] == "../sentiment.csv"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "work/run", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(recorded["after"]["accuracy"])
    # the run's config.yaml repeats it from here: its paths are relative to the file
    assert main(["train", "--config", "work/run/config.yaml", "--max-steps", "1", "--out", "again"]) == 0
    assert json.loads(Path("again/metrics.json").read_text())["examples"]["train"] == 96
