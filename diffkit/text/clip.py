"""A tiny CLIP trained from scratch on the captioned-shapes world (Radford et al. 2021).

Two encoders map an image and a caption to unit vectors in one space; training pulls the
matching pairs of a batch together and pushes the other pairs apart with the symmetric InfoNCE
loss (CLIP's Figure 3 pseudocode; InfoNCE: van den Oord et al. 2018, Eq. 4):

    logits = exp(s) * I @ T.T,   loss = (CE(logits, diag) + CE(logits.T, diag)) / 2

with a learned temperature exp(-s), capped like CLIP's at exp(s) <= 100 after each optimiser step
(``TinyCLIP.clamp_parameters``, called by ``diffkit.train``; a clamp in the forward pass would
zero the gradient of s above the cap). The text side is a real
transformers ``CLIPTextModel`` (tiny config) with a word-level ``CLIPTokenizer``, so
``export_text_encoder`` writes folders that ``CLIPTextModel.from_pretrained`` and
``CLIPTokenizer.from_pretrained`` load offline: the text encoder of the book's tiny Stable
Diffusion. The image side is a small CNN, which learns 32x32 shapes on a CPU far faster than a
ViT would.
"""

from __future__ import annotations

import functools
import json
import math
import string
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffkit.data.shapes import COLOURS, POSITION_PHRASES, SHAPES, SIZES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# every word of the captions (diffkit.data.shapes), then words captions never use: they get
# tokens (so probes such as "a photo of a red circle" tokenize) but are never trained
CAPTION_WORDS = tuple(dict.fromkeys(
    ["a", "an", "and", *SIZES, *COLOURS, *SHAPES,
     *(w for phrase in POSITION_PHRASES.values() for w in phrase.split())]))
EXTRA_WORDS = ("photo", "of", "shape", "shapes", "not", "no", "one", "two", "there", "is", "image")
WORDS = CAPTION_WORDS + EXTRA_WORDS
TEXT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4)
VISION_CONFIG = dict(channels=[48, 64, 96, 128], width=256)
MAX_LOG_SCALE = math.log(100)   # the cap of the inverse temperature exp(s), as CLIP's


# --- word-level tokenizer ----------------------------------------------------------------

