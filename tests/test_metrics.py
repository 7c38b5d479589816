"""diffkit.eval.metrics: sliced Wasserstein, Frechet distance and the digits judge."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from diffkit import checkpoints
from diffkit.data import digits
from diffkit.eval import metrics
from diffkit.eval.metrics import frechet_distance, sliced_wasserstein
from diffkit.nn import classifiers
from diffkit.nn.classifiers import DigitsJudge


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sliced_wasserstein_identical_is_zero():
    a = torch.randn(300, 2, generator=_gen(0))
    assert sliced_wasserstein(a, a.clone(), generator=_gen(1)) == pytest.approx(0, abs=1e-12)
    # a permutation of the same points is the same distribution
    assert sliced_wasserstein(a, a[torch.randperm(300, generator=_gen(2))],
                              generator=_gen(1)) == pytest.approx(0, abs=1e-12)


def test_sliced_wasserstein_of_a_shift():
    """For b = a + d each projection shifts by u.d, so SW2 = sqrt(E_u (u.d)^2) = |d| / sqrt(2)."""
    a = torch.randn(400, 2, generator=_gen(0), dtype=torch.float64)
    direction = torch.randn(2, generator=_gen(5), dtype=torch.float64)
    direction /= direction.norm()
    values = []
    for length in (0.25, 1.0, 3.0):
        sw = sliced_wasserstein(a, a + length * direction, n_projections=2048, generator=_gen(1))
        assert sw == pytest.approx(length / math.sqrt(2), rel=0.03)
        values.append(sw)
    assert values[0] < values[1] < values[2]


def test_sliced_wasserstein_seeded_and_errors():
    a, b = torch.randn(50, 3, generator=_gen(0)), torch.randn(50, 3, generator=_gen(1))
    first = sliced_wasserstein(a, b, generator=_gen(2))
    assert first == sliced_wasserstein(a, b, generator=_gen(2)) and first > 0.05
    for x, y in ((a, b[:40]), (a, b[:, :2]), (a[:, 0], b[:, 0]), (a[None], b[None])):
        with pytest.raises(ValueError, match="shape"):
            sliced_wasserstein(x, y)
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(a, b, n_projections=0)


def _closed_form(mu_a, cov_a, mu_b, cov_b):
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 sqrtm(C_a C_b)) with scipy's general sqrtm."""
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def _gaussian(n, mu, cov, seed):
    z = torch.randn(n, len(mu), generator=_gen(seed), dtype=torch.float64).numpy()
    return torch.from_numpy(mu + z @ np.linalg.cholesky(cov).T)


MU_A, MU_B = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
COV_A = np.array([[1.0, 0.3, 0.0], [0.3, 2.0, 0.5], [0.0, 0.5, 0.7]])
COV_B = np.array([[0.5, -0.2, 0.1], [-0.2, 1.0, 0.0], [0.1, 0.0, 1.5]])


def test_frechet_equals_closed_form_on_the_sample_statistics():
    a, b = _gaussian(500, MU_A, COV_A, 0), _gaussian(700, MU_B, COV_B, 1)
    an, bn = a.numpy(), b.numpy()
    expected = _closed_form(an.mean(0), np.cov(an, rowvar=False),
                            bn.mean(0), np.cov(bn, rowvar=False))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_population_gaussians():
    a, b = _gaussian(200_000, MU_A, COV_A, 2), _gaussian(200_000, MU_B, COV_B, 3)
    expected = _closed_form(MU_A, COV_A, MU_B, COV_B)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    # commuting (diagonal) covariances: the trace term is sum (sqrt(a_i) - sqrt(b_i))^2
    da, db = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    x = _gaussian(200_000, np.zeros(2), np.diag(da), 4)
    y = _gaussian(200_000, np.array([1.0, 0.0]), np.diag(db), 5)
    hand = 1.0 + ((np.sqrt(da) - np.sqrt(db)) ** 2).sum()  # = 1 + 4 + 1
    assert frechet_distance(x, y) == pytest.approx(hand, rel=0.02)


