"""Stable Diffusion taken apart: parameter counts per module, the attention layers, and where the
timestep enters the UNet.

SD 1.5's sizes are counted from its configuration alone, on the meta device (nothing is
allocated or downloaded). The timestep's path through diffusers' ``UNet2DConditionModel`` is
``time_proj`` (sinusoidal features of t, Ho et al. 2020 after Vaswani et al. 2017), then
``time_embedding`` (an MLP), then, inside every ``ResnetBlock2D``, a SiLU and a per-block linear
``time_emb_proj`` whose output is added to the feature map right after the block's first
convolution. ``timestep_trace`` shows it with forward hooks (the input image and everything
before that addition are identical for two timesteps); ``without_time_embedding`` cuts it in
chosen blocks, so its effect on the denoising error can be measured.
"""

from __future__ import annotations

import contextlib

import torch

from diffkit.eval.latent_cost import SD15_UNET

# runwayml/stable-diffusion-v1-5's vae/config.json and text_encoder/config.json (CLIP ViT-L/14)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                 hidden_act="quick_gelu", projection_dim=768)


def parameter_counts(components: dict) -> dict[str, int]:
    """{name: number of parameters} of each torch module among ``components``."""
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in components.items() if isinstance(module, torch.nn.Module)}


def sd15_modules() -> dict[str, torch.nn.Module]:
    """SD 1.5's VAE, text encoder and UNet built from their configurations on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {"vae": AutoencoderKL(**SD15_VAE),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
                "unet": UNet2DConditionModel(**SD15_UNET)}


def attention_census(unet) -> dict[str, int]:
    """How many ResNet blocks, transformer blocks, self-attention (``attn1``) and
    cross-attention (``attn2``) layers the UNet has."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    modules = list(unet.modules())
    blocks = [m for m in modules if isinstance(m, BasicTransformerBlock)]
    return {"resnet_blocks": sum(isinstance(m, ResnetBlock2D) for m in modules),
            "transformer_blocks": len(blocks),
            "self_attention": sum(b.attn1 is not None for b in blocks),
            "cross_attention": sum(getattr(b, "attn2", None) is not None for b in blocks)}


def resnet_names(unet) -> list[str]:
    """Names of the UNet's ResNet blocks (each adds the timestep), in module order."""
    from diffusers.models.resnet import ResnetBlock2D

    return [name for name, m in unet.named_modules() if isinstance(m, ResnetBlock2D)]


@torch.no_grad()
def timestep_trace(unet, x_t: torch.Tensor, timesteps: tuple[int, int], context: torch.Tensor,
                   block: str | None = None) -> dict[str, float]:
    """Run the UNet at two timesteps on the same input and text; return the max abs difference
    between the two runs at each stage of the first ResNet block (or ``block``): the image fed
    to ``conv_in``, its output, the block's first convolution, the feature map after the
    timestep is added (``norm2``'s input) and the UNet's output."""
    block = block or resnet_names(unet)[0]
    resnet = unet.get_submodule(block)
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name, which):
        def hook(module, args, output):
            seen.setdefault(name, []).append((args[0] if which == "input" else output).clone())
        return hook

    hooks = [unet.conv_in.register_forward_hook(keep("input image", "input")),
             unet.conv_in.register_forward_hook(keep("conv_in output", "output")),
             resnet.conv1.register_forward_hook(keep("first convolution", "output")),
             resnet.norm2.register_forward_hook(keep("after adding the timestep", "input"))]
    try:
        outputs = [unet(x_t, t, encoder_hidden_states=context).sample for t in timesteps]
    finally:
        for h in hooks:
            h.remove()
    diffs = {name: float((a - b).abs().max()) for name, (a, b) in seen.items()}
    diffs["UNet output"] = float((outputs[0] - outputs[1]).abs().max())
    return diffs


@contextlib.contextmanager
def without_time_embedding(unet, blocks: list[str] | None = None):
    """Zero ``time_emb_proj`` in the named ResNet blocks (all when None) for the duration: those
    blocks then add nothing that depends on t. The weights are restored on exit."""
    names = resnet_names(unet) if blocks is None else list(blocks)
    projections = [unet.get_submodule(name).time_emb_proj for name in names]
    saved = [(p.weight.detach().clone(), p.bias.detach().clone()) for p in projections]
    try:
        with torch.no_grad():
            for p in projections:
                p.weight.zero_()
                p.bias.zero_()
        yield names
    finally:
        with torch.no_grad():
            for p, (weight, bias) in zip(projections, saved):
                p.weight.copy_(weight)
                p.bias.copy_(bias)


@torch.no_grad()
def denoising_error(unet, latents: torch.Tensor, states: torch.Tensor, alphas_cumprod,
                    timesteps, *, generator=None) -> list[float]:
    """Mean squared error of the UNet's epsilon prediction on noised latents, per timestep (the
    training loss of an epsilon model, at fixed t)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    errors = []
    for t in timesteps:
        eps = torch.randn(latents.shape, generator=generator)
        z_t = abar[t].sqrt() * latents + (1 - abar[t]).sqrt() * eps
        t_batch = torch.full((len(latents),), int(t))
        prediction = unet(z_t, t_batch, encoder_hidden_states=states).sample
        errors.append(float(((prediction - eps) ** 2).mean()))
    return errors
