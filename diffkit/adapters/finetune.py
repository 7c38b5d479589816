"""Teaching a pipeline a new concept with a LoRA-family adapter: the data and the training run.

The concepts are those of the shapes world's extended vocabularies (orange, ring:
:mod:`diffkit.data.shapes`). The pipeline's text encoder needs no new token for them: its
tokenizer is a byte-pair encoding whose base vocabulary holds every letter, so "orange" becomes a
few sub-word pieces the encoder has never seen together, and the UNet learns what their states
mean. The training run is SD's loss (:class:`diffkit.latent.tiny_sd.LatentDiffusionLoss`) on the
adapter's factors only, everything else frozen; the same code runs on a real SD 1.x pipeline
given its images and captions.
"""

from __future__ import annotations

import copy

import torch

from diffkit.adapters import lora
from diffkit.data.shapes import ALL_COLOURS, ALL_SHAPES, make_shapes
from diffkit.latent import sd, tiny_sd
from diffkit.train import train

CONCEPTS = {"orange": dict(colours=("orange",)), "ring": dict(shapes=("ring",))}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONVOLUTIONS = ("conv1", "conv2", "conv_shortcut")


def concept_scenes(concept: str, n: int, *, seed: int, objects=1, caption_template=0):
    """n one-object scenes of ``concept`` (every other attribute drawn as usual)."""
    if concept not in CONCEPTS:
        raise ValueError(f"concept must be one of {sorted(CONCEPTS)}, got {concept!r}")
    return make_shapes(n, seed=seed, objects=objects, caption_template=caption_template,
                       **CONCEPTS[concept])


def concept_vocabulary() -> dict:
    """The judge's vocabularies that can name both concepts."""
    return dict(shapes=ALL_SHAPES, colours=ALL_COLOURS)


def present_targets(unet, targets) -> list[str]:
    """The names of ``targets`` that some module of ``unet`` has (LoCon's conv_shortcut exists
    only where a block changes width)."""
    names = [n for n, _ in unet.named_modules()]
    return [t for t in targets if any(lora.matches(n, t) for n in names)]


def concept_pipeline(device=None):
    """The book's tiny SD with the ``shapes-vae-ft`` decoder, which can draw the concepts. Its
    encoder is ``shapes-vae``'s, so the UNet and every adapter of it see the latents they were
    trained on (the swap readers of SD 1.x make with ``sd-vae-ft-mse``)."""
    from diffkit import checkpoints

    pipe = sd.load_pipeline(device=device)
    vae, _ = checkpoints.load_model("shapes-vae-ft", device=pipe.device)
    pipe.vae = vae
    return pipe


def training_scenes(concept: str, n_concept: int, n_base: int, *, seed: int):
    """(images, captions): n_concept one-object scenes of the concept and n_base one-object
    scenes of the base world, the regularisation that keeps the base prompts as they were."""
    from diffkit.data.shapes import make_shapes

    scenes = concept_scenes(concept, n_concept, seed=seed)
    if n_base == 0:
        return scenes.images, scenes.captions
    base = make_shapes(n_base, seed=seed + 1, objects=1)
    return torch.cat([scenes.images, base.images]), scenes.captions + base.captions


def train_attached(model, pipe, images: torch.Tensor, captions: list[str], *, steps: int,
                   batch_size: int = 64, lr: float = 1e-3, caption_dropout: float = 0.1,
                   seed: int = 0, device=None, progress: bool = False, state_path=None,
                   callback=None):
    """Train the attached updates of ``model`` (a UNet, or a module called like one) with SD's
    loss on the scenes (images (N, 3, H, W) in [-1, 1] and captions), the pipeline's VAE and
    text encoder frozen. Returns the ``diffkit.train.train`` result (its ``ema`` the model)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    device = device or pipe.unet.device
    latents, states = tiny_sd.encode_pool(pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                          images.to(pipe.vae.device), captions,
                                          generator=torch.Generator(pipe.vae.device)
                                          .manual_seed(seed))
    empty = tiny_sd.text_states(pipe.text_encoder, pipe.tokenizer, [""])
    loss = tiny_sd.LatentDiffusionLoss(pipe.scheduler.alphas_cumprod, empty,
                                       caption_dropout=caption_dropout,
                                       target=sd.prediction_type(pipe))
    return train(model, loss, (latents.cpu(), states.cpu()), steps=steps, batch_size=batch_size,
                 lr=lr, warmup=min(50, steps // 10 + 1), seed=seed, device=device,
                 state_path=state_path, progress=progress, callback=callback)


def train_adapter(pipe, images: torch.Tensor, captions: list[str], *, kind: str = "lora",
                  rank: int, alpha: float | None = None, targets=ATTENTION, steps: int,
                  **options):
    """Train a ``kind`` adapter of rank ``rank`` on ``targets`` of a copy of ``pipe.unet`` on the
    scenes (``train_attached``'s options). Returns (the EMA of the adapted UNet, the
    ``diffkit.train.train`` result); ``pipe`` is left unchanged."""
    unet = copy.deepcopy(pipe.unet)   # attach to a copy, never to the caller's UNet
    lora.attach(unet, present_targets(unet, targets), kind=kind, rank=rank, alpha=alpha)
    result = train_attached(unet, pipe, images, captions, steps=steps, **options)
    return result.ema.eval(), result
