"""``lorakit train`` unchanged under ``torchrun`` and ``accelerate launch`` (2 processes, gloo on
CPU): one progress bar, one report, one output directory written by rank 0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cli_fixtures import sentiment_rows, tiny_bert, write_rows

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(240)]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist-cli")
    tiny_bert(root / "bert")
    write_rows(sentiment_rows(), root / "sentiment.csv")
    return root


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


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_train_runs_unchanged_under_a_launcher(launcher: str, files: Path, tmp_path: Path) -> None:
    port = str(_port())
    command = [a.replace("{port}", port) for a in LAUNCHERS[launcher]] + [
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
        "4",
        "--threads",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=220, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    bars = [line for line in done.stderr.replace("\r", "\n").splitlines() if " 0/4 [" in line]
    assert len(bars) == 1, f"expected one training progress bar, got {len(bars)}"
    assert done.stdout.count("trainable parameters") == 1
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["steps"] == 4 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written beside it
