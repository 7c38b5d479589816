"""Small statistics for the CLIP / BLIP probes of chapter 6: win rates with their standard error,
binding twins among captions, near-miss negatives, how much fused features move, parameter
counts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffkit.data.shapes import parse_caption


def win_rate(gap: torch.Tensor) -> dict:
    """How often a true caption beats an altered one, from the similarity gaps (n,) (true minus
    altered; a tie counts one half): {n, rate, se, gap, abs_gap}. ``se`` is the binomial
    standard error, floored at 0.5 / n so that a rate of 0 or 1 does not claim certainty."""
    gap = torch.as_tensor(gap).flatten().double()
    n = len(gap)
    if n == 0:
        raise ValueError("gap must hold at least one comparison")
    rate = float((gap > 0).double().mean() + (gap == 0).double().mean() / 2)
    return {"n": n, "rate": rate, "se": max(math.sqrt(rate * (1 - rate) / n), 0.5 / n),
                "gap": float(gap.mean()), "abs_gap": float(gap.abs().mean())}


def bag_of_words(text: str) -> tuple:
    """The caption's words, sorted: what a bag-of-words model sees."""
    return tuple(sorted(text.split()))


def meaning(text: str) -> tuple:
    """What a caption says (its objects and their attributes), whatever the order of its phrases."""
    return tuple(sorted(str(sorted(obj.items())) for obj in parse_caption(text)))


def binding_twins(captions: Sequence[str], objects: Sequence[list], batch: int = 128) -> dict:
    """Binding twins: captions with the same words and another meaning (colours swapped between
    the shapes). For the two-object captions of a pool drawn like the training data:
    ``share_with_twin`` (a twin exists in the pool) and ``batch_has_twin``, the mean probability
    that a random batch of ``batch`` captions holds a twin of a given one."""
    if len(captions) != len(objects) or len(captions) < 2:
        raise ValueError("need at least two captions, one object list per caption")
    if batch < 2:
        raise ValueError(f"batch must be at least 2, got {batch}")
    bags, meanings = Counter(), Counter()
    for text in captions:
        bags[bag_of_words(text)] += 1
        meanings[bag_of_words(text), meaning(text)] += 1
    two = [t for objs, t in zip(objects, captions) if len(objs) == 2]
    if not two:
        raise ValueError("the pool holds no two-object caption")
    twins = np.array([bags[bag_of_words(t)] - meanings[bag_of_words(t), meaning(t)] for t in two])
    p_twin = twins / (len(captions) - 1)
    return {"share_with_twin": float(np.mean(twins > 0)),
            "batch_has_twin": float(np.mean(1 - (1 - p_twin) ** (batch - 1)))}


def near_miss_share(picks: torch.Tensor, captions: Sequence[str], objects: Sequence[list],
                    matches: Callable) -> float:
    """Share of picked negatives (one caption index per scene) that name the right colour and
    shape of every object they mention: ``matches(caption, objects)["colour_shape"] == 1``."""
    picks = [int(j) for j in picks]
    if len(picks) != len(objects) or not picks:
        raise ValueError("need one picked caption per scene")
    return sum(matches(captions[j], objs)["colour_shape"] == 1.0
               for j, objs in zip(picks, objects)) / len(picks)


def mean_off_diagonal(gram: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a batch of square matrices (..., n, n)."""
    if gram.ndim < 2 or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] < 2:
        raise ValueError(f"gram must be (..., n, n) with n >= 2, got {tuple(gram.shape)}")
    n = gram.shape[-1]
    off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return float(off.mean() / (n * (n - 1)))


def pair_feature_spread(feats: torch.Tensor) -> tuple[float, float]:
    """For unit features of pairs (images, captions, d), indexed [image, caption]: the mean
    cosine of one caption's features across two images, and of one image's across two
    captions. A text-only feature would give 1 for the first."""
    if feats.ndim != 3:
        raise ValueError(f"feats must be (images, captions, d), got {tuple(feats.shape)}")
    same_caption = mean_off_diagonal(torch.einsum("icd,jcd->cij", feats, feats))
    same_image = mean_off_diagonal(torch.einsum("icd,ied->ice", feats, feats))
    return same_caption, same_image


def count_parameters(*modules) -> int:
    """Number of parameters of the modules (tensors count their elements)."""
    return sum(m.numel() if isinstance(m, torch.Tensor) else sum(p.numel() for p in m.parameters())
               for m in modules)
