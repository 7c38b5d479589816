"""Score-based models: Tweedie, denoising score matching, Langevin dynamics, the VP/VE SDE samplers.

Everything is checked against the analytic Gaussian mixture (diffkit.diffusion.gmm), whose score, denoiser
and probability-flow ODE solution are exact. Monte Carlo checks compare with their standard error.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffkit.diffusion import score
from diffkit.diffusion import sde as sdes
from diffkit.diffusion.gmm import GaussianMixture
from diffkit.eval import distributions
from diffkit.train import train

F64 = torch.float64
ANGLES = 2 * math.pi * torch.arange(8, dtype=F64) / 8
RING = GaussianMixture(1.5 * torch.stack([ANGLES.cos(), ANGLES.sin()], 1), [0.1] * 8)
MIXTURE = GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, 2.0]], [0.6, 0.8, 0.5], [0.5, 0.3, 0.2])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- Tweedie -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_tweedie_score_equals_autograd_of_log_density(sigma):
    x = (MIXTURE.sample(256, gen(0)) + sigma * torch.randn(256, 2, generator=gen(1), dtype=F64))
    x.requires_grad_(True)
    autograd_score, = torch.autograd.grad(MIXTURE.log_prob(x, sigma).sum(), x)
    x = x.detach()
    tweedie = score.denoiser_to_score(x, MIXTURE.denoise(x, sigma), sigma)
    assert torch.allclose(tweedie, autograd_score, rtol=1e-9, atol=1e-12)
    eps_hat = score.score_to_eps(tweedie, sigma)
    assert torch.allclose(eps_hat, (x - MIXTURE.denoise(x, sigma)) / sigma, atol=1e-12)


@pytest.mark.parametrize("sde", [sdes.VPSDE(), sdes.VESDE(0.01, 50.0)], ids=["VP", "VE"])
@pytest.mark.parametrize("t", [0.01, 0.3, 0.9])
def test_score_from_denoiser_is_the_score_of_the_sde_marginal(sde, t):
    """log p_t(x) = log p_sigma(x / s) - D log s for x(t) = s (x_0 + sigma eps)."""
    s, sigma = sde.scale(t), sde.sigma(t)
    x = sdes.marginal_sample(MIXTURE, sde, t, 128, gen(2)).requires_grad_(True)
    log_p = MIXTURE.log_prob(x / s, sigma) - 2 * math.log(s)
    expected, = torch.autograd.grad(log_p.sum(), x)
    got = sdes.score_from_denoiser(MIXTURE, sde)(x.detach(), t)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


# ---- denoising score matching ------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.1, 1.0])
def test_dsm_loss_of_exact_score_has_its_analytic_value(sigma):
    """One Gaussian N(mu, s^2 I): the sigma^2-weighted DSM loss of its score is s^2/(s^2+sigma^2)"""
    n, s = 100_000, 0.5
    single = GaussianMixture([[0.3, -0.2]], [s])
    x0, eps = single.sample(n, gen(3)), torch.randn(n, 2, generator=gen(4), dtype=F64)
    per_sample = score.dsm_loss(single.score, x0, torch.full((n,), sigma, dtype=F64), eps,
                                reduce=False)
    standard_error = float(per_sample.std()) / math.sqrt(n)
    assert abs(float(per_sample.mean()) - s ** 2 / (s ** 2 + sigma ** 2)) < 4 * standard_error


@pytest.mark.parametrize("sigma", [0.05, 0.5])
def test_exact_score_minimises_dsm_and_perturbations_cost_their_explicit_distance(sigma):
    n = 100_000
    x0, eps = RING.sample(n, gen(5)), torch.randn(n, 2, generator=gen(6), dtype=F64)
    sig = torch.full((n,), sigma, dtype=F64)
    exact = score.dsm_loss(RING.score, x0, sig, eps, reduce=False)
    x = x0 + sigma * eps
    for perturbed in (lambda y, s: 1.2 * RING.score(y, s),
                      lambda y, s: RING.score(y, s) + torch.tensor([1.0, -1.0], dtype=F64)):
        rise = score.dsm_loss(perturbed, x0, sig, eps, reduce=False) - exact
        explicit = ((sigma * (perturbed(x, sigma) - RING.score(x, sigma))) ** 2).mean(1)
        assert float(rise.mean()) > 0                          # the exact score is the minimiser
        gap = rise - explicit                                  # Vincent 2011: mean zero
        assert abs(float(gap.mean())) < 4 * float(gap.std()) / math.sqrt(n)


def test_dsm_training_reduces_the_score_error():
    points = RING.sample(4000, gen(7)).float()
    torch.manual_seed(0)
    net = score.ScoreNet(dim=2, width=32, depth=2, emb_dim=16)
    x = (RING.sample(1000, gen(8)) + 0.5 * torch.randn(1000, 2, generator=gen(9), dtype=F64))
    exact = RING.score(x, 0.5)

    def error():
        with torch.no_grad():
            return float(((net.score(x.float(), 0.5).double() - exact) ** 2).sum(1).mean()
                         / (exact ** 2).sum(1).mean())
    before = error()
    net = train(net, score.dsm_objective(0.1, 5.0), points, steps=300, batch_size=128, lr=3e-3,
                seed=0, progress=False).ema
    assert error() < 0.25 * before and error() < 0.1, (before, error())


# ---- Langevin dynamics --------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [0.01, 0.2])
def test_langevin_reaches_the_ula_stationary_law_of_a_gaussian(delta):
    """1-D N(m, s^2): ULA's stationary law is N(m, s^2 / (1 - delta / (4 s^2)))."""
    m, s2, n = 1.0, 0.25, 40_000
    target = GaussianMixture([[m]], [s2 ** 0.5])
    x = score.langevin(lambda y: target.score(y), torch.full((n, 1), -2.0, dtype=F64), delta,
                       600, generator=gen(10))
    v_inf = s2 / (1 - delta / (4 * s2))
    assert abs(float(x.mean()) - m) < 4 * math.sqrt(v_inf / n)
    assert abs(float(x.var()) - v_inf) < 4 * v_inf * math.sqrt(2 / (n - 1))


