"""ControlNet on Stable Diffusion (Zhang et al. 2023): a trainable copy of the UNet's encoder
whose outputs, through zero-initialised convolutions, are added to the frozen UNet's skips.

``make_controlnet`` is diffusers' ``ControlNetModel.from_unet``: it copies the UNet's
``conv_in``, time embedding, down blocks and middle block (weights included), adds a small conv
net that encodes the condition image to the latent's size (its last convolution zero), and a
1 x 1 convolution after every down-block output and after the middle block, all zero. So at
initialisation every residual is zero and the pipeline's output equals the base SD's exactly.
The zero convolutions do not block learning: for a residual r = W h + b with W = b = 0, the
loss gradient with respect to W is (dL/dr) h^T, not zero because the copy's features h are not,
while the gradient reaching the copy, W^T dL/dr, is zero. So the first step moves only the zero
convolutions (and the condition encoder's zero output layer), and from the second step on the
gradient flows into the copy as well (checked in the tests).

``control_denoiser`` is the UNet with the ControlNet as one denoiser D(x, sigma; text) on the
scheduler's table, so ``sd.text_to_image(..., denoiser=...)`` samples with it; the tests check
that this equals ``StableDiffusionControlNetPipeline``.
"""

from __future__ import annotations

import numbers

import torch

from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.latent.sd import unet_denoiser
from diffkit.latent.vae import downsampling_factor


def make_controlnet(unet, vae, *, embedding_channels: tuple[int, ...] | None = None):
    """``ControlNetModel.from_unet(unet)`` with a condition encoder that downsamples by the VAE's
    factor (diffusers' default, x8, fails on a x4 VAE with a bare size error)."""
    from diffusers import ControlNetModel

    factor = downsampling_factor(vae)
    levels = factor.bit_length()            # 2 ** (levels - 1) == factor
    if 2 ** (levels - 1) != factor:
        raise ValueError(f"the VAE factor {factor} is not a power of two")
    channels = embedding_channels or tuple(8 * 2 ** i for i in range(levels))
    if len(channels) != levels:
        raise ValueError(f"embedding_channels needs {levels} entries to downsample by {factor}, "
                         f"got {channels}")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)


def zero_modules(controlnet) -> list[str]:
    """Names of the ControlNet's modules whose weights and biases are all zero."""
    return [name for name, m in controlnet.named_modules()
            if list(m.parameters(recurse=False))
            and all(bool((p == 0).all()) for p in m.parameters(recurse=False))]


def _check_condition(condition: torch.Tensor, height: int, width: int) -> None:
    if (not isinstance(condition, torch.Tensor) or condition.ndim != 4 or condition.shape[1] != 3
            or tuple(condition.shape[-2:]) != (height, width)):
        got = tuple(condition.shape) if isinstance(condition, torch.Tensor) else type(condition)
        raise ValueError(f"the condition must be images (B, 3, {height}, {width}) in [0, 1], "
                         f"got {got}")


def _checked(pipe, condition: torch.Tensor, scale) -> tuple[torch.Tensor, float]:
    """The condition on the UNet's device and dtype and the scale as a float, once both are
    checked: images of the pipeline's size and a non-negative number."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or scale < 0:
        raise ValueError(f"the conditioning scale must be a non-negative number, got {scale!r}")
    size = pipe.unet.config.sample_size * downsampling_factor(pipe.vae)
    _check_condition(condition, size, size)
    return condition.to(pipe.unet.device, pipe.unet.dtype), float(scale)


def control_denoiser(pipe, controlnet, condition: torch.Tensor, *,
                     scale: float = 1.0) -> DiscreteTimeDenoiser:
    """D(x, sigma; encoder_hidden_states) of ``pipe.unet`` with ``controlnet``'s residuals for
    ``condition`` (B, 3, H, W) in [0, 1] (as the pipeline takes it, not normalised), weighted
    by ``scale`` (the pipeline's ``controlnet_conditioning_scale``). A guided batch (unconditional
    and conditional halves) gets the condition once per half, as in the pipeline."""
    condition, scale = _checked(pipe, condition, scale)

    def model(x_t, t, encoder_hidden_states):
        repeated = condition.repeat(len(x_t) // len(condition), 1, 1, 1)
        down, middle = controlnet(x_t, t, encoder_hidden_states=encoder_hidden_states,
                                  controlnet_cond=repeated, conditioning_scale=scale,
                                  return_dict=False)
        return pipe.unet(x_t, t, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=down,
                         mid_block_additional_residual=middle).sample

    return unet_denoiser(pipe, model)


def make_t2i_adapter(unet, vae, *, num_res_blocks: int = 2):
    """A diffusers ``T2IAdapter`` ("full_adapter", Mou et al. 2023) for ``unet``: the condition
    image pixel-unshuffled by the VAE's factor, then one stage of ``num_res_blocks`` ResNet
    blocks per UNet resolution, each stage's output (the UNet block's width) added to that
    down block's output. No copy of the UNet and no text or time input: the features are
    computed once per image, not once per step."""
    from diffusers import T2IAdapter

    return T2IAdapter(in_channels=3, channels=list(unet.config.block_out_channels),
                      num_res_blocks=num_res_blocks, downscale_factor=downsampling_factor(vae),
                      adapter_type="full_adapter")


def adapter_denoiser(pipe, adapter, condition: torch.Tensor, *,
                     scale: float = 1.0) -> DiscreteTimeDenoiser:
    """D(x, sigma; encoder_hidden_states) of ``pipe.unet`` with the T2I-Adapter's features of
    ``condition`` (B, 3, H, W) in [0, 1] times ``scale`` (``adapter_conditioning_scale``) added
    inside its down blocks, as ``StableDiffusionAdapterPipeline`` adds them."""
    condition, scale = _checked(pipe, condition, scale)
    with torch.no_grad():
        features = [f * scale for f in adapter(condition)]

    def model(x_t, t, encoder_hidden_states):
        repeat = len(x_t) // len(condition)
        return pipe.unet(x_t, t, encoder_hidden_states=encoder_hidden_states,
                         down_intrablock_additional_residuals=[
                             f.repeat(repeat, 1, 1, 1) for f in features]).sample

    return unet_denoiser(pipe, model)


def make_denoiser(pipe, control, condition: torch.Tensor, *, scale: float = 1.0):
    """``control_denoiser`` for a ``ControlNetModel``, ``adapter_denoiser`` for a
    ``T2IAdapter``."""
    from diffusers import ControlNetModel, T2IAdapter

    if isinstance(control, ControlNetModel):
        return control_denoiser(pipe, control, condition, scale=scale)
    if isinstance(control, T2IAdapter):
        return adapter_denoiser(pipe, control, condition, scale=scale)
    raise ValueError(f"control must be a ControlNetModel or a T2IAdapter, "
                     f"got {type(control).__name__}")


def _with_control(cls_name: str, pipe, **control):
    """diffusers pipeline ``cls_name`` of ``pipe``'s parts and the control model given by name."""
    import diffusers

    out = getattr(diffusers, cls_name)(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, **control)
    out.set_progress_bar_config(disable=True)
    return out


