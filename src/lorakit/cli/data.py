"""Reading examples from CSV, JSONL/JSON and Parquet files, checking columns, and the seeded split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError

__all__ = ["Rows", "read_table", "require_columns", "split"]

Rows = list[dict[str, Any]]
READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def read_table(path: str) -> Rows:
    """The rows of a data file, as dicts. The reader is chosen by the file's extension."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"data file {path!r} does not exist")
    kind = READERS.get(file.suffix.lower())
    if kind is None:
        raise CliError(f"data file {path!r}: unknown format {file.suffix!r}; use one of {', '.join(READERS)}")
    try:
        import pandas as pd
    except ImportError as exc:
        raise CliError("reading data files needs pandas: pip install 'lorakit[cli]'") from exc
    try:
        if kind in ("csv", "tsv"):
            frame = pd.read_csv(file, sep="," if kind == "csv" else "\t", keep_default_na=False)
        elif kind in ("jsonl", "json"):
            lines = kind == "jsonl" or file.read_text(encoding="utf-8").lstrip()[:1] != "["
            frame = pd.read_json(file, lines=lines, dtype=False)
        else:
            frame = pd.read_parquet(file)
    except ImportError as exc:
        raise CliError(f"reading {file.suffix} files needs pyarrow: pip install 'lorakit[cli]'") from exc
    except Exception as exc:  # pandas' parser errors name the line
        raise CliError(f"data file {path!r} could not be read: {str(exc).splitlines()[0]}") from exc
    rows: Rows = frame.to_dict(orient="records")
    if not rows:
        raise CliError(f"data file {path!r} holds no examples")
    return [{str(k): _plain(v) for k, v in row.items()} for row in rows]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (from Parquet and JSON) as Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def require_columns(rows: Rows, columns: Sequence[tuple[str, str]], source: str) -> None:
    """Raise one line naming each missing column (and its flag) and listing the columns that exist."""
    present = list(rows[0]) if rows else []
    missing = [f"{flag} {name!r}" for flag, name in columns if name not in present]
    if missing:
        raise CliError(f"{source} has no column {' / '.join(missing)}; its columns: {', '.join(present)}")


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
