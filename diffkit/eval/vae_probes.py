"""What a VAE keeps and loses, measured: the card figures of ``shapes-vae`` and ``patches-vae``.

``shapes_report`` is the ceiling any latent diffusion model on the VAE can reach: the shapes
judge reads held-out scenes after one encode-decode round trip; ``concept_report`` does the same
for the two concepts of the fine-tuning chapters (orange, the ring), which a LoRA can teach the
UNet only if the VAE can draw them. ``patches_report`` measures one
natural-patch VAE: PSNR, the power kept per frequency band, the KL rate (per latent entry and
per channel), and how far the latents are from filling the prior: a Frechet distance between
posterior samples z ~ q(z | x) of the data, flattened, and as many draws of N(0, I). Decoding a
prior draw gives data-like images only where that distance is small.
"""

from __future__ import annotations

import torch

from diffkit.data.patches import natural_patches
from diffkit.data.shapes import ALL_COLOURS, ALL_SHAPES, SIZES, make_shapes
from diffkit.eval import blur
from diffkit.eval.metrics import frechet_distance
from diffkit.eval.shapes_judge import judge, judge_accuracy
from diffkit.latent import vae as V

SHAPES_TEST_SEED = 1808          # held-out scenes (the training pool uses another seed)
PATCHES_TEST_SEED = 1809
N_BANDS = 8


def _rounded(d: dict, digits: int = 4) -> dict:
    return {k: round(float(v), digits) for k, v in d.items()}


@torch.no_grad()
def shapes_report(vae, device="cpu", *, n: int = 500, seed: int = SHAPES_TEST_SEED) -> dict:
    """Judge accuracy and PSNR on n held-out one-object and n two-object reconstructions."""
    vae = vae.to(device).eval()
    out = {}
    for objects in (1, 2):
        scenes = make_shapes(n, seed=seed + objects, objects=objects)
        recon = V.reconstruct(vae, scenes.images.to(device)).cpu()
        accuracy = judge_accuracy(scenes, recon)
        out.update({f"{k}_{objects}obj": v for k, v in accuracy.items()
                    if k in ("shape", "colour", "size", "position", "count", "object")})
        out[f"psnr_{objects}obj"] = blur.psnr(recon, scenes.images).mean().item()
        if objects == 1:
            out["band_energy_ratio_1obj"] = blur.band_energy_ratio(recon, scenes.images,
                                                                   N_BANDS).tolist()
    out = _rounded({k: v for k, v in out.items() if not isinstance(v, list)}) | {
        "band_energy_ratio_1obj": [round(v, 4) for v in out["band_energy_ratio_1obj"]]}
    out.update(scaling_factor=round(float(vae.config.scaling_factor), 5), n=n, seed=seed)
    return out


@torch.no_grad()
def concept_report(vae, device="cpu", *, n: int = 500, seed: int = SHAPES_TEST_SEED) -> dict:
    """The judge (concept vocabularies) on round trips of n held-out one-object scenes of each
    concept: "orange_colour" (orange scenes read orange), "orange_shape", and "ring_shape_small"
    / "ring_shape_large" (rings read as rings, by size: a small ring's hole is 4 px wide, one
    latent cell at x4)."""
    vae = vae.to(device).eval()
    vocabulary = dict(shapes=ALL_SHAPES, colours=ALL_COLOURS)
    orange = make_shapes(n, seed=seed + 3, objects=1, colours=("orange",))
    accuracy = judge_accuracy(orange, V.reconstruct(vae, orange.images.to(device)).cpu(),
                              **vocabulary)
    out = {"orange_colour": accuracy["colour"], "orange_shape": accuracy["shape"]}
    rings = make_shapes(n, seed=seed + 4, objects=1, shapes=("ring",))
    read = judge(V.reconstruct(vae, rings.images.to(device)).cpu(), **vocabulary)
    for size in SIZES:
        found = [any(o.shape == "ring" for o in seen)
                 for truth, seen in zip(rings.objects, read) if truth[0].size == size]
        out[f"ring_shape_{size}"] = sum(found) / max(1, len(found))
    return _rounded(out) | {"n": n, "seed": seed}


@torch.no_grad()
def patches_report(vae, device="cpu", *, n: int = 1000, seed: int = PATCHES_TEST_SEED) -> dict:
    """PSNR, band energy ratios, KL rate and the latent-to-prior distance of one VAE."""
    vae = vae.to(device).eval()
    patches = natural_patches(n, split="test", seed=seed)
    post = vae.encode(patches.to(device)).latent_dist
    recon = vae.decode(post.mean).sample.clamp(-1, 1).cpu()
    kl = V.kl_to_standard_normal(post.mean, post.logvar).mean().item() / post.mean[0].numel()
    g = torch.Generator().manual_seed(seed)
    mean, std = post.mean.cpu(), post.std.cpu()
    z = mean + std * torch.randn(mean.shape, generator=g)
    prior = torch.randn(mean.shape, generator=g)
    kl_channel = 0.5 * (mean ** 2 + std ** 2 - 1 - 2 * std.log()).mean((0, 2, 3))
    return {
        "psnr": round(blur.psnr(recon, patches).mean().item(), 3),
        "l1": round((recon - patches).abs().mean().item(), 5),
        "kl_per_latent_entry": round(kl, 5),
        "band_energy_ratio": [round(v, 4) for v in blur.band_energy_ratio(recon, patches,
                                                                         N_BANDS).tolist()],
        "band_error_ratio": [round(v, 4) for v in blur.band_error_ratio(recon, patches,
                                                                       N_BANDS).tolist()],
        "latent_channel_mean": [round(v, 4) for v in mean.mean((0, 2, 3)).tolist()],
        "latent_channel_std": [round(v, 4) for v in mean.std((0, 2, 3)).tolist()],
        "kl_per_channel": [round(v, 4) for v in kl_channel.tolist()],
        "latent_prior_frechet": round(frechet_distance(z.flatten(1), prior.flatten(1)), 3),
        "latent_numbers": post.mean[0].numel(), "n": n, "seed": seed,
    }


def family_report(models, device="cpu", **kw) -> dict:
    """patches_report for every member of a family (a ModuleDict of VAEs)."""
    return {name: patches_report(vae, device, **kw) for name, vae in models.items()}
