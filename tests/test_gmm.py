"""The analytic Gaussian mixture: exact denoiser, score, density, ODE reference, sampler order."""

from __future__ import annotations

import math

import pytest
import torch

from diffkit.diffusion.gmm import GaussianMixture
from diffkit.diffusion.samplers import sample_dpmpp_2m, sample_euler, sample_heun, sigmas_karras
from diffkit.eval.solvers import error_at_sigma_min, loglog_slope

F64 = torch.float64
MEANS = [[-2.0, 0.0], [2.0, 1.0], [0.0, 2.0]]
STDS = [0.6, 0.8, 0.5]
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def gmm():
    return GaussianMixture(MEANS, STDS, WEIGHTS)


def points(n=16, scale=2.0, seed=0, D=2):
    return torch.randn(n, D, dtype=F64, generator=torch.Generator().manual_seed(seed)) * scale


def mixture_moments(g):
    mean = g.weights @ g.means
    second = sum(w * (s ** 2 * torch.eye(g.D, dtype=F64) + torch.outer(m, m))
                 for w, s, m in zip(g.weights, g.stds, g.means))
    return mean, second - torch.outer(mean, mean)


# ---- validation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(means=[0.0, 1.0], stds=[1.0, 1.0]), "means must have shape"),
    (dict(means=[[0.0], [1.0]], stds=[1.0]), "stds must have shape"),
    (dict(means=[[0.0], [1.0]], stds=[1.0, 0.0]), "stds must be finite and > 0"),
    (dict(means=[[0.0], [1.0]], stds=[1.0, 1.0], weights=[1.0]), "weights must have shape"),
    (dict(means=[[0.0], [1.0]], stds=[1.0, 1.0], weights=[1.0, -0.5]), "weights must be"),
])
def test_constructor_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


def test_weights_are_normalised():
    g = GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [2.0, 6.0])
    assert torch.allclose(g.weights, torch.tensor([0.25, 0.75], dtype=F64))
    uniform = GaussianMixture([[0.0], [1.0]], [1.0, 1.0]).weights
    assert torch.allclose(uniform, torch.tensor([0.5, 0.5], dtype=F64))


