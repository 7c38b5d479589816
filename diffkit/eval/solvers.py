"""Measuring samplers (chapter 5): evaluation counts, step schedules, error against a reference.

* :class:`CountingDenoiser` counts the denoiser evaluations a sampler makes (its NFE).
* :func:`sigmas_exponential`: noise levels uniform in lambda = -log sigma (k-diffusion's
  ``get_sigmas_exponential``; the "logSNR" steps of Lu et al. 2022, DPM-Solver sec. 3.3).
* :func:`sample_euler_lambda`: plain Euler on dx/dlambda = D(x, e^-lambda) - x. It approximates
  the linear part -x as well, where the exponential integrator (DPM-Solver++(1) = DDIM = Euler in
  sigma) solves it exactly: the foil that shows what the exact linear part buys.
* :func:`error_at_sigma_min`, :func:`loglog_slope`, :func:`fewest_nfe`: error-vs-NFE curves.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from diffkit.diffusion.contract import check_sampler_input, report_step


class CountingDenoiser:
    """Wrap ``denoiser(x, sigma, **kw) -> x0_hat`` and count its calls in ``nfe``."""

    def __init__(self, denoiser: Callable[..., torch.Tensor]):
        self.denoiser, self.nfe = denoiser, 0

    def __call__(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, **kwargs)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n levels from sigma_max to sigma_min, equally spaced in log sigma, then 0: (n + 1,)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return torch.cat([log_sigmas.exp(), log_sigmas.new_zeros(1)])


@torch.no_grad()
def sample_euler_lambda(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, generator=None,
                        callback=None, extra_args: dict | None = None) -> torch.Tensor:
    """Plain Euler in lambda = -log sigma: x <- x + h (D - x), h = log(sigma / sigma_next).

    The exact flow of the linear part multiplies x by e^-h; Euler uses 1 - h, which is wrong by
    O(h^2) per step and flips sign for h > 1. The last step to sigma = 0 (h infinite) returns
    x0_hat, as every sampler of :mod:`diffkit.diffusion.samplers` does. Deterministic; ``generator`` unused.
    """
    sigmas, s_in = check_sampler_input(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma * s_in, **(extra_args or {}))
        report_step(callback, i, x, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = (sigma / sigma_next).log()
            x = x + h * (denoised - x)
    return x


def error_at_sigma_min(sampler, denoiser, x: torch.Tensor, reference: torch.Tensor,
                       sigmas: torch.Tensor) -> tuple[int, float]:
    """Run ``sampler`` from x (B, D) on ``sigmas`` (ending ``[..., sigma_min, 0]``) and return
    (NFE spent to reach sigma_min, RMS over the batch of |x(sigma_min) - reference|).

    The state at sigma_min is read from the callback of the last step, so the final jump to
    sigma = 0 (the same x0_hat for every sampler) and its one evaluation are not counted.
    """
    counted, seen = CountingDenoiser(denoiser), {}

    def callback(info):
        if info["sigma_next"] == 0:
            seen["x"], seen["nfe"] = info["x"], counted.nfe - 1
    sampler(counted, x.clone(), sigmas, callback=callback)
    if "x" not in seen:
        raise ValueError("sigmas must end in 0: the sampler never reported its last step")
    error = (seen["x"] - reference).flatten(1).norm(dim=1).pow(2).mean().sqrt()
    return seen["nfe"], float(error)


def loglog_slope(nfe: Sequence[float], error: Sequence[float]) -> float:
    """Least-squares slope of log(error) against log(nfe): -p for a method of order p."""
    nfe, error = np.asarray(nfe, dtype=float), np.asarray(error, dtype=float)
    if nfe.shape != error.shape or nfe.size < 2:
        raise ValueError("need at least two (nfe, error) pairs of equal length")
    if (nfe <= 0).any() or (error <= 0).any():
        raise ValueError("nfe and error must be positive to take logarithms")
    return float(np.polyfit(np.log(nfe), np.log(error), 1)[0])


def fewest_nfe(nfe: Sequence[int], values: Sequence[float], bar: float) -> int | None:
    """The smallest NFE whose value is <= bar (lower is better), or None if none reaches it."""
    if len(nfe) != len(values):
        raise ValueError("nfe and values must have the same length")
    passing = [n for n, v in zip(nfe, values) if v <= bar]
    return min(passing) if passing else None
