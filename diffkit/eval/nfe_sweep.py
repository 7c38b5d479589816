"""Samplers against their budget of evaluations (chapter 5): error curves on the exact mixture,
a sweep of samplers over NFE budgets on a trained denoiser, judged, the per-sample distance to
an ODE limit, and pixel statistics that say how a failed sample failed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from diffkit.diffusion.samplers import sample_heun, sigmas_karras
from diffkit.eval import metrics
from diffkit.eval.solvers import CountingDenoiser, error_at_sigma_min


def error_curve(sampler: Callable, gmm, x_start: torch.Tensor, x_exact: torch.Tensor,
                levels: Sequence[int], *, sigma_min: float, sigma_max: float,
                spacing: Callable = sigmas_karras) -> list[tuple[int, float]]:
    """[(NFE, RMS error at sigma_min)] of ``sampler`` on the mixture, for each number of noise
    levels in ``levels`` placed by ``spacing(n, sigma_min, sigma_max)``."""
    if not levels:
        raise ValueError("levels must hold at least one number of noise levels")
    return [error_at_sigma_min(sampler, gmm, x_start, x_exact, spacing(n, sigma_min, sigma_max))
            for n in levels]


def steps_for_budget(sampler: Callable, budget: int) -> int:
    """The most steps ``sampler`` can take within ``budget`` evaluations: Heun pays 2n - 1 for n
    steps (its last step is Euler), every other sampler of the chapter one per step."""
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    return (budget + 1) // 2 if sampler is sample_heun else budget


def sweep_budgets(samplers: dict, denoiser: Callable, noise: torch.Tensor, budgets: Sequence[int],
                  judge, *, sigma_min: float, sigma_max: float, keep: int, seed: int = 2) -> dict:
    """Run every sampler at every budget on Karras sigmas from the same ``noise`` (N, ...),
    judged: {(name, budget): {nfe, seconds, head, samples, report}}. ``head`` is the first
    ``keep`` samples unclamped (for distances to an ODE limit), ``samples`` all of them clamped
    to [-1, 1], ``report`` ``metrics.judge_report``. Each run checks its NFE count."""
    if not 1 <= keep <= len(noise):
        raise ValueError(f"keep must lie in [1, {len(noise)}], got {keep}")
    runs = {}
    for name, sampler in samplers.items():
        for budget in budgets:
            steps = steps_for_budget(sampler, budget)
            sigmas = sigmas_karras(steps, sigma_min, sigma_max)
            counted = CountingDenoiser(denoiser)
            start = time.perf_counter()
            out = sampler(counted, noise * sigmas[0], sigmas,
                          generator=torch.Generator().manual_seed(seed))
            seconds = time.perf_counter() - start
            expected = 2 * steps - 1 if sampler is sample_heun else steps
            if counted.nfe != expected or counted.nfe > budget:
                raise RuntimeError(f"{name}: {counted.nfe} evaluations, expected {expected} "
                                   f"within a budget of {budget}")
            runs[name, budget] = {"nfe": counted.nfe, "seconds": seconds,
                                  "head": out[:keep].cpu(), "samples": out.clamp(-1, 1).cpu(),
                                  "report": metrics.judge_report(judge, out.clamp(-1, 1))}
    return runs


# the per-sample distance to the ODE limit chapter 5 calls ``rms_distance``
rms_distance = metrics.rms_per_image


def pixel_stats(x: torch.Tensor) -> dict:
    """How unclamped samples (N, ...) on the [-1, 1] pixel scale look: ``saturated``, the share
    of pixels beyond +-1 (clipped when shown); ``contrast``, the mean over samples of the pixel
    standard deviation within a sample (small for washed-out gray images)."""
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"x must be (N, ...) with N >= 1, got {tuple(x.shape)}")
    flat = x.detach().flatten(1).double()
    return {"saturated": float((flat.abs() > 1).double().mean()),
            "contrast": float(flat.std(1).mean())}


def noise_band(values: Sequence[float]) -> float:
    """Width (max - min) of a set of repeated measurements: the spread a difference must beat."""
    if len(values) < 2:
        raise ValueError("need at least two measurements for a spread")
    return float(max(values) - min(values))
