"""Recipes of chapter 1 (DDPM): the digits judge, a 2-D DDPM on the 8-Gaussian ring, and a
UNet DDPM on 8x8 digits."""

from __future__ import annotations

import torch

from diffkit import data
from diffkit.diffusion import ddpm
from diffkit.diffusion.schedules import make_schedule
from diffkit.eval import metrics
from diffkit.eval.digits import digits_quality
from diffkit.eval.distributions import toy2d_quality
from diffkit.nn.classifiers import DigitsJudge, judge_loss
from diffkit.nn.mlp import MLPDenoiser
from diffkit.nn.unet import UNet
from diffkit.recipes.registry import SEED, recipe
from diffkit.train import train


def ddpm_loss(schedule, target="eps"):
    """loss_fn for ``train``: the simple DDPM loss on the first tensor of the batch."""
    def loss_fn(model, batch, generator):
        return ddpm.training_loss(model, schedule, batch[0], target=target, generator=generator)
    return loss_fn


# --- digits judge ------------------------------------------------------------------------

def judge_quality(judge, device) -> dict:
    test_x, test_y = data.digits("test")
    return {"test_accuracy": metrics.accuracy(judge, test_x.to(device), test_y)}


@recipe("digits-judge", "CNN classifier on the digits train split (the judge)", 3000,
        judge_quality)
def digits_judge(steps, device, state_path, progress):
    result = train(DigitsJudge(), judge_loss, data.digits("train"), steps=steps,
                   batch_size=128, lr=2e-3, weight_decay=1e-4, ema_decay=0.995, seed=SEED,
                   device=device, state_path=state_path, progress=progress)
    return result, {"batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4}


# --- 2-D DDPM ----------------------------------------------------------------------------

TOY2D_CONFIG = dict(distribution="ring8", schedule="linear", target="eps")


def toy2d_card_quality(model, device, *, n: int = 2000, seed: int = 1) -> dict:
    """The card's sliced W2 at n=2000, seed 1; the tests re-measure it at a smaller n."""
    measured = toy2d_quality(model, make_schedule(TOY2D_CONFIG["schedule"]), n=n, seed=seed,
                             device=device, distribution=TOY2D_CONFIG["distribution"])
    del measured["samples"]
    return measured


@recipe("toy2d-ddpm", "MLP DDPM on the 8-Gaussian ring (chapter 1)", 8000, toy2d_card_quality)
def toy2d_ddpm(steps, device, state_path, progress):
    points = data.toy2d(TOY2D_CONFIG["distribution"], 20000,
                        generator=torch.Generator().manual_seed(SEED))
    result = train(MLPDenoiser(dim=2, width=256, depth=4),
                   ddpm_loss(make_schedule(TOY2D_CONFIG["schedule"])), points, steps=steps,
                   batch_size=512, lr=2e-3, ema_decay=0.999, seed=SEED, device=device,
                   state_path=state_path, progress=progress)
    return result, {**TOY2D_CONFIG, "batch_size": 512, "lr": 2e-3}


# --- digits DDPM -------------------------------------------------------------------------

DIGITS_UNET = dict(in_channels=1, base_channels=24, channel_mults=(1, 2), num_res_blocks=1)


def digits_card_quality(model, device, *, n: int = 1000, seed: int = 1) -> dict:
    """The card's judge report at n=1000, seed 1; the tests re-measure it at a smaller n."""
    return digits_quality(model, make_schedule("linear"), n=n, seed=seed, device=device)


@recipe("digits-ddpm", "UNet DDPM on 8x8 digits, linear schedule, eps target (chapter 1)", 6000,
        digits_card_quality)
def digits_ddpm(steps, device, state_path, progress):
    result = train(UNet(**DIGITS_UNET), ddpm_loss(make_schedule("linear")),
                   data.digits("train")[0], steps=steps, batch_size=128, lr=1e-3,
                   ema_decay=0.999, seed=SEED, device=device, state_path=state_path,
                   progress=progress)
    return result, {"schedule": "linear", "target": "eps", "batch_size": 128, "lr": 1e-3}
