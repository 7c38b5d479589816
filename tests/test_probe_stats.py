"""diffkit.eval.probe_stats: win rates, binding twins, near misses, feature spreads."""

import math

import pytest
import torch

from diffkit.data.shapes import make_shapes
from diffkit.eval.probe_stats import (
    bag_of_words,
    binding_twins,
    count_parameters,
    mean_off_diagonal,
    meaning,
    near_miss_share,
    pair_feature_spread,
    win_rate,
)
from diffkit.eval.shapes_judge import caption_matches


def test_win_rate_counts_ties_half_and_floors_the_error():
    r = win_rate(torch.tensor([1.0, -1.0, 0.0, 2.0]))
    assert r["n"] == 4 and r["rate"] == 0.625 and math.isclose(r["gap"], 0.5)
    assert math.isclose(r["se"], math.sqrt(0.625 * 0.375 / 4)) and r["abs_gap"] == 1.0
    assert win_rate(torch.ones(10))["se"] == 0.05
    with pytest.raises(ValueError):
        win_rate(torch.tensor([]))


def test_meaning_ignores_phrase_order_but_not_binding():
    a, b = "a red circle and a blue square", "a blue square and a red circle"
    swapped = "a blue circle and a red square"
    assert meaning(a) == meaning(b) != meaning(swapped)
    assert bag_of_words(a) == bag_of_words(swapped)


def test_binding_twins_on_a_hand_made_pool():
    caps = ["a red circle and a blue square", "a blue circle and a red square", "a red circle",
            "a green triangle and a red square"]
    objs = [[{}, {}], [{}, {}], [{}], [{}, {}]]
    t = binding_twins(caps, objs, batch=2)
    # the first two are each other's twins (p = 1/3 each), the last has none
    assert math.isclose(t["share_with_twin"], 2 / 3)
    assert math.isclose(t["batch_has_twin"], (1 / 3 + 1 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        binding_twins(["a red circle"], [[{}]])


def test_near_miss_share_and_feature_spreads():
    scenes = make_shapes(6, seed=1, objects=1)
    own = torch.arange(6)
    assert near_miss_share(own, scenes.captions, scenes.objects, caption_matches) == 1.0
    assert mean_off_diagonal(torch.ones(3, 4, 4)) == 1.0
    assert mean_off_diagonal(torch.eye(4)) == 0.0
    text_only = torch.nn.functional.normalize(torch.randn(1, 5, 8), dim=-1).expand(5, 5, 8)
    same_caption, same_image = pair_feature_spread(text_only)
    assert math.isclose(same_caption, 1.0, rel_tol=1e-6) and same_image < 0.9
    assert count_parameters(torch.nn.Linear(3, 2), torch.zeros(4)) == 12
    with pytest.raises(ValueError):
        mean_off_diagonal(torch.ones(3, 2))
