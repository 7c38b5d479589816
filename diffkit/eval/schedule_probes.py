"""Measurements of chapter 2 (noise schedules): how fast a schedule destroys the class of a digit
(the Bayes-optimal classifier of noised digits), the grid on which the reverse-step Gaussian gap is
evaluated, the brightness of generated images, and whether a gap between two figures is resolved
by the noise of the measurement."""

from __future__ import annotations

import math

import torch


def bayes_class_accuracy(abar_t, train: torch.Tensor, train_labels: torch.Tensor,
                         test: torch.Tensor, test_labels: torch.Tensor,
                         noise: torch.Tensor) -> float:
    """Accuracy of the Bayes classifier p(y | x_t) of a data set that *is* the train points
    (N, D), on the test points (M, D) noised to x_t = sqrt(abar_t) x + sqrt(1 - abar_t) noise.

    p(y | x_t) = sum_i w_i [y_i = y] with w_i proportional to
    exp(-|x_t - sqrt(abar_t) x_i|^2 / 2 (1 - abar_t)): the best any classifier can do on x_t.
    """
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"train and test must be (N, D) and (M, D), got {tuple(train.shape)} "
                         f"and {tuple(test.shape)}")
    if noise.shape != test.shape:
        raise ValueError(f"noise must have the test points' shape {tuple(test.shape)}, "
                         f"got {tuple(noise.shape)}")
    if train_labels.shape != (train.shape[0],) or test_labels.shape != (test.shape[0],):
        raise ValueError("labels must be (N,) and (M,), one per point")
    a = torch.as_tensor(abar_t, dtype=train.dtype)
    if not 0 < float(a) < 1:
        raise ValueError(f"abar_t must lie in (0, 1), got {float(a)}")
    x_t = a.sqrt() * test + (1 - a).sqrt() * noise
    log_w = -torch.cdist(x_t, a.sqrt() * train) ** 2 / (2 * (1 - a))
    onehot = torch.nn.functional.one_hot(train_labels, int(train_labels.max()) + 1).to(train.dtype)
    posterior = torch.softmax(log_w, 1) @ onehot
    return float((posterior.argmax(1) == test_labels).double().mean())


def gap_grid(steps: int, *, dense: int = 40, sparse: int = 20) -> torch.Tensor:
    """Timesteps at which to evaluate the reverse-step Gaussian gap G_t of a ``steps``-step chain:
    every step of a chain of at most 200 steps; otherwise every step below ``dense``, every 4th up
    to 200 (G_t changes fast there), every ``sparse``-th after (G_t is smooth and tiny), and the
    last step. Sorted, unique, (K,) long."""
    if steps < 1 or not 0 < dense <= 200 or sparse < 1:
        raise ValueError(f"need steps >= 1, 0 < dense <= 200 and sparse >= 1, got {steps}, "
                         f"{dense}, {sparse}")
    if steps <= 200:
        return torch.arange(steps)
    return torch.cat([torch.arange(dense), torch.arange(dense, 200, 4),
                      torch.arange(200, steps, sparse), torch.tensor([steps - 1])]).unique()


def brightness_stats(u: torch.Tensor, d: int, *, extreme: float = 0.7) -> dict:
    """Mean brightness m = u / sqrt(d) of images from their brightness coordinate u (any shape,
    one value per image): dict(spread = std of m, extreme = share with |m| >= ``extreme``, m)."""
    if d < 1:
        raise ValueError(f"d (pixels per image) must be positive, got {d}")
    m = u.flatten().double() / math.sqrt(d)
    return {"spread": float(m.std()), "extreme": float((m.abs() >= extreme).double().mean()),
            "m": m}


def verdict(gap: float, noise: float, *, lower_is_better: bool, names=("second", "first")) -> str:
    """Read a difference ``gap`` = second - first against the ``noise`` of a difference: a tie
    within twice the noise, else which of ``names`` (second, first) is better."""
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    if abs(gap) <= 2 * noise:
        return "tie (within twice the noise of a difference)"
    return f"{names[0]} better" if (gap < 0) == lower_is_better else f"{names[1]} better"


def compare_reports(first: dict, second: dict, n: int, frechet_noise_256: float) -> dict:
    """Differences second - first of two judge reports of n samples each, with the noise of
    each difference: the Frechet distance's (``frechet_noise_256``, the spread of one Frechet
    figure at n = 256, scaled by sqrt(256 / n), times sqrt 2 for a difference) and the confident
    fraction's (binomial, sqrt(2 p (1 - p) / n) at the pooled p)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    p = (first["confident_fraction"] + second["confident_fraction"]) / 2
    return {"frechet_gap": second["frechet"] - first["frechet"],
            "frechet_noise": math.sqrt(2) * frechet_noise_256 * math.sqrt(256 / n),
            "confident_gap": second["confident_fraction"] - first["confident_fraction"],
            "confident_noise": math.sqrt(2 * p * (1 - p) / n)}
