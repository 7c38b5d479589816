"""diffkit.diffusion.schedules: betas equal diffusers' DDPMScheduler; derived tables; validation;
zero terminal SNR equals diffusers' rescale; the Gaussian gap of a reverse step."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from diffkit.diffusion.schedules import (
    KINDS,
    Schedule,
    make_schedule,
    rescale_zero_terminal_snr,
    reverse_step_gaussian_gap,
    zero_terminal_snr,
)

DIFFUSERS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1000, 50])
def test_betas_equal_diffusers(kind, T):
    ours = make_schedule(kind, T)
    theirs = DDPMScheduler(num_train_timesteps=T, **DIFFUSERS[kind])
    assert ours.betas.dtype == torch.float64 and ours.T == T and ours.kind == kind
    # diffusers stores float32: agree to float32 precision
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(),
                               rtol=2e-5, atol=1e-8)


def test_scaled_linear_ends():
    s = make_schedule("scaled_linear")
    assert math.isclose(float(s.betas[0]), 0.00085, rel_tol=1e-12)
    assert math.isclose(float(s.betas[-1]), 0.012, rel_tol=1e-12)
    # sqrt(beta) is linear in t
    root = s.betas.sqrt()
    diffs = root[1:] - root[:-1]
    torch.testing.assert_close(diffs, diffs.mean().expand_as(diffs), rtol=1e-9, atol=1e-12)


def test_linear_custom_range():
    s = make_schedule("linear", 11, beta_start=0.01, beta_end=0.11)
    torch.testing.assert_close(s.betas, torch.arange(1, 12, dtype=torch.float64) / 100)


def test_cosine_alpha_bar_and_cap():
    T, s_ = 1000, 0.008
    s = make_schedule("cosine", T)
    assert float(s.betas[-1]) == pytest.approx(0.999, abs=1e-12)  # the cap binds at the end
    assert float(s.betas.max()) <= 0.999 + 1e-12

    def f(u):
        return math.cos((u / T + s_) / (1 + s_) * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    # abar_t = f(t+1)/f(0) wherever the cap did not bind (all but the last step)
    torch.testing.assert_close(s.alphas_cumprod[:-1], expected[:-1], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_tables(kind):
    s = make_schedule(kind, 200)
    abar = s.alphas_cumprod
    assert bool((abar[1:] < abar[:-1]).all()), "abar must be strictly decreasing"
    assert bool((abar > 0).all()) and bool((abar < 1).all())
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    expected_abar = torch.from_numpy(np.cumprod(1 - s.betas.numpy()))
    torch.testing.assert_close(abar, expected_abar)
    torch.testing.assert_close(s.sigmas, ((1 - abar) / abar).sqrt())
    assert bool((s.sigmas[1:] > s.sigmas[:-1]).all())
    torch.testing.assert_close(s.snr, 1 / s.sigmas ** 2)
    torch.testing.assert_close(s.log_snr, -2 * s.sigmas.log())
    # the forward identity of the core contract: sqrt(abar) * sqrt(1 + sigma^2) = 1
    torch.testing.assert_close(abar.sqrt() * (1 + s.sigmas ** 2).sqrt(), torch.ones_like(abar))


def test_to_dtype_keeps_kind():
    s = make_schedule("cosine", 10).to(dtype=torch.float32)
    assert s.betas.dtype == torch.float32 and s.kind == "cosine"
    assert make_schedule("linear", 10, dtype=torch.float32).betas.dtype == torch.float32


@pytest.mark.parametrize("kwargs", [
    dict(kind="quadratic"), dict(kind="squaredcos_cap_v2"),
    dict(kind="linear", T=1), dict(kind="linear", T=0), dict(kind="linear", T=1000.0),
    dict(kind="linear", T="1000"), dict(kind="linear", T=True),
    dict(kind="linear", beta_start=0.02, beta_end=0.01),
    dict(kind="linear", beta_start=0.0), dict(kind="linear", beta_end=1.0),
    dict(kind="scaled_linear", beta_start=-0.1),
    dict(kind="cosine", beta_start=1e-4), dict(kind="cosine", beta_end=0.02),
])
def test_make_schedule_errors(kwargs):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError):
        make_schedule(kind, **kwargs)


@pytest.mark.parametrize("betas", [
    torch.tensor([0.1, 1.0]), torch.tensor([0.0, 0.1]), torch.tensor([0.1, -0.2]),
    torch.tensor([0.1, 1.5]), torch.full((2, 3), 0.1), torch.tensor(0.1), torch.tensor([]),
    torch.tensor([1, 2]), [0.1, 0.2],
])
def test_schedule_rejects_bad_betas(betas):
    with pytest.raises(ValueError):
        Schedule(betas)


def test_check_t():
    s = make_schedule("linear", 10)
    out = s.check_t(torch.tensor([0, 9, 3], dtype=torch.int32))
    assert out.dtype == torch.int64 and out.tolist() == [0, 9, 3]
    for bad in (torch.tensor([0, 10]), torch.tensor([-1]), torch.tensor([0.0, 1.0]),
                torch.tensor([[1, 2]]), torch.tensor(3), 3, [1, 2], torch.tensor([True])):
        with pytest.raises(ValueError):
            s.check_t(bad)


# --- zero terminal SNR (Lin et al. 2024) ------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1000, 50])
def test_rescale_zero_terminal_snr_equals_diffusers(kind, T):
    betas = make_schedule(kind, T).betas
    ours = rescale_zero_terminal_snr(betas)
    theirs = diffusers_rescale(betas.clone())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert float(ours[-1]) == 1.0  # x_T is pure noise
    # the first abar is kept, the terminal one is 0, sqrt(abar) is an affine map of the old one
    abar_old, abar_new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - ours, 0)
    assert float(abar_new[0]) == pytest.approx(float(abar_old[0]), rel=1e-12)
    assert float(abar_new[-1]) == 0.0
    root_new, root_old = abar_new.sqrt(), abar_old.sqrt()
    slope = (root_new[1:] - root_new[:-1]) / (root_old[1:] - root_old[:-1])
    torch.testing.assert_close(slope, slope.mean().expand_as(slope), rtol=1e-6, atol=0)
    assert ours.dtype == betas.dtype and betas is not ours


def test_rescale_does_not_modify_its_input():
    betas = make_schedule("scaled_linear", 20).betas
    before = betas.clone()
    rescale_zero_terminal_snr(betas)
    assert torch.equal(betas, before)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_terminal_snr_schedule(kind):
    s = make_schedule(kind)
    z = zero_terminal_snr(s)
    assert z.kind == kind + "+zsnr" and z.T == s.T
    exact = rescale_zero_terminal_snr(s.betas)
    # everything but the last beta is Lin et al.'s; the last is capped at 0.999 as in the cosine
    torch.testing.assert_close(z.betas[:-1], exact[:-1].clamp(max=0.999))
    assert float(z.betas[-1]) == pytest.approx(0.999)
    assert float(z.alphas_cumprod[-1].sqrt()) < 1e-4
    assert float(z.alphas_cumprod[-1]) < float(s.alphas_cumprod[-1])
    assert bool(torch.isfinite(z.sigmas).all()) and float(z.snr[-1]) < 1e-8
    assert bool((z.alphas_cumprod[1:] < z.alphas_cumprod[:-1]).all())


def test_zero_terminal_snr_errors():
    with pytest.raises(ValueError, match="Schedule"):
        zero_terminal_snr(make_schedule("linear").betas)
    with pytest.raises(ValueError, match="max_beta"):
        zero_terminal_snr(make_schedule("linear"), max_beta=1.0)
    for bad in (torch.tensor([0.1]), torch.tensor([[0.1, 0.2]]), torch.tensor([0.1, 1.0]),
                torch.tensor([1, 2]), [0.1, 0.2]):
        with pytest.raises(ValueError):
            rescale_zero_terminal_snr(bad)


# --- the Gaussian gap of one reverse step ------------------------------------------------------

LEVELS = torch.tensor([-1.0, -0.5, 0.25, 1.0], dtype=torch.float64)
WEIGHTS = torch.tensor([0.4, 0.1, 0.2, 0.3], dtype=torch.float64)


def test_gap_is_zero_for_gaussian_reverse_steps():
    # a point mass: q(x_{t-1} | x_t) is exactly the Gaussian posterior of Ho et al. eq. 7
    gap = reverse_step_gaussian_gap(make_schedule("linear", 50), torch.tensor([0.3]),
                                    torch.tensor([1.0]))
    assert gap.shape == (49,) and float(gap.abs().max()) < 1e-10


@pytest.mark.parametrize("t, data_std", [(3, 0.0), (0, 0.05), (2, 0.05)])
def test_gap_against_brute_force_quadrature(t, data_std):
    s = make_schedule("linear", 20, beta_start=0.01, beta_end=0.2)
    gap = float(reverse_step_gaussian_gap(s, LEVELS, WEIGHTS, torch.tensor([t]),
                                          data_std=data_std, nodes=24)[0])
    # brute force on a grid: the joint density of (x_{t-1}, x_t), straight from the definitions
    abar = torch.cat([torch.ones(1, dtype=torch.float64), s.alphas_cumprod])   # abar_{-1} = 1
    a_prev, beta = abar[t], s.betas[t]
    m, v = a_prev.sqrt() * LEVELS, a_prev * data_std ** 2 + 1 - a_prev          # law of x_{t-1}
    x = torch.linspace(-4, 4, 1201, dtype=torch.float64)[:, None, None]       # x_t
    y = torch.linspace(-4, 4, 4001, dtype=torch.float64)[None, :, None]       # x_{t-1}

    def normal(u, mean, var):
        return torch.exp(-(u - mean) ** 2 / (2 * var)) / (2 * math.pi * var) ** 0.5

    joint = (WEIGHTS * normal(y, m, v) * normal(x, (1 - beta).sqrt() * y, beta)).sum(-1)
    dx, dy = float(x[1, 0, 0] - x[0, 0, 0]), float(y[0, 1, 0] - y[0, 0, 0])
    p_x = joint.sum(1) * dy
    q = joint / p_x[:, None]
    y = y[0, :, 0]
    mean = (q * y).sum(1) * dy
    var = (q * (y - mean[:, None]) ** 2).sum(1) * dy
    log_n = (-(y - mean[:, None]) ** 2 / (2 * var[:, None])
             - 0.5 * torch.log(2 * math.pi * var[:, None]))
    kl = (q * (q.clamp_min(1e-300).log() - log_n)).sum(1) * dy
    brute = float((kl * p_x).sum() * dx)
    assert gap > 1e-3
    assert gap == pytest.approx(brute, rel=0.02)


def test_gap_grows_with_the_step():
    # the same path from abar = 1 to abar_T in fewer, larger steps is less Gaussian per step
    # and in total (Sohl-Dickstein et al. 2015)
    fine = reverse_step_gaussian_gap(make_schedule("linear", 200, beta_start=1e-3, beta_end=0.05),
                                     LEVELS, WEIGHTS)
    coarse = reverse_step_gaussian_gap(make_schedule("linear", 20, beta_start=1e-2, beta_end=0.5),
                                       LEVELS, WEIGHTS)
    assert float(coarse.sum()) > 3 * float(fine.sum()) > 0
    assert bool((fine >= 0).all())


def test_gap_converges_in_the_number_of_nodes():
    s = make_schedule("cosine", 40)
    a = reverse_step_gaussian_gap(s, LEVELS, WEIGHTS, nodes=8)
    b = reverse_step_gaussian_gap(s, LEVELS, WEIGHTS, nodes=16)
    assert float(a.sum()) == pytest.approx(float(b.sum()), rel=0.02)


@pytest.mark.parametrize("kwargs", [
    dict(levels=torch.tensor([]), weights=torch.tensor([])),
    dict(levels=torch.tensor([0.0, 1.0]), weights=torch.tensor([1.0])),
    dict(levels=torch.tensor([0.0, 1.0]), weights=torch.tensor([0.5, 0.6])),
    dict(levels=torch.tensor([0.0, 1.0]), weights=torch.tensor([1.5, -0.5])),
    dict(t=torch.tensor([0, 1])), dict(t=torch.tensor([10])), dict(nodes=1),
    dict(data_std=-0.1), dict(data_std=float("nan")),
])
def test_gap_errors(kwargs):
    args = dict(levels=LEVELS, weights=WEIGHTS, t=None)
    args.update(kwargs)
    with pytest.raises(ValueError):
        reverse_step_gaussian_gap(make_schedule("linear", 10), args["levels"], args["weights"],
                                  args["t"], nodes=kwargs.get("nodes", 8),
                                  data_std=kwargs.get("data_std", 0.0))
