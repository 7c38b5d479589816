"""DreamBooth and Textual Inversion: teaching a pipeline one subject from a few images.

* DreamBooth (Ruiz et al. 2023) fine-tunes the whole UNet (optionally the text encoder too) on
  3-5 images of the subject whose captions bind a rare identifier to the subject's class ("a
  large red sks circle in the centre"), with the prior-preservation loss: the same loss on
  images that the *base* model draws for the class prompts ("a large red circle in the
  centre"), weighted by lambda, so that the class keeps its meaning while the identifier takes
  the subject's,

      L = E ||eps - eps_theta(z_t, t, c_instance)||^2
          + lambda E ||eps' - eps_theta(z'_t', t', c_class)||^2.

* Textual Inversion (Gal et al. 2023) adds one token to the tokenizer and one row to the text
  encoder's embedding table, and trains that row alone with SD's loss, the gradient flowing
  through the frozen text encoder and UNet. The row is a ``torch.nn.utils.parametrize``
  parametrization of the embedding weight (the table with row k replaced by the trained vector),
  so every other number of every model is untouched by construction; its file is diffusers'
  ``learned_embeds.safetensors`` ({token: vector}), which ``pipe.load_textual_inversion`` reads.

Both take the pipeline's parts and never change the caller's pipeline; the same code runs on a
real SD 1.x pipeline (``diffkit.latent.sd.load_pipeline``).
"""

from __future__ import annotations

import copy
import json
import numbers
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from diffkit.latent import sd, tiny_sd
from diffkit.latent import vae as V
from diffkit.train import train

EMBEDS_FILE, META_FILE = "learned_embeds.safetensors", "diffkit_token.json"


def pipeline_with(pipe, **parts):
    """A pipeline of ``pipe``'s class sharing its parts except ``parts`` (a fine-tuned UNet, a
    text encoder and tokenizer with a new token); ``pipe`` itself is unchanged."""
    unknown = set(parts) - set(pipe.components)
    if unknown:
        raise ValueError(f"the pipeline has no parts {sorted(unknown)}; it has "
                         f"{sorted(pipe.components)}")
    options = {k: pipe.config[k] for k in ("requires_safety_checker",) if k in pipe.config}
    new = type(pipe)(**{**pipe.components, **parts}, **options)
    new.set_progress_bar_config(disable=True)
    return new


def _check_instances(images: torch.Tensor, captions: list[str]) -> None:
    if len(images) == 0:
        raise ValueError("no instance images: DreamBooth and Textual Inversion need 1 or more "
                         "(3-5 is the usual number)")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} instance images but {len(captions)} captions")


def _check_weight(prior_weight) -> float:
    if (isinstance(prior_weight, bool) or not isinstance(prior_weight, numbers.Real)
            or prior_weight < 0):
        raise ValueError(f"prior_weight must be a number >= 0 (0: no prior preservation), got "
                         f"{prior_weight!r}")
    return float(prior_weight)


def _base_loss(pipe, caption_dropout: float):
    empty = tiny_sd.text_states(pipe.text_encoder, pipe.tokenizer, [""])
    return tiny_sd.LatentDiffusionLoss(pipe.scheduler.alphas_cumprod, empty,
                                       caption_dropout=caption_dropout,
                                       target=sd.prediction_type(pipe))


class PriorPreservationLoss:
    """SD's loss on the instance half of each row of the batch plus ``prior_weight`` times the
    same loss on its class half: rows are (instance latents, instance states, class latents,
    class states)."""

    def __init__(self, base_loss, prior_weight: float):
        self.base, self.prior_weight = base_loss, _check_weight(prior_weight)

    def __call__(self, unet, batch, generator=None) -> torch.Tensor:
        latents, states, class_latents, class_states = batch
        loss = self.base(unet, (latents, states), generator)
        return loss + self.prior_weight * self.base(unet, (class_latents, class_states), generator)


