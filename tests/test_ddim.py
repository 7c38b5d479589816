"""diffkit.diffusion.ddim: eq. 16 variances, the eq. 7 posterior family, Lemma 1 (same marginals), the
eq. 12 step, DDIM = Euler on the probability-flow ODE, inversion and the sigma-hat sampler.

Parity: ``invert`` equals diffusers' ``DDIMInverseScheduler`` loop and ``sample_ddpm_mean`` equals
``DDPMScheduler(variance_type="fixed_large")`` on the same eps model, float64 tables, to 1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDPMScheduler

from diffkit.diffusion import ddim, ddpm
from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.diffusion.gmm import GaussianMixture
from diffkit.diffusion.samplers import sample_ddim, sample_ddpm, sigmas_karras, spaced_timesteps
from diffkit.diffusion.schedules import make_schedule

F64 = torch.float64
SCHEDULE = make_schedule("linear")
ABAR = SCHEDULE.alphas_cumprod


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class SmoothEps:
    """A fixed eps model, smooth in x_t and fractional t: x_t (B, 1, 2, 3), t (B,)."""

    def __init__(self, seed=0, dim=6):
        g = _gen(seed)
        self.W = torch.randn(dim, dim, generator=g, dtype=F64) / dim ** 0.5
        self.b = torch.randn(dim, generator=g, dtype=F64)

    def __call__(self, x, t):
        t = torch.as_tensor(t, dtype=F64).reshape(-1, 1)
        low = t.floor().long().clamp(0, len(ABAR) - 2)
        abar = torch.lerp(ABAR[low], ABAR[low + 1], t - low)
        h = x.flatten(1) @ self.W + self.b * torch.sin(6 * t / 1000)
        return ((1 - abar).sqrt() * x.flatten(1) + 0.3 * torch.tanh(h)).reshape(x.shape)


MODEL = SmoothEps()
DENOISER = DiscreteTimeDenoiser(MODEL, ABAR)


# ---- eq. 16 ----------------------------------------------------------------------------------
def test_ddim_sigma_endpoints_and_sigma_hat():
    t = torch.tensor([1, 10, 300, 999])
    a_t, a_prev = ABAR[t], ABAR[t - 1]
    _, beta_tilde = ddpm.posterior_mean_variance(SCHEDULE, torch.zeros(4, 1, dtype=F64),
                                                 torch.zeros(4, 1, dtype=F64), t)
    torch.testing.assert_close(ddim.ddim_sigma(a_t, a_prev, 1.0) ** 2, beta_tilde[:, 0],
                               rtol=1e-12, atol=0)
    assert bool((ddim.ddim_sigma(a_t, a_prev, 0.0) == 0).all())
    torch.testing.assert_close(ddim.ddim_sigma(a_t, a_prev, 0.3),
                               0.3 * ddim.ddim_sigma(a_t, a_prev, 1.0))
    torch.testing.assert_close(ddim.sigma_hat(a_t, a_prev) ** 2, SCHEDULE.betas[t],
                               rtol=1e-10, atol=0)
    assert bool((ddim.sigma_hat(a_t, a_prev) > ddim.ddim_sigma(a_t, a_prev, 1.0)).all())
    # to x_0 (abar_prev = 1) the step is deterministic whatever eta
    assert float(ddim.ddim_sigma(ABAR[5], 1.0, 1.0)) == 0.0


@pytest.mark.parametrize("args, match", [
    ((0.5, 0.4, 0.0), "abar_t < abar_prev"),
    ((0.5, 0.5, 0.0), "abar_t < abar_prev"),
    ((0.0, 0.4, 0.0), "0 < abar_t"),
    ((0.5, 1.2, 0.0), "abar_prev <= 1"),
    ((float("nan"), 0.9, 0.0), "finite"),
    ((0.5, 0.9, -0.1), "eta must be"),
])
def test_ddim_sigma_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ddim.ddim_sigma(*args)


# ---- eq. 7 and Lemma 1 -----------------------------------------------------------------------
def test_posterior_at_eta_one_is_the_ddpm_posterior():
    t = torch.tensor([1, 2, 50, 500, 999])
    g = _gen(0)
    x0, x_t = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    mean, var = ddpm.posterior_mean_variance(SCHEDULE, x0, x_t, t)
    std = ddim.ddim_sigma(ABAR[t], ABAR[t - 1], 1.0)
    mean2, var2 = ddim.posterior(x0, x_t, ABAR[t], ABAR[t - 1], std)
    assert var2.shape == var.shape == (5, 1)
    torch.testing.assert_close(mean2, mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(var2, var, rtol=1e-12, atol=0)
    # eta = 0: x_{t-1} is x_0 noised with the same eps that is in x_t
    eps = (x_t - ABAR[t, None].sqrt() * x0) / (1 - ABAR[t, None]).sqrt()
    mean0, var0 = ddim.posterior(x0, x_t, ABAR[t], ABAR[t - 1], 0.0)
    renoised = ABAR[t - 1, None].sqrt() * x0 + (1 - ABAR[t - 1, None]).sqrt() * eps
    torch.testing.assert_close(mean0, renoised)
    assert bool((var0 == 0).all())


def test_posterior_rejects_bad_input():
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="std must satisfy"):
        ddim.posterior(x, x, 0.5, 0.9, 0.5)           # std^2 = 0.25 > 1 - 0.9
    with pytest.raises(ValueError, match="std must satisfy"):
        ddim.posterior(x, x, 0.5, 0.9, -0.1)
    with pytest.raises(ValueError, match="same shape"):
        ddim.posterior(x, torch.zeros(2, 4, dtype=F64), 0.5, 0.9, 0.1)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, "random"])
def test_sample_forward_keeps_the_ddpm_marginals(eta):
    """Lemma 1: x_t ~ N(sqrt(abar_t) x_0, (1 - abar_t) I) for every choice of the variances."""
    schedule = make_schedule("linear", T=200)
    abar = schedule.alphas_cumprod
    if eta == "random":   # any std in its allowed range [0, sqrt(1 - abar_{t-1})], drawn per step
        beta = torch.cat([abar.new_ones(1), 1 - abar[1:] / abar[:-1]])
        eta_max = ((1 - abar) / beta).sqrt()                   # eq. 16 at std^2 = 1 - abar_{t-1}
        eta = torch.rand(200, generator=_gen(5), dtype=F64) * eta_max
        assert float(eta.max()) > 1.5                          # eta > 1 is allowed as well
    n = 20000
    x0 = torch.randn(n, 2, generator=_gen(1), dtype=F64) * 0.5 + 1.0     # random data
    out = ddim.sample_forward(x0, abar, eta, generator=_gen(2), keep={0, 20, 100, 199})
    assert sorted(out) == [0, 20, 100, 199]
    for t, x in out.items():
        resid = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()   # N(0, I), independent of x0
        se = 1 / math.sqrt(n)
        assert float(resid.mean(0).abs().max()) < 4 * se, (t, resid.mean(0))
        assert float((resid.var(0) - 1).abs().max()) < 4 * math.sqrt(2) * se, (t, resid.var(0))
        corr = torch.corrcoef(torch.stack([resid[:, 0], x0[:, 0]]))[0, 1]
        assert abs(float(corr)) < 4 * se


def test_sample_forward_joint_law_depends_on_eta():
    """Same marginals, different trajectories: the noise in x_20 and x_100 is the same one at
    eta = 0 (correlation 1) and has DDPM's correlation sqrt(abar_100 (1 - abar_20) /
    (abar_20 (1 - abar_100))) at eta = 1."""
    abar = make_schedule("linear", T=200).alphas_cumprod
    x0 = torch.zeros(20000, 1, dtype=F64)
    corr = {}
    for eta in (0.0, 1.0):
        out = ddim.sample_forward(x0, abar, eta, generator=_gen(3), keep={20, 100})
        corr[eta] = float(torch.corrcoef(torch.stack([out[20][:, 0], out[100][:, 0]]))[0, 1])
    markov = math.sqrt(abar[100] * (1 - abar[20]) / (abar[20] * (1 - abar[100])))
    assert corr[0.0] > 1 - 1e-9
    assert abs(corr[1.0] - markov) < 0.02, (corr, markov)


def test_sample_forward_rejects_bad_input():
    x0 = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="shape \\(T,\\)"):
        ddim.sample_forward(x0, ABAR, torch.zeros(7))
    with pytest.raises(ValueError, match="std must satisfy"):
        ddim.sample_forward(x0, ABAR[:50], 200.0)                 # too much noise for x_{t-1}
    with pytest.raises(ValueError, match="alphas_cumprod"):
        ddim.sample_forward(x0, ABAR[:1], 0.0)
    with pytest.raises(ValueError, match="abar_t < abar_prev"):
        ddim.sample_forward(x0, ABAR.flip(0), 0.0)


# ---- eq. 12, and the ODE view ----------------------------------------------------------------
def test_ddim_step_eta_one_is_p_step_and_eta_zero_is_euler():
    t = torch.tensor([1, 10, 400, 999])
    g = _gen(4)
    x_t, eps, z = (torch.randn(4, 1, 2, 3, generator=g, dtype=F64) for _ in range(3))
    torch.testing.assert_close(ddim.ddim_step(x_t, eps, ABAR[t], ABAR[t - 1], eta=1.0, noise=z),
                               ddpm.p_step(SCHEDULE, eps, x_t, t, z), rtol=0, atol=1e-10)
    # eta = 0 in x_t units == one Euler step of dx/dsigma = (x - D) / sigma in x = x_t / sqrt(abar)
    sigma, sigma_prev = SCHEDULE.sigmas[t], SCHEDULE.sigmas[t - 1]
    x = x_t / ABAR[t].sqrt().reshape(-1, 1, 1, 1)
    denoised = x - sigma.reshape(-1, 1, 1, 1) * eps
    euler = ddim.euler_step(x, denoised, sigma, sigma_prev)
    torch.testing.assert_close(ddim.ddim_step(x_t, eps, ABAR[t], ABAR[t - 1]),
                               euler * ABAR[t - 1].sqrt().reshape(-1, 1, 1, 1), rtol=0, atol=1e-12)
    # a skip over a subsequence too, with a scalar pair
    skip = ddim.ddim_step(x_t[:1], eps[:1], ABAR[900], ABAR[400])
    x, sigma = x_t[:1] / ABAR[900].sqrt(), SCHEDULE.sigmas[900]
    euler = ddim.euler_step(x, x - sigma * eps[:1], sigma, SCHEDULE.sigmas[400])
    torch.testing.assert_close(skip, euler * ABAR[400].sqrt(), rtol=0, atol=1e-12)


def test_ddim_step_matches_sample_ddim():
    x = torch.randn(3, 1, 2, 3, generator=_gen(6), dtype=F64)
    sigmas = DENOISER.sigmas_for_timesteps([700, 300])          # one step 700 -> 300, then 0
    one = {}
    sample_ddim(DENOISER, x, sigmas, callback=lambda info: one.setdefault(info["i"], info["x"]))
    x_t = x / (1 + sigmas[0] ** 2).sqrt()
    eps = MODEL(x_t, torch.full((3,), 700.0))
    ours = ddim.ddim_step(x_t, eps, ABAR[700], ABAR[300]) / ABAR[300].sqrt()
    torch.testing.assert_close(ours, one[1], rtol=0, atol=1e-10)


def test_step_functions_reject_bad_input():
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="noise"):
        ddim.ddim_step(x, x, 0.5, 0.9, eta=0.5)
    with pytest.raises(ValueError, match="same shape"):
        ddim.ddim_step(x, torch.zeros(3, 3, dtype=F64), 0.5, 0.9)
    with pytest.raises(ValueError, match="sigma > 0"):
        ddim.euler_step(x, x, 0.0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        ddim.euler_step(x, torch.zeros(2, dtype=F64), 1.0, 0.5)


# ---- inversion -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [5, 10, 50])
def test_invert_matches_diffusers_ddim_inverse_scheduler(n):
    x0 = torch.randn(4, 1, 2, 3, generator=_gen(7), dtype=F64).clamp(-1, 1)
    sched = DDIMInverseScheduler(clip_sample=False)
    sched.set_timesteps(n)
    sched.alphas_cumprod, sched.initial_alpha_cumprod = ABAR.clone(), torch.tensor(1.0, dtype=F64)
    latent = x0.clone()
    for t in sched.timesteps:
        latent = sched.step(MODEL(latent, t), t, latent).prev_sample
    sigmas = DENOISER.sigmas_for_timesteps(spaced_timesteps(n, 1000, "leading"))
    ours = ddim.invert(DENOISER, x0, sigmas)
    diff = float((ours / (1 + sigmas[0] ** 2).sqrt() - latent).abs().max())
    print(f"PARITY invert vs DDIMInverseScheduler n={n}: {diff:.1e}")
    assert diff < 1e-10


def test_invert_round_trip_on_the_exact_mixture_converges_at_first_order():
    gmm = GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, 2.0]], [0.6, 0.8, 0.5], [0.5, 0.3, 0.2])
    x0 = gmm.sample(256, _gen(8))
    errors = []
    for n in (10, 20, 40, 80):
        sigmas = sigmas_karras(n, 0.002, 80.0)
        latent = ddim.invert(gmm, x0, sigmas)
        back = sample_ddim(gmm, latent, sigmas)
        errors.append(float((back - x0).pow(2).mean().sqrt()))
    slope = math.log(errors[-1] / errors[0]) / math.log(8)
    print("round-trip RMS errors:", [f"{e:.3g}" for e in errors], f"slope {slope:.2f}")
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert -1.3 < slope < -0.7, slope


def test_invert_reports_and_rejects_bad_input():
    x0 = torch.zeros(2, 1, 2, 3, dtype=F64)
    seen = []
    sigmas = DENOISER.sigmas_for_timesteps([600, 200])
    ddim.invert(DENOISER, x0, sigmas, callback=lambda info: seen.append(float(info["sigma_next"])))
    assert seen == pytest.approx([float(sigmas[1]), float(sigmas[0])])   # low to high noise
    with pytest.raises(ValueError, match="end in exactly 0"):
        ddim.invert(DENOISER, x0, sigmas[:-1])
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim.invert(DENOISER, x0, sigmas.flip(0))


# ---- DDPM's mean with other variances: sigma-hat, DDPM itself, and no noise ------------------
@pytest.mark.parametrize("n", [5, 10, 50])
def test_sigma_hat_matches_diffusers_fixed_large(n):
    sched = DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    sched.set_timesteps(n)
    sched.alphas_cumprod, sched.one = ABAR.clone(), torch.tensor(1.0, dtype=F64)
    sigmas = DENOISER.sigmas_for_timesteps(spaced_timesteps(n, 1000, "leading"))
    noise = torch.randn(4, 1, 2, 3, generator=_gen(9), dtype=F64)
    x_t, g = noise * sigmas[0] / (1 + sigmas[0] ** 2).sqrt(), _gen(10)
    for t in sched.timesteps:
        x_t = sched.step(MODEL(x_t, t), t, x_t, generator=g).prev_sample
    ours = ddim.sample_ddpm_mean(DENOISER, noise * sigmas[0], sigmas, generator=_gen(10))
    diff = float((ours - x_t).abs().max())
    print(f"PARITY sigma-hat vs DDPMScheduler(fixed_large) n={n}: {diff:.1e}")
    assert diff < 1e-10


def test_ddpm_mean_small_is_ddpm_and_none_is_not_ddim():
    sigmas = DENOISER.sigmas_for_timesteps(spaced_timesteps(20, 1000, "leading"))
    x = torch.randn(4, 1, 2, 3, generator=_gen(12), dtype=F64) * sigmas[0]
    small = ddim.sample_ddpm_mean(DENOISER, x, sigmas, variance="small", generator=_gen(1))
    torch.testing.assert_close(small, sample_ddpm(DENOISER, x, sigmas, generator=_gen(1)),
                               rtol=0, atol=1e-12)
    large = ddim.sample_ddpm_mean(DENOISER, x, sigmas, variance="large", generator=_gen(1))
    assert float((large - small).abs().max()) > 1e-3          # more noise: another sample
    none = ddim.sample_ddpm_mean(DENOISER, x, sigmas, variance="none", generator=_gen(1))
    assert torch.equal(none, ddim.sample_ddpm_mean(DENOISER, x, sigmas, variance="none",
                                                   generator=_gen(2)))      # deterministic
    assert float((none - sample_ddim(DENOISER, x, sigmas)).abs().max()) > 1e-2   # but not DDIM


def test_sample_ddpm_mean_is_seeded_and_checks_input():
    sigmas = DENOISER.sigmas_for_timesteps([800, 400, 0])
    x = torch.randn(2, 1, 2, 3, generator=_gen(11), dtype=F64) * sigmas[0]
    a = ddim.sample_ddpm_mean(DENOISER, x, sigmas, generator=_gen(1))
    assert torch.equal(a, ddim.sample_ddpm_mean(DENOISER, x, sigmas, generator=_gen(1)))
    assert not torch.equal(a, ddim.sample_ddpm_mean(DENOISER, x, sigmas, generator=_gen(2)))
    with pytest.raises(ValueError, match="end in exactly 0"):
        ddim.sample_ddpm_mean(DENOISER, x, sigmas[:-1])
    with pytest.raises(ValueError, match="unknown variance"):
        ddim.sample_ddpm_mean(DENOISER, x, sigmas, variance="fixed_large")
