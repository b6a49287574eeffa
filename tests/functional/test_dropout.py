"""LoRA dropout (lorakit.functional.dropout): the keep-mask's rate and reproducibility, its packing to
one bit per element, and that dropout saves those bits for backward instead of a dropped copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.functional import dropout as LD

DTYPES = [torch.float32, torch.bfloat16]


def test_dropout_really_drops_and_is_reproducible():
    x = torch.ones(64, 32)
    masks = []
    for _ in range(2):
        torch.manual_seed(0)
        masks.append(LD.dropout_keep_mask(x, 0.5))
    y1, y2 = (LD.apply_dropout(x, m, 0.5) for m in masks)
    assert torch.equal(y1, y2)
    zero_fraction = (y1 == 0).float().mean().item()
    assert 0.4 < zero_fraction < 0.6
    assert set(y1.unique().tolist()) == {0.0, 2.0}


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd saves while running ``fn``."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_keeps_one_bit_per_element_not_a_copy(dtype):
    x = torch.randn(8, 32, 64, dtype=dtype, requires_grad=True)
    sizes = {}
    for p in (0.0, 0.1):
        torch.manual_seed(0)
        model = get_peft_model(
            nn.Sequential(*[nn.Linear(64, 64) for _ in range(2)]).to(dtype),
            LoraConfig(r=4, target_modules=["0", "1"], lora_dropout=p),
        )
        model.train()
        sizes[p] = _saved_bytes(lambda m=model: m(x))
    # two LoRA layers, each keeping its mask packed 8 elements a byte (PEFT keeps x ⊙ mask and the mask)
    assert sizes[0.1] - sizes[0.0] == 2 * x.numel() // 8
    assert sizes[0.1] - sizes[0.0] <= 2 * x.numel() * x.element_size() / 16


@pytest.mark.parametrize("shape", [(3, 5, 16), (7,), (9, 3)])
def test_mask_packing_round_trips(shape):
    keep = torch.rand(shape) > 0.5
    bits = LD.pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    assert torch.equal(LD.unpack_mask(bits, keep.shape), keep)


def test_mask_packing_is_exact_for_every_byte_and_bit_order():
    every_byte = torch.arange(256).to(torch.uint8)
    keep = LD.unpack_mask(every_byte, torch.Size([256 * 8]))
    expected = torch.tensor([[(byte >> (7 - j)) & 1 for j in range(8)] for byte in range(256)]).bool()
    assert torch.equal(keep, expected.reshape(-1))  # element j of a group is bit 7 − j
    assert torch.equal(LD.pack_mask(keep), every_byte)
    offset = torch.rand(37) > 0.5
    assert torch.equal(LD.unpack_mask(LD.pack_mask(offset[3:]), torch.Size([34])), offset[3:])


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_dropout_rate_is_p_within_sampling_error(p):
    torch.manual_seed(1)
    n = 1 << 21
    dropped = 1.0 - LD.dropout_keep_mask(torch.empty(n), p).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5
    # the words are uniform: a quarter and three quarters of their range are hit in those shares
    hist = torch.stack([LD.dropout_keep_mask(torch.empty(n), q).double().mean() for q in (0.25, 0.75)])
    torch.testing.assert_close(hist, torch.tensor([0.75, 0.25], dtype=torch.float64), atol=2e-3, rtol=0)


def test_dropout_mask_extremes():
    torch.manual_seed(0)
    assert LD.dropout_keep_mask(torch.empty(10_000), 0.0).all()
    assert LD.dropout_keep_mask(torch.empty(10_000), 1e-12).all()
    assert not LD.dropout_keep_mask(torch.empty(10_000), 1.0 - 1e-12).any()
    assert LD.dropout_keep_mask(torch.empty(2, 3, 5), 0.5).shape == (2, 3, 5)  # odd count of elements
