"""The reverse SDE and the probability-flow ODE of a VE or VP SDE (Song et al. 2021) as samplers
on the contract: ``sample_NAME(denoiser, x, sigmas, *, sde, generator=None, callback=None)``.

x is x_sigma = x(t) / scale(t) and ``sigmas`` the noise levels sigma(t_i) of the SDE's times,
ending in 0. Each step goes back to the SDE's own variable x(t) = scale(t) x_sigma and time
t_i = ``sde.t_of_sigma(sigma_i)``, takes the score from the denoiser by Tweedie's formula,
grad log p_t(x(t)) = (scale D(x_sigma, sigma) - x(t)) / (scale sigma)^2, and steps in t as the
paper writes the equation: Euler-Maruyama on the reverse SDE (eq. 6), Euler or Heun on the
probability-flow ODE (eq. 13). The step into the last level before 0 adds no noise (the
"denoised" mean of Song et al.'s code), and the step to sigma = 0 returns x0_hat = D(x, sigma).
Chapter 4's ``sde.reverse_sde_sample`` / ``sde.probability_flow_sample`` (a score function, a
uniform grid in t, and x(t) at t_end) are thin wrappers around these two.
"""

from __future__ import annotations

import math

import torch

from diffkit.diffusion.contract import Denoiser, check_sampler_input, draw_noise, report_step


def _score(sde, denoiser, x, sigma, s_in, extra_args):
    """(x(t), t, scale, score at x(t), x0_hat) for x = x_sigma at the level sigma."""
    t = sde.t_of_sigma(float(sigma))
    s = sde.scale(t)
    denoised = denoiser(x, sigma * s_in, **(extra_args or {}))
    x_t = s * x
    return x_t, t, s, (s * denoised - x_t) / (s * sigma) ** 2, denoised


@torch.no_grad()
def sample_reverse_sde(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, sde,
                       generator=None, callback=None,
                       extra_args: dict | None = None) -> torch.Tensor:
    """Euler-Maruyama on dx = [f(x,t) - g(t)^2 grad log p_t(x)] dt + g(t) dw_bar (Anderson 1982;
    Song et al. 2021, eq. 6) over the times of ``sigmas``; the last step returns x0_hat."""
    sigmas, s_in = check_sampler_input(x, sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_t, t, _, score, denoised = _score(sde, denoiser, x, sigma, s_in, extra_args)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            return denoised
        t_next = sde.t_of_sigma(float(sigma_next))
        dt, g = t_next - t, sde.diffusion(t)                          # dt < 0: back in time
        x_t = x_t + (sde.drift(x_t, t) - g ** 2 * score) * dt
        if i < n - 2:                                                 # not into the last level
            x_t = x_t + g * math.sqrt(-dt) * draw_noise(x_t, generator)
        x = x_t / sde.scale(t_next)
    return x


@torch.no_grad()
def sample_probability_flow(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, sde,
                            method: str = "heun", generator=None, callback=None,
                            extra_args: dict | None = None) -> torch.Tensor:
    """Euler or Heun in t on dx/dt = f(x,t) - g(t)^2 grad log p_t(x) / 2 (Song et al. 2021,
    eq. 13) over the times of ``sigmas``; deterministic; the last step returns x0_hat."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    sigmas, s_in = check_sampler_input(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_t, t, _, score, denoised = _score(sde, denoiser, x, sigma, s_in, extra_args)
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            return denoised
        t_next = sde.t_of_sigma(float(sigma_next))
        dt = t_next - t
        d_cur = sde.drift(x_t, t) - 0.5 * sde.diffusion(t) ** 2 * score
        x_next = x_t + d_cur * dt
        if method == "heun":
            s_next = sde.scale(t_next)
            _, _, _, score_next, _ = _score(sde, denoiser, x_next / s_next, sigma_next, s_in,
                                            extra_args)
            d_next = sde.drift(x_next, t_next) - 0.5 * sde.diffusion(t_next) ** 2 * score_next
            x_next = x_t + 0.5 * (d_cur + d_next) * dt
        x = x_next / sde.scale(t_next)
    return x
