"""Score-based models: denoising score matching, Langevin dynamics, the VP/VE SDEs, their samplers.

The score of the noised data density p_sigma (data x_0 plus sigma * eps) is tied to the denoiser by
Tweedie's formula (Robbins 1956; Efron 2011, "Tweedie's formula and selection bias"):

    grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2 = -eps_hat(x, sigma) / sigma,

so predicting the noise, the clean sample or the score is one model in three units. This module
adds the denoising score-matching loss, a sigma-conditioned network, (annealed) Langevin dynamics,
and the VP/VE SDEs of Song et al. 2021 with reverse-SDE and probability-flow-ODE samplers.
Points are (B, D); sigma is a float or (B,); SDE time t is a float in (0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import metrics
from .nets import MLPDenoiser

ScoreFn = Callable[..., torch.Tensor]


def _check_points(x, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or not torch.is_floating_point(x):
        raise ValueError(f"{what} must be a floating-point tensor of shape (B, D)")


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


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
    _check_points(x0, "x0")
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
        u = torch.rand(x0.shape[0], generator=generator)
        sigma = (math.log(sigma_min) + u * math.log(sigma_max / sigma_min)).exp().to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
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
        _check_points(x)
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
    _check_points(x)
    if not step_size > 0 or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"need step_size > 0 and an integer n_steps >= 1, got "
                         f"{step_size}, {n_steps!r}")
    for k in range(n_steps):
        x = x + 0.5 * step_size * score_fn(x) + math.sqrt(step_size) * _noise(x, generator)
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


# ---- the SDEs of Song et al. 2021: both have marginals x(t) = scale(t) (x_0 + sigma(t) eps) ----
@dataclass(frozen=True)
class VESDE:
    """Variance exploding: dx = sqrt(d[sigma^2(t)]/dt) dw, sigma(t) = sigma_min (sigma_max /
    sigma_min)^t (Song et al. 2021, eq. 9 and app. C). Prior N(0, sigma_max^2 I). The process is
    taken to start from data already noised to sigma_min, so its marginal is exactly p_sigma(t)."""
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got "
                             f"{self.sigma_min}, {self.sigma_max}")

    def sigma(self, t: float) -> float:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def scale(self, t: float) -> float:
        return 1.0

    def drift(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: float) -> float:
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def prior_sample(self, shape, generator=None, dtype=torch.float64) -> torch.Tensor:
        return self.sigma_max * torch.randn(shape, generator=generator, dtype=dtype)


@dataclass(frozen=True)
class VPSDE:
    """Variance preserving: dx = -beta(t)/2 x dt + sqrt(beta(t)) dw, beta linear from beta_min to
    beta_max (Song et al. 2021, eq. 11 and app. B: DDPM's chain with beta_i = beta(i/N)/N, large N).
    abar(t) = exp(-int_0^t beta) = scale(t)^2, sigma(t) = sqrt(1/abar - 1). Prior N(0, I)."""
    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_abar(self, t: float) -> float:
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2)

    def sigma(self, t: float) -> float:
        return math.sqrt(math.expm1(-self.log_abar(t)))

    def scale(self, t: float) -> float:
        return math.exp(0.5 * self.log_abar(t))

    def drift(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return -0.5 * self.beta(t) * x

    def diffusion(self, t: float) -> float:
        return math.sqrt(self.beta(t))

    def prior_sample(self, shape, generator=None, dtype=torch.float64) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)


def score_from_denoiser(denoiser: Callable, sde) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """score_fn(x, t) = grad log p_t(x) for x(t) = s (x_0 + sigma eps), from a denoiser D(x, sigma):
    (s D(x / s, sigma) - x) / (s^2 sigma^2), Tweedie's formula after the change of variables."""
    def score_fn(x: torch.Tensor, t: float) -> torch.Tensor:
        s, sigma = sde.scale(t), sde.sigma(t)
        x0_hat = denoiser(x / s, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device))
        return (s * x0_hat - x) / (s * sigma) ** 2
    return score_fn


