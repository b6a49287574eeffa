"""Reading examples from CSV/TSV, JSONL/JSON and Parquet files, refusing incomplete rows, the class
names in their natural order, and the seeded split.

Never train on garbage silently: a row whose text or label is missing (``null``, ``NaN``, an empty
or blank string, an empty list) is refused with its row number, or dropped and counted with
``--drop-incomplete``. Values are read as written: a JSONL ``null`` stays missing (it never becomes
the class ``'nan'``), integer labels stay integers.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError

__all__ = ["Rows", "read_table", "require_columns", "complete_rows", "class_names", "class_name", "split"]

Rows = list[dict[str, Any]]
READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_SHOWN = 10  # row numbers listed in an error


def _text(file: Path, path: str) -> str:
    """The file as UTF-8 text; a decode error names the line and column."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise CliError(
            f"data file {path!r} is not UTF-8: line {line}, column {column} has the byte "
            f"{raw[exc.start : exc.start + 1]!r}; save it as UTF-8"
        ) from exc


def _json_lines(text: str, path: str) -> Rows:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise CliError(f"data file {path!r}: line {number} is not JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise CliError(f"data file {path!r}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def read_table(path: str) -> Rows:
    """The rows of a data file, as dicts of plain Python values; the reader is chosen by the
    extension. CSV/TSV cells are strings, exactly as written (an empty cell is ``""``)."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"data file {path!r} does not exist")
    kind = READERS.get(file.suffix.lower())
    if kind is None:
        raise CliError(f"data file {path!r}: unknown format {file.suffix!r}; use one of {', '.join(READERS)}")
    if kind in ("jsonl", "json"):
        text = _text(file, path)
        if kind == "jsonl" or text.lstrip()[:1] != "[":
            rows = _json_lines(text, path)
        else:
            try:
                rows = json.loads(text)
            except ValueError as exc:
                raise CliError(f"data file {path!r} is not JSON: {exc}") from exc
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise CliError(f"data file {path!r} must hold a list of JSON objects")
    else:
        rows = _pandas_rows(file, kind, path)
    if not rows:
        raise CliError(f"data file {path!r} holds no examples")
    return [{str(k): _plain(v) for k, v in row.items()} for row in rows]


def _pandas_rows(file: Path, kind: str, path: str) -> Rows:
    try:
        import pandas as pd
    except ImportError as exc:
        raise CliError("reading CSV and Parquet files needs pandas: pip install pandas") from exc
    try:
        if kind in ("csv", "tsv"):
            text = io.StringIO(_text(file, path))
            frame = pd.read_csv(text, sep="," if kind == "csv" else "\t", dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(file)
    except CliError:
        raise
    except ImportError as exc:
        raise CliError(f"reading {file.suffix} files needs pyarrow: pip install pyarrow") from exc
    except Exception as exc:  # pandas' parser errors name the line
        raise CliError(f"data file {path!r} could not be read: {str(exc).splitlines()[0]}") from exc
    rows: Rows = frame.to_dict(orient="records")
    return rows


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (from Parquet) as Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def require_columns(rows: Rows, columns: Sequence[tuple[str, str]], source: str) -> None:
    """Raise one line naming each missing column (and its flag) and listing the columns that exist."""
    present = list(rows[0]) if rows else []
    missing = [f"{flag} {name!r}" for flag, name in columns if name not in present]
    if missing:
        raise CliError(f"{source} has no column {' / '.join(missing)}; its columns: {', '.join(present)}")


def is_missing(value: Any) -> bool:
    """``None``, ``NaN``, a blank string or an empty list: nothing to train on."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple)):
        return len(value) == 0
    return False


def complete_rows(rows: Rows, columns: Sequence[str], source: str, drop: bool) -> tuple[Rows, int]:
    """(the rows with a value in every column, how many were dropped). Without ``drop`` an
    incomplete row is an error naming the rows (1-based, in file order) and the column."""
    bad = [i for i, row in enumerate(rows) if any(is_missing(row.get(c)) for c in columns)]
    if not bad:
        return rows, 0
    if not drop:
        shown = ", ".join(str(i + 1) for i in bad[:_SHOWN]) + (" ..." if len(bad) > _SHOWN else "")
        cols = " / ".join(repr(c) for c in columns)
        raise CliError(
            f"{source}: {len(bad)} of {len(rows)} rows have no {cols} (null, NaN or empty): rows {shown}; "
            "fix them, or pass --drop-incomplete to leave them out"
        )
    keep = set(range(len(rows))) - set(bad)
    kept = [row for i, row in enumerate(rows) if i in keep]
    if not kept:
        raise CliError(f"{source}: every row lacks a value in {' / '.join(columns)}")
    return kept, len(bad)


def class_name(value: Any) -> str:
    """A label as the class name it stands for: ``3``, ``3.0`` and ``"3"`` are all ``"3"``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text)
        except ValueError:
            return text
        return (
            str(int(number)) if number.is_integer() and "." not in text and "e" not in text.lower() else text
        )
    return str(value)


def class_names(values: Sequence[Any]) -> list[str]:
    """The distinct class names: in numeric order when every one is a number (``2`` before
    ``10``), else in string order."""
    names = {class_name(v) for v in values}
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def split(rows: Rows, test_size: float, seed: int) -> tuple[Rows, Rows]:
    """A seeded shuffle, then (train, held-out); ``test_size`` is a fraction, or a count if >= 1."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = int(test_size) if test_size >= 1 else round(len(rows) * test_size)
    if not 0 < n_test < len(rows):
        raise CliError(
            f"--test-size {test_size} leaves no training or no held-out example out of {len(rows)}"
        )
    held_out = [rows[i] for i in order[:n_test]]
    train = [rows[i] for i in order[n_test:]]
    return train, held_out
