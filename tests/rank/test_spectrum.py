"""The spectrum of ΔW = s·B·A from the factors: singular values, effective and stable rank and energy
levels, checked against direct SVDs of the formed ΔW."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.rank import spectrum
from lorakit.rank.spectra import effective_rank, stable_rank


def _known(d: int, k: int, sigma: list[float], s: float, seed: int = 0):
    """Factors with ΔW = s·B·A = U diag(σ) Vᵀ exactly (U, V orthonormal)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, len(sigma), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, len(sigma), generator=gen, dtype=torch.float64))
    b = u * torch.tensor(sigma, dtype=torch.float64) / s
    return v.T.contiguous(), b


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=8), st.floats(0.1, 4.0))
def test_singular_values_match_direct_svd(sigma, s):
    a, b = _known(20, 24, sigma, s)
    sp = spectrum(a, b, s)
    direct = torch.linalg.svdvals(s * b @ a)[: len(sigma)]
    assert torch.allclose(torch.tensor(sp.singular_values, dtype=torch.float64), direct, atol=1e-5)
    assert sp.singular_values == sorted(sp.singular_values, reverse=True)
    p = direct / direct.sum()
    assert sp.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert sp.stable_rank == pytest.approx(float((direct**2).sum() / direct.max() ** 2), rel=1e-6)
    assert sp.energy[-1] == pytest.approx(1.0)


def test_energy_levels_and_degenerate_updates():
    a, b = _known(30, 30, [10.0, 4.0, 2.0, 1.0], 2.0)  # energy 0.826, 0.959, 0.992, 1
    sp = spectrum(a, b, 2.0)
    assert sp.ranks_for_energy == {0.90: 2, 0.95: 2, 0.99: 3}
    assert effective_rank(torch.zeros(4)) == 0.0 and stable_rank(torch.zeros(4)) == 0.0
    zero = spectrum(torch.randn(4, 8), torch.zeros(6, 4), 1.0)
    assert zero.ranks_for_energy[0.9] == 0 and zero.effective_rank == 0.0
