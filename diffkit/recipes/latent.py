"""Recipes of chapter 8 (the latent space): ``shapes-vae``, the VAE chapter 9's Stable Diffusion
draws in, ``shapes-vae-ft``, its decoder fine-tuned to draw the fine-tuning chapters' two new
concepts (the encoder, hence every latent, unchanged), and ``patches-vae``, a family of
natural-patch VAEs for the blur and rate-distortion studies. Each is a diffusers
``save_pretrained`` folder (the family: one subfolder per member) that
``AutoencoderKL.from_pretrained`` loads offline. What they measure is in
:mod:`diffkit.eval.vae_probes`."""

from __future__ import annotations

import functools

import torch

from diffkit import checkpoints
from diffkit.data.patches import natural_patches
from diffkit.data.shapes import ALL_COLOURS, ALL_SHAPES, make_shapes
from diffkit.eval import vae_probes
from diffkit.latent import vae as V
from diffkit.recipes.registry import SEED, member_state_path, recipe
from diffkit.train import TrainResult, train

SHAPES_TRAIN_SEED = 808
PATCHES_TRAIN_SEED = 809
SHAPES_VAE = dict(latent_channels=4)
SHAPES_HYPER = dict(pool=20_000, batch_size=64, lr=2e-3, ema_decay=0.999, warmup=200,
                    kl_weight=1e-6, mse_weight=1.0)


def _fit(vae_or_model, loss, pool, steps, device, state_path, progress, hyper, **extra):
    keys = ("batch_size", "lr", "ema_decay", "warmup")
    return train(vae_or_model, loss, pool, steps=steps, seed=SEED, device=device,
                 state_path=state_path, progress=progress, **{k: hyper[k] for k in keys}, **extra)


def shapes_quality(vae, device, **kw) -> dict:
    return vae_probes.shapes_report(vae, device, **kw)


@recipe("shapes-vae", "tiny AutoencoderKL (x4, 4 latent channels) on shapes scenes (chapter 8)",
        4500, shapes_quality)
def shapes_vae(steps, device, state_path, progress):
    pool = make_shapes(SHAPES_HYPER["pool"], seed=SHAPES_TRAIN_SEED).images
    vae = V.make_vae(**SHAPES_VAE)
    loss = functools.partial(V.vae_loss, kl_weight=SHAPES_HYPER["kl_weight"],
                             mse_weight=SHAPES_HYPER["mse_weight"])
    result = _fit(vae, loss, pool, steps, device, state_path, progress, SHAPES_HYPER)
    factor = V.set_scaling_factor(result.ema, pool[:4096].to(device))
    return result, {**SHAPES_HYPER, "vae": SHAPES_VAE, "train_seed": SHAPES_TRAIN_SEED,
                    "scaling_factor": factor}


# --- shapes-vae-ft: the decoder taught the concepts, the latent space kept -------------------
# As stabilityai/sd-vae-ft-mse for SD 1.x: only the decoder trains, so the encoder maps every
# image to the latent it had, every UNet trained on shapes-vae (shapes-sd, the control models)
# works unchanged, and the VAE can now draw what the LoRA / DreamBooth chapters teach the UNet.
# The pool: base scenes (so the base world stays drawn as before), scenes of the extended
# vocabularies, and scenes of each concept alone.

FT_TRAIN_SEED = 810
FT_HYPER = dict(part=5000, batch_size=64, lr=1e-3, ema_decay=0.999, warmup=50, kl_weight=1e-6,
                mse_weight=1.0, trained="decoder, post_quant_conv")
FT_PARTS = {"base": {}, "extended": dict(shapes=ALL_SHAPES, colours=ALL_COLOURS),
            "orange": dict(shapes=ALL_SHAPES, colours=("orange",)),
            "ring": dict(shapes=("ring",), colours=ALL_COLOURS)}
ENCODER = ("encoder.", "quant_conv.")


def encoder_change(vae, base) -> float:
    """The largest change of an encoder weight from ``base`` (0.0: the latents are the same)."""
    ref = base.state_dict()
    return max((v.cpu() - ref[k].cpu()).abs().max().item()
               for k, v in vae.state_dict().items() if k.startswith(ENCODER))


def shapes_vae_ft_quality(vae, device, **kw) -> dict:
    base, _ = checkpoints.load_model("shapes-vae", device=device)
    return {**vae_probes.shapes_report(vae, device, **kw),
            **{f"concept_{k}": v for k, v in vae_probes.concept_report(vae, device, **kw).items()},
            "encoder_max_change": encoder_change(vae, base)}


