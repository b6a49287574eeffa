"""The running batch's KV cache: rows of different lengths, left-padded to one length.

Continuous batching needs rows to join and leave a batch between decoding steps. transformers'
``DynamicCache`` holds, per layer, keys and values of shape (B, heads, T, head_dim) for one common
length ``T``; rows shorter than ``T`` are padded on the left and masked out by a (B, T) attention
mask, as ``generate`` does for a padded batch. This module adds the three operations it lacks:

- :meth:`BatchCache.join`: stack two batches (a newly prefilled group and the running one),
  padding the shorter on the left;
- :meth:`BatchCache.keep`: drop finished rows;
- trimming: after rows leave, columns that are padding in every remaining row are cut away, so the
  batch never attends over more than its longest live row.

Only caches whose every layer is a plain ``DynamicLayer`` (full attention) can be spliced like this:
sliding-window and linear-attention layers keep states that are not per-position columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.errors import ServingError

__all__ = ["BatchCache", "check_cache"]


def check_cache(cache: Any) -> None:
    """Refuse a cache this module cannot splice (raised when the first prefill shows its layers)."""
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", ())}
    if not hasattr(cache, "layers") or any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ServingError(
            f"serving needs a model whose KV cache is full attention only (DynamicLayer); this "
            f"model's cache has {sorted(kinds) or type(cache).__name__}"
        )


class BatchCache:
    """A ``DynamicCache`` and the (B, T) mask of its real (1) and padding (0) columns.

    Invariant: column ``t`` of row ``b`` holds keys and values of a real token iff ``mask[b, t]``;
    a row's real columns are contiguous and end at ``T``.
    """

    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # (B, T), int64

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def lengths(self) -> list[int]:
        """Real tokens held per row (the next token's position in each row)."""
        return self.mask.sum(dim=1).tolist()

    def _layers(self) -> list[Any]:
        return list(self.cache.layers)

    def grow(self) -> torch.Tensor:
        """Append one real column to the mask for the token being decoded; returns the (B, T + 1)
        mask for the model call (whose cache update appends the matching key/value column)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), then cut the columns that are padding for all of them."""
        index = torch.tensor(list(rows), dtype=torch.long)
        self.mask = self.mask.index_select(0, index)
        first = self._first_real_column()
        for layer in self._layers():
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self.mask = self.mask[:, first:]

    def _first_real_column(self) -> int:
        if self.rows == 0:
            return self.length
        real = self.mask.any(dim=0).nonzero()
        return int(real[0].item()) if len(real) else self.length

    def join(self, other: BatchCache) -> None:
        """Append ``other``'s rows after this batch's rows, left-padding whichever is shorter."""
        if self.rows == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        length = max(self.length, other.length)
        mine, theirs = self._layers(), other._layers()
        for a, b in zip(mine, theirs, strict=True):
            a.keys = torch.cat([_pad_left(a.keys, length), _pad_left(b.keys, length)], dim=0)
            a.values = torch.cat([_pad_left(a.values, length), _pad_left(b.values, length)], dim=0)
        self.mask = torch.cat([_pad_left_mask(self.mask, length), _pad_left_mask(other.mask, length)], dim=0)


def _pad_left(states: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, T, D) → (B, H, length, D) with zeros in front."""
    missing = length - states.shape[2]
    if missing == 0:
        return states
    pad = states.new_zeros(states.shape[0], states.shape[1], missing, states.shape[3])
    return torch.cat([pad, states], dim=2)


def _pad_left_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
