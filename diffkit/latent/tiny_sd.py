"""The parts of the book's tiny Stable Diffusion: its UNet, the latent-diffusion loss, assembly.

The tiny SD is made of the book's own trained parts: the VAE ``shapes-vae`` (chapter 8) and the
text encoder of ``shapes-clip`` (chapter 6), both frozen, and a small ``UNet2DConditionModel``
trained here, in SD's block order (cross-attention blocks first, a plain block last, mirrored
on the way up: diffusers' adapters expect it). ``build_pipeline`` puts them into a real
``StableDiffusionPipeline`` whose ``save_pretrained`` folder loads with ``from_pretrained``.

The loss is SD's (Rombach et al. 2022, eq. 2) on latents already scaled by the VAE's factor:
z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with t uniform, and the UNet regresses eps (or v)
given z_t, t and the text states; a fraction ``caption_dropout`` of the captions is replaced by
the empty prompt's states, which is what classifier-free guidance needs at sampling time.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

# SD 1.x's noise schedule and scheduler settings (steps_offset=1 and clip_sample=False, or the
# pipeline rewrites a scheduler it is given)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                   beta_end=0.012, steps_offset=1, timestep_spacing="leading")
TINY_UNET = dict(layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
                 attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TARGETS = ("epsilon", "v_prediction")


def make_unet(cross_attention_dim: int, *, latent_channels: int = 4, sample_size: int = 8,
              **overrides) -> UNet2DConditionModel:
    """The tiny conditional UNet on (latent_channels, sample_size, sample_size) latents."""
    config = {**TINY_UNET, **overrides}
    return UNet2DConditionModel(sample_size=sample_size, in_channels=latent_channels,
                                out_channels=latent_channels,
                                cross_attention_dim=cross_attention_dim, **config)


def make_scheduler(kind: str = "dpmpp_2m", prediction_type: str = "epsilon"):
    """A diffusers scheduler on SD's schedule: "dpmpp_2m", "euler", "euler_ancestral" or
    "ddim"."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    kinds = {"dpmpp_2m": (DPMSolverMultistepScheduler,
                          dict(algorithm_type="dpmsolver++", solver_order=2)),
             "euler": (EulerDiscreteScheduler, {}),
             "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
             "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=False))}
    if kind not in kinds:
        raise ValueError(f"unknown scheduler {kind!r}; expected one of {sorted(kinds)}")
    cls, extra = kinds[kind]
    return cls(**SD_SCHEDULE, prediction_type=prediction_type, **extra)


def frozen_parts(root=None, device=None):
    """(vae, text_encoder, tokenizer): the shipped ``shapes-vae`` and the text half of
    ``shapes-clip`` (a transformers ``CLIPTextModel`` and its ``CLIPTokenizer``), frozen."""
    from diffkit import checkpoints

    vae, _ = checkpoints.load_model("shapes-vae", root=root, device=device)
    clip, _ = checkpoints.load_model("shapes-clip", root=root, device=device)
    for module in (vae, clip):
        module.requires_grad_(False)
    return vae, clip.text_model, clip.tokenizer


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """The captions' token ids (N, L), padded to the tokenizer's length. A caption longer than
    that is refused (training on a silently cut caption teaches the wrong words)."""
    limit = tokenizer.model_max_length
    pieces = tokenizer(list(captions), padding="max_length", max_length=limit).input_ids
    longest = max(range(len(pieces)), key=lambda i: len(pieces[i]), default=None)
    if longest is not None and len(pieces[longest]) > limit:
        raise ValueError(f"captions must fit the tokenizer's {limit} tokens; "
                         f"{captions[longest]!r} takes {len(pieces[longest])}")
    return torch.tensor(pieces, dtype=torch.long)


@torch.no_grad()
def text_states(text_encoder, tokenizer, captions: list[str], *, batch: int = 1000):
    """Per-token states (N, L, D) of the captions (:func:`token_ids`, so a caption longer than
    the tokenizer's length is refused)."""
    ids = token_ids(tokenizer, captions).to(text_encoder.device)
    return torch.cat([text_encoder(chunk)[0] for chunk in ids.split(batch)])


@torch.no_grad()
def encode_pool(vae, text_encoder, tokenizer, images, captions, *, generator=None,
                batch: int = 1000):
    """The training pool of latent diffusion, computed once because both encoders are frozen:
    scaled latents (a posterior sample, as SD trains) and the captions' text states."""
    from diffkit.latent import vae as V

    latents = V.encode(vae, images, generator=generator, batch_size=batch)
    return latents, text_states(text_encoder, tokenizer, captions, batch=batch)


def build_pipeline(vae, text_encoder, tokenizer, unet, scheduler=None):
    """A ``StableDiffusionPipeline`` of the given parts (no safety checker: nothing to check)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler or make_scheduler(),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


class LatentDiffusionLoss:
    """SD's training loss on batches (scaled latents (B, C, h, w), text states (B, L, D)).

    ``empty``: the text states (1, L, D) of the empty prompt, which replace a caption with
    probability ``caption_dropout``; ``target``: "epsilon" or "v_prediction" (v = sqrt(abar) eps
    - sqrt(1 - abar) z_0). All randomness comes from the loop's generator.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, empty: torch.Tensor, *,
                 caption_dropout: float = 0.1, target: str = "epsilon",
                 snr_gamma: float | None = None):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if (isinstance(caption_dropout, bool) or not isinstance(caption_dropout, numbers.Real)
                or not 0 <= caption_dropout < 1):
            raise ValueError(f"caption_dropout must lie in [0, 1), got {caption_dropout!r}")
        if empty.ndim != 3 or empty.shape[0] != 1:
            raise ValueError(f"empty must be the (1, L, D) states of the empty prompt, got "
                             f"{tuple(empty.shape)}")
        if snr_gamma is not None and not (isinstance(snr_gamma, numbers.Real)
                                          and not isinstance(snr_gamma, bool) and snr_gamma > 0):
            raise ValueError(f"snr_gamma must be None or a positive number, got {snr_gamma!r}")
        self.snr_gamma = snr_gamma
        self.abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        self.empty, self.caption_dropout, self.target = empty, float(caption_dropout), target

    def __call__(self, unet, batch, generator=None) -> torch.Tensor:
        latents, states = batch
        if latents.ndim != 4 or states.ndim != 3 or len(latents) != len(states):
            raise ValueError(f"batch must be latents (B, C, h, w) and text states (B, L, D), got "
                             f"{tuple(latents.shape)} and {tuple(states.shape)}")
        n, device = len(latents), latents.device
        t = torch.randint(0, len(self.abar), (n,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        drop = (torch.rand(n, generator=generator) < self.caption_dropout).to(device)
        states = torch.where(drop[:, None, None], self.empty.to(device), states)
        abar = self.abar[t].to(device).view(-1, 1, 1, 1)
        z_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        prediction = unet(z_t, t.to(device), encoder_hidden_states=states).sample
        if self.target == "epsilon":
            goal = noise
        else:
            goal = abar.sqrt() * noise - (1 - abar).sqrt() * latents
        if self.snr_gamma is None:
            return F.mse_loss(prediction, goal)
        # Min-SNR-gamma (Hang et al. 2023): weight each t by min(SNR, gamma) / SNR for epsilon
        # (/ (SNR + 1) for v), which caps the low-noise steps' share of the gradient
        snr = (abar / (1 - abar)).flatten()
        weight = snr.clamp(max=self.snr_gamma) / (snr if self.target == "epsilon" else snr + 1)
        per_sample = F.mse_loss(prediction, goal, reduction="none").flatten(1).mean(1)
        return (weight * per_sample).mean()
