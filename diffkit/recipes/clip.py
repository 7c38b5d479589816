"""Recipe of chapter 6 (CLIP) on the captioned-shapes world; the probes that measure it are in
:mod:`diffkit.eval.clip_probes`."""

from __future__ import annotations

from diffkit.data.shapes import make_shapes
from diffkit.eval.clip_probes import CLIP_TEST_SEED, CLIP_TRAIN_SEED, clip_report
from diffkit.recipes.registry import SEED, recipe
from diffkit.text import clip
from diffkit.train import train

CLIP_POOL = 40_000          # pre-generated training pairs; each step draws a fresh batch of them


def clip_card_quality(model, device, *, n: int = 1000, seed: int = CLIP_TEST_SEED) -> dict:
    return clip_report(model.to(device), n=n, seed=seed)


CLIP_HYPER = dict(batch_size=128, lr=1e-3, weight_decay=0.0, ema_decay=0.99, warmup=100,
                  pool=CLIP_POOL)


@recipe("shapes-clip", "tiny CLIP (CNN + CLIPTextModel) on captioned shapes (chapter 6)", 1000,
        clip_card_quality)
def shapes_clip(steps, device, state_path, progress):
    pool = make_shapes(CLIP_POOL, seed=CLIP_TRAIN_SEED)
    model = clip.TinyCLIP()
    data = (clip.to_uint8_images(pool.images), model.tokenize(pool.captions))
    hyper = {k: v for k, v in CLIP_HYPER.items() if k != "pool"}
    result = train(model, clip.clip_loss, data, steps=steps, seed=SEED, device=device,
                   state_path=state_path, progress=progress, **hyper)
    return result, {**CLIP_HYPER, "train_seed": CLIP_TRAIN_SEED, "test_seed": CLIP_TEST_SEED}
