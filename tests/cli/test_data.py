"""Never train on garbage silently: missing texts and labels are refused with their rows (or dropped
and counted), values are read as written, numeric labels keep numeric order, decode errors name the
line. Real files in every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_fixtures import write_rows

from lorakit.cli import data
from lorakit.cli.errors import CliError
from lorakit.cli.tasks import TASKS, label_names

ROWS = [
    {"text": "good", "label": "food"},
    {"text": "fine", "label": ""},
    {"text": None, "label": "tech"},
    {"text": "  ", "label": "tech"},
    {"text": "ok", "label": None},
    {"text": "yes", "label": "tech"},
]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_incomplete_rows_are_refused_by_number_or_dropped(tmp_path: Path, suffix: str) -> None:
    rows = data.read_table(str(write_rows(ROWS, tmp_path / f"d{suffix}")))
    with pytest.raises(CliError) as info:
        data.complete_rows(rows, ["text", "label"], "data", drop=False)
    assert "4 of 6 rows have no 'text' / 'label' (null, NaN or empty): rows 2, 3, 4, 5" in str(info.value)
    kept, dropped = data.complete_rows(rows, ["text", "label"], "data", drop=True)
    assert dropped == 4 and [r["label"] for r in kept] == ["food", "tech"]
    assert label_names(TASKS["seq-cls"], kept, "label") == ["food", "tech"]  # no '', 'nan' or 'None' class


def test_a_jsonl_null_stays_missing_and_integers_stay_integers(tmp_path: Path) -> None:
    file = tmp_path / "d.jsonl"
    file.write_text('{"text": "a", "label": 10}\n{"text": "b", "label": null}\n{"text": "c", "label": 2}\n')
    rows = data.read_table(str(file))
    assert [r["label"] for r in rows] == [10, None, 2]
    with pytest.raises(CliError, match="rows 2;"):
        data.complete_rows(rows, ["label"], "data", drop=False)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_numeric_labels_keep_numeric_order(tmp_path: Path, suffix: str) -> None:
    rows = [{"text": f"t{i}", "label": i % 12} for i in range(24)]
    read = data.read_table(str(write_rows(rows, tmp_path / f"d{suffix}")))
    names = label_names(TASKS["seq-cls"], read, "label")
    assert names == [str(i) for i in range(12)]  # index == label value, also from 10 classes on
    assert data.class_names(["1.5", "10", "2", 3.0]) == ["1.5", "2", "3", "10"]
    assert data.class_names(["b", "a", "10"]) == ["10", "a", "b"]


def test_decode_errors_name_the_line(tmp_path: Path) -> None:
    for suffix in (".csv", ".jsonl"):
        file = tmp_path / f"d{suffix}"
        lines = (
            ["text,label", "good,pos", "fine,pos", "café,neg"]
            if suffix == ".csv"
            else [
                json.dumps({"text": "good", "label": "pos"}),
                '{"text": "café", "label": "neg"}',
            ]
        )
        file.write_bytes("\n".join(lines).encode("latin-1"))
        with pytest.raises(CliError) as info:
            data.read_table(str(file))
        line = len(lines)
        assert f"is not UTF-8: line {line}, column" in str(info.value) and "b'\\xe9'" in str(info.value)


def test_a_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    file = tmp_path / "d.jsonl"
    file.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(CliError, match="line 2 is not JSON"):
        data.read_table(str(file))
