"""``lorakit train --rank-sweep``: one run per rank, a table, sweep.json and sweep.png."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_fixtures import sentiment_rows, tiny_bert, write_rows

from lorakit.cli.main import main
from lorakit.cli.sweep import suggest


@pytest.mark.slow
def test_rank_sweep_trains_each_rank_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_bert(tmp_path / "bert")
    write_rows(sentiment_rows(), tmp_path / "sentiment.csv")
    out = tmp_path / "sweep"
    argv = [
        "train",
        "--model",
        str(tmp_path / "bert"),
        "--data",
        str(tmp_path / "sentiment.csv"),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--max-steps",
        "4",
        "--threads",
        "1",
        "--rank-sweep",
        "4,1,2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["r"] for r in sweep["runs"]] == [1, 2, 4]
    assert [r["alpha"] for r in sweep["runs"]] == [2.0, 4.0, 8.0]  # alpha / r kept at 16 / 8
    params = [r["trainable"] for r in sweep["runs"]]
    assert params[0] < params[1] < params[2]
    assert len({r["before"] for r in sweep["runs"]}) == 1
    assert sweep["suggested_rank"] in (1, 2, 4)
    assert (out / "sweep.png").stat().st_size > 5000
    for r in (1, 2, 4):
        config = json.loads((out / f"r{r}" / "adapter_config.json").read_text())
        assert config["r"] == r
    assert "<- suggested" in capsys.readouterr().out


def test_suggestion_is_the_smallest_rank_near_the_best() -> None:
    rows = [
        {"r": 1, "after": 0.70},
        {"r": 2, "after": 0.795},
        {"r": 4, "after": 0.80},
        {"r": 8, "after": 0.79},
    ]
    assert suggest(rows, "accuracy") == 2
    ppl = [{"r": 1, "after": 9.0}, {"r": 4, "after": 5.05}, {"r": 8, "after": 5.0}]
    assert suggest(ppl, "perplexity") == 4


def test_bad_rank_list_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_bert(tmp_path / "bert")
    write_rows(sentiment_rows(), tmp_path / "s.csv")
    argv = [
        "train",
        "--model",
        str(tmp_path / "bert"),
        "--data",
        str(tmp_path / "s.csv"),
        "--text-column",
        "sentence",
        "--label-column",
        "sentiment",
        "--rank-sweep",
        "2,x",
    ]
    assert main(argv) == 2
    assert "--rank-sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sweeps_rank_equals_a_single_run_at_that_rank(tmp_path: Path) -> None:
    """Each rank of a sweep trains from the seed: a sweep's later ranks skip the evaluation before
    training (it is the same for every rank), and an evaluation draws from torch's generator, so
    without re-seeding their data order (and so their result) differed from a single run's."""
    tiny_bert(tmp_path / "bert")
    write_rows(sentiment_rows(), tmp_path / "s.csv")
    common = ["train", "--model", str(tmp_path / "bert"), "--data", str(tmp_path / "s.csv")]
    common += ["--text-column", "sentence", "--label-column", "sentiment", "--threads", "1"]
    common += ["--max-steps", "6", "--batch-size", "4", "--lr", "5e-2", "--dropout", "0.1"]
    assert main([*common, "--rank-sweep", "2,4", "--out", str(tmp_path / "sweep")]) == 0
    assert main([*common, "--r", "4", "--alpha", "8", "--out", str(tmp_path / "single")]) == 0
    swept = json.loads((tmp_path / "sweep" / "r4" / "metrics.json").read_text())
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert swept["after"] == single["after"]
    assert swept["loss_curve"] == single["loss_curve"]
