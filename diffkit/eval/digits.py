"""Digits models judged: ancestral DDPM samples through the judge (``metrics.judge_report``),
guided samples judged against the class they were asked for, and a noise-conditional
classifier's accuracy on noised test digits."""

from __future__ import annotations

from typing import Callable

import torch

from diffkit import checkpoints, data
from diffkit.diffusion import ddpm
from diffkit.diffusion.samplers import sample_dpmpp_2m, sigmas_karras
from diffkit.eval import metrics


def digits_quality(model, schedule, *, n: int, seed: int = 1, device="cpu",
                   model_kwargs=None) -> dict:
    """Judge n ancestral DDPM samples of a digits model (see ``metrics.judge_report``)."""
    judge, _ = checkpoints.load_model("digits-judge", device=device)
    samples = ddpm.sample(model, schedule, (n, 1, 8, 8),
                          generator=torch.Generator().manual_seed(seed), device=device,
                          model_kwargs=model_kwargs)
    return metrics.judge_report(judge, samples.clamp(-1, 1))


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """n labels, n / num_classes of each class in order: (n,)."""
    if n <= 0 or n % num_classes:
        raise ValueError(f"n must be a positive multiple of {num_classes}, got {n}")
    return torch.arange(num_classes).repeat_interleave(n // num_classes)


def sample_digits(denoiser: Callable, labels: torch.Tensor, *, sigma_min: float,
                  sigma_max: float, steps: int = 20, seed: int = 1,
                  device="cpu", sampler=sample_dpmpp_2m, **extra) -> torch.Tensor:
    """Digits (N, 1, 8, 8) in [-1, 1] for labels (N,): ``sampler`` on Karras sigmas, the
    labels (and ``extra``, e.g. guidance_scale) passed to the denoiser as keyword arguments."""
    sigmas = sigmas_karras(steps, sigma_min, sigma_max).to(device)
    noise = torch.randn(labels.shape[0], 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = sampler(denoiser, noise.to(device) * sigmas[0], sigmas,
                  generator=torch.Generator().manual_seed(seed + 1),
                  extra_args={"y": labels.to(device), **extra})
    return out.clamp(-1, 1)


@torch.no_grad()
def judge_requested(judge, samples: torch.Tensor, labels: torch.Tensor) -> dict:
    """``metrics.judge_report`` plus the fraction the judge assigns to the requested class
    (``requested``: argmax; ``requested_confident``: argmax with confidence >= 0.9), and the
    diversity *within* classes: the mean pairwise judge-feature distance among the samples the
    judge puts in one class, averaged over the classes with at least 2 samples, next to the same
    figure for the real train digits of each class (``diversity_within_real``).

    Within-class diversity is what guidance trades away; the overall ``diversity`` of
    ``judge_report`` also counts the distances between classes, which balanced labels fix.
    Grouping by the judge's class (not the requested one) keeps the figure meaningful when the
    labels are ignored (w = 0).
    """
    device = next(judge.parameters()).device
    report = metrics.judge_report(judge, samples)
    samples, labels = samples.to(device).float(), labels.cpu()
    probs = judge.probs(samples).cpu()
    top, label = probs.max(-1)
    hit = label == labels
    report["requested"] = float(hit.float().mean())
    report["requested_confident"] = float((hit & (top >= 0.9)).float().mean())
    real_x, real_y = data.digits("train")
    feats, real_feats = judge.features(samples).cpu(), judge.features(real_x.to(device)).cpu()
    within, within_real = [], []
    for c in label.unique().tolist():
        if int((label == c).sum()) >= 2:
            within.append(metrics.mean_pairwise_distance(feats[label == c]))
            within_real.append(metrics.mean_pairwise_distance(real_feats[real_y == c]))
    report["diversity_within"] = sum(within) / len(within) if within else float("nan")
    report["diversity_within_real"] = (sum(within_real) / len(within_real) if within
                                       else float("nan"))
    return report


@torch.no_grad()
def noisy_accuracy(model, device, schedule, *, t_grid=(0, 250, 500, 750, 999), repeats: int = 4,
                   seed: int = 1) -> dict:
    """Test accuracy of a classifier net(x_t, t) on q_sample'd test digits at each t in t_grid
    (averaged over ``repeats`` noise draws): {"accuracy_t<t>": float}."""
    test_x, test_y = data.digits("test")
    g = torch.Generator().manual_seed(seed)
    out = {}
    model.eval()
    for t in t_grid:
        correct = 0.0
        for _ in range(repeats):
            noise = torch.randn(test_x.shape, generator=g)
            tt = torch.full((test_x.shape[0],), t, dtype=torch.long)
            x_t = ddpm.q_sample(schedule, test_x, tt, noise)
            pred = model(x_t.to(device), tt.to(device)).argmax(-1).cpu()
            correct += float((pred == test_y).float().mean()) / repeats
        out[f"accuracy_t{t}"] = correct
    return out
