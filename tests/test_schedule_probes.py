"""Chapter 2's measurements: the Bayes classifier of noised points, the G_t grid, brightness
statistics and the verdict on a gap against its noise."""

import math

import pytest
import torch

from diffkit.eval import schedule_probes as sp

F64 = torch.float64


def _two_clusters(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=F64)
    return centres[labels] + 0.1 * torch.randn(n, 2, generator=g, dtype=F64), labels


def test_bayes_accuracy_is_perfect_when_clean_and_chance_when_drowned():
    train, train_y = _two_clusters(200, 0)
    test, test_y = _two_clusters(400, 1)
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert sp.bayes_class_accuracy(1 - 1e-6, train, train_y, test, test_y, noise) == 1.0
    drowned = sp.bayes_class_accuracy(1e-6, train, train_y, test, test_y, noise)
    assert abs(drowned - 0.5) < 4 * math.sqrt(0.25 / 400), drowned


def test_bayes_accuracy_matches_the_two_gaussian_error_rate():
    # two points +-c: p(y | x_t) picks the sign of the first coordinate, so the accuracy is
    # Phi(sqrt(abar) c / sqrt(1 - abar)), here with abar = 0.5, c = 1: Phi(1) = 0.8413
    train = torch.tensor([[-1.0], [1.0]], dtype=F64)
    n = 20000
    test_y = torch.arange(n) % 2
    test = (2 * test_y.double() - 1)[:, None]
    noise = torch.randn(n, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    acc = sp.bayes_class_accuracy(0.5, train, torch.tensor([0, 1]), test, test_y, noise)
    assert abs(acc - 0.8413) < 4 * math.sqrt(0.84 * 0.16 / n), acc


def test_bayes_accuracy_refuses_bad_input():
    train, train_y = _two_clusters(10, 0)
    with pytest.raises(ValueError, match="abar_t"):
        sp.bayes_class_accuracy(1.0, train, train_y, train, train_y, torch.zeros_like(train))
    with pytest.raises(ValueError, match="noise"):
        sp.bayes_class_accuracy(0.5, train, train_y, train, train_y, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="labels"):
        sp.bayes_class_accuracy(0.5, train, train_y[:5], train, train_y, torch.zeros_like(train))


def test_gap_grid_is_dense_early_and_ends_at_the_last_step():
    assert torch.equal(sp.gap_grid(100), torch.arange(100))
    grid = sp.gap_grid(1000, dense=40, sparse=20)
    assert torch.equal(grid[:40], torch.arange(40))
    assert int(grid[-1]) == 999 and bool((grid[1:] > grid[:-1]).all())
    assert len(grid) == 40 + 40 + 40 + 1
    with pytest.raises(ValueError, match="dense"):
        sp.gap_grid(1000, dense=0)


def test_brightness_stats():
    d = 64 * 64
    u = math.sqrt(d) * torch.tensor([-1.0, -0.5, 0.5, 1.0])
    r = sp.brightness_stats(u, d)
    assert r["extreme"] == 0.5
    assert r["spread"] == pytest.approx(float(torch.tensor([-1.0, -0.5, 0.5, 1.0]).std()))
    with pytest.raises(ValueError, match="d"):
        sp.brightness_stats(u, 0)


def test_verdict_and_compare_reports():
    assert sp.verdict(0.1, 0.1, lower_is_better=True).startswith("tie")
    assert sp.verdict(-0.5, 0.1, lower_is_better=True, names=("cosine", "linear")) == "cosine better"
    assert sp.verdict(-0.5, 0.1, lower_is_better=False, names=("cosine", "linear")) == "linear better"
    with pytest.raises(ValueError, match="noise"):
        sp.verdict(0.0, -1.0, lower_is_better=True)
    a = {"frechet": 2.0, "confident_fraction": 0.9}
    b = {"frechet": 3.0, "confident_fraction": 0.95}
    c = sp.compare_reports(a, b, 1024, 0.5)
    assert c["frechet_gap"] == 1.0 and c["frechet_noise"] == pytest.approx(math.sqrt(2) * 0.25)
    assert c["confident_gap"] == pytest.approx(0.05)
    assert c["confident_noise"] == pytest.approx(math.sqrt(2 * 0.925 * 0.075 / 1024))
