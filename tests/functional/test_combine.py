"""The combination math of adapter arithmetic (lorakit.functional.combine): TIES by hand, and DARE's
random drops are unbiased and keep the density."""

from __future__ import annotations

import torch

from lorakit.functional import combine as LC


def test_ties_by_hand():
    t1, t2, t3 = torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-1.0, -2.0, 1.0, 4.0]), torch.zeros(4)
    # density 1: no trim. Elected signs (total): +, -, +, + → keep t1[0], t1[1], t2[1], t1[2], t2[2], t2[3]
    got = LC.combine([t1, t2, t3], [1.0, 2.0, 1.0], "ties", density=1.0)
    torch.testing.assert_close(got, torch.tensor([3.0, (-1.0 - 4.0) / 2, (0.5 + 2.0) / 2, 8.0]))
    # density 0.5 keeps the 2 largest of each: t1 → [3, 0, 0, -2], t2 → [0, -2, 0, 4]
    got = LC.combine([t1, t2], [1.0, 1.0], "ties", density=0.5, majority_sign_method="frequency")
    torch.testing.assert_close(got, torch.tensor([3.0, -2.0, 0.0, 4.0]))


def test_dare_is_unbiased_and_keeps_density():
    torch.manual_seed(0)
    tensors = [torch.randn(40, 30), torch.randn(40, 30)]
    weights, density, draws = [0.6, -1.5], 0.3, 400
    linear = LC.combine(tensors, weights, "linear")
    samples = torch.stack([LC.combine(tensors, weights, "dare_linear", density) for _ in range(draws)])
    # per entry the estimator has std ≤ Σ|w_i t_i| √((1-d)/d) / √draws; check the mean within 5 σ overall
    spread = abs(weights[0]) * tensors[0].abs() + abs(weights[1]) * tensors[1].abs()
    sigma = spread * ((1 - density) / density) ** 0.5 / draws**0.5
    assert ((samples.mean(0) - linear).abs() <= 5 * sigma + 1e-6).float().mean() > 0.999
    kept = (LC.combine([tensors[0]], [1.0], "dare_linear", density) != 0).float().mean().item()
    assert abs(kept - density) < 4 * (density * (1 - density) / tensors[0].numel()) ** 0.5
    torch.manual_seed(5)
    first = LC.combine(tensors, weights, "dare_ties", density)
    torch.manual_seed(5)
    assert torch.equal(first, LC.combine(tensors, weights, "dare_ties", density))  # seeded
