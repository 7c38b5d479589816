"""Measuring samples: a sliced Wasserstein distance for 2-D data, and the digits judge.

The judge is a small CNN trained on the digits train split (recipe ``digits-judge``). It gives
(1) the fraction of samples it classifies with confidence >= 0.9 and the classes present, and
(2) a Frechet distance in its 128-d feature space (the FID recipe of Heusel et al. 2017 with
our judge in place of Inception), reported next to its floor: the distance between the train
and test splits, i.e. what two real samples of that size already differ by.
"""

from __future__ import annotations

import numpy as np
import torch

from diffkit.nn.classifiers import DigitsJudge


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, n_projections: int = 512,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between point sets a (N, D) and b (N, D).

    Average over random unit directions of the 1-D W2 between the projections, which for two
    sets of equal size is the RMS difference of their sorted values (Rabin et al. 2011).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (N, D) with equal shapes, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if n_projections <= 0:
        raise ValueError(f"n_projections must be positive, got {n_projections}")
    directions = torch.randn(a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=0, keepdim=True)
    pa = (a.double().cpu() @ directions).sort(dim=0).values
    pb = (b.double().cpu() @ directions).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) between Gaussian fits."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError("features must be (N, F) and (M, F) with the same F")
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError("need at least 2 feature vectors on each side")
    a, b = features_a.double().cpu().numpy(), features_b.double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # symmetric form: C_a^1/2 C_b C_a^1/2 is PSD, so its square root's trace is sum sqrt(eig)
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(distance, 0.0))  # rounding can leave -1e-6 for identical feature sets


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance between distinct rows of features (N, F): a diversity measure.

    Mode collapse shows as a drop against the same figure for real data (DDIM's Table 1 and the
    guidance trade-off are read with it next to the Frechet distance).
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, F) with N >= 2, got {tuple(features.shape)}")
    f = features.double()
    n = f.shape[0]
    return float(torch.cdist(f, f).sum() / (n * (n - 1)))


def rms_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image RMS difference per pixel between image sets a and b (n, ...): (n,)."""
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a and b must be image sets (n, ...) of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).flatten(1).pow(2).mean(1).sqrt()


@torch.no_grad()
def accuracy(judge: DigitsJudge, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((judge.probs(x).argmax(-1) == y.to(x.device)).float().mean())


@torch.no_grad()
def judge_report(judge: DigitsJudge, samples: torch.Tensor, *, confidence: float = 0.9) -> dict:
    """Score generated digits (N, 1, 8, 8) in [-1, 1] against the real test split.

    Returns confident_fraction, class_counts, classes_present, frechet (samples vs test
    split) and frechet_floor (as many real train digits as samples, up to the 1437 there are,
    vs the test split): the Frechet distance is biased upward at small N, so the floor is
    taken at the same N. ``diversity`` is the mean pairwise feature distance of the samples,
    ``diversity_real`` the same for those real train digits.
    """
    from diffkit.data import digits

    judge.eval()
    device = next(judge.parameters()).device
    samples = samples.to(device).float()
    probs = judge.probs(samples)
    top, label = probs.max(-1)
    counts = torch.bincount(label[top >= confidence], minlength=10).tolist()
    test_x = digits("test")[0].to(device)
    train_x = digits("train")[0]
    keep = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(0))
    train_x = train_x[keep[:samples.shape[0]]].to(device)
    test_f = judge.features(test_x)
    sample_f, train_f = judge.features(samples), judge.features(train_x)
    return {
        "n": samples.shape[0],
        "confident_fraction": float((top >= confidence).float().mean()),
        "class_counts": counts,
        "classes_present": sum(c > 0 for c in counts),
        "frechet": frechet_distance(sample_f, test_f),
        "frechet_floor": frechet_distance(train_f, test_f),
        "diversity": mean_pairwise_distance(sample_f),
        "diversity_real": mean_pairwise_distance(train_f),
    }