def test_annealed_langevin_recovers_mode_weights_that_plain_langevin_keeps():
    """Song & Ermon 2019, sec. 3.2.2 / Figure 3."""
    two = GaussianMixture([[-5.0, -5.0], [5.0, 5.0]], [1.0, 1.0], [0.2, 0.8])
    n = 2000
    start = torch.rand(n, 2, generator=gen(11), dtype=F64) * 16 - 8
    plain = score.langevin(lambda y: two.score(y), start, 0.1, 500, generator=gen(12))
    annealed = score.annealed_langevin(two.score, start, torch.logspace(math.log10(20), -1, 10),
                                       n_steps_each=100, step_lr=2e-3, generator=gen(13))
    share = {k: float((v.sum(1) < 0).double().mean()) for k, v in
             [("start", start), ("plain", plain), ("annealed", annealed)]}
    assert abs(share["plain"] - share["start"]) < 0.03
    assert abs(share["annealed"] - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n), share


# ---- SDEs --------------------------------------------------------------------------------------
def test_vp_sde_discretised_is_the_ddpm_linear_schedule():
    from diffkit.diffusion.schedules import make_schedule
    linear, vp = make_schedule("linear"), sdes.VPSDE(0.1, 20.0)
    t = (torch.arange(linear.T, dtype=F64) + 1) / linear.T
    abar = torch.tensor([math.exp(vp.log_abar(float(u))) for u in t], dtype=F64)
    assert float((linear.alphas_cumprod.double() - abar).abs().max()) < 1e-3
    assert abs(vp.beta(0.0) / 1000 - 1e-4) < 1e-12 and abs(vp.beta(1.0) / 1000 - 0.02) < 1e-12


def test_vp_probability_flow_equals_the_sigma_ode_after_rescaling():
    vp, t_end = sdes.VPSDE(), 1e-3
    x1 = vp.prior_sample((32, 2), gen(14))
    reference = RING.ode_reference(x1 / vp.scale(1.0), [vp.sigma(1.0), vp.sigma(t_end)])
    errors = []
    for n_steps in (200, 400):
        x = sdes.probability_flow_sample(sdes.score_from_denoiser(RING, vp), vp, x1, n_steps,
                                          t_end=t_end)
        errors.append(float((x / vp.scale(t_end) - reference).abs().max()))
    assert errors[1] < 2e-3
    assert 1.6 < math.log2(errors[0] / errors[1]) < 2.4        # Heun: second order


