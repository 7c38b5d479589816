"""diffkit.plots: figures the chapters share."""

import re

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from diffkit import plots  # noqa: E402


def test_scatter_animation_is_self_contained():
    # the book is read offline: no CDN stylesheet, and the <img> shows a frame without JS
    html = plots.scatter_animation([torch.randn(20, 2) for _ in range(3)], ["a", "b", "c"])
    assert "http://" not in html and "https://" not in html
    assert '<i class="fa' not in html
    assert re.search(r'<img id="_anim_img[0-9a-f]+" src="data:image/png;base64,', html)


def test_scatter_animation_checks_labels():
    with pytest.raises(ValueError, match="one label per frame"):
        plots.scatter_animation([torch.randn(5, 2)], ["a", "b"])


def test_image_grid_rejects_bad_shapes():
    fig, ax = matplotlib.pyplot.subplots()
    with pytest.raises(ValueError, match="images must be"):
        plots.image_grid(ax, torch.zeros(2, 8, 8))


def test_markdown_table_formats_and_checks_rows():
    text = plots.markdown_table(["a", "|b|"], [[1, 0.12345], ["x|y", 2.0]], digits=2)
    assert text.splitlines() == ["| a | \\|b\\| |", "|---|---|", "| 1 | 0.12 |", "| x\\|y | 2.00 |"]
    with pytest.raises(ValueError, match="row 0 has 1 cells, expected 2"):
        plots.markdown_table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="header"):
        plots.markdown_table([], [])