def train_dreambooth(pipe, images: torch.Tensor, captions: list[str], *, steps: int,
                     class_images: torch.Tensor | None = None, class_captions=None,
                     prior_weight: float = 1.0, batch_size: int = 4, lr: float = 2e-4,
                     caption_dropout: float = 0.1, seed: int = 0, device=None,
                     progress: bool = False, state_path=None, callback=None, unet=None,
                     train_text_encoder: bool = False):
    """Fine-tune a copy of ``pipe.unet`` (or ``unet``, a copy the caller holds, e.g. to sample
    with the live weights in ``callback``, trained as its ``requires_grad`` flags say: with
    LoRA factors attached, only those) on the instance images (N, 3, H, W) in [-1, 1] and
    their captions, with prior preservation on the class images and captions when
    ``prior_weight`` > 0 (each step: ``batch_size`` instance and as many class examples).
    Returns (the EMA of the fine-tuned UNet, the ``diffkit.train.train`` result); ``pipe`` is
    left unchanged. ``train_text_encoder``: a copy of the text encoder trains too (the paper's
    option), the text states recomputed at every step; the result's model is then a
    ``UNetAndText`` (``.unet``, ``.text_encoder``). A dropped caption is replaced by the frozen
    encoder's empty-prompt states either way."""
    _check_instances(images, captions)
    prior_weight = _check_weight(prior_weight)
    if prior_weight > 0 and (class_images is None or class_captions is None
                             or len(class_images) == 0):
        raise ValueError("prior_weight > 0 needs class_images and class_captions (the base "
                         "model's own images of the class prompts); pass prior_weight=0 without")
    device = device or pipe.unet.device
    generator = torch.Generator(pipe.vae.device).manual_seed(seed)

    def pool(scene_images, texts):
        scene_images = scene_images.to(pipe.vae.device)
        if train_text_encoder:      # the states change with the encoder: keep the token ids
            latents = V.encode(pipe.vae, scene_images, generator=generator)
            return latents.cpu(), tiny_sd.token_ids(pipe.tokenizer, texts)
        latents, states = tiny_sd.encode_pool(pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                              scene_images, list(texts), generator=generator)
        return latents.cpu(), states.cpu()

    latents, states = pool(images, captions)
    loss = _base_loss(pipe, caption_dropout)
    if train_text_encoder:
        loss = EncodedTextLoss(loss)
    data = (latents, states)
    if prior_weight > 0:
        if len(class_images) != len(class_captions):
            raise ValueError(f"{len(class_images)} class images but {len(class_captions)} "
                             "captions")
        class_latents, class_states = pool(class_images, class_captions)
        pair = torch.arange(len(class_latents)) % len(latents)   # each class row, an instance
        data = (latents[pair], states[pair], class_latents, class_states)
        loss = PriorPreservationLoss(loss, prior_weight)
    if unet is pipe.unet:
        raise ValueError("unet must be a copy of pipe.unet, not the pipeline's own")
    if unet is None:            # the whole UNet trains; a caller's copy keeps its own flags
        unet = copy.deepcopy(pipe.unet).requires_grad_(True)   # (LoRA factors: DreamBooth-LoRA)
    if train_text_encoder:
        unet = UNetAndText(unet, copy.deepcopy(pipe.text_encoder).requires_grad_(True))
    unet.train()
    result = train(unet, loss, data, steps=steps, batch_size=batch_size, lr=lr,
                   warmup=min(50, steps // 10 + 1), seed=seed, device=device,
                   state_path=state_path, progress=progress, callback=callback)
    return result.ema.eval(), result


class UNetAndText(nn.Module):
    """A UNet and a text encoder trained together (DreamBooth with ``train_text_encoder``)."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder


# --- Textual Inversion ---------------------------------------------------------------------------

class TokenRow(nn.Module):
    """The parametrization weight -> weight with row ``row`` replaced by the trained ``vector``."""

    def __init__(self, row: int, init: torch.Tensor):
        super().__init__()
        self.row = row
        self.vector = nn.Parameter(init.detach().clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight[:self.row], self.vector[None].to(weight.dtype),
                          weight[self.row + 1:]])


def add_token(text_encoder, tokenizer, token: str, init_word: str) -> int:
    """Add ``token`` to the tokenizer and a row to the encoder's embedding table, initialised to
    the mean embedding of ``init_word``'s pieces (Gal et al. start from a coarse descriptor).
    Returns the new row. A token the vocabulary already has is refused."""
    if not isinstance(token, str) or not token.strip() or " " in token:
        raise ValueError(f"token must be one word without spaces, got {token!r}")
    if token in tokenizer.get_vocab() or f"{token}</w>" in tokenizer.get_vocab():
        raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary; Textual "
                         "Inversion needs a new one (e.g. '<my-concept>')")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise ValueError(f"init_word {init_word!r} has no tokens")
    tokenizer.add_tokens([token])
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    row = tokenizer.convert_tokens_to_ids(token)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[row] = table[init_ids].mean(0)
    return row


class TextualInversion(nn.Module):
    """Copies of a pipeline's text encoder, tokenizer and UNet, frozen, with one new token whose
    embedding row is the only trained parameter (``vector``). ``pipe`` (a pipeline) or ``base``
    (the name of a shipped one, as a checkpoint's card rebuilds it)."""

    def __init__(self, token: str, init_word: str, base: str = "shapes-sd", pipe=None):
        super().__init__()
        if pipe is None:
            from diffkit import checkpoints

            pipe, _ = checkpoints.load_model(base)
        self.tokenizer = copy.deepcopy(pipe.tokenizer)
        self.text_encoder = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
        self.unet = copy.deepcopy(pipe.unet).requires_grad_(False)
        self.row = add_token(self.text_encoder, self.tokenizer, token, init_word)
        embedding = self.text_encoder.get_input_embeddings()
        parametrize.register_parametrization(embedding, "weight",
                                             TokenRow(self.row, embedding.weight[self.row]))
        self.config = dict(token=token, init_word=init_word, base=base)

    @property
    def vector(self) -> nn.Parameter:
        return self.text_encoder.get_input_embeddings().parametrizations.weight[0].vector

    def text_states(self, captions: list[str]) -> torch.Tensor:
        return tiny_sd.text_states(self.text_encoder, self.tokenizer, captions)

    def write_files(self, folder) -> None:
        """diffusers' ``learned_embeds.safetensors`` ({token: vector}) and the base's record."""
        folder = Path(folder)
        save_file({self.config["token"]: self.vector.detach().cpu().float().contiguous()},
                  str(folder / EMBEDS_FILE))
        meta = {**self.config, "dim": int(self.vector.numel())}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    def save(self, folder) -> Path:
        """Write the token's files to ``folder`` (replaced atomically)."""
        from diffkit.checkpoints import _replace_folder

        return _replace_folder(Path(folder), self.write_files)

    def read_files(self, folder) -> None:
        saved = load_file(str(Path(folder) / EMBEDS_FILE))
        if set(saved) != {self.config["token"]}:
            raise ValueError(f"{folder} holds the tokens {sorted(saved)}, expected "
                             f"[{self.config['token']!r}]")
        vector = saved[self.config["token"]]
        if vector.shape != self.vector.shape:
            raise ValueError(f"{folder}: an embedding of {tuple(vector.shape)}, this text encoder "
                             f"takes {tuple(self.vector.shape)}")
        with torch.no_grad():
            self.vector.copy_(vector)


class EncodedTextLoss:
    """SD's loss with the text states computed from token ids by the model's (partly trained)
    ``text_encoder`` at every step, for its ``unet``: batches are (latents, token ids)."""

    def __init__(self, base_loss):
        self.base = base_loss

    def __call__(self, model, batch, generator=None) -> torch.Tensor:
        latents, ids = batch
        states = model.text_encoder(ids)[0]
        return self.base(model.unet, (latents, states), generator)


def train_textual_inversion(pipe, images: torch.Tensor, captions: list[str], *, token: str,
                            init_word: str, steps: int, model: TextualInversion | None = None,
                            batch_size: int = 4, lr: float = 5e-3, caption_dropout: float = 0.0,
                            seed: int = 0, device=None, progress: bool = False,
                            state_path=None, callback=None):
    """Learn the embedding of ``token`` (which the captions use) from the instance images.
    Returns (the EMA of the ``TextualInversion`` model, the ``diffkit.train.train`` result)."""
    _check_instances(images, captions)
    if not all(token in text.split() for text in captions):
        raise ValueError(f"every caption must contain the token {token!r}")
    model = model or TextualInversion(token, init_word, pipe=pipe)
    generator = torch.Generator(pipe.vae.device).manual_seed(seed)
    latents = V.encode(pipe.vae, images.to(pipe.vae.device), generator=generator).cpu()
    ids = tiny_sd.token_ids(model.tokenizer, captions)
    loss = EncodedTextLoss(_base_loss(pipe, caption_dropout))
    result = train(model, loss, (latents, ids), steps=steps,
                   batch_size=batch_size, lr=lr, warmup=min(50, steps // 10 + 1), seed=seed,
                   device=device or pipe.unet.device, state_path=state_path, progress=progress,
                   callback=callback)
    return result.ema.eval(), result
