"""Score-based models: denoising score matching, Langevin dynamics, the VP/VE SDEs, their samplers.

The score of the noised data density p_sigma (data x_0 plus sigma * eps) is tied to the denoiser by
Tweedie's formula (Robbins 1956; Efron 2011, "Tweedie's formula and selection bias"):

    grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2 = -eps_hat(x, sigma) / sigma,

so predicting the noise, the clean sample or the score is one model in three units. This module
adds the denoising score-matching loss, a sigma-conditioned network and (annealed) Langevin
dynamics; the VP/VE SDEs and their samplers are in :mod:`diffkit.diffusion.sde`.
Points are (B, D); sigma is a float or (B,).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from diffkit.diffusion.contract import check_generator, draw_noise
from diffkit.nn.mlp import MLPDenoiser

ScoreFn = Callable[..., torch.Tensor]


def check_points(x, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not torch.is_floating_point(x):
        raise ValueError(f"{what} must be a floating-point tensor of shape (B, D)")


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B, 1) column on x's device and dtype; sigma > 0 required."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if sigma.numel() not in (1, x.shape[0]):
        raise ValueError(f"sigma must be a float or of shape (B={x.shape[0]},), "
                         f"got {sigma.numel()} values")
    if not bool((sigma > 0).all()) or not bool(torch.isfinite(sigma).all()):
        raise ValueError("sigma must be finite and > 0")
    return sigma.expand(x.shape[0])[:, None]


# ---- Tweedie: denoiser <-> score <-> eps ---------------------------------------------------------
def denoiser_to_score(x: torch.Tensor, x0_hat: torch.Tensor, sigma) -> torch.Tensor:
    """Tweedie's formula (Efron 2011): grad log p_sigma(x) = (x0_hat - x) / sigma^2. x: (B, D)."""
    return (x0_hat - x) / _per_sample(sigma, x) ** 2


def score_to_eps(score: torch.Tensor, sigma) -> torch.Tensor:
    """eps_hat = E[eps | x] = -sigma * grad log p_sigma(x) (x = x0 + sigma eps)."""
    return -_per_sample(sigma, score) * score


# ---- denoising score matching ----------------------------------------------------------------
def dsm_loss(score_fn: ScoreFn, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
             *, reduce: bool = True) -> torch.Tensor:
    """Denoising score matching (Vincent 2011), weighted by sigma^2 (Song et al. 2021, eq. 7).

    Perturb x = x0 + sigma eps; the target is the kernel's score grad log q(x | x0) = -eps / sigma.
    Returns the mean over batch and coordinates of |sigma s(x, sigma) + eps|^2 (per sample, (B,),
    with ``reduce=False``); for a network predicting eps_hat = -sigma s it is the DDPM simple loss
    |eps - eps_hat|^2. x0, eps: (B, D); sigma: (B,) or a float.
    """
    check_points(x0, "x0")
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
    s = _per_sample(sigma, x0)
    per_sample = ((s * score_fn(x0 + s * eps, s[:, 0]) + eps) ** 2).mean(1)
    return per_sample.mean() if reduce else per_sample


def dsm_objective(sigma_min: float = 0.01, sigma_max: float = 10.0) -> Callable:
    """``loss_fn(model, batch, generator)`` for :func:`diffkit.train.train`: :func:`dsm_loss` of
    ``model.score`` with log sigma uniform on [log sigma_min, log sigma_max] and fresh eps."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")

    def loss_fn(model, batch, generator):
        x0 = batch[0]
        check_generator(generator)
        u = torch.rand(x0.shape[0], generator=generator)
        sigma = (math.log(sigma_min) + u * math.log(sigma_max / sigma_min)).exp().to(x0.device)
        eps = draw_noise(x0.float(), generator).to(x0.dtype)   # float32 draws, as trained
        return dsm_loss(model.score, x0, sigma, eps)
    return loss_fn


class ScoreNet(nn.Module):
    """A noise-conditional score network s_theta(x, sigma) (Song & Ermon 2019) built on MLPDenoiser.

    The MLP predicts eps from the rescaled input x / sqrt(1 + sigma^2) (unit scale at every sigma)
    and a "time" c_noise = 1000 (log sigma + 7) / 14, which maps sigma in [1e-3, 1e3] onto the
    [0, 1000) range its sinusoidal embedding was designed for. forward(x, sigma) -> eps_hat;
    score = -eps_hat / sigma; denoise = x - sigma eps_hat (the sampler contract). x: (B, D).
    """

    def __init__(self, dim: int = 2, width: int = 128, depth: int = 3, emb_dim: int = 64):
        super().__init__()
        self.net = MLPDenoiser(dim=dim, width=width, depth=depth, emb_dim=emb_dim)

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        check_points(x)
        s = _per_sample(sigma, x)
        c_noise = 1000.0 * (s[:, 0].log() + 7.0) / 14.0
        return self.net(x / (1 + s ** 2).sqrt(), c_noise)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return -self(x, sigma) / _per_sample(sigma, x)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return x - _per_sample(sigma, x) * self(x, sigma)


# ---- Langevin dynamics ---------------------------------------------------------------------------
@torch.no_grad()
def langevin(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, step_size: float,
             n_steps: int, *, generator: torch.Generator | None = None,
             callback: Callable | None = None) -> torch.Tensor:
    """Unadjusted Langevin (Song & Ermon 2019, eq. 4): x <- x + (e/2) grad log p(x) + sqrt(e) z.

    score_fn(x) -> (B, D). Samples p only as e -> 0 and n_steps -> inf: for N(m, s^2) the chain's
    stationary law is N(m, s^2 / (1 - e / (4 s^2))). callback(k, x) after each step.
    """
    check_points(x)
    if not step_size > 0 or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"need step_size > 0 and an integer n_steps >= 1, got "
                         f"{step_size}, {n_steps!r}")
    for k in range(n_steps):
        x = x + 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * draw_noise(x, generator)
        if callback is not None:
            callback(k, x)
    return x


def annealed_langevin(score_fn: ScoreFn, x: torch.Tensor, sigmas, *, n_steps_each: int = 100,
                      step_lr: float = 2e-5, generator: torch.Generator | None = None,
                      callback: Callable | None = None) -> torch.Tensor:
    """Annealed Langevin dynamics, Song & Ermon 2019 Algorithm 1.

    For each sigma_i of a decreasing sequence, run n_steps_each Langevin steps on
    score_fn(x, sigma_i) with step alpha_i = step_lr * sigma_i^2 / sigma_L^2. Returns samples of
    (approximately) p_{sigma_L}. callback(i, x) after each noise level.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if sigmas.numel() < 1 or not bool((sigmas > 0).all()) \
            or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be a non-empty, strictly decreasing sequence of values > 0")
    for i, sigma in enumerate(sigmas.tolist()):
        alpha = step_lr * sigma ** 2 / float(sigmas[-1]) ** 2
        x = langevin(lambda y: score_fn(y, sigma), x, alpha, n_steps_each, generator=generator)
        if callback is not None:
            callback(i, x)
    return x
