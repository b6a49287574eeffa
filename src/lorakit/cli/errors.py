"""The one exception the command reports as a single line (argparse style, exit status 2)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CliError", "choices"]


class CliError(Exception):
    """Bad input to the ``lorakit`` command: a path, a column, a choice. Printed as one line."""


def choices(values: Iterable[object]) -> str:
    """``'a', 'b', 'c'``: the valid values, for an error message."""
    return ", ".join(repr(str(v)) for v in values)
