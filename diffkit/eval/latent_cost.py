"""What latent diffusion saves, counted: FLOPs, activation memory and time per denoising step.

The same UNet (same widths, depths and attention levels) is run on pixels (3 x 32 x 32) and on
the VAE's latents (4 x 8 x 8). FLOPs are counted by ``torch.utils.flop_counter`` (matrix
multiplies and convolutions, forward and backward), memory is the bytes of the activations the
forward pass saves for the backward one (what training must hold per step, read with
``torch.autograd.graph.saved_tensors_hooks``), and time is the best of a few training steps.
SD 1.5's real sizes (512 x 512 pixels vs 4 x 64 x 64 latents) are counted on the meta device:
the network is built and run without allocating a single weight.
"""

from __future__ import annotations

import time

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch.utils.flop_counter import FlopCounterMode

# the unconditional two-level UNet of the comparison (chapter 9's, without cross-attention)
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D"))
# runwayml/stable-diffusion-v1-5's unet/config.json (the fields that set its cost)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_TEXT_TOKENS = 77


def tiny_unet(channels: int, size: int) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       **TINY_UNET)


def _call(model, x, context):
    t = torch.full((x.shape[0],), 500, device=x.device)
    if context is None:
        return model(x, t).sample
    return model(x, t, encoder_hidden_states=context).sample


def training_step_flops(model, x, context=None) -> int:
    """FLOPs of one training step's forward and backward pass (an MSE loss on the output)."""
    with FlopCounterMode(display=False) as counter:
        _call(model, x, context).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def forward_flops(model, x, context=None) -> int:
    """FLOPs of one forward pass: the cost of one denoising step at sampling time."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _call(model, x, context)
    return counter.get_total_flops()


def saved_activation_bytes(model, x, context=None) -> int:
    """Bytes of the tensors the forward pass keeps for backward (weights excluded)."""
    weights = {p.data_ptr() for p in model.parameters()} if x.device.type != "meta" else set()
    total = 0

    def pack(tensor):
        nonlocal total
        if x.device.type == "meta" or tensor.data_ptr() not in weights:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _call(model, x, context)
    return total


def seconds_per_training_step(model, x, *, repeats: int = 3) -> float:
    """Best wall time of a training step (forward, backward, AdamW) over ``repeats``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    best = float("inf")
    for attempt in range(repeats + 1):  # the first step (allocation, Adam's state) is not timed
        start = time.perf_counter()
        loss = _call(model, x, None).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if attempt:
            best = min(best, time.perf_counter() - start)
    return best


def tiny_comparison(device="cpu", *, batch: int = 16, repeats: int = 3,
                    timing: bool = True) -> dict:
    """Pixel (3 x 32 x 32) vs latent (4 x 8 x 8) per-step cost of the same tiny UNet."""
    out = {}
    for space, (c, s) in {"pixel": (3, 32), "latent": (4, 8)}.items():
        model = tiny_unet(c, s).to(device)
        x = torch.randn(batch, c, s, s, generator=torch.Generator().manual_seed(0)).to(device)
        out[space] = dict(
            numbers=c * s * s,
            forward_gflops=forward_flops(model, x) / 1e9,
            training_gflops=training_step_flops(model, x) / 1e9,
            activation_mib=saved_activation_bytes(model, x) / 2 ** 20,
            parameters=sum(p.numel() for p in model.parameters()))
        if timing:
            out[space]["seconds_per_step"] = seconds_per_training_step(model, x, repeats=repeats)
    out["ratio"] = {k: out["pixel"][k] / out["latent"][k] for k in out["pixel"]
                    if k != "parameters"}
    for space in ("pixel", "latent"):
        out[space]["batch"] = batch
    return out


def sd15_comparison() -> dict:
    """SD 1.5's UNet on 3 x 512 x 512 pixels vs 4 x 64 x 64 latents, one image, counted on the
    meta device (nothing is allocated; the weights would be 3.4 GB)."""
    out = {}
    for space, (c, s) in {"pixel": (3, 512), "latent": (4, 64)}.items():
        with torch.device("meta"):
            model = UNet2DConditionModel(**{**SD15_UNET, "in_channels": c, "out_channels": c,
                                            "sample_size": s})
            x = torch.empty(1, c, s, s)
            context = torch.empty(1, SD15_TEXT_TOKENS, SD15_UNET["cross_attention_dim"])
        out[space] = dict(numbers=c * s * s, forward_tflops=forward_flops(model, x, context) / 1e12,
                          activation_gib=saved_activation_bytes(model, x, context) / 2 ** 30,
                          parameters=sum(p.numel() for p in model.parameters()))
    out["ratio"] = {k: out["pixel"][k] / out["latent"][k] for k in out["pixel"]
                    if k != "parameters"}
    return out
