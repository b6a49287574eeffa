"""Splicing left-padded KV caches: joining, dropping rows and trimming keep every row's real columns,
in order, at the end of the row."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lorakit.serving.batch_cache import BatchCache


def _rows(lengths: list[int], start: int) -> BatchCache:
    """A one-layer cache whose row i holds values start+i at its real columns (left-padded)."""
    longest = max(lengths)
    keys = torch.zeros(len(lengths), 1, longest, 2)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for i, n in enumerate(lengths):
        keys[i, :, longest - n :] = start + i
        mask[i, longest - n :] = 1
    cache = DynamicCache()
    cache.update(keys, keys.clone(), 0)
    return BatchCache(cache, mask)


def _real(batch: BatchCache) -> list[list[float]]:
    keys = batch.cache.layers[0].keys
    return [keys[b, 0, batch.mask[b].bool(), 0].tolist() for b in range(batch.rows)]


def test_join_pads_the_shorter_batch_on_the_left() -> None:
    batch = _rows([2, 3], start=1)
    batch.join(_rows([5], start=10))
    assert batch.length == 5 and batch.lengths() == [2, 3, 5]
    assert _real(batch) == [[1, 1], [2, 2, 2], [10] * 5]
    assert batch.mask[:, -1].tolist() == [1, 1, 1]  # every row's real columns end at T


def test_keep_drops_rows_and_trims_columns_padding_everywhere() -> None:
    batch = _rows([2, 3], start=1)
    batch.join(_rows([5], start=10))
    batch.keep([1, 0])  # the 5-token row leaves: two columns are now padding in every row
    assert batch.length == 3 and batch.lengths() == [3, 2]
    assert _real(batch) == [[2, 2, 2], [1, 1]]
    assert batch.cache.layers[0].values.shape[2] == 3


def test_grow_adds_a_real_column_for_the_decoded_token() -> None:
    batch = _rows([1, 2], start=0)
    assert batch.grow().tolist() == [[0, 1, 1], [1, 1, 1]]