def controlnet_pipeline(pipe, controlnet):
    """A ``StableDiffusionControlNetPipeline`` of ``pipe``'s parts and ``controlnet``."""
    return _with_control("StableDiffusionControlNetPipeline", pipe, controlnet=controlnet)


def adapter_pipeline(pipe, adapter):
    """A ``StableDiffusionAdapterPipeline`` of ``pipe``'s parts and ``adapter``."""
    return _with_control("StableDiffusionAdapterPipeline", pipe, adapter=adapter)


def conditions(scenes, kind: str = "edges") -> torch.Tensor:
    """The control images (N, 3, S, S) in [0, 1] of shapes scenes: their objects' inner edges
    ("edges") or their masks ("masks"), white on black in all three channels."""
    if kind == "edges":
        single = scenes.edges
    elif kind == "masks":
        single = scenes.masks.any(1, keepdim=True).float()
    else:
        raise ValueError(f"kind must be 'edges' or 'masks', got {kind!r}")
    return single.expand(-1, 3, -1, -1).contiguous()


class ControlNetLoss:
    """SD's training loss with the ControlNet's residuals added to a frozen UNet: what trains a
    ControlNet (Zhang et al. 2023, eq. 2), and with a ``T2IAdapter`` in its place, the adapter's
    features added instead (Mou et al. 2023). ``batch``: scaled latents (B, C, h, w), text states
    (B, L, D) and control images (B, 3, H, W) in [0, 1]. The noise, timesteps and caption dropout
    are :class:`diffkit.latent.tiny_sd.LatentDiffusionLoss`'s (the paper drops half of the
    prompts, so the ControlNet learns to read the condition alone). Freezes ``unet``."""

    def __init__(self, unet, alphas_cumprod, empty, *, caption_dropout: float = 0.5,
                 target: str = "epsilon"):
        from diffkit.latent.tiny_sd import LatentDiffusionLoss

        self.unet = unet.requires_grad_(False)
        self.loss = LatentDiffusionLoss(alphas_cumprod, empty, caption_dropout=caption_dropout,
                                        target=target)

    def __call__(self, controlnet, batch, generator=None) -> torch.Tensor:
        from types import SimpleNamespace

        latents, states, control = batch
        if control.ndim != 4 or control.shape[1] != 3 or len(control) != len(latents):
            raise ValueError(f"control images must be (B, 3, H, W) for {len(latents)} latents, "
                             f"got {tuple(control.shape)}")

        from diffusers import T2IAdapter

        # an adapter's features: once per image (no t, no text); a ControlNet runs per call
        features = controlnet(control) if isinstance(controlnet, T2IAdapter) else None

        def model(z_t, t, encoder_hidden_states):
            if features is not None:
                residuals = dict(down_intrablock_additional_residuals=list(features))
            else:
                down, middle = controlnet(z_t, t, encoder_hidden_states=encoder_hidden_states,
                                          controlnet_cond=control, return_dict=False)
                residuals = dict(down_block_additional_residuals=down,
                                 mid_block_additional_residual=middle)
            return SimpleNamespace(sample=self.unet(
                z_t, t, encoder_hidden_states=encoder_hidden_states, **residuals).sample)

        return self.loss(model, (latents, states), generator)
