"""DDPM (Ho et al. 2020): forward marginal, posterior, training losses, the ancestral step and
sampler.

Symbols (book/notation.md): x_0 data, x_t noisy sample, eps ~ N(0, I), beta_t, alpha_t,
abar_t, t an integer tensor of shape (B,) with values in [0, T). The posterior q(x_{t-1} | x_t,
x_0) has one home, :func:`q_posterior`; the ancestral step :func:`p_step` (chapter 1's algorithm
box) and the sampler :func:`sample_ddpm` (on the contract of :mod:`diffkit.diffusion.samplers`)
call it, and :func:`sample` is the old call ``sample(model, schedule, shape)`` over the latter.
"""

from __future__ import annotations

from typing import Callable

import torch

from diffkit.diffusion.contract import (
    Denoiser,
    check_generator,
    check_sampler_input,
    draw_noise,
    report_step,
)
from diffkit.diffusion.denoisers import PREDICTIONS, DiscreteTimeDenoiser
from diffkit.diffusion.schedules import Schedule

TARGETS = PREDICTIONS                     # ("eps", "x0", "v")


def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] reshaped to (B, 1, ..., 1) so it broadcasts against ``like`` (B, ...)."""
    values = table.to(like.device)[t.to(like.device)].to(like.dtype)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _check(schedule: Schedule, t: torch.Tensor, **tensors: torch.Tensor) -> torch.Tensor:
    t = schedule.check_t(t)
    shape = None
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor) or value.ndim < 1:
            raise ValueError(f"{name} must be a tensor of shape (B, ...), got {type(value).__name__}")
        if value.shape[0] != t.shape[0]:
            raise ValueError(f"{name} has batch size {value.shape[0]} but t has {t.shape[0]}")
        if shape is not None and value.shape != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        shape = value.shape
    return t


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. eq. 4)."""
    t = _check(schedule, t, x0=x0, noise=noise)
    abar = _at(schedule.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def _abar_prev(schedule: Schedule) -> torch.Tensor:
    """abar_{t-1} with the convention abar_{-1} = 1 (x_{-1} is x_0 itself)."""
    abar = schedule.alphas_cumprod
    return torch.cat([abar.new_ones(1), abar[:-1]])


def q_posterior(x0: torch.Tensor, x_t: torch.Tensor, abar_t, abar_prev,
                beta_t) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) between two levels abar_t < abar_prev (Ho et al.
    eqs. 6-7), with alpha_t = 1 - beta_t:

        mu-tilde   = sqrt(abar_prev) beta_t / (1 - abar_t) x_0
                     + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t,
        beta-tilde = (1 - abar_prev) / (1 - abar_t) beta_t.

    beta_t = 1 - abar_t / abar_prev: the schedule's own beta_t on the full chain (pass it from the
    table, where it is exact), the step of a subsequence otherwise (DDIM's Table 1). x0, x_t:
    (B, ...); abar_t, abar_prev, beta_t: tensors broadcasting against them (0-d or (B, 1, ...)).
    """
    alpha_t = 1 - beta_t
    mean = (abar_prev.sqrt() * beta_t / (1 - abar_t)) * x0 \
        + (alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)) * x_t
    variance = (1 - abar_prev) / (1 - abar_t) * beta_t
    return mean, variance


def posterior_mean_variance(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor,
                            t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) at the schedule's t (B,) (:func:`q_posterior`,
    Ho et al. eqs. 6-7); the variance has shape (B, 1, ..., 1) and is zero at t = 0."""
    t = _check(schedule, t, x0=x0, x_t=x_t)
    abar, abar_prev = _at(schedule.alphas_cumprod, t, x0), _at(_abar_prev(schedule), t, x0)
    return q_posterior(x0, x_t, abar, abar_prev, _at(schedule.betas, t, x0))


def v_target(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, sec. 4)."""
    t = _check(schedule, t, x0=x0, noise=noise)
    abar = _at(schedule.alphas_cumprod, t, x0)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def predict_x0_eps(schedule: Schedule, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                   target: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a network output for ``target`` ("eps", "x0" or "v") into (x0_hat, eps_hat)."""
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; expected one of {TARGETS}")
    t = _check(schedule, t, output=output, x_t=x_t)
    abar = _at(schedule.alphas_cumprod, t, x_t)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if target == "eps":
        eps = output
        x0 = (x_t - s * eps) / a
    elif target == "x0":
        x0 = output
        eps = (x_t - a * x0) / s
    else:  # x_t = a x0 + s eps and v = a eps - s x0, a rotation with a^2 + s^2 = 1
        x0 = a * x_t - s * output
        eps = s * x_t + a * output
    return x0, eps


def training_loss(model: Callable, schedule: Schedule, x0: torch.Tensor, *, target: str = "eps",
                  generator: torch.Generator | None = None, model_kwargs: dict | None = None,
                  t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The simple loss E_{t, eps} ||target - model(x_t, t)||^2 (Ho et al. eq. 14 for eps).

    t ~ U{0..T-1} and eps ~ N(0, I) are drawn on the CPU from ``generator`` (so the numbers do
    not depend on the device) unless given.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; expected one of {TARGETS}")
    batch = x0.shape[0]
    check_generator(generator)
    if t is None:
        t = torch.randint(0, schedule.T, (batch,), generator=generator).to(x0.device)
    if noise is None:
        noise = draw_noise(x0, generator)
    x_t = q_sample(schedule, x0, t, noise)
    wanted = {"eps": noise, "x0": x0, "v": None}[target]
    if wanted is None:
        wanted = v_target(schedule, x0, t, noise)
    output = model(x_t, t, **(model_kwargs or {}))
    return torch.nn.functional.mse_loss(output, wanted)


def p_step(schedule: Schedule, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
           noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (Ho et al. Algorithm 2, line 4):

        x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z,

    which is the posterior mean mu-tilde(x_t, x0_hat) (eq. 7, :func:`q_posterior`) at
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (eq. 15; eq. 11 is the algebra), plus
    sigma_t z with sigma_t^2 the posterior variance beta-tilde_t (diffusers' ``fixed_small``);
    no noise is added where t = 0. eps, x_t, noise: (B, ...); t: (B,).
    """
    t = _check(schedule, t, eps=eps, x_t=x_t, noise=noise)
    x0_hat, _ = predict_x0_eps(schedule, eps, x_t, t, "eps")
    mean, variance = posterior_mean_variance(schedule, x0_hat, x_t, t)
    return mean + variance.sqrt() * noise


VARIANCES = ("small", "large", "none")


@torch.no_grad()
def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                variance: str = "small", generator=None, callback=None,
                extra_args: dict | None = None) -> torch.Tensor:
    """Ancestral DDPM on the sampler contract, Ho et al. 2020 Algorithm 2: x_{t-1} ~
    q(x_{t-1} | x_t, x0_hat), eqs. 6-7 (:func:`q_posterior`).

    Between consecutive sigmas, abar = 1 / (1 + sigma^2) and beta_t = 1 - abar_t / abar_prev: on
    the schedule's own sigmas this is DDPM's chain (diffusers' DDPMScheduler), on a subsequence
    the chain of DDIM's Table 1. ``variance``: "small" -- beta-tilde_t (``fixed_small``; DDIM
    with eta = 1); "large" -- beta_t (Ho et al. sec. 3.2, the "sigma-hat" row of DDIM's Table 1,
    ``fixed_large``); "none" -- no noise (deterministic, but *not* DDIM(eta = 0)). No noise on
    the last step to sigma = 0. With few steps "large" exceeds 1 - abar_prev, all the noise
    x_{t-1} can hold.
    """
    sigmas, s_in = check_sampler_input(x, sigmas)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **(extra_args or {}))
        report_step(callback, i, x, sigma, sigma_next, denoised)
        abar, abar_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        beta = 1 - abar / abar_prev                                     # beta_t of this step
        mu_tilde, beta_tilde = q_posterior(denoised, abar.sqrt() * x, abar, abar_prev, beta)
        var = {"small": beta_tilde, "large": beta, "none": torch.zeros_like(beta)}[variance]
        x_prev = mu_tilde
        if sigma_next > 0 and var > 0:
            x_prev = mu_tilde + var.sqrt() * draw_noise(x, generator)
        x = x_prev / abar_prev.sqrt()                                   # back to x_sigma
    return x


@torch.no_grad()
def sample(model: Callable, schedule: Schedule, shape: tuple[int, ...], *, target: str = "eps",
           generator: torch.Generator | None = None, device=None, model_kwargs: dict | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Ancestral sampling from x_T ~ N(0, I) down to x_0 at every t (Algorithm 2): chapter 1's
    call, run as :func:`sample_ddpm` on the schedule's T sigmas with ``model`` (predicting
    ``target``) wrapped by :class:`DiscreteTimeDenoiser` (t rounded: the integer chain).

    ``callback(t, x_t, x0_hat)`` is called at each step (for animations). x_T, then one noise
    per step but the last, is drawn on the CPU from ``generator``, so a seed gives the same
    samples on every device. Returns x_0 of ``shape`` on ``device``, in ``dtype`` (float32, as
    the noise is drawn; float64 for a network run in double precision).
    """
    if any((not isinstance(n, int)) or n <= 0 for n in shape):
        raise ValueError(f"shape must be positive integers, got {shape}")
    device = torch.device("cpu") if device is None else torch.device(device)
    x_T = draw_noise(torch.empty(shape, dtype=dtype, device=device), generator)
    denoiser = DiscreteTimeDenoiser(model, schedule.alphas_cumprod, prediction=target,
                                    quantize=True)
    sigmas = torch.cat([denoiser.sigmas.flip(0), torch.zeros(1, dtype=torch.float64)])

    def report(d):   # the contract's x_sigma back to chapter 1's x_t
        callback(schedule.T - 1 - d["i"], d["x"] / (1 + d["sigma"] ** 2).sqrt(), d["denoised"])
    return sample_ddpm(denoiser, x_T * (1 + sigmas[0] ** 2).sqrt(), sigmas, generator=generator,
                       callback=None if callback is None else report, extra_args=model_kwargs)
