"""diffkit.data: 2-D toy distributions and the digits splits."""

import math
from collections import Counter

import pytest
import torch

from diffkit.data import TOY2D, digits, toy2d


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", TOY2D)
def test_toy2d_shape_and_determinism(name):
    a = toy2d(name, 500, generator=_gen(0))
    b = toy2d(name, 500, generator=_gen(0))
    c = toy2d(name, 500, generator=_gen(1))
    assert a.shape == (500, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.3 < a.std(0).min() and a.abs().max() < 3.0  # roughly unit spread
    assert toy2d(name, 1).shape == (1, 2)


def test_ring8_has_eight_modes():
    x = toy2d("ring8", 4000, generator=_gen(0))
    radius = x.norm(dim=1)
    assert (radius - 1.5).abs().max() < 0.6
    angle = torch.atan2(x[:, 1], x[:, 0])
    mode = torch.round(angle / (2 * math.pi / 8)).long() % 8
    counts = torch.bincount(mode, minlength=8)
    assert counts.numel() == 8 and counts.min() > 400  # ~500 each
    centres = 1.5 * torch.stack([torch.cos(mode * math.pi / 4), torch.sin(mode * math.pi / 4)], 1)
    spread = (x - centres).std(0)
    torch.testing.assert_close(spread, torch.full((2,), 0.1), rtol=0.1, atol=0)
    # nothing between the modes
    offset = torch.remainder(angle + math.pi / 8, math.pi / 4) - math.pi / 8
    assert offset.abs().max() < math.pi / 8 * 0.8


def test_checkerboard_on_dark_squares():
    x = toy2d("checkerboard", 4000, generator=_gen(0))
    assert x.min() >= -2 and x.max() <= 2
    cells = torch.floor(x + 2).long().clamp(0, 3)
    assert (cells.sum(1) % 2 == 0).all()
    assert len({tuple(c) for c in cells.tolist()}) == 8  # all eight dark squares used


def test_moons_two_arcs():
    x = toy2d("moons", 2000, generator=_gen(0))
    torch.testing.assert_close(x.mean(0), torch.zeros(2), rtol=0, atol=0.1)


@pytest.mark.parametrize("name, n", [("rings", 10), ("", 10), ("ring8", 0), ("ring8", -1),
                                     ("ring8", 2.0), ("ring8", True), ("moons", "10")])
def test_toy2d_errors(name, n):
    with pytest.raises(ValueError):
        toy2d(name, n)


@pytest.fixture(scope="module")
def splits():
    return {split: digits(split) for split in ("train", "test", "all")}


def test_digits_sizes_and_range(splits):
    for split, n in (("train", 1437), ("test", 360), ("all", 1797)):
        x, y = splits[split]
        assert x.shape == (n, 1, 8, 8) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert x.min() == -1.0 and x.max() == 1.0
        assert set(y.tolist()) == set(range(10))


def test_digits_partition(splits):
    def rows(split):
        x, y = splits[split]
        return Counter((bytes(img.numpy().tobytes()), int(label)) for img, label in zip(x, y))

    # train and test together are exactly the whole set (as a multiset): a disjoint partition
    assert rows("train") + rows("test") == rows("all")
    test_counts = torch.bincount(splits["test"][1], minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37  # stratified 20%


def test_digits_deterministic_and_bad_split(splits):
    x, y = digits("test")
    assert torch.equal(x, splits["test"][0]) and torch.equal(y, splits["test"][1])
    with pytest.raises(ValueError, match="split"):
        digits("validation")
