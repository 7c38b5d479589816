"""How much a measure moves between two draws of *real* data: the noise band every claim about
generated digits is compared with (a ranking or a gap is resolved only when it exceeds it)."""

from __future__ import annotations

import torch

from diffkit import data
from diffkit.eval import metrics


@torch.no_grad()
def real_digit_spread(judge, n: int, *, draws: int = 7, seed: int = 3, device="cpu") -> dict:
    """Frechet distance (to the test split, in the judge's features) and diversity of ``draws``
    random sets of n real train digits: {"frechet": [draws], "diversity": [draws]}.

    The sets are ``randperm`` draws from one generator seeded with ``seed``, so chapters that
    quote the same (n, seed) quote the same numbers.
    """
    real_train = data.digits("train")[0]
    if not 2 <= n <= len(real_train):
        raise ValueError(f"n must lie in [2, {len(real_train)}] (the train split), got {n}")
    if draws < 2:
        raise ValueError(f"draws must be at least 2 to measure a spread, got {draws}")
    g = torch.Generator().manual_seed(seed)
    test_features = judge.features(data.digits("test")[0].to(device))
    frechet, diversity = [], []
    for _ in range(draws):
        pick = real_train[torch.randperm(len(real_train), generator=g)[:n]]
        features = judge.features(pick.to(device))
        frechet.append(metrics.frechet_distance(features, test_features))
        diversity.append(metrics.mean_pairwise_distance(features))
    return {"frechet": frechet, "diversity": diversity}
