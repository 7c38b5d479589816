"""Guided digits swept over the guidance scale (chapter 7): one judged run per scale, the rows
of its table, and the summary of where accuracy saturates and quality breaks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffkit import data
from diffkit.eval import digits

TABLE_HEADER = ["w", "judged as requested", "confident and requested",
                "noisy classifier at t = 0 agrees", "Fréchet / floor",
                "within-class diversity / real"]


def sweep(denoiser: Callable, scales: Sequence[float], labels: torch.Tensor, judge,
          second_opinion: Callable, *, sigma_min: float, sigma_max: float,
          device="cpu") -> dict:
    """For each scale w: guided digits for ``labels`` (``digits.sample_digits``, same noise
    for every w), judged (``digits.judge_requested``), plus ``second``: the fraction that
    ``second_opinion(samples) -> logits`` (another classifier) also assigns to the requested
    class, and the samples. Returns {w: report}."""
    if not len(scales):
        raise ValueError("scales must hold at least one guidance scale")
    out = {}
    for w in scales:
        samples = digits.sample_digits(denoiser, labels, guidance_scale=w, sigma_min=sigma_min,
                                       sigma_max=sigma_max, device=device)
        report = digits.judge_requested(judge, samples, labels)
        with torch.no_grad():
            second = second_opinion(samples).argmax(1).cpu()
        out[w] = dict(report, second=float((second == labels.cpu()).float().mean()),
                      samples=samples.cpu())
    return out


def fd_ratio(r: dict) -> float:
    """Fréchet distance over the floor of as many real digits."""
    return r["frechet"] / r["frechet_floor"]


def diversity_ratio(r: dict) -> float:
    """Within-class diversity over that of real digits of the same classes."""
    return r["diversity_within"] / r["diversity_within_real"]


def table_rows(runs: dict) -> list[list]:
    """Rows of :data:`TABLE_HEADER` for a :func:`sweep` result (for ``plots.show_table``)."""
    return [[f"{w:g}", r["requested"], r["requested_confident"], r["second"], fd_ratio(r),
             diversity_ratio(r)] for w, r in runs.items()]


def summary(runs: dict, *, tolerance: float = 0.01, broken_ratio: float = 1.5) -> dict:
    """Where a sweep saturates and breaks: ``best`` judged-as-requested fraction, the smallest
    scale ``saturated`` within ``tolerance`` of it, and ``broken``: the first scale above
    ``saturated`` whose Fréchet distance exceeds ``broken_ratio`` times the floor (None if
    none does)."""
    if not runs:
        raise ValueError("runs must hold at least one scale")
    best = max(r["requested"] for r in runs.values())
    saturated = min(w for w, r in runs.items() if r["requested"] >= best - tolerance)
    broken = [w for w, r in runs.items() if fd_ratio(r) > broken_ratio and w > saturated]
    return {"best": best, "saturated": saturated, "broken": broken[0] if broken else None}


@torch.no_grad()
def real_balanced_spread(judge, per_class: int, *, draws: int = 7, seed: int = 3,
                         num_classes: int = 10) -> dict:
    """The noise band of a guided sweep's figures: ``digits.judge_requested`` on ``draws`` random
    class-balanced sets of ``per_class`` real train digits per class, labelled with their true
    class. Returns {"frechet": [draws], "diversity_within": [draws]}, where diversity_within is
    a ratio to real digits' (as :func:`diversity_ratio`), so the lists read on the same scales
    as a sweep's columns."""
    real_x, real_y = data.digits("train")
    counts = torch.bincount(real_y, minlength=num_classes)
    if per_class < 2 or per_class > int(counts.min()):
        raise ValueError(f"per_class must lie in [2, {int(counts.min())}], got {per_class}")
    if draws < 2:
        raise ValueError(f"draws must be at least 2 to measure a spread, got {draws}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    frechet, diversity = [], []
    for _ in range(draws):
        pick = torch.cat([torch.nonzero(real_y == c).flatten()[
            torch.randperm(int(counts[c]), generator=g)[:per_class]] for c in range(num_classes)])
        report = digits.judge_requested(judge, real_x[pick], labels)
        frechet.append(report["frechet"])
        diversity.append(diversity_ratio(report))
    return {"frechet": frechet, "diversity_within": diversity}
