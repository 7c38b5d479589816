"""DDPM (Ho et al. 2020): forward marginal, posterior, training losses and the ancestral step.

Symbols (book/notation.md): x_0 data, x_t noisy sample, eps ~ N(0, I), beta_t, alpha_t,
abar_t, t an integer tensor of shape (B,) with values in [0, T).
"""

from __future__ import annotations

from typing import Callable

import torch

from diffkit.diffusion.schedules import Schedule

TARGETS = ("eps", "x0", "v")


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


def posterior_mean_variance(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor,
                            t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7).

    mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
    variance = (1 - abar_{t-1}) / (1 - abar_t) beta_t, shape (B, 1, ..., 1); zero at t = 0.
    """
    t = _check(schedule, t, x0=x0, x_t=x_t)
    abar, abar_prev = _at(schedule.alphas_cumprod, t, x0), _at(_abar_prev(schedule), t, x0)
    beta, alpha = _at(schedule.betas, t, x0), _at(schedule.alphas, t, x0)
    mean = (abar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1 - abar_prev) * x_t) / (1 - abar)
    variance = (1 - abar_prev) / (1 - abar) * beta
    return mean, variance


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
    if t is None:
        t = torch.randint(0, schedule.T, (batch,), generator=generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(schedule, x0, t, noise)
    wanted = {"eps": noise, "x0": x0, "v": None}[target]
    if wanted is None:
        wanted = v_target(schedule, x0, t, noise)
    output = model(x_t, t, **(model_kwargs or {}))
    return torch.nn.functional.mse_loss(output, wanted)


def p_step(schedule: Schedule, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
           noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (Ho et al. Algorithm 2, line 4).

    x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z, with
    sigma_t^2 the posterior variance (1 - abar_{t-1}) / (1 - abar_t) beta_t (diffusers'
    ``fixed_small``); no noise is added where t = 0.
    """
    t = _check(schedule, t, eps=eps, x_t=x_t, noise=noise)
    beta, alpha = _at(schedule.betas, t, x_t), _at(schedule.alphas, t, x_t)
    abar, abar_prev = _at(schedule.alphas_cumprod, t, x_t), _at(_abar_prev(schedule), t, x_t)
    mean = (x_t - beta / (1 - abar).sqrt() * eps) / alpha.sqrt()
    variance = (1 - abar_prev) / (1 - abar) * beta
    return mean + variance.sqrt() * noise


@torch.no_grad()
def sample(model: Callable, schedule: Schedule, shape: tuple[int, ...], *, target: str = "eps",
           generator: torch.Generator | None = None, device=None, model_kwargs: dict | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Ancestral sampling from x_T ~ N(0, I) down to x_0 with ``p_step`` at every t.

    ``callback(t, x_t, x0_hat)`` is called at each step (for animations). Noise is drawn on the
    CPU from ``generator`` so a seed gives the same samples on every device.
    """
    if any((not isinstance(n, int)) or n <= 0 for n in shape):
        raise ValueError(f"shape must be positive integers, got {shape}")
    device = torch.device("cpu") if device is None else torch.device(device)
    x = torch.randn(shape, generator=generator).to(device)
    table = schedule.to(device=device, dtype=x.dtype)
    for step in reversed(range(schedule.T)):
        t = torch.full((shape[0],), step, dtype=torch.long, device=device)
        output = model(x, t, **(model_kwargs or {}))
        x0_hat, eps = predict_x0_eps(table, output, x, t, target)
        if callback is not None:
            callback(step, x, x0_hat)
        noise = torch.randn(shape, generator=generator).to(device) if step > 0 else torch.zeros_like(x)
        x = p_step(table, eps, x, t, noise)
    return x
