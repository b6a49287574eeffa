"""Machine-readable output: with ``--json`` stdout carries the JSON and nothing else.

Libraries print notices to stdout (DeepSpeed's accelerator line when transformers imports it,
loaders' reports, C extensions); under ``--json`` such lines would break ``| jq``. While the work
runs, ``sys.stdout`` and file descriptor 1 point at stderr, so whatever anything prints goes
there; the command prints its result after the block.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator

__all__ = ["stdout_to_stderr"]


def _fileno(stream: object) -> int | None:
    try:
        return int(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None  # a captured or replaced stream (pytest's capsys): Python-level only


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """Inside the block, what is printed to stdout (by ``print`` or by writes to descriptor 1)
    goes to stderr; afterwards stdout is what it was."""
    if not active:
        yield
        return
    sys.stdout.flush()
    out, err = _fileno(sys.stdout), _fileno(sys.stderr)
    saved = os.dup(out) if out is not None and err is not None else None
    if saved is not None:
        os.dup2(err, out)  # type: ignore[arg-type]
    previous, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stdout = previous
        if saved is not None:
            os.dup2(saved, out)  # type: ignore[arg-type]
            os.close(saved)
