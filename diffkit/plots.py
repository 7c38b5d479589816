"""Figures the chapters share: image grids, 2-D scatter frames and their HTML animation."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import torch
from matplotlib import animation

# matplotlib's player draws its buttons with Font Awesome icons loaded from a CDN; the book is
# read offline, so the icons become plain characters and the stylesheet link is dropped
_BUTTON_TEXT = {"fa-minus": "&minus;", "fa-fast-backward": "&#x23EE;", "fa-step-backward": "&#x25C1;",
                "fa-play fa-flip-horizontal": "&#x25C0;", "fa-pause": "&#x23F8;", "fa-play": "&#x25B6;",
                "fa-step-forward": "&#x25B7;", "fa-fast-forward": "&#x23ED;", "fa-plus": "+"}


def _offline_player(html: str) -> str:
    """Make matplotlib's jshtml self-contained: no CDN stylesheet, first frame in the <img>."""
    html = re.sub(r"<link[^>]*font-awesome[^>]*>", "", html)
    for icon, text in _BUTTON_TEXT.items():
        html = html.replace(f'<i class="fa {icon}"></i>', text)
    first = re.search(r'frames\[0\] = "(data:image/[a-z]+;base64,[^"]+)"', html)
    if first is not None:  # the player fills the <img> from JS; give it the first frame too
        html = re.sub(r'<img id="(_anim_img[0-9a-f]+)">', rf'<img id="\1" src="{first.group(1)}">',
                      html, count=1)
    return html


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
    html = _offline_player(anim.to_jshtml(default_mode="once"))
    plt.close(fig)
    return html


def markdown_table(header: list[str], rows: list[list], *, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table (the book renders it): floats to ``digits`` decimals,
    everything else with ``str``. Every row must have one cell per header column."""
    if not header:
        raise ValueError("header must name at least one column")
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells, expected {len(header)}: {row!r}")

    def cell(value) -> str:
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(str(h).replace("|", "\\|") for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def show_table(header: list[str], rows: list[list], *, digits: int = 3) -> None:
    """Display :func:`markdown_table` in a notebook (rendered as a table in the book)."""
    from IPython.display import Markdown, display

    display(Markdown(markdown_table(header, rows, digits=digits)))
