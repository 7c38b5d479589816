"""Recipes of chapter 7 (guidance): a noise-conditional digits classifier and a
class-conditional digits DDPM.

Each recipe registers itself in ``diffkit.recipes.RECIPES`` with the ``recipe`` decorator. The
helpers below (guided sampling of digits, the judge's verdict per requested class) are shared
by the recipes' measurements and by chapter 7.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import checkpoints, data, ddpm, metrics, nets
from .guidance import ClassifierFreeGuidance, NoisyDigitsClassifier
from .recipes import DIGITS_UNET, SEED, recipe
from .samplers import EpsDenoiser, sample_dpmpp_2m, sigmas_karras
from .schedules import make_schedule
from .train import train

SCHEDULE = "linear"
T_GRID = (0, 250, 500, 750, 999)      # where the noisy classifier's accuracy is measured
P_UNCOND = 0.2                         # label dropout (Ho & Salimans 2022: 0.1-0.2 work best)
GUIDED_STEPS = 20                      # DPM-Solver++(2M) steps on Karras sigmas (chapter 5)
CARD_SCALES = (1.0, 3.0)               # CFG scales measured on the card
CARD_N = 1000                          # class-balanced samples per scale on the card


# --- guided sampling of digits, judged -------------------------------------------------------

def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """n labels, n / num_classes of each class in order: (n,)."""
    if n <= 0 or n % num_classes:
        raise ValueError(f"n must be a positive multiple of {num_classes}, got {n}")
    return torch.arange(num_classes).repeat_interleave(n // num_classes)


def sample_digits(denoiser: Callable, labels: torch.Tensor, *, sigma_min: float,
                  sigma_max: float, steps: int = GUIDED_STEPS, seed: int = 1,
                  device="cpu", sampler=sample_dpmpp_2m, **extra) -> torch.Tensor:
    """Digits (N, 1, 8, 8) in [-1, 1] for labels (N,): ``sampler`` on Karras sigmas, the
    labels (and ``extra``, e.g. guidance_scale) passed to the denoiser as keyword arguments."""
    sigmas = sigmas_karras(steps, sigma_min, sigma_max).to(device)
    noise = torch.randn(labels.shape[0], 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = sampler(denoiser, noise.to(device) * sigmas[0], sigmas,
                  generator=torch.Generator(device=device).manual_seed(seed + 1),
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


# --- noise-conditional classifier ------------------------------------------------------------

def noisy_classifier_loss(schedule):
    """Cross-entropy of the classifier on x_t = q_sample(x_0, t), t ~ U{0..T-1}."""
    def loss_fn(model, batch, generator):
        x0, y = batch
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return nn.functional.cross_entropy(model(ddpm.q_sample(schedule, x0, t, noise), t), y)
    return loss_fn


@torch.no_grad()
def noisy_accuracy(model, device, *, t_grid=T_GRID, repeats: int = 4, seed: int = 1) -> dict:
    """Test accuracy of a classifier net(x_t, t) on q_sample'd test digits at each t in t_grid
    (averaged over ``repeats`` noise draws): {"accuracy_t<t>": float}."""
    schedule = make_schedule(SCHEDULE)
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


def noisy_classifier_quality(model, device) -> dict:
    return noisy_accuracy(model, device)


NOISY_CLASSIFIER = dict(channels=32, emb_dim=64, hidden=128)


@recipe("digits-classifier-noisy",
        "noise-conditional CNN classifier on q_sample'd digits, uniform t, linear schedule "
        "(chapter 7, classifier guidance)", 4000, noisy_classifier_quality)
def digits_classifier_noisy(steps, device, state_path, progress):
    result = train(NoisyDigitsClassifier(**NOISY_CLASSIFIER),
                   noisy_classifier_loss(make_schedule(SCHEDULE)), data.digits("train"),
                   steps=steps, batch_size=256, lr=2e-3, weight_decay=1e-4, ema_decay=0.995,
                   seed=SEED, device=device, state_path=state_path, progress=progress)
    return result, {"schedule": SCHEDULE, "batch_size": 256, "lr": 2e-3, "weight_decay": 1e-4,
                    "t": "uniform in 0..999"}


# --- class-conditional DDPM with label dropout -----------------------------------------------

def cond_ddpm_loss(schedule, p_uncond: float = P_UNCOND, null_label: int = 10):
    """The eps loss with the label replaced by ``null_label`` with probability ``p_uncond``
    (Ho & Salimans 2022, Algorithm 1): one network learns p(x | y) and p(x)."""
    if not 0 <= p_uncond < 1:
        raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}")

    def loss_fn(model, batch, generator):
        x0, y = batch
        drop = (torch.rand(y.shape, generator=generator) < p_uncond).to(y.device)
        y = torch.where(drop, torch.full_like(y, null_label), y)
        return ddpm.training_loss(model, schedule, x0, target="eps", generator=generator,
                                  model_kwargs={"y": y})
    return loss_fn


def cond_digits_quality(model, device, *, n: int | None = None, scales=CARD_SCALES) -> dict:
    """Judge n class-balanced CFG samples (DPM-Solver++(2M), GUIDED_STEPS) at each scale."""
    judge, _ = checkpoints.load_model("digits-judge", device=device)
    schedule = make_schedule(SCHEDULE)
    denoiser = EpsDenoiser(model, schedule.alphas_cumprod)
    cfg = ClassifierFreeGuidance(denoiser, null_label=model.config["num_classes"])
    n = CARD_N if n is None else n
    labels = balanced_labels(n)
    out = {"n": n, "sampler": f"dpmpp_2m, {GUIDED_STEPS} Karras steps"}
    for w in scales:
        samples = sample_digits(cfg, labels, sigma_min=denoiser.sigma_min,
                                sigma_max=denoiser.sigma_max, device=device, guidance_scale=w)
        report = judge_requested(judge, samples, labels)
        tag = f"w{w:g}"
        out.update({f"{tag}_requested": report["requested"],
                    f"{tag}_confident": report["confident_fraction"],
                    f"{tag}_frechet": report["frechet"],
                    f"{tag}_diversity_within": report["diversity_within"]})
        out["frechet_floor"] = report["frechet_floor"]
        out["diversity_within_real"] = report["diversity_within_real"]
    return out


@recipe("digits-cond-ddpm",
        f"class-conditional UNet DDPM on digits with label dropout p={P_UNCOND} (null label 10), "
        "linear schedule, eps target (chapter 7, classifier-free guidance)", 6000,
        cond_digits_quality)
def digits_cond_ddpm(steps, device, state_path, progress):
    result = train(nets.UNet(**DIGITS_UNET, num_classes=10),
                   cond_ddpm_loss(make_schedule(SCHEDULE)), data.digits("train"), steps=steps,
                   batch_size=128, lr=1e-3, ema_decay=0.999, seed=SEED, device=device,
                   state_path=state_path, progress=progress)
    return result, {"schedule": SCHEDULE, "target": "eps", "batch_size": 128, "lr": 1e-3,
                    "p_uncond": P_UNCOND, "null_label": 10}
