"""Samplers on one contract: a denoiser ``D(x, sigma) -> x0_hat`` and a decreasing list of sigmas.

A sampler is ``sample_NAME(denoiser, x, sigmas, *, generator=None, callback=None, ...) -> x``:
``sigmas`` is a strictly decreasing 1-D tensor ending in exactly 0, ``x`` starts as
``noise * sigmas[0]``, the loop reads like the paper's algorithm box (k-diffusion style), and all
randomness comes from ``generator``. ``extra_args`` (a dict) is passed to every denoiser call, so
conditioning and guidance live in the denoiser. Samplers run under ``torch.no_grad()``; a
denoiser that needs gradients (classifier guidance) opens ``torch.enable_grad()`` itself.

Networks over integer t that predict eps, x0 or v are wrapped once by
:class:`diffkit.diffusion.denoisers.DiscreteTimeDenoiser`. ``sample_ddpm`` lives with DDPM's
posterior in :mod:`diffkit.diffusion.ddpm` and is listed here with the others.
Every sampler equals its diffusers scheduler (tests/test_samplers.py: float64 tables to 1e-6,
float32 tables to 1e-4). Where diffusers is not self-consistent the tests assert the gap:

* Euler/Heun, "linspace" spacing: t is fractional unless (T - 1) / (n - 1) is an integer. sigma(t)
  is then a linear interpolation of the table in t (diffkit: in log sigma, as k-diffusion), and
  the model's t is not ``_sigma_to_t`` of its sigma. ``init_noise_sigma`` is sigma_max, but
  sqrt(sigma_max^2 + 1) for "leading". Euler's and DPM-Solver's ``step`` round the sample to
  float32 even when everything else is float64.
* DPMSolverMultistep with Karras sigmas rounds the model's t (``DiscreteTimeDenoiser(quantize=True)``
  matches); for "squaredcos_cap_v2" it truncates t instead, repeats t = 998 and, run as a plain
  loop, steps past its sigma table (IndexError) unless ``set_begin_index(0)`` is called.
* DDIM steps from t to t - T // n, not to the next listed timestep for "linspace" (and "trailing"
  when n does not divide T); ``set_alpha_to_one=False`` ends at sigma(t=0) > 0, returning x_t
  there instead of x0_hat. DDIM/DDPM clip x0_hat to [-1, 1] by default (``clip_sample``); parity
  needs ``clip_sample=False``.
"""

from __future__ import annotations

import numpy as np
import torch

from diffkit.diffusion.contract import Denoiser, check_sampler_input, draw_noise, report_step
from diffkit.diffusion.ddim import ddim_sigma
from diffkit.diffusion.ddpm import sample_ddpm

__all__ = ["get_ancestral_step", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_euler",
           "sample_euler_ancestral", "sample_heun", "sigmas_karras", "spaced_timesteps"]

SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(n: int, T: int = 1000, spacing: str = "leading",
                     steps_offset: int = 0) -> list[int]:
    """The n integer timesteps diffusers' DDIM/DDPM schedulers use (Lin et al. 2023, Table 2)."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"n must be an integer in [1, T={T}], got {n!r}")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    else:
        t = np.round(np.arange(T, 0, -T / n)) - 1
    return [int(v) for v in t]


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n levels from sigma_max to sigma_min, then 0. (n + 1,) float64."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 < sigma_min < sigma_max or rho <= 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got "
                         f"{sigma_min}, {sigma_max}, {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float = 1.0):
    """Split sigma -> sigma_next into an ODE step to sigma_down plus fresh noise sigma_up.

    sigma_down^2 + sigma_up^2 = sigma_next^2, with sigma_up^2 = eta^2 sigma_next^2 (sigma^2 -
    sigma_next^2) / sigma^2: DDIM's eq. 16 variance in sigma space (k-diffusion).
    """
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                                / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None,
                 callback=None, extra_args: dict | None = None) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3)."""
    sigmas, s_in = check_sampler_input(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **(extra_args or {}))
        report_step(callback, i, x, sigma, sigma_next, denoised)
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                           eta: float = 1.0, generator=None, callback=None,
                           extra_args: dict | None = None) -> torch.Tensor:
    """Euler step to sigma_down, then fresh noise of std sigma_up (k-diffusion; DDIM eq. 16)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    sigmas, s_in = check_sampler_input(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **(extra_args or {}))
        report_step(callback, i, x, sigma, sigma_next, denoised)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + draw_noise(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_heun(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None,
                callback=None, extra_args: dict | None = None) -> torch.Tensor:
    """Heun's 2nd-order method, EDM Algorithm 1 (deterministic): 2 evaluations per step,
    1 on the last step to sigma = 0 where the correction would divide by zero."""
    sigmas, s_in = check_sampler_input(x, sigmas)
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, t_cur * s_in, **(extra_args or {}))
        report_step(callback, i, x, t_cur, t_next, denoised)
        d_cur = (x - denoised) / t_cur                                     # Alg. 1, line 4
        x_next = x + (t_next - t_cur) * d_cur                              # line 5 (Euler)
        if t_next > 0:                                                     # line 6
            denoised_next = denoiser(x_next, t_next * s_in, **(extra_args or {}))
            d_prime = (x_next - denoised_next) / t_next                    # line 7
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)  # line 8
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None,
                    callback=None, extra_args: dict | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2, in t = -log sigma.

    First step first order (no history); last step to sigma = 0 first order, which returns
    x0_hat (diffusers' ``lower_order_final`` with ``final_sigmas_type="zero"``).
    """
    sigmas, s_in = check_sampler_input(x, sigmas)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **(extra_args or {}))
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised                                   # DPM-Solver++(1) to sigma = 0
        else:
            t, t_next = -sigma.log(), -sigma_next.log()
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised                      # first step: DPM-Solver++(1)
            else:
                r = (t - (-sigmas[i - 1].log())) / h       # r_i = h_{i-1} / h_i
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised  # D_i
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_d   # alpha = 1 for x_sigma
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, eta: float = 0.0,
                generator=None, callback=None, extra_args: dict | None = None) -> torch.Tensor:
    """DDIM, Song et al. 2021 eq. 12 with the eq. 16 variance scaled by eta, in sigma space.

    With abar = 1 / (1 + sigma^2) and x_t = sqrt(abar) x. eta = 0 is exactly Euler in sigma;
    eta = 1 is the DDPM posterior step (:func:`sample_ddpm`) and equals Euler-ancestral. eta > 1
    would ask for more noise than x_{t-1} can hold (std^2 > 1 - abar_prev): refused.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 1:
        raise ValueError(f"eta must be <= 1 (eta > 1 asks for a noise std above "
                         f"sqrt(1 - abar_prev)), got {eta}")
    sigmas, s_in = check_sampler_input(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **(extra_args or {}))
        report_step(callback, i, x, sigma, sigma_next, denoised)
        eps = (x - denoised) / sigma                                    # eps_hat(x_t)
        abar, abar_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
        std = ddim_sigma(abar, abar_prev, eta)                          # eq. 16
        dir_xt = (1 - abar_prev - std ** 2).clamp(min=0).sqrt() * eps   # "direction to x_t"
        x_prev = abar_prev.sqrt() * denoised + dir_xt                   # eq. 12, in x_t space
        if std > 0:
            x_prev = x_prev + std * draw_noise(x, generator)
        x = x_prev / abar_prev.sqrt()                                   # back to x_sigma
    return x
