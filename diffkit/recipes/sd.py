"""Recipe of chapter 9: ``shapes-sd``, the book's tiny Stable Diffusion.

The VAE ``shapes-vae`` and the text encoder of ``shapes-clip`` are frozen, so their outputs are
computed once for the whole pool (scaled posterior-sample latents, per-token text states) and
only the UNet trains, on SD's epsilon loss with 10% caption dropout, on one- and two-object
scenes. The checkpoint is the whole ``StableDiffusionPipeline`` as ``save_pretrained`` writes it
(its scheduler the recommended one), so ``StableDiffusionPipeline.from_pretrained`` loads it
offline; the card records the recommended steps and guidance scale and what the shapes judge
reads at them (:mod:`diffkit.eval.sd_probes`).
"""

from __future__ import annotations

import torch

from diffkit.data.shapes import make_shapes
from diffkit.eval import sd_probes
from diffkit.latent import tiny_sd
from diffkit.recipes.registry import SEED, recipe
from diffkit.train import TrainResult, train

SD_TRAIN_SEED = 909
SD_UNET = dict(block_out_channels=(32, 64), layers_per_block=1)
SD_HYPER = dict(pool=20_000, batch_size=128, lr=1e-3, ema_decay=0.999, warmup=100,
                caption_dropout=0.1, target="epsilon")
# what the card recommends and the chapter and tests use: DPM-Solver++(2M), the saved scheduler
RECOMMENDED = dict(scheduler="dpmpp_2m", num_inference_steps=20, guidance_scale=3.0)


def shapes_sd_quality(pipe, device, *, n: int = 200, seed: int = sd_probes.SD_TEST_SEED) -> dict:
    pipe = pipe.to(device)
    figures = sd_probes.attribute_report(
        pipe, n=n, seed=seed, steps=RECOMMENDED["num_inference_steps"],
        guidance_scale=RECOMMENDED["guidance_scale"], sampler=RECOMMENDED["scheduler"])
    return {**figures, "n": n, "seed": seed, **RECOMMENDED}


@recipe("shapes-sd", "tiny Stable Diffusion: UNet2DConditionModel on shapes-vae latents, "
        "conditioned on the shapes-clip text encoder (chapter 9)", 6000, shapes_sd_quality,
        time_bar_seconds=45 * 60)
def shapes_sd(steps, device, state_path, progress):
    vae, text_encoder, tokenizer = tiny_sd.frozen_parts(device=device)
    scenes = make_shapes(SD_HYPER["pool"], seed=SD_TRAIN_SEED)
    latents, states = tiny_sd.encode_pool(vae, text_encoder, tokenizer, scenes.images,
                                          scenes.captions,
                                          generator=torch.Generator().manual_seed(SEED))
    empty = tiny_sd.text_states(text_encoder, tokenizer, [""])
    torch.manual_seed(SEED)
    unet = tiny_sd.make_unet(text_encoder.config.hidden_size,
                             sample_size=latents.shape[-1], **SD_UNET)
    scheduler = tiny_sd.make_scheduler(RECOMMENDED["scheduler"], SD_HYPER["target"])
    loss = tiny_sd.LatentDiffusionLoss(scheduler.alphas_cumprod, empty,
                                       caption_dropout=SD_HYPER["caption_dropout"],
                                       target=SD_HYPER["target"])
    keys = ("batch_size", "lr", "ema_decay", "warmup")
    result = train(unet, loss, (latents.cpu(), states.cpu()), steps=steps, seed=SEED, device=device,
                   state_path=state_path, progress=progress, **{k: SD_HYPER[k] for k in keys})
    pipe = tiny_sd.build_pipeline(vae, text_encoder, tokenizer, result.ema.eval(), scheduler)
    pipe.set_progress_bar_config(disable=True)
    parameters = sum(p.numel() for p in result.ema.parameters())
    return (TrainResult(pipe, pipe, result.losses, result.steps, result.wall_time,
                        result.resumed_from),
            {**SD_HYPER, "unet": SD_UNET, "unet_parameters": parameters,
             "train_seed": SD_TRAIN_SEED, "recommended": RECOMMENDED})