def test_frechet_identical_and_symmetric():
    a, b = _gaussian(400, MU_A, COV_A, 6), _gaussian(300, MU_B, COV_B, 7)
    assert abs(frechet_distance(a, a.clone())) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(frechet_distance(a, b),
                                                                   rel=1e-5)


def test_frechet_errors():
    a = torch.randn(10, 3)
    for x, y in ((a, a[:, :2]), (a[:, 0], a[:, 0]), (a, a[:1]), (a[:1], a)):
        with pytest.raises(ValueError):
            frechet_distance(x, y)


def test_judge_rejects_wrong_shapes():
    judge = DigitsJudge()
    for shape in ((2, 1, 16, 16), (2, 8, 8), (2, 3, 8, 8), (64,)):
        with pytest.raises(ValueError, match="8, 8"):
            judge(torch.zeros(shape))
    assert judge.features(torch.zeros(2, 1, 8, 8)).shape == (2, 128)
    assert judge.probs(torch.zeros(2, 1, 8, 8)).sum(-1).allclose(torch.ones(2))


def test_judge_loss_is_seeded():
    torch.manual_seed(0)
    judge = DigitsJudge().eval()  # no dropout: only the shift augmentation is random
    x, y = torch.randn(8, 1, 8, 8, generator=_gen(0)), torch.arange(8)
    first = classifiers.judge_loss(judge, (x, y), _gen(3))
    assert first.item() == classifiers.judge_loss(judge, (x, y), _gen(3)).item()
    assert first.ndim == 0 and first.item() > 0


@pytest.fixture(scope="module")
def shipped_judge():
    judge, card = checkpoints.load_model("digits-judge")
    return judge


def test_shipped_judge_on_real_and_noise(shipped_judge):
    test_x, test_y = digits("test")
    assert metrics.accuracy(shipped_judge, test_x, test_y) >= 0.97
    real = metrics.judge_report(shipped_judge, test_x)
    assert real["n"] == 360
    assert real["confident_fraction"] >= 0.95
    assert real["classes_present"] == 10
    assert len(real["class_counts"]) == 10 and sum(real["class_counts"]) <= 360
    # the samples are the test split: zero up to rounding (the trace terms are ~850 here)
    assert abs(real["frechet"]) < 1e-3
    assert real["frechet_floor"] > 0
    noise = torch.rand(360, 1, 8, 8, generator=_gen(0)) * 2 - 1
    fake = metrics.judge_report(shipped_judge, noise)
    assert fake["frechet_floor"] == pytest.approx(real["frechet_floor"])  # same N, same floor
    assert fake["frechet"] > 10 * fake["frechet_floor"]
    assert fake["confident_fraction"] < real["confident_fraction"]
    train_x = digits("train")[0][:360]
    other = metrics.judge_report(shipped_judge, train_x)
    assert other["frechet"] < 3 * other["frechet_floor"]  # real digits sit near the floor


def test_mean_pairwise_distance_known_values_and_errors():
    from diffkit.eval.metrics import mean_pairwise_distance
    # three points on a line at 0, 1, 3: distances 1, 3, 2 -> mean 2
    assert mean_pairwise_distance(torch.tensor([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)
    assert mean_pairwise_distance(torch.ones(5, 4)) == 0.0   # a collapsed set has no diversity
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_distance(torch.ones(1, 4))


def test_real_digit_spread_is_seeded_and_checks_its_input():
    from diffkit import checkpoints
    from diffkit.eval.reference import real_digit_spread

    judge, _ = checkpoints.load_model("digits-judge")
    a = real_digit_spread(judge, 50, draws=3)
    b = real_digit_spread(judge, 50, draws=3)
    assert a == b and len(a["frechet"]) == len(a["diversity"]) == 3
    assert len(set(a["frechet"])) == 3                      # three different draws
    assert min(a["frechet"]) > 0 and min(a["diversity"]) > 0
    with pytest.raises(ValueError, match="n must lie in"):
        real_digit_spread(judge, 1)
    with pytest.raises(ValueError, match="draws must be at least 2"):
        real_digit_spread(judge, 50, draws=1)
