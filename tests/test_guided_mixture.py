"""diffkit.eval.guided_mixture: where class-1 points of the labelled mixture land, with errors."""

import math

import pytest
import torch

from diffkit.eval.guided_mixture import FIGURES, moments, standard_errors, z_score

F64 = torch.float64
B, C = torch.tensor([1.5, 0.0], dtype=F64), torch.tensor([0.0, 3.0], dtype=F64)


def cloud(n_b, n_c, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([B + std * torch.randn(n_b, 2, generator=g, dtype=F64),
                      C + std * torch.randn(n_c, 2, generator=g, dtype=F64)])


def test_moments_of_samples_recover_the_components():
    r = moments(cloud(30000, 10000), B, C)
    assert set(FIGURES) <= set(r) and r["n_B"] > 29000
    assert abs(r["share at C"] - 0.25) < 0.01
    assert abs(r["B mean x1"] - 1.5) < 0.02 and abs(r["C mean x2"] - 3.0) < 0.02
    assert abs(r["B std x1"] - 0.5) < 0.02 and abs(r["B std x2"] - 0.5) < 0.02


def test_weights_act_like_repeated_points():
    x = torch.tensor([[1.5, 0.0], [2.5, 0.0], [0.0, 3.0]], dtype=F64)
    weighted = moments(x, B, C, torch.tensor([1.0, 3.0, 4.0]))
    repeated = moments(x[[0, 1, 1, 1, 2, 2, 2, 2]], B, C)
    for k in FIGURES:
        assert math.isclose(weighted[k], repeated[k], abs_tol=1e-12), k
    assert weighted["share at C"] == 0.5 and weighted["B mean x1"] == 2.25


def test_standard_errors_and_z_scores_shrink_with_n():
    small, large = moments(cloud(300, 100), B, C), moments(cloud(30000, 10000), B, C)
    se_small, se_large = standard_errors(small, 400), standard_errors(large, 40000)
    assert all(se_large[k] < 0.2 * se_small[k] for k in se_small)
    assert math.isclose(se_large["share at C"], math.sqrt(0.25 * 0.75 / 40000), rel_tol=0.05)
    shifted = dict(large, **{"B mean x1": large["B mean x1"] + 10 * se_large["B mean x1"]})
    assert math.isclose(z_score(shifted, large, 40000, "B mean x1"), 10, rel_tol=1e-9)
    both = z_score(shifted, large, 40000, "B mean x1", reference_n=40000)
    assert math.isclose(both, 10 / math.sqrt(2), rel_tol=0.01)


def test_errors():
    with pytest.raises(ValueError, match="x must be"):
        moments(torch.zeros(4, 3, dtype=F64), B, C)
    with pytest.raises(ValueError, match="both components"):
        moments(cloud(10, 0), B, C)
    with pytest.raises(ValueError, match="weight"):
        moments(cloud(5, 5), B, C, -torch.ones(10))
    r = moments(cloud(5, 5), B, C)
    with pytest.raises(ValueError, match="n_B"):
        standard_errors(r, 5)
    with pytest.raises(ValueError, match="key"):
        z_score(r, r, 10, "B std x2")
