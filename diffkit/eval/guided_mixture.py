"""Guided sampling on the labelled mixture of chapter 7, measured: where the points of class 1
land (share at the far component C; mean and spread of the points at B) for weighted grid
points (the exact tilted density) or samples, their Monte Carlo standard errors, and the
distance between two such measurements in standard errors."""

from __future__ import annotations

import math

import torch

FIGURES = ("share at C", "B mean x1", "B std x1", "B std x2", "C mean x2")
"""The figures :func:`moments` returns (besides the count ``n_B``), in table order."""

TESTED = ("share at C", "B mean x1", "C mean x2")
"""The figures :func:`standard_errors` gives a standard error for."""


def moments(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, weight=None) -> dict:
    """Where the points x (N, 2) of class 1 are: each goes to the nearer of the means b and c
    (2,). Returns the (weighted) share at C, B's mean and std along x1 (towards A) and its std
    along x2, C's mean height x2, and ``n_B``, the number of points at B.

    ``weight`` (N,), non-negative, turns grid points into a density (the exact tilted density
    on a fine grid); None weighs every point equally (samples).
    """
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"x must be (N, 2), got {tuple(x.shape)}")
    weight = torch.ones(len(x), dtype=x.dtype) if weight is None else weight.to(x.dtype)
    if weight.shape != (len(x),) or (weight < 0).any() or weight.sum() <= 0:
        raise ValueError("weight must be (N,), non-negative, with a positive sum")
    weight = weight / weight.sum()
    at_b = (x - b).norm(dim=1) < (x - c).norm(dim=1)
    if weight[at_b].sum() <= 0 or weight[~at_b].sum() <= 0:
        raise ValueError("both components need points (or weight) to measure their moments")
    wb = weight[at_b] / weight[at_b].sum()
    mean_b = (wb[:, None] * x[at_b]).sum(0)
    std_b = (wb[:, None] * (x[at_b] - mean_b) ** 2).sum(0).sqrt()
    wc = weight[~at_b] / weight[~at_b].sum()
    return {"share at C": float(weight[~at_b].sum()), "B mean x1": float(mean_b[0]),
            "B std x1": float(std_b[0]), "B std x2": float(std_b[1]),
            "C mean x2": float((wc * x[~at_b, 1]).sum()), "n_B": int(at_b.sum())}


def standard_errors(r: dict, n: int, c_std: float = 0.5) -> dict:
    """Monte Carlo standard errors of :func:`moments` of n samples: binomial for the share at
    C, std / sqrt(n_B) for B's mean, ``c_std`` / sqrt(n - n_B) for C's mean height."""
    n_b = r["n_B"]
    if not 0 < n_b < n:
        raise ValueError(f"need 0 < n_B < n, got n_B = {n_b}, n = {n}")
    share = r["share at C"]
    return {"share at C": math.sqrt(share * (1 - share) / n),
            "B mean x1": r["B std x1"] / math.sqrt(n_b),
            "C mean x2": c_std / math.sqrt(n - n_b)}


def z_score(r: dict, reference: dict, n: int, key: str, reference_n: int | None = None) -> float:
    """(r - reference) in standard errors for figure ``key``: the reference is exact (the
    tilted density) when ``reference_n`` is None, else another set of ``reference_n`` samples,
    whose standard error adds in quadrature."""
    if key not in TESTED:
        raise ValueError(f"key must be one of {TESTED}, got {key!r}")
    se = standard_errors(r, n)[key]
    if reference_n is not None:
        se = math.hypot(se, standard_errors(reference, reference_n)[key])
    return (r[key] - reference[key]) / se