@pytest.mark.parametrize("kind", ["sde", "ode"])
@pytest.mark.parametrize("sde", [sdes.VPSDE(), sdes.VESDE(0.01, 50.0)], ids=["VP", "VE"])
def test_samplers_match_the_exact_marginal(sde, kind):
    n, t_end = 2000, 1e-3
    score_fn = sdes.score_from_denoiser(RING, sde)
    prior = sde.prior_sample((n, 2), gen(15))
    if kind == "sde":
        x = sdes.reverse_sde_sample(score_fn, sde, prior, 500, t_end=t_end, generator=gen(16))
    else:
        x = sdes.probability_flow_sample(score_fn, sde, prior, 100, t_end=t_end)
    quality = distributions.distance_to_exact(
        x, lambda m, g: sdes.marginal_sample(RING, sde, t_end, m, g), generator=gen(17), repeats=2)
    fit = distributions.mixture_fit(RING, x / sde.scale(t_end))
    # exact samples of this size score 0.95 +- 0.15 on the ratio, +-1.1 % on the spread and
    # 0.02 +- 0.007 on the weights (chapter 4); the bars are about four of those deviations
    assert quality["ratio"] < 2.0, quality
    assert abs(fit["within_std"] / math.hypot(0.1, sde.sigma(t_end)) - 1) < 0.04, fit
    assert fit["weights_tv"] < 0.05, fit


def test_reverse_sde_with_too_few_steps_is_measurably_wrong():
    vp = sdes.VPSDE()
    x = sdes.reverse_sde_sample(sdes.score_from_denoiser(RING, vp), vp,
                                 vp.prior_sample((2000, 2), gen(18)), 10, generator=gen(19))
    assert distributions.mixture_fit(RING, x / vp.scale(1e-3))["within_std"] > 0.15


def test_samplers_are_deterministic_given_the_generator():
    ve = sdes.VESDE()
    fn = sdes.score_from_denoiser(RING, ve)
    prior = ve.prior_sample((64, 2), gen(20))
    a = sdes.reverse_sde_sample(fn, ve, prior, 20, generator=gen(21))
    b = sdes.reverse_sde_sample(fn, ve, prior, 20, generator=gen(21))
    assert torch.equal(a, b)
    c = score.langevin(lambda y: RING.score(y, 0.1), prior / 50, 1e-3, 5, generator=gen(22))
    d = score.langevin(lambda y: RING.score(y, 0.1), prior / 50, 1e-3, 5, generator=gen(22))
    assert torch.equal(c, d)