def _time_grid(n_steps: int, t_end: float) -> list[float]:
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if not 0 < t_end < 1:
        raise ValueError(f"t_end must lie in (0, 1), got {t_end}")
    return torch.linspace(1.0, t_end, n_steps + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def reverse_sde_sample(score_fn: ScoreFn, sde, x: torch.Tensor, n_steps: int, *,
                       t_end: float = 1e-3, generator: torch.Generator | None = None,
                       callback: Callable | None = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE dx = [f(x,t) - g(t)^2 grad log p_t(x)] dt + g(t) dw_bar
    (Anderson 1982; Song et al. 2021, eq. 6), from t = 1 to t_end on a uniform grid.

    x: (B, D) drawn from the prior (``sde.prior_sample``). The last step adds no noise (the
    "denoised" mean, as in Song et al.'s code). callback(i, t_next, x) after each step.
    """
    _check_points(x)
    ts = _time_grid(n_steps, t_end)
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t                                                # < 0: backwards in time
        g = sde.diffusion(t)
        x = x + (sde.drift(x, t) - g ** 2 * score_fn(x, t)) * dt
        if i < n_steps - 1:
            x = x + g * math.sqrt(-dt) * _noise(x, generator)
        if callback is not None:
            callback(i, t_next, x)
    return x


@torch.no_grad()
def probability_flow_sample(score_fn: ScoreFn, sde, x: torch.Tensor, n_steps: int, *,
                            t_end: float = 1e-3, method: str = "heun",
                            callback: Callable | None = None) -> torch.Tensor:
    """The probability-flow ODE dx/dt = f(x,t) - g(t)^2 grad log p_t(x) / 2 (Song et al. 2021,
    eq. 13), Euler or Heun (2nd order) from t = 1 to t_end on a uniform grid. Deterministic."""
    _check_points(x)
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    ts = _time_grid(n_steps, t_end)

    def velocity(y, t):
        return sde.drift(y, t) - 0.5 * sde.diffusion(t) ** 2 * score_fn(y, t)

    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = t_next - t
        d_cur = velocity(x, t)
        x_next = x + d_cur * dt
        if method == "heun":
            x_next = x + 0.5 * (d_cur + velocity(x_next, t_next)) * dt
        x = x_next
        if callback is not None:
            callback(i, t_next, x)
    return x


def marginal_sample(gmm, sde, t: float, n: int, generator: torch.Generator | None = None):
    """n exact draws (n, D) of the SDE's marginal at time t on a Gaussian mixture:
    s(t) (x_0 + sigma(t) eps)."""
    x0 = gmm.sample(n, generator)
    return sde.scale(t) * (x0 + sde.sigma(t) * torch.randn(x0.shape, generator=generator,
                                                           dtype=x0.dtype))


# ---- measuring samples against an exact sampler --------------------------------------------------
def distance_to_exact(samples: torch.Tensor, exact_sample: Callable, *,
                      generator: torch.Generator, repeats: int = 5,
                      n_projections: int = 128) -> dict:
    """Sliced W2 (Rabin et al. 2011) of samples (n, D) to fresh exact sets of n points, and the
    true-vs-true floor, both averaged over ``repeats`` fresh sets: dict(sliced_w2, floor, ratio).

    exact_sample(n, generator) -> (n, D). 128 directions are plenty in 2-D (one angle).
    """
    _check_points(samples, "samples")
    n, distance, floor = samples.shape[0], 0.0, 0.0
    for _ in range(repeats):
        a, b = exact_sample(n, generator), exact_sample(n, generator)
        distance += metrics.sliced_wasserstein(samples, a, n_projections=n_projections,
                                               generator=generator) / repeats
        floor += metrics.sliced_wasserstein(b, a, n_projections=n_projections,
                                            generator=generator) / repeats
    return {"sliced_w2": distance, "floor": floor, "ratio": distance / floor}


def mixture_fit(gmm, x: torch.Tensor) -> dict:
    """Assign each point (n, D) to its most likely component (at sigma = 0); return the spread of
    the residuals x - mu_k (within_std, to compare with the components' std) and the component
    frequencies (weights, (K,)) with their total-variation distance to gmm.weights (weights_tv)."""
    _check_points(x)
    k = gmm.component_posterior(x.double(), 0.0).argmax(1)
    weights = torch.bincount(k, minlength=gmm.K).double() / x.shape[0]
    return {"within_std": float((x.double() - gmm.means[k]).std()), "weights": weights,
            "weights_tv": float(0.5 * (weights - gmm.weights).abs().sum())}
