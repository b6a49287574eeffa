"""Machine-readable output: with ``--json`` stdout carries the JSON and nothing else.

Libraries print notices to stdout (DeepSpeed's accelerator line when transformers imports it,
loaders' reports, C extensions); under ``--json`` such lines would break ``| jq``. While the work
runs, ``sys.stdout`` and file descriptor 1 point at stderr, so whatever anything prints goes
there; the command prints its result after the block.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["stdout_to_stderr"]


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """Inside the block, what is printed to stdout (by ``print``, or written to file descriptor 1
    by a library or an extension) goes to stderr; afterwards stdout is what it was."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    previous, sys.stdout = sys.stdout, sys.stderr
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stdout = previous
        os.dup2(saved, 1)
        os.close(saved)
