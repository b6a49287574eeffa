"""EVA's math: the incremental SVD equals the SVD of all the centred data it has seen, keeps only
c × k components, converges as batches add up, and the rank allocation pools explained variance."""

from __future__ import annotations

import pytest
import torch

from lorakit.functional import eva as EF


def _data(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, k)  # distinct variances, well separated directions
    return torch.randn(n, k, generator=g) * scales + torch.randn(k, generator=g)


@pytest.mark.parametrize("batch", [25, 40])
def test_incremental_equals_the_svd_of_all_centred_rows(batch):
    """With as many components as features (q = 2k ≥ k: the randomized SVD is exact), the state
    after all batches is the PCA of the stacked data: same singular values, components up to sign."""
    k, n = 6, 100
    x = _data(n, k)
    state = None
    for chunk in x.split(batch):
        if chunk.shape[0] >= k:
            state = EF.svd_update(state, chunk, k)
    rows = torch.cat([c for c in x.split(batch) if c.shape[0] >= k]).double()
    _, s, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    # float32 first batch (ε ≈ 6e-8 relative) carried through a few float64 updates
    torch.testing.assert_close(state.singular_values.double(), s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        (state.components.double() @ vh.T).abs(), torch.eye(k, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(state.mean, rows.mean(0))
    torch.testing.assert_close(state.var, rows.var(0, correction=0))
    total = ((rows - rows.mean(0)) ** 2).sum()
    torch.testing.assert_close(state.explained_variance_ratio.double(), s**2 / total, rtol=1e-5, atol=1e-7)


def test_state_holds_components_not_activations():
    state = None
    for i in range(4):
        state = EF.svd_update(state, _data(64, 12, seed=i), 3)
    assert state.count == 4 * 64
    assert {t.shape for t in (state.components, state.singular_values, state.mean, state.var)} == {
        (3, 12),
        (3,),
        (12,),
    }


def test_components_are_sign_normalised_and_the_global_generator_is_untouched():
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    state = EF.svd_update(None, _data(40, 8), 3)
    assert torch.equal(before, torch.random.get_rng_state())
    top = state.components.gather(1, state.components.abs().argmax(1, keepdim=True))
    assert (top > 0).all()


def test_convergence_is_per_component_cosine_similarity():
    first = EF.svd_update(None, _data(200, 6, seed=1), 3)
    assert not EF.converged(None, first, 0.0).any()  # nothing to compare with yet
    second = EF.svd_update(first, _data(200, 6, seed=2), 3)
    sims = torch.nn.functional.cosine_similarity(second.components.double(), first.components.double())
    assert torch.equal(EF.converged(first, second, 0.99), sims >= 0.99)
    assert EF.converged(first, second, 0.0).all()


def test_redistribution_keeps_the_largest_ratios_up_to_the_budget():
    ratios = {
        "a": torch.tensor([0.5, 0.2, 0.01]),
        "b": torch.tensor([0.4, 0.3, 0.25]),
        "c": torch.tensor([0.05, 0.04, 0.03]),
    }
    # the 4 largest: 0.5 (a), 0.4 (b), 0.3 (b), 0.25 (b)
    assert EF.redistribute_ranks(ratios, 4) == {"a": 1, "b": 3, "c": 0}
    assert EF.redistribute_ranks(ratios, 9) == {"a": 3, "b": 3, "c": 3}


def test_the_first_layer_of_identical_inputs_takes_the_largest_rank_of_its_group():
    """q, k, v share one input, hence one SVD and equal ratios; however the sort breaks the tie, q
    (whose SVD is checked for convergence) gets the largest of the group's ranks."""
    shared = torch.tensor([0.3, 0.2])
    ratios = {"q": shared, "o": torch.tensor([0.1]), "k": shared, "v": shared}
    ranks = EF.redistribute_ranks(ratios, 4, {"k": "q", "v": "q"})
    assert sum(ranks.values()) == 4 and ranks["o"] == 0
    assert ranks["q"] == max(ranks["q"], ranks["k"], ranks["v"]) == 2
