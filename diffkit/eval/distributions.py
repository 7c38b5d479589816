"""Samples measured against an exact distribution: sliced W2 to fresh exact sets with its
true-vs-true floor, and the fit of samples to a Gaussian mixture's components."""

from __future__ import annotations

from typing import Callable

import torch

from diffkit import data
from diffkit.diffusion import ddpm
from diffkit.diffusion.score import check_points
from diffkit.eval.metrics import sliced_wasserstein


def distance_to_exact(samples: torch.Tensor, exact_sample: Callable, *,
                      generator: torch.Generator, repeats: int = 5,
                      n_projections: int = 128) -> dict:
    """Sliced W2 (Rabin et al. 2011) of samples (n, D) to fresh exact sets of n points, and the
    true-vs-true floor, both averaged over ``repeats`` fresh sets: dict(sliced_w2, floor, ratio).

    exact_sample(n, generator) -> (n, D). 128 directions are plenty in 2-D (one angle).
    """
    check_points(samples, "samples")
    n, distance, floor = samples.shape[0], 0.0, 0.0
    for _ in range(repeats):
        a, b = exact_sample(n, generator), exact_sample(n, generator)
        distance += sliced_wasserstein(samples, a, n_projections=n_projections,
                                               generator=generator) / repeats
        floor += sliced_wasserstein(b, a, n_projections=n_projections,
                                            generator=generator) / repeats
    return {"sliced_w2": distance, "floor": floor, "ratio": distance / floor}


def mixture_fit(gmm, x: torch.Tensor) -> dict:
    """Assign each point (n, D) to its most likely component (at sigma = 0); return the spread of
    the residuals x - mu_k (within_std, to compare with the components' std) and the component
    frequencies (weights, (K,)) with their total-variation distance to gmm.weights (weights_tv)."""
    check_points(x)
    k = gmm.component_posterior(x.double(), 0.0).argmax(1)
    weights = torch.bincount(k, minlength=gmm.K).double() / x.shape[0]
    return {"within_std": float((x.double() - gmm.means[k]).std()), "weights": weights,
            "weights_tv": float(0.5 * (weights - gmm.weights).abs().sum())}


def toy2d_quality(model, schedule, *, n=2000, seed=1, device="cpu", target="eps",
                  repeats: int = 5, distribution: str = "ring8") -> dict:
    """Sliced W2 of n DDPM samples of a 2-D model to fresh sets of n points of ``distribution``
    (``data.toy2d``), and of true to true (:func:`distance_to_exact`, 512 directions).

    Both are averaged over ``repeats`` fresh true sets: one draw of the floor is noisy (the
    8 modes' counts fluctuate), and the bar compares the two averages. Also returns the
    samples (n, 2) for plotting.
    """
    g = torch.Generator().manual_seed(seed)
    samples = ddpm.sample(model, schedule, (n, 2), target=target, generator=g,
                          device=device).cpu()
    measured = distance_to_exact(samples, lambda k, gen: data.toy2d(distribution, k, generator=gen),
                                 generator=g, repeats=repeats, n_projections=512)
    return {"n": n, "sliced_w2": measured["sliced_w2"], "sliced_w2_floor": measured["floor"],
            "ratio": measured["ratio"], "samples": samples}