# ---- input validation --------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors():
    x = torch.zeros(4, 2, dtype=F64)
    fn = sdes.score_from_denoiser(RING, sdes.VPSDE())
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        score.denoiser_to_score(x, x, 0.0)
    with pytest.raises(ValueError, match="sigma must be a float or of shape"):
        score.score_to_eps(x, torch.ones(3))
    with pytest.raises(ValueError, match="eps must have the shape of x0"):
        score.dsm_loss(RING.score, x, torch.ones(4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"x0 must be a floating-point tensor of shape \(B, D\)"):
        score.dsm_loss(RING.score, torch.zeros(4), torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        score.dsm_objective(1.0, 0.5)
    with pytest.raises(ValueError, match="step_size > 0 and an integer n_steps >= 1"):
        score.langevin(lambda y: y, x, -0.1, 10)
    with pytest.raises(ValueError, match="step_size > 0 and an integer n_steps >= 1"):
        score.langevin(lambda y: y, x, 0.1, 0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        score.annealed_langevin(RING.score, x, [0.1, 1.0])
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        sdes.VESDE(50.0, 0.01)
    with pytest.raises(ValueError, match="need 0 < beta_min <= beta_max"):
        sdes.VPSDE(0.0, 20.0)
    with pytest.raises(ValueError, match="n_steps must be an integer >= 1"):
        sdes.reverse_sde_sample(fn, sdes.VPSDE(), x, 0)
    with pytest.raises(ValueError, match=r"t_end must lie in \(0, 1\)"):
        sdes.probability_flow_sample(fn, sdes.VPSDE(), x, 10, t_end=0.0)
    with pytest.raises(ValueError, match="method must be 'euler' or 'heun'"):
        sdes.probability_flow_sample(fn, sdes.VPSDE(), x, 10, method="rk4")
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor of shape \(B, D\)"):
        score.ScoreNet()(torch.zeros(4, 2, 1), 1.0)


# ---- the SDE samplers on the sampler contract (diffkit.diffusion.sde_samplers) -------------------
def _old_reverse_sde(score_fn, sde, x, n_steps, t_end, generator):
    """The t-grid Euler-Maruyama loop as chapter 4 first wrote it (the reference)."""
    ts = torch.linspace(1.0, t_end, n_steps + 1, dtype=torch.float64).tolist()
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt, g = t_next - t, sde.diffusion(t)
        x = x + (sde.drift(x, t) - g ** 2 * score_fn(x, t)) * dt
        if i < n_steps - 1:
            x = x + g * math.sqrt(-dt) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


def _old_probability_flow(score_fn, sde, x, n_steps, t_end, method):
    ts = torch.linspace(1.0, t_end, n_steps + 1, dtype=torch.float64).tolist()

    def velocity(y, t):
        return sde.drift(y, t) - 0.5 * sde.diffusion(t) ** 2 * score_fn(y, t)

    for t, t_next in zip(ts[:-1], ts[1:]):
        dt = t_next - t
        d_cur = velocity(x, t)
        x_next = x + d_cur * dt
        if method == "heun":
            x_next = x + 0.5 * (d_cur + velocity(x_next, t_next)) * dt
        x = x_next
    return x


@pytest.mark.parametrize("process", [sdes.VPSDE(), sdes.VESDE(0.01, 50.0)], ids=["VP", "VE"])
def test_t_of_sigma_inverts_sigma(process):
    for t in (1e-3, 0.1, 0.5, 1.0):
        assert process.t_of_sigma(process.sigma(t)) == pytest.approx(t, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("process", [sdes.VPSDE(), sdes.VESDE(0.01, 50.0)], ids=["VP", "VE"])
def test_the_score_function_calls_are_the_contract_samplers(process):
    score_fn = sdes.score_from_denoiser(MIXTURE, process)
    prior = process.prior_sample((64, 2), gen(30))
    new = sdes.reverse_sde_sample(score_fn, process, prior, 40, t_end=1e-3, generator=gen(31))
    old = _old_reverse_sde(score_fn, process, prior, 40, 1e-3, gen(31))
    assert (new - old).abs().max() < 1e-9 * (1 + old.abs().max())
    for method in ("euler", "heun"):
        new = sdes.probability_flow_sample(score_fn, process, prior, 30, t_end=1e-3, method=method)
        old = _old_probability_flow(score_fn, process, prior, 30, 1e-3, method)
        assert (new - old).abs().max() < 1e-9 * (1 + old.abs().max()), method


def test_the_contract_sde_samplers_end_in_x0_hat_and_check_their_input():
    from diffkit.diffusion.sde_samplers import sample_probability_flow, sample_reverse_sde

    vp = sdes.VPSDE()
    ts = [1.0, 0.5, 0.1, 1e-3]
    sigmas = torch.tensor([vp.sigma(t) for t in ts] + [0.0], dtype=torch.float64)
    x = vp.prior_sample((32, 2), gen(40)) / vp.scale(1.0)
    seen = []
    out = sample_reverse_sde(MIXTURE, x, sigmas, sde=vp, generator=gen(41),
                             callback=lambda step: seen.append(step))
    assert len(seen) == 4 and torch.equal(out, seen[-1]["denoised"])   # the last step: x0_hat
    out = sample_probability_flow(MIXTURE, x, sigmas, sde=vp)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="end in exactly 0"):
        sample_reverse_sde(MIXTURE, x, sigmas[:-1], sde=vp)
    with pytest.raises(ValueError, match="method"):
        sample_probability_flow(MIXTURE, x, sigmas, sde=vp, method="rk4")