def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE on one word: characters, "</w>" on the last, merge the best-ranked pair."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = zip(parts, parts[1:])
        rank, i = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(pairs))
        if rank == math.inf:
            break
        merged, j = [], 0
        while j < len(parts):  # merge every occurrence of the pair, left to right
            if j + 1 < len(parts) and (parts[j], parts[j + 1]) == (parts[i], parts[i + 1]):
                merged.append(parts[j] + parts[j + 1])
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def word_level_bpe(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges under which CLIP's BPE turns each word into one token "word</w>".

    Single letters (with and without "</w>") are the fallback for other words. A word's merges
    are appended after all earlier ones, so they never change how an earlier word is merged.
    """
    words = list(words)
    if not words or any(not w or set(w) - set(string.ascii_lowercase) for w in words):
        raise ValueError(f"words must be a non-empty list of lower-case a-z words, got {words!r}")
    tokens = [BOS, EOS, *string.ascii_lowercase, *(c + "</w>" for c in string.ascii_lowercase)]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:  # merge the first two remaining parts, then re-run the BPE
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
            if parts[0] + parts[1] not in tokens:
                tokens.append(parts[0] + parts[1])
            parts = _bpe(word, ranks)
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tokenizer_files(folder, words, max_length: int) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of the word-level tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = word_level_bpe(words)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
         "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}))
    return folder


@functools.lru_cache(maxsize=8)
def make_tokenizer(words: tuple[str, ...] = WORDS, max_length: int = 20) -> CLIPTokenizer:
    """The word-level CLIPTokenizer; built with from_pretrained on a folder (transformers 5 ignores
    file paths given to the constructor)."""
    with tempfile.TemporaryDirectory() as folder:
        return CLIPTokenizer.from_pretrained(str(save_tokenizer_files(folder, words, max_length)))


# --- the model ---------------------------------------------------------------------------

class ShapesImageEncoder(nn.Module):
    """CNN for (B, 3, 32, 32) images in [-1, 1] -> (B, width) features.

    A 2x2-patch stem (16x16), one conv at 16x16, two stride-2 convs (8x8, 4x4), then a flatten,
    not a global average pool: position is one of the attributes.
    """

    def __init__(self, channels=(48, 64, 96, 128), width: int = 256):
        super().__init__()
        c0, c1, c2, c3 = channels

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.GELU()]
        self.body = nn.Sequential(nn.Conv2d(3, c0, 2, 2), nn.GELU(), *block(c0, c1, 1),
                                  *block(c1, c2, 2), *block(c2, c3, 2), nn.Flatten(),
                                  nn.Linear(c3 * 16, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class TinyCLIP(nn.Module):
    """CLIP with a CNN image encoder and a tiny ``CLIPTextModel``; the constructor's JSON
    arguments (kept in ``config``) rebuild it, tokenizer included."""

    def __init__(self, words=WORDS, max_length: int = 20, text=None, vision=None,
                 embed_dim: int = 64, init_temperature: float = 0.07):
        super().__init__()
        text, vision = dict(text or TEXT_CONFIG), dict(vision or VISION_CONFIG)
        self.config = dict(words=list(words), max_length=max_length, text=text, vision=vision,
                           embed_dim=embed_dim, init_temperature=init_temperature)
        self.tokenizer = make_tokenizer(tuple(words), max_length)
        tok = self.tokenizer
        self.text_model = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), max_position_embeddings=max_length, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=embed_dim,
            **text))
        self.image_encoder = ShapesImageEncoder(**vision)
        self.text_projection = nn.Linear(text["hidden_size"], embed_dim, bias=False)
        self.visual_projection = nn.Linear(vision["width"], embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def scale(self) -> torch.Tensor:
        """exp(s), the inverse temperature (at most 100 once ``clamp_parameters`` has run)."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Cap exp(s) at 100 after each optimiser step (``diffkit.train``), as CLIP does."""
        self.logit_scale.clamp_(max=MAX_LOG_SCALE)

    def tokenize(self, texts) -> torch.Tensor:
        """(B, max_length) token ids, padded with EOS; a text longer than that is a ValueError."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        ids = self.tokenizer(list(texts), verbose=False)["input_ids"]  # we raise instead
        limit = self.config["max_length"]
        for text, row in zip(texts, ids):
            if len(row) > limit:
                raise ValueError(f"prompt {text!r} is {len(row)} tokens with BOS/EOS; the "
                                 f"tokenizer allows at most {limit}")
        pad = self.tokenizer.pad_token_id
        return torch.tensor([row + [pad] * (limit - len(row)) for row in ids])

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, embed_dim) unit vectors: the projected EOS state (CLIP's pooling).
        The mask is causal, so the padding after EOS does not change the result."""
        pooled = self.text_model(input_ids=input_ids.to(self.device)).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 32, 32) in [-1, 1] -> (B, embed_dim) unit vectors."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
            raise ValueError(f"images must be (B, 3, 32, 32) in [-1, 1], got {tuple(images.shape)}")
        features = self.image_encoder(images.to(self.device))
        return F.normalize(self.visual_projection(features), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """logits_per_image (B_images, B_texts) = exp(s) * cosine similarities."""
        return self.scale() * self.image_features(images) @ self.text_features(input_ids).T

    @torch.no_grad()
    def encode_text(self, texts, batch_size: int = 500) -> torch.Tensor:
        """list of N strings -> (N, embed_dim) unit vectors."""
        ids = self.tokenize(texts)
        return torch.cat([self.text_features(c) for c in ids.split(batch_size)])

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(N, 3, 32, 32) in [-1, 1] -> (N, embed_dim) unit vectors."""
        if images.ndim != 4:
            raise ValueError(f"images must be (N, 3, 32, 32), got {tuple(images.shape)}")
        return torch.cat([self.image_features(c) for c in images.split(batch_size)])

    def similarity(self, images: torch.Tensor, texts) -> torch.Tensor:
        """(N_images, N_texts) cosine similarities."""
        return self.encode_image(images) @ self.encode_text(texts).T

    def zero_shot(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """(N,) index of the prompt closest to each image: classification by prompts."""
        return self.similarity(images, prompts).argmax(1)


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of the image->text and text->image cross-entropies, pair i <-> i."""
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"logits must be a square (B, B) matrix, "
                         f"got {tuple(logits_per_image.shape)}")
    target = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target)
            + F.cross_entropy(logits_per_image.T, target)) / 2


def clip_loss(model: TinyCLIP, batch, generator=None) -> torch.Tensor:
    """loss_fn for ``diffkit.train.train``: batch = (uint8 images (B, 3, 32, 32), ids (B, L))."""
    images, input_ids = batch
    return contrastive_loss(model(to_float_images(images), input_ids))


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 (4x less memory for a large training pool)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks=(1, 5),
                     groups=None) -> dict[str, float]:
    """Recall@k of pairs (image i, text i), both directions.

    groups: optional (N,) ids; pairs with equal ids are interchangeable (identical captions),
    so retrieving any of them counts as a hit. Keys: "image_to_text_R@k", "text_to_image_R@k".
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"need two (N, D) embeddings of paired items, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    n = len(image_emb)
    groups = torch.arange(n) if groups is None else torch.as_tensor(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"each k must lie in [1, {n}], got {ks}")
    sims = image_emb.float() @ text_emb.float().T
    same = groups.view(-1, 1) == groups.view(1, -1)   # (N, N): is j a right answer for i
    out = {}
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        order = s.argsort(dim=1, descending=True)
        hit = same.gather(1, order)
        for k in ks:
            out[f"{name}_R@{k}"] = float(hit[:, :k].any(1).float().mean())
    return out


def export_text_encoder(model: TinyCLIP, folder) -> Path:
    """Write ``folder/text_encoder`` (CLIPTextModel, safetensors) and ``folder/tokenizer``."""
    folder = Path(folder)
    model.text_model.save_pretrained(folder / "text_encoder", safe_serialization=True)
    save_tokenizer_files(folder / "tokenizer", model.config["words"], model.config["max_length"])
    model.tokenizer.save_pretrained(folder / "tokenizer")  # adds tokenizer.json
    return folder
