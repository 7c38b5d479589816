"""Recipes of chapter 2 (noise schedules).

Each recipe registers itself in ``diffkit.recipes.registry.RECIPES`` with the ``recipe`` decorator.
``digits-ddpm-cosine`` is the ``digits-ddpm`` recipe with one change, the cosine schedule of
Improved DDPM (Nichol & Dhariwal 2021, eq. 17), so that chapter 2 can compare the two
schedules on the same network, data, steps, optimiser, EMA and seed.
"""

from __future__ import annotations

from diffkit import data
from diffkit.diffusion.schedules import make_schedule
from diffkit.nn import unet
from diffkit.recipes.ddpm import DIGITS_UNET, ddpm_loss, digits_quality
from diffkit.recipes.registry import SEED, recipe
from diffkit.train import train

COSINE_SCHEDULE = "cosine"


def digits_cosine_card_quality(model, device, *, n: int = 1000, seed: int = 1) -> dict:
    # Sampled exactly like digits-ddpm's card (ancestral DDPM, 1000 steps, n=1000, seed 1),
    # only with the schedule the model was trained on.
    return digits_quality(model, make_schedule(COSINE_SCHEDULE), n=n, seed=seed, device=device)


@recipe("digits-ddpm-cosine",
        "UNet DDPM on 8x8 digits, cosine schedule, eps target (chapter 2)", 6000,
        digits_cosine_card_quality)
def digits_ddpm_cosine(steps, device, state_path, progress):
    result = train(unet.UNet(**DIGITS_UNET), ddpm_loss(make_schedule(COSINE_SCHEDULE)),
                   data.digits("train")[0], steps=steps, batch_size=128, lr=1e-3,
                   ema_decay=0.999, seed=SEED, device=device, state_path=state_path,
                   progress=progress)
    return result, {"schedule": COSINE_SCHEDULE, "target": "eps", "batch_size": 128,
                    "lr": 1e-3}
