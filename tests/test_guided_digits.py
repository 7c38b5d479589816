"""diffkit.eval.guided_digits: a guidance sweep judged, its table rows and summary."""

import pytest
import torch

from diffkit import checkpoints, data
from diffkit.eval.guided_digits import (
    TABLE_HEADER,
    fd_ratio,
    real_balanced_spread,
    summary,
    sweep,
    table_rows,
)


class RealDigitsOfClass:
    """A denoiser that ignores x and returns a real test digit of class y when the scale is
    at least 1 and of a wrong class below: a guide whose effect the judge must see."""

    def __init__(self):
        x, y = data.digits("test")
        self.by_class = [x[y == c] for c in range(10)]

    def __call__(self, x, sigma, *, y, guidance_scale):
        wanted = y if guidance_scale >= 1 else (y + 1) % 10
        return torch.stack([self.by_class[int(c)][i % 5] for i, c in enumerate(wanted)]).to(x)


@pytest.fixture(scope="module")
def judge():
    return checkpoints.load_model("digits-judge")[0]


def test_sweep_sees_the_requested_class(judge):
    labels = torch.arange(10).repeat_interleave(3)
    runs = sweep(RealDigitsOfClass(), [0.0, 1.0], labels, judge, judge,
                 sigma_min=0.002, sigma_max=80.0)
    assert list(runs) == [0.0, 1.0]
    assert runs[1.0]["requested"] > 0.9 and runs[1.0]["second"] > 0.9
    assert runs[0.0]["requested"] < 0.1 and runs[0.0]["second"] < 0.1
    assert runs[1.0]["samples"].shape == (30, 1, 8, 8)
    rows = table_rows(runs)
    assert len(rows) == 2 and all(len(r) == len(TABLE_HEADER) for r in rows)
    assert rows[1][0] == "1" and rows[1][4] == fd_ratio(runs[1.0])
    with pytest.raises(ValueError, match="scales"):
        sweep(RealDigitsOfClass(), [], labels, judge, judge, sigma_min=0.002, sigma_max=80.0)


def test_summary_finds_saturation_and_break():
    def run(req, fd):
        return {"requested": req, "frechet": fd, "frechet_floor": 1.0}
    runs = {0.0: run(0.1, 1.0), 1.0: run(0.95, 1.1), 2.0: run(0.99, 1.2), 4.0: run(0.995, 1.4),
            8.0: run(0.99, 2.0)}
    s = summary(runs)
    assert s == {"best": 0.995, "saturated": 2.0, "broken": 8.0}
    assert summary({0.0: run(0.5, 1.0)})["broken"] is None
    with pytest.raises(ValueError):
        summary({})


def test_real_balanced_spread_is_seeded_near_one_and_checks_input(judge):
    a = real_balanced_spread(judge, 20, draws=3, seed=3)
    b = real_balanced_spread(judge, 20, draws=3, seed=3)
    assert a == b and len(a["frechet"]) == 3
    # real digits' within-class diversity over that of all real digits of the class: about 1
    assert all(abs(v - 1) < 0.1 for v in a["diversity_within"])
    assert len(set(a["frechet"])) == 3 and all(v > 0 for v in a["frechet"])
    with pytest.raises(ValueError, match="per_class"):
        real_balanced_spread(judge, 1000)
    with pytest.raises(ValueError, match="draws"):
        real_balanced_spread(judge, 20, draws=1)
