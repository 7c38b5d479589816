"""Figures the chapters share: image grids, 2-D scatter frames and their HTML animation."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib import animation


def image_grid(ax, images: torch.Tensor, nrow: int = 10, *, title: str | None = None):
    """Draw images (N, C, H, W) in [-1, 1] as one grid on ``ax``; returns the ax."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + 1) + 1, nrow * (w + 1) + 1)
    for i, image in enumerate(images.detach().float().cpu().clamp(-1, 1)):
        r, k = divmod(i, nrow)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = image
    grid = (grid + 1) / 2
    if c == 1:
        ax.imshow(grid[0], cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.permute(1, 2, 0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def scatter_animation(frames: list[torch.Tensor], labels: list[str], *, reference=None,
                      limit: float = 3.0, interval: int = 120) -> str:
    """An HTML/JS animation (plays in the static book) of 2-D point clouds, one per frame."""
    if not frames or len(frames) != len(labels):
        raise ValueError("need one label per frame and at least one frame")
    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.8", label="data")
    points = ax.scatter(frames[0][:, 0], frames[0][:, 1], s=2, c="C0")
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    title = ax.set_title(labels[0])

    def draw(i):
        points.set_offsets(frames[i].cpu().numpy())
        title.set_text(labels[i])
        return points, title

    anim = animation.FuncAnimation(fig, draw, frames=len(frames), interval=interval, blit=False)
    html = anim.to_jshtml(default_mode="once")
    plt.close(fig)
    return html