@recipe("shapes-vae-ft", "shapes-vae with its decoder fine-tuned on scenes with orange and "
        "rings, the encoder frozen (chapter 11)", 1500, shapes_vae_ft_quality)
def shapes_vae_ft(steps, device, state_path, progress):
    vae, _ = checkpoints.load_model("shapes-vae")
    vae.train()
    for name, module in vae.named_children():
        module.requires_grad_(f"{name}." not in ENCODER)
    pool = torch.cat([make_shapes(FT_HYPER["part"], seed=FT_TRAIN_SEED + i, **vocabulary).images
                      for i, vocabulary in enumerate(FT_PARTS.values())])
    loss = functools.partial(V.vae_loss, kl_weight=FT_HYPER["kl_weight"],
                             mse_weight=FT_HYPER["mse_weight"])
    result = _fit(vae, loss, pool, steps, device, state_path, progress, FT_HYPER)
    # the scaling factor is the base's: the latents are the same
    return result, {**FT_HYPER, "parts": list(FT_PARTS), "train_seed": FT_TRAIN_SEED,
                    "scaling_factor": vae.config.scaling_factor}


# --- patches-vae: the family of chapter 8's sweeps --------------------------------------------

PATCHES_HYPER = dict(pool=12_000, batch_size=64, lr=2e-3, ema_decay=0.995, warmup=100,
                     mse_weight=1.0, finetune_fraction=0.4, finetune_lr=2e-4,
                     adversarial_weight=0.1)
# the base (SD's KL weight, x4, 4 channels), then one change at a time
PATCHES_MEMBERS = {
    "base": dict(kl_weight=1e-6),
    "kl-1e-4": dict(kl_weight=1e-4),
    "kl-1e-2": dict(kl_weight=1e-2),
    "kl-1": dict(kl_weight=1.0),
    "factor-2": dict(kl_weight=1e-6, block_out_channels=(16, 32)),
    "channels-8": dict(kl_weight=1e-6, latent_channels=8),
}
# the second loss term: both start from the trained base and train finetune_fraction * steps
# more at finetune_lr, one with the adversarial term and one without (the control)
FINETUNED = ("continued", "adversarial")


def patches_quality(models, device, *, n: int = 500, **kw) -> dict:
    return vae_probes.family_report(models, device, n=n, **kw)


@recipe("patches-vae", "tiny AutoencoderKL family on natural skimage patches: KL sweep, x2, "
        "8 channels, adversarial term (chapter 8)", 800, patches_quality)
def patches_vae(steps, device, state_path, progress):
    hyper = PATCHES_HYPER
    pool = natural_patches(hyper["pool"], split="train", seed=PATCHES_TRAIN_SEED)
    members, results = {}, {}
    for name, spec in PATCHES_MEMBERS.items():
        arch = {k: v for k, v in spec.items() if k != "kl_weight"}
        torch.manual_seed(SEED)
        loss = functools.partial(V.vae_loss, kl_weight=spec["kl_weight"],
                                 mse_weight=hyper["mse_weight"])
        results[name] = _fit(V.make_vae(**arch), loss, pool, steps, device,
                             member_state_path(state_path, name), progress, hyper)
        members[name] = results[name].ema
    extra = max(1, round(hyper["finetune_fraction"] * steps))
    tune = {**hyper, "lr": hyper["finetune_lr"], "warmup": 1}
    for name in FINETUNED:
        vae = V.make_vae()
        vae.load_state_dict(members["base"].state_dict())
        weight = hyper["adversarial_weight"] if name == "adversarial" else 0.0
        torch.manual_seed(SEED)
        model = V.AdversarialVAE(vae, V.PatchDiscriminator())
        loss = functools.partial(V.adversarial_vae_loss, kl_weight=1e-6,
                                 mse_weight=hyper["mse_weight"], adversarial_weight=weight)
        results[name] = _fit(model, loss, pool, extra, device, member_state_path(state_path, name),
                             progress, tune, lr_schedule="constant")
        members[name] = results[name].ema.vae
    for vae in members.values():   # every member's own factor, as for shapes-vae
        V.set_scaling_factor(vae, pool[:4096].to(device))
    family = torch.nn.ModuleDict(members)
    base = results["base"]
    result = TrainResult(family, family, base.losses, steps,
                         sum(r.wall_time for r in results.values()), base.resumed_from)
    return result, {**hyper, "members": PATCHES_MEMBERS, "finetuned": list(FINETUNED),
                    "finetune_steps": extra, "train_seed": PATCHES_TRAIN_SEED}