def test_methods_reject_bad_inputs(gmm):
    x = points(4)
    with pytest.raises(ValueError, match="shape \\(B, D=2\\)"):
        gmm.denoise(torch.zeros(4, 3, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="shape \\(B, D=2\\)"):
        gmm.score(torch.zeros(2, dtype=F64), 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        gmm.denoise(x, -0.1)
    with pytest.raises(ValueError, match="sigma must be"):
        gmm.log_prob(x, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="positive integer"):
        gmm.sample(0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        gmm.ode_reference(x, [1.0, 2.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        gmm.ode_reference(x, [1.0])


# ---- exactness of denoiser, score and density ---------------------------------------------------
@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_denoise_matches_monte_carlo_posterior_mean(gmm, sigma):
    """E[x0 | x] by self-normalised importance sampling from the prior: sum w_i x0_i / sum w_i."""
    x = points(6, scale=1.5, seed=1)
    x0 = gmm.sample(400_000, generator=torch.Generator().manual_seed(2))        # (M, D)
    log_w = -((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma ** 2)       # (B, M)
    w = torch.softmax(log_w, dim=1)
    mc = w @ x0
    ess = 1 / (w ** 2).sum(1)                                                   # effective size
    se = (w[:, :, None] * (x0[None] - mc[:, None]) ** 2).sum(1).sqrt() / ess.sqrt()[:, None]
    err = (mc - gmm.denoise(x, sigma)).abs()
    assert ess.min() > 2000
    assert (err <= 5 * se + 1e-3).all(), (err, se)
    assert err.max() < 0.05


def test_component_posterior_is_a_distribution_and_matches_bayes(gmm):
    x, sigma = points(8), 0.7
    r = gmm.component_posterior(x, sigma)
    assert torch.allclose(r.sum(1), torch.ones(8, dtype=F64), atol=1e-14)
    # Bayes by hand for component 0
    dens = torch.stack([w * torch.exp(-((x - m) ** 2).sum(1) / (2 * (s ** 2 + sigma ** 2)))
                        / (2 * math.pi * (s ** 2 + sigma ** 2)) for w, s, m in
                        zip(gmm.weights, gmm.stds, gmm.means)], dim=1)
    assert torch.allclose(r, dens / dens.sum(1, keepdim=True), atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 0.05, 1.0, 10.0])
def test_score_is_autograd_gradient_of_log_prob(gmm, sigma):
    x = points(16).requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)
    assert torch.allclose(gmm.score(x.detach(), sigma), grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 80.0])
def test_tweedie_denoise_equals_x_plus_sigma2_score(gmm, sigma):
    x = points(16, scale=sigma + 1)
    assert torch.allclose(gmm.denoise(x, sigma), x + sigma ** 2 * gmm.score(x, sigma),
                          atol=1e-10 * (1 + sigma ** 2))


def test_denoise_limits_and_contract(gmm):
    x = points(8)
    assert torch.equal(gmm(x, 0.5), gmm.denoise(x, 0.5))
    assert torch.allclose(gmm.denoise(x, 0.0), x, atol=1e-14)                      # no noise
    prior_mean = gmm.weights @ gmm.means
    assert torch.allclose(gmm.denoise(x, 1e5), prior_mean.expand(8, 2), atol=1e-6)  # all noise
    sigmas = torch.linspace(0.1, 3.0, 8, dtype=F64)                               # per-sample
    rows = torch.cat([gmm.denoise(x[i:i + 1], sigmas[i]) for i in range(8)])
    assert torch.allclose(gmm.denoise(x, sigmas), rows, atol=1e-14)


def test_sample_statistics_match_mixture_moments(gmm):
    n = 200_000
    x = gmm.sample(n, generator=torch.Generator().manual_seed(3))
    mean, cov = mixture_moments(gmm)
    se_mean = cov.diagonal().sqrt() / math.sqrt(n)
    assert ((x.mean(0) - mean).abs() <= 5 * se_mean).all()
    assert torch.allclose(torch.cov(x.T), cov, atol=0.03)
    same = gmm.sample(5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(same, gmm.sample(5, generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_log_prob_integrates_to_one(sigma):
    g1 = GaussianMixture([[-1.0], [0.5], [3.0]], [0.2, 0.7, 0.4], [0.3, 0.5, 0.2])
    grid = torch.linspace(-15, 15, 30_001, dtype=F64)
    mass = torch.trapezoid(g1.log_prob(grid[:, None], sigma).exp(), grid)
    assert abs(mass.item() - 1) < 1e-9
    g2 = GaussianMixture(MEANS, STDS, WEIGHTS)
    u = torch.linspace(-10, 10, 801, dtype=F64)
    xx, yy = torch.meshgrid(u, u, indexing="ij")
    dens = g2.log_prob(torch.stack([xx.flatten(), yy.flatten()], 1), sigma).exp().reshape(801, 801)
    assert abs(torch.trapezoid(torch.trapezoid(dens, u), u).item() - 1) < 1e-6


def test_noised_marginal_is_mixture_with_inflated_variance(gmm):
    x, sigma = points(16), 1.3
    wider = GaussianMixture(MEANS, [math.sqrt(s ** 2 + sigma ** 2) for s in STDS], WEIGHTS)
    assert torch.allclose(gmm.log_prob(x, sigma), wider.log_prob(x), atol=1e-12)


# ---- the probability-flow ODE reference ---------------------------------------------------------
def test_ode_reference_exact_for_single_gaussian():
    """One component N(mu, s^2 I): x(sigma) = mu + (x(sigma0) - mu) sqrt(v(sigma) / v(sigma0)),
    v(sigma) = s^2 + sigma^2 (the ODE is linear there)."""
    mu, s = torch.tensor([0.5, -1.0], dtype=F64), 0.3
    g = GaussianMixture(mu[None], [s])
    x = points(8, scale=80.0)
    sigmas = [80.0, 5.0, 0.002, 0.0]
    traj = g.ode_reference(x, sigmas, return_all=True)
    assert traj.shape == (4, 8, 2)
    for sig, xs in zip(sigmas, traj):
        exact = mu + (x - mu) * math.sqrt((s ** 2 + sig ** 2) / (s ** 2 + 80.0 ** 2))
        assert torch.allclose(xs, exact, atol=1e-8, rtol=1e-9)


def test_ode_transports_noised_marginal_to_data(gmm):
    """Start from exact draws of p_80 (x0 + 80 eps): the ODE output must be distributed as p_0."""
    n, gen = 3000, torch.Generator().manual_seed(4)
    x80 = gmm.sample(n, generator=gen) + 80.0 * torch.randn(n, 2, dtype=F64, generator=gen)
    out = gmm.ode_reference(x80, [80.0, 0.0], rtol=1e-8, atol=1e-8)
    mean, cov = mixture_moments(gmm)
    se = cov.diagonal().sqrt() / math.sqrt(n)
    assert ((out.mean(0) - mean).abs() <= 5 * se).all()
    assert torch.allclose(torch.cov(out.T), cov, atol=0.15)
    assert gmm.log_prob(out).mean() > gmm.log_prob(x80).mean() + 5    # landed on the data


# ---- convergence order of the samplers against the exact ODE solution --------------------------
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


@pytest.fixture(scope="module")
def ode_problem(gmm):
    x = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(5)) * SIGMA_MAX
    return x, gmm.ode_reference(x, [SIGMA_MAX, SIGMA_MIN])


NS = (16, 32, 64, 128, 256, 512)


@pytest.mark.parametrize("sampler, nfe_per_step, lo, hi", [
    (sample_euler, 1, -1.3, -0.7),
    (sample_heun, 2, -math.inf, -1.6),
    (sample_dpmpp_2m, 1, -math.inf, -1.6),
], ids=["euler", "heun", "dpmpp_2m"])
def test_convergence_order_on_mixture(gmm, ode_problem, sampler, nfe_per_step, lo, hi):
    x, ref = ode_problem
    nfe, err = zip(*(error_at_sigma_min(sampler, gmm, x, ref, sigmas_karras(n, SIGMA_MIN, SIGMA_MAX))
                     for n in NS))
    assert list(nfe) == [nfe_per_step * (n - 1) for n in NS]            # honest NFE count
    slope = loglog_slope(nfe, err)
    print(f"ORDER {sampler.__name__}: NFE {nfe} RMS error {['%.1e' % e for e in err]} "
          f"slope {slope:.3f}")
    assert lo <= slope <= hi, slope
    assert err[-1] < (2e-2 if sampler is sample_euler else 2e-4)
