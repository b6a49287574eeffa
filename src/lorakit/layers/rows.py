"""Mixed batches: which adapter each row of a batch gets, without walking the module tree.

``PeftModel.forward`` / ``generate`` with ``adapter_names=[...]`` open a :func:`row_adapters` block;
every LoRA layer called inside it reads the names through :func:`rows_for`. ``"__base__"``
(:data:`BASE_ROWS`) means "no adapter" for its row.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

__all__ = ["BASE_ROWS", "row_adapters", "rows_for"]

BASE_ROWS = "__base__"

# The per-row adapter names of the model call in progress. A context variable reaches every layer
# (and stays correct across threads) without a hook per module.
_ROW_ADAPTERS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "lorakit_row_adapters", default=None
)

# How many row_adapters blocks are open (in any thread): while 0, forward reads no context variable,
# which torch.compile could not trace (a plain int global it guards on).
_OPEN_ROW_BLOCKS = 0


@contextlib.contextmanager
def row_adapters(names: Sequence[str]) -> Iterator[None]:
    """Within the block, LoRA layers give row ``i`` of each batch adapter ``names[i]``."""
    global _OPEN_ROW_BLOCKS
    token = _ROW_ADAPTERS.set(tuple(names))
    _OPEN_ROW_BLOCKS += 1
    try:
        yield
    finally:
        _OPEN_ROW_BLOCKS -= 1
        _ROW_ADAPTERS.reset(token)


def rows_for(x: torch.Tensor, explicit: Sequence[str] | None) -> list[str] | None:
    """The adapter name of each row of ``x``: ``explicit``, else the model call's, where a batch
    that is a multiple of the names (generate() with beams or several samples) repeats each name."""
    if explicit is not None:
        return list(explicit)
    if not _OPEN_ROW_BLOCKS:
        return None
    names = _ROW_ADAPTERS.get()
    if names is None:
        return None
    rows = x.shape[0] if x.dim() else 0
    if names and rows != len(names) and rows % len(names) == 0:
        return [n for n in names for _ in range(rows // len(names))]
    return list(names)
