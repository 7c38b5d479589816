"""The SDEs of Song et al. 2021 (VE and VP), the score of a denoiser under them, and their
reverse-SDE and probability-flow-ODE samplers. Points are (B, D); SDE time t is a float in (0, 1].

On the sampler contract: in x_sigma = x(t) / scale(t) both SDEs are dx = sqrt(d[sigma^2]/dt) dw
(for VP, Ito on x / scale cancels the drift), so they differ only by sigma(t): the contract's
``sample_euler`` / ``sample_heun`` on sigmas = sigma(t_i) integrate the probability-flow ODE
dx/dsigma = (x - D) / sigma (Karras et al. 2022, eq. 3) and ``sample_euler_ancestral`` the
reverse SDE, stepping in sigma. Stepping in t as the paper writes them (Euler-Maruyama's
g(t)^2 dt, the VP drift) needs the SDE itself: :mod:`diffkit.diffusion.sde_samplers` has those
samplers on the contract with ``sde=`` as an option, and the score-function calls below
(chapter 4's) are thin wrappers of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from diffkit.diffusion.score import ScoreFn, check_points
from diffkit.diffusion.sde_samplers import sample_probability_flow, sample_reverse_sde


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

    def t_of_sigma(self, sigma: float) -> float:
        """The time at which sigma(t) = sigma (the inverse of ``sigma``)."""
        return math.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

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

    def t_of_sigma(self, sigma: float) -> float:
        """The time at which sigma(t) = sigma: the root of beta_min t + (beta_max - beta_min) t^2
        / 2 = log(1 + sigma^2), written 2c / (b + sqrt(b^2 + 4ac)) to avoid cancellation."""
        a, b, c = 0.5 * (self.beta_max - self.beta_min), self.beta_min, math.log1p(sigma ** 2)
        return 2 * c / (b + math.sqrt(b * b + 4 * a * c))

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


def denoiser_from_score(score_fn: ScoreFn, sde, times: dict[float, float] | None = None):
    """D(x_sigma, sigma) = x_sigma + scale sigma^2 score_fn(scale x_sigma, t) for t = t(sigma),
    Tweedie's formula read backwards (the inverse of :func:`score_from_denoiser`). ``times`` maps
    noise levels to the exact SDE times they came from (else ``sde.t_of_sigma``)."""
    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        level = float(sigma.reshape(-1)[0])
        t = (times or {}).get(level)
        t = sde.t_of_sigma(level) if t is None else t
        s = sde.scale(t)
        return x + s * level ** 2 * score_fn(s * x, t)
    return denoiser


def _on_the_grid(sampler, score_fn: ScoreFn, sde, x: torch.Tensor, n_steps: int, t_end: float,
                 callback, **options) -> torch.Tensor:
    """Run a contract sampler of :mod:`diffkit.diffusion.sde_samplers` on the levels of a uniform
    grid in t from 1 to t_end (then 0) and return x(t_end) = scale x_sigma at the last level,
    as chapter 4 measures it; ``callback(i, t_next, x(t_next))`` after each step."""
    check_points(x)
    ts = _time_grid(n_steps, t_end)
    levels = [sde.sigma(t) for t in ts]
    sigmas = torch.tensor(levels + [0.0], dtype=torch.float64)
    at_level = {}

    def keep(step):
        i = step["i"]
        if i >= 1:
            at_level[i] = sde.scale(ts[i]) * step["x"]
            if callback is not None:
                callback(i - 1, ts[i], at_level[i])

    sampler(denoiser_from_score(score_fn, sde, dict(zip(levels, ts))), x / sde.scale(ts[0]),
            sigmas.to(x.dtype), sde=sde, callback=keep, **options)
    return at_level[n_steps]


def reverse_sde_sample(score_fn: ScoreFn, sde, x: torch.Tensor, n_steps: int, *,
                       t_end: float = 1e-3, generator: torch.Generator | None = None,
                       callback: Callable | None = None) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE dx = [f(x,t) - g(t)^2 grad log p_t(x)] dt + g(t) dw_bar
    (Anderson 1982; Song et al. 2021, eq. 6), from t = 1 to t_end on a uniform grid: a thin
    wrapper of :func:`~diffkit.diffusion.sde_samplers.sample_reverse_sde` for a score function.

    x: (B, D) drawn from the prior (``sde.prior_sample``). The last step adds no noise (the
    "denoised" mean, as in Song et al.'s code). callback(i, t_next, x) after each step.
    """
    return _on_the_grid(sample_reverse_sde, score_fn, sde, x, n_steps, t_end, callback,
                        generator=generator)


def probability_flow_sample(score_fn: ScoreFn, sde, x: torch.Tensor, n_steps: int, *,
                            t_end: float = 1e-3, method: str = "heun",
                            callback: Callable | None = None) -> torch.Tensor:
    """The probability-flow ODE dx/dt = f(x,t) - g(t)^2 grad log p_t(x) / 2 (Song et al. 2021,
    eq. 13), Euler or Heun (2nd order) from t = 1 to t_end on a uniform grid, deterministic: a
    thin wrapper of :func:`~diffkit.diffusion.sde_samplers.sample_probability_flow`."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    return _on_the_grid(sample_probability_flow, score_fn, sde, x, n_steps, t_end, callback,
                        method=method)


def marginal_sample(gmm, sde, t: float, n: int, generator: torch.Generator | None = None):
    """n exact draws (n, D) of the SDE's marginal at time t on a Gaussian mixture:
    s(t) (x_0 + sigma(t) eps)."""
    x0 = gmm.sample(n, generator)
    return sde.scale(t) * (x0 + sde.sigma(t) * torch.randn(x0.shape, generator=generator,
                                                           dtype=x0.dtype))
