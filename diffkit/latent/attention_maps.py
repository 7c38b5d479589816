"""Where each word of a prompt looks: the cross-attention maps of a whole sampling run.

In every cross-attention layer each image position (a query) spreads one unit of attention over
the prompt's tokens (the keys), so a token's map over the positions says where in the latent
that word is being read. ``record_word_maps`` runs diffkit's text-to-image loop with an
:class:`~diffkit.latent.cross_attention.AttentionRecorder` installed and returns, for every
sampler step, the maps of the conditional half of the guided batch, averaged over heads and
over the cross-attention layers at the latent's own resolution (the tiny UNet has three there,
SD 1.5 five at 64 x 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffkit.latent.cross_attention import AttentionRecorder


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Indices of ``word``'s tokens in the prompt's token sequence (BOS at 0), every occurrence;
    a word the tokenizer splits into several pieces gives all of them."""
    ids = tokenizer(prompt).input_ids
    piece = tokenizer(word, add_special_tokens=False).input_ids
    if not piece:
        raise ValueError(f"{word!r} has no tokens")
    found = [i + k for i in range(len(ids) - len(piece) + 1)
             if ids[i:i + len(piece)] == piece for k in range(len(piece))]
    if not found:
        raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}")
    return found


@torch.no_grad()
def record_word_maps(pipe, prompts: list[str], *, steps: int, guidance_scale: float,
                     sampler: str = "dpmpp_2m", generator=None, size: int | None = None):
    """(images (B, 3, H, W) in [-1, 1], maps (steps, B, tokens, h, w)): the run's images and,
    per step, every token's attention over the h x w latent (each position's map over the
    tokens sums to 1). ``size``: the side of the layers to average (default the latent's; the
    lower resolutions of the UNet have their own layers, SD's middle block at 8 x 8)."""
    from diffkit.latent.sd import text_to_image
    from diffkit.latent.vae import downsampling_factor

    n, unet = len(prompts), pipe.unet
    # the conditional half is the last n rows of a guided batch (and the whole of an unguided)
    recorder = AttentionRecorder(reduce=lambda p: p[-n:].mean(1)).name_layers(unet)
    previous = unet.attn_processors
    unet.set_attn_processor(recorder)
    try:
        images = text_to_image(pipe, prompts, steps=steps, guidance_scale=guidance_scale,
                               sampler=sampler, generator=generator)
    finally:
        unet.set_attn_processor(previous)
    h = w = size or images.shape[-1] // downsampling_factor(pipe.vae)
    full = [m for _, m in recorder.maps if m.shape[1] == h * w]
    if not full or len(full) % steps:
        raise ValueError(f"expected the same number of {h}x{w} cross-attention maps at each of "
                         f"{steps} steps, got {len(full)}")
    maps = torch.stack(full).view(steps, len(full) // steps, n, h * w, -1).mean(1)
    return images, maps.transpose(2, 3).reshape(steps, n, -1, h, w)


def mass_inside(word_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's attention (B, h, w) that falls inside a pixel mask (B, H, W), the
    mask's coverage of each latent cell taken as its weight."""
    if word_maps.ndim != 3 or masks.ndim != 3 or len(word_maps) != len(masks):
        raise ValueError(f"expected maps (B, h, w) and masks (B, H, W), got "
                         f"{tuple(word_maps.shape)} and {tuple(masks.shape)}")
    cover = F.adaptive_avg_pool2d(masks[:, None].float(), word_maps.shape[-2:])[:, 0]
    total = word_maps.flatten(1).sum(1).clamp_min(1e-12)
    return (word_maps * cover).flatten(1).sum(1) / total


def centroid(word_maps: torch.Tensor) -> torch.Tensor:
    """Attention-weighted centre (B, 2) of maps (B, h, w), as (x, y) in [0, 1] of the image."""
    b, h, w = word_maps.shape
    weights = word_maps / word_maps.flatten(1).sum(1).clamp_min(1e-12).view(b, 1, 1)
    xs = (torch.arange(w, dtype=weights.dtype) + 0.5) / w
    ys = (torch.arange(h, dtype=weights.dtype) + 0.5) / h
    return torch.stack([(weights.sum(1) * xs).sum(1), (weights.sum(2) * ys).sum(1)], 1)
