"""``lorakit train`` unchanged under ``torchrun`` and ``accelerate launch`` (2 processes, gloo on
CPU): one progress bar, one report, one output directory written by rank 0."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(240)]

LAUNCHERS = {
    "torchrun": [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master_addr=127.0.0.1",
        "--master_port={port}",
        "-m",
        "lorakit.cli",
    ],
    "accelerate": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        "{port}",
        "-m",
        "lorakit.cli",
    ],
}


def _train_args(files: Path, out: Path, steps: int = 4) -> list[str]:
    return [
        "train",
        "--model",
        str(files / "bert"),
        "--data",
        str(files / "sentiment.csv"),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--max-steps",
        str(steps),
        "--threads",
        "1",
        "--out",
        str(out),
    ]


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_train_runs_unchanged_under_a_launcher(
    launcher: str,
    cli_files: Path,
    tmp_path: Path,
    subprocess_env: dict[str, str],
    free_port: Callable[[], int],
) -> None:
    port = str(free_port())
    command = [a.replace("{port}", port) for a in LAUNCHERS[launcher]] + _train_args(
        cli_files, tmp_path / "run"
    )
    env = {**subprocess_env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    bars = [line for line in done.stderr.replace("\r", "\n").splitlines() if " 0/4 [" in line]
    assert len(bars) == 1, f"expected one training progress bar, got {len(bars)}"
    assert done.stdout.count("trainable parameters") == 1
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["steps"] == 4 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside it


DRIVER = """
import json, os, sys
import torch.distributed as dist
from lorakit.cli.main import main
code = main(sys.argv[1:])
print("DRIVER " + json.dumps({"rank": int(os.environ["RANK"]), "exit": code, "group": dist.is_initialized()}))
"""


def test_train_leaves_no_process_group_behind(
    cli_files: Path, tmp_path: Path, subprocess_env: dict[str, str], free_port: Callable[[], int]
) -> None:
    """The Trainer creates the group under a launcher; ``main`` must destroy it before returning.
    Left alive, a gloo worker that frees a finished all-gather's tensors while the interpreter
    finalises calls std::terminate (SIGABRT) on some runs; this check sees the group itself, every run."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    command = [a.replace("{port}", str(free_port())) for a in LAUNCHERS["torchrun"][:-2]] + [str(driver)]
    command += _train_args(cli_files, tmp_path / "run", steps=1)
    env = {**subprocess_env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split("DRIVER ", 1)[1] for line in done.stdout.splitlines() if "DRIVER " in line]
    reports = [json.loads(line) for line in lines]
    assert sorted(r["rank"] for r in reports) == [0, 1], done.stdout[-2000:]
    assert all(r["exit"] == 0 for r in reports), reports
    assert not any(r["group"] for r in reports), f"process group still initialised after main(): {reports}"
