"""Recipes of chapter 7 (guidance): a noise-conditional digits classifier and a
class-conditional digits DDPM.

Each recipe registers itself in ``diffkit.recipes.registry.RECIPES`` with the ``recipe``
decorator. The helpers below (guided sampling of digits, the judge's verdict per requested
class) are shared by the recipes' measurements and by chapter 7.
"""

from __future__ import annotations

import torch
from torch import nn

from diffkit import checkpoints, data
from diffkit.diffusion import ddpm
from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.diffusion.guidance import ClassifierFreeGuidance
from diffkit.diffusion.schedules import make_schedule
from diffkit.eval.digits import balanced_labels, judge_requested, noisy_accuracy, sample_digits
from diffkit.nn import unet
from diffkit.nn.classifiers import NoisyDigitsClassifier
from diffkit.recipes.ddpm import DIGITS_UNET
from diffkit.recipes.registry import SEED, recipe
from diffkit.train import train

SCHEDULE = "linear"
T_GRID = (0, 250, 500, 750, 999)      # where the noisy classifier's accuracy is measured
P_UNCOND = 0.2                         # label dropout (Ho & Salimans 2022: 0.1-0.2 work best)
GUIDED_STEPS = 20                      # DPM-Solver++(2M) steps on Karras sigmas (chapter 5)
CARD_SCALES = (1.0, 3.0)               # CFG scales measured on the card
CARD_N = 1000                          # class-balanced samples per scale on the card


# --- noise-conditional classifier ------------------------------------------------------------

def noisy_classifier_loss(schedule):
    """Cross-entropy of the classifier on x_t = q_sample(x_0, t), t ~ U{0..T-1}."""
    def loss_fn(model, batch, generator):
        x0, y = batch
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        return nn.functional.cross_entropy(model(ddpm.q_sample(schedule, x0, t, noise), t), y)
    return loss_fn


def noisy_classifier_quality(model, device, *, repeats: int = 4, seed: int = 1) -> dict:
    return noisy_accuracy(model, device, make_schedule(SCHEDULE), t_grid=T_GRID,
                          repeats=repeats, seed=seed)


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


def cond_digits_quality(model, device, *, n: int | None = None, scales=CARD_SCALES,
                        seed: int = 1) -> dict:
    """Judge n class-balanced CFG samples (DPM-Solver++(2M), GUIDED_STEPS) at each scale;
    ``seed`` seeds ``sample_digits`` (the card's is 1)."""
    judge, _ = checkpoints.load_model("digits-judge", device=device)
    schedule = make_schedule(SCHEDULE)
    denoiser = DiscreteTimeDenoiser(model, schedule.alphas_cumprod)
    cfg = ClassifierFreeGuidance(denoiser, null_label=model.config["num_classes"])
    n = CARD_N if n is None else n
    labels = balanced_labels(n)
    out = {"n": n, "sampler": f"dpmpp_2m, {GUIDED_STEPS} Karras steps"}
    for w in scales:
        samples = sample_digits(cfg, labels, sigma_min=denoiser.sigma_min,
                                sigma_max=denoiser.sigma_max, steps=GUIDED_STEPS, seed=seed,
                                device=device, guidance_scale=w)
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
    result = train(unet.UNet(**DIGITS_UNET, num_classes=10),
                   cond_ddpm_loss(make_schedule(SCHEDULE)), data.digits("train"), steps=steps,
                   batch_size=128, lr=1e-3, ema_decay=0.999, seed=SEED, device=device,
                   state_path=state_path, progress=progress)
    return result, {"schedule": SCHEDULE, "target": "eps", "batch_size": 128, "lr": 1e-3,
                    "p_uncond": P_UNCOND, "null_label": 10}
