"""``TrainSettings`` is the flags, the config file and the Python entry point: the same values, the
same checks, preset < config file < flags, ``--print-config`` read back by ``--config``, help from
the docstrings."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lorakit.cli import TrainSettings
from lorakit.cli.errors import CliError
from lorakit.cli.main import SUBCOMMANDS, main
from lorakit.cli.training import parse_settings


def test_python_callers_get_the_same_checks_as_flags() -> None:
    with pytest.raises(CliError) as info:
        TrainSettings(model="m", data="d.csv", lr=-1, batch_size=0, max_steps=0)
    assert str(info.value) == (
        "--lr -1 must be > 0; --max-steps 0 must be >= 1 (or unset: --epochs); --batch-size 0 must be >= 1"
    )
    with pytest.raises(
        CliError, match=r"--task 'regression' must be one of seq-cls, .*; --r '8' must be int"
    ):
        TrainSettings(r="8", task="regression")  # type: ignore[arg-type]


def test_lists_from_commas_and_presets_from_python() -> None:
    s = TrainSettings(target_modules="query, value", rank_sweep="8,2,4")
    assert s.target_modules == ["query", "value"] and s.rank_sweep == [2, 4, 8]
    assert TrainSettings(target_modules="all-linear").target_modules == "all-linear"
    preset = TrainSettings.from_preset("smollm2-trec", max_steps=300)
    assert preset.preset == "smollm2-trec" and preset.task == "causal-lm" and preset.max_steps == 300
    assert preset.chat_template is False  # the preset's own setting


def test_preset_then_config_file_then_flags(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text('max-steps = 7\nlr = 0.01\ntarget_modules = ["query"]\n')
    s = parse_settings(["--config", str(tmp_path / "run.toml"), "--lr", "0.02"])
    assert s is not None
    assert s.preset == "minilm-vader" and s.batch_size == 16  # the default preset's
    assert s.max_steps == 7 and s.target_modules == ["query"]  # the file's, over the preset's
    assert s.lr == 0.02  # the flag's, over the file's
    (tmp_path / "run.json").write_text('{"model": "m", "data": "d.csv", "r": 4}')
    s = parse_settings(["--config", str(tmp_path / "run.json"), "--no-chat-template", "--resume"])
    assert s is not None and s.preset is None and s.r == 4 and s.batch_size == 16
    assert s.chat_template is False and s.resume is True
    s = parse_settings(["--model", "m", "--data", "d", "--max_steps", "3", "--target-modules", "a,b"])
    assert s is not None and s.max_steps == 3 and s.target_modules == ["a", "b"]  # underscores parse too


def test_print_config_is_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["--preset", "smollm2-trec", "--r", "4", "--target-modules", "q_proj,k_proj", "--out", "runs/x"]
    with pytest.raises(SystemExit) as exit_info:
        parse_settings([*argv, "--print-config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "max_new_tokens: 3" in printed  # the preset's values are in it
    (tmp_path / "printed.yaml").write_text(printed)
    assert parse_settings(["--config", str(tmp_path / "printed.yaml")]) == parse_settings(argv)


@pytest.mark.parametrize("command", ["", *SUBCOMMANDS])
def test_help_is_plain_text_from_the_docstrings(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and not re.search(r":\w+:`", text), text
    if command == "train":
        for field in dataclasses.fields(TrainSettings):
            assert "--" + field.name.replace("_", "-") in text
        assert "LoRA rank (type: int, default: 8)" in text  # the field's docstring
        assert "--no-chat-template" in text and "causal-lm" in text
