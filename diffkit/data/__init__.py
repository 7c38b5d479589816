"""Data made or shipped locally: 2-D toy distributions, sklearn's 8x8 digits in [-1, 1], and the
procedural captioned-shapes world (`shapes`, defined in :mod:`diffkit.data.shapes`)."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

TOY2D = ("ring8", "moons", "spiral", "checkerboard")


def _check_n(n: int) -> None:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"n must be a positive integer, got {n!r}")


def toy2d(name: str, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points (n, 2) from a named 2-D distribution, scaled to roughly unit spread.

    ``ring8``: 8 Gaussians (std 0.1) on a circle of radius 1.5; ``moons``: two interleaved
    half circles with noise 0.05; ``spiral``: a noisy two-turn spiral; ``checkerboard``:
    uniform on the dark squares of a 4x4 board over [-2, 2]^2.
    """
    _check_n(n)
    n = int(n)
    g = generator
    if name == "ring8":
        k = torch.randint(0, 8, (n,), generator=g)
        angle = 2 * math.pi * k / 8
        centres = 1.5 * torch.stack([angle.cos(), angle.sin()], dim=1)
        return centres + 0.1 * torch.randn(n, 2, generator=g)
    if name == "moons":
        upper = torch.rand(n, generator=g) < 0.5
        angle = math.pi * torch.rand(n, generator=g)
        x = torch.where(upper, angle.cos(), 1 - angle.cos())
        y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
        points = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.2
        return points + 0.05 * torch.randn(n, 2, generator=g)
    if name == "spiral":
        s = torch.rand(n, generator=g).sqrt() * 4 * math.pi
        points = torch.stack([s * s.cos(), s * s.sin()], dim=1) / (2 * math.pi)
        return points + 0.05 * torch.randn(n, 2, generator=g)
    if name == "checkerboard":
        u = torch.rand(n, 2, generator=g) * 4 - 2
        cell = torch.floor(u + 2).long()
        flip = (cell.sum(1) % 2 == 1)  # move points off the light squares by one cell in x
        u[flip, 0] = torch.where(u[flip, 0] < 1, u[flip, 0] + 1, u[flip, 0] - 3)
        return u
    raise ValueError(f"unknown toy distribution {name!r}; expected one of {TOY2D}")


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits as images (N, 1, 8, 8) in [-1, 1] and labels (N,).

    ``split``: "train" (1437 images), "test" (360) or "all" (1797); the split is a fixed,
    class-stratified 80/20 partition, so every chapter and the judge agree on it.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    labels = bunch.target.astype(np.int64)
    if split != "all":
        index = np.arange(len(labels))
        train_index, test_index = train_test_split(index, test_size=0.2, random_state=0,
                                                   stratify=labels)
        chosen = np.sort(train_index if split == "train" else test_index)
        images, labels = images[chosen], labels[chosen]
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)
