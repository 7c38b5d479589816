"""BLIP on a tiny scale: one image encoder, one text transformer in three modes, three losses.

Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training" (Sec. 3.1-3.2, Fig. 2). The
text transformer runs as
* the unimodal text encoder ([CLS] first, bidirectional self-attention, no image),
* the image-grounded text encoder ([ENC] first, plus cross-attention to the image tokens),
* the image-grounded text decoder ([DEC] first, causal self-attention, cross-attention);
as in the paper the decoder shares everything with the encoders except its self-attention.
Training sums ITC (contrastive, on projected unimodal features), ITM (binary matching on the
fused [ENC] output, with negatives mined from the ITC similarities) and LM (teacher-forced
captioning). The vocabulary is the word list of ``diffkit.data.shapes`` captions. BLIP's momentum
encoder, queues and CapFilt bootstrapping are left out: our captions are clean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffkit.data.shapes import (
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    TEMPLATES,
    parse_caption,
)
from diffkit.nn.attention import Attention

SPECIALS = ("[PAD]", "[CLS]", "[ENC]", "[DEC]", "[EOS]")
PAD, CLS, ENC, DEC, EOS = range(len(SPECIALS))
_words = {w for t in TEMPLATES for w in t.split() if "{" not in w}
_words |= {"a", "an", "and", *SHAPES, *COLOURS, *SIZES}
_words |= {w for p in POSITION_PHRASES.values() for w in p.split()}
VOCAB = SPECIALS + tuple(sorted(_words))
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_LEN = 18                      # [CLS] + the longest two-object caption (14 words) + [EOS], slack
MAX_LOG_SCALE = math.log(100)     # the ITC inverse temperature's cap, as CLIP's
ABSENT, UNSAID = -2, -1           # codes of a missing object slot and of an attribute left unsaid
ATTRIBUTES = (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS))


def tokenize(captions: list[str], max_len: int = MAX_LEN) -> torch.Tensor:
    """Word ids (B, max_len): [CLS] words [EOS] [PAD]...; the first id is swapped per mode."""
    if isinstance(captions, str) or not len(captions):
        raise ValueError("captions must be a non-empty list of strings")
    ids = torch.full((len(captions), max_len), PAD, dtype=torch.long)
    for i, text in enumerate(captions):
        words = text.lower().split()
        unknown = [w for w in words if w not in WORD_ID or w in SPECIALS]
        if unknown:
            raise ValueError(f"caption {text!r} has words outside the shapes vocabulary: {unknown}")
        if len(words) + 2 > max_len:
            raise ValueError(f"caption {text!r} has {len(words)} words; at most {max_len - 2} fit")
        ids[i, :len(words) + 2] = torch.tensor([CLS] + [WORD_ID[w] for w in words] + [EOS])
    return ids


def detokenize(ids: torch.Tensor) -> list[str]:
    """Strings of word ids (B, L): the words up to the first [EOS], specials dropped."""
    out = []
    for row in ids.tolist():
        words = []
        for i in row:
            if i == EOS:
                break
            if i >= len(SPECIALS):
                words.append(VOCAB[i])
        out.append(" ".join(words))
    return out


def _codes(rows) -> torch.Tensor:
    codes = torch.full((len(rows), 2, 4), ABSENT, dtype=torch.long)
    for i, objects in enumerate(rows):
        if not 1 <= len(objects) <= 2:
            raise ValueError(f"expected 1 or 2 objects per scene or caption, got {len(objects)}")
        for k, obj in enumerate(objects):
            for a, (name, words) in enumerate(ATTRIBUTES):
                value = obj[name] if isinstance(obj, dict) else getattr(obj, name)
                codes[i, k, a] = UNSAID if value is None else words.index(value)
    return codes


def scene_codes(objects) -> torch.Tensor:
    """Attributes (N, 2, 4) of scenes (lists of ShapeObject): shape, colour, size, position ids."""
    return _codes(objects)


def caption_codes(captions: list[str]) -> torch.Tensor:
    """Attributes (N, 2, 4) a caption states; UNSAID where it leaves one out."""
    return _codes([parse_caption(c) for c in captions])


def consistent(text_codes: torch.Tensor, scene_codes_: torch.Tensor) -> torch.Tensor:
    """(T, S) bool: caption t is a true description of scene s (count right, nothing said wrong).

    Captions leave out size or position, so one caption can describe many scenes: such pairs are
    positives, and mining them as ITM negatives would teach the model to reject true captions.
    """
    t, s = text_codes[:, None], scene_codes_[None]            # (T, 1, 2, 4), (1, S, 2, 4)

    def slot(a, b):
        return ((a == b) | ((a == UNSAID) & (b >= 0))).all(-1)
    return ((slot(t[..., 0, :], s[..., 0, :]) & slot(t[..., 1, :], s[..., 1, :]))
            | (slot(t[..., 0, :], s[..., 1, :]) & slot(t[..., 1, :], s[..., 0, :])))


def mine_hard_negatives(similarity: torch.Tensor, allowed: torch.Tensor,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """One negative column per row (B,), drawn with probability softmax(similarity) over allowed.

    BLIP's hard-negative mining (Sec. 3.2): the more similar a wrong pair looks to ITC, the likelier
    it is picked. ``allowed`` (B, B) bool excludes the positives (and every consistent pair).
    """
    if similarity.shape != allowed.shape or similarity.dim() != 2:
        raise ValueError(f"similarity and allowed must be the same (B, B') shape, got "
                         f"{tuple(similarity.shape)} and {tuple(allowed.shape)}")
    if not allowed.any(1).all():
        raise ValueError("every row needs at least one allowed negative")
    allowed = allowed.cpu()
    weights = similarity.detach().float().softmax(1).cpu() * allowed
    # a row whose allowed weights all underflow to 0 falls back to a uniform draw
    weights = torch.where(weights.sum(1, keepdim=True) == 0, allowed.float(), weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1).to(similarity.device)


def contrastive_and_matching_losses(sim: torch.Tensor, positive: torch.Tensor,
                                    image_tokens: torch.Tensor, ids: torch.Tensor, itm_logits,
                                    generator: torch.Generator | None = None):
    """(ITC, ITM) losses of one batch, shared by BLIP and BLIP-2's stage 1.

    ITC: symmetric cross-entropy of the scaled similarities ``sim`` [image, text] with every
    consistent pair as a target (soft labels, since a partial caption fits several scenes).
    ITM: for each image a hard negative text and for each text a hard negative image, mined
    from ``sim``; ``itm_logits(image_tokens, ids)`` scores (match, no match) pairs.
    """
    itc = -((positive / positive.sum(1, keepdim=True)) * sim.log_softmax(1)).sum(1).mean() / 2 \
        - ((positive / positive.sum(0, keepdim=True)) * sim.log_softmax(0)).sum(0).mean() / 2
    neg_text = mine_hard_negatives(sim, positive == 0, generator)
    neg_image = mine_hard_negatives(sim.T, positive.T == 0, generator)
    tokens = torch.cat([image_tokens, image_tokens, image_tokens[neg_image]])
    pair_ids = torch.cat([ids, ids[neg_text], ids])
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long().to(ids.device)
    return itc, F.cross_entropy(itm_logits(tokens, pair_ids), labels)


def mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(),
                         nn.Linear(4 * dim, dim))


class ImageEncoder(nn.Module):
    """Strided CNN to a 4x4 token grid, a [CLS] token, one attention block: (B, 17, D)."""

    def __init__(self, dim: int = 64, heads: int = 4):
        super().__init__()
        layers, cin = [], 3
        for w in (32, dim, dim):  # 32 -> 16 -> 8 -> 4; a 4x4 stride-2 stem sees every pixel
            layers += [nn.Conv2d(cin, w, 4 if cin == 3 else 3, stride=2, padding=1),
                       nn.GroupNorm(8, w), nn.GELU()]
            cin = w
        self.cnn = nn.Sequential(*layers)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.ln, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.mlp, self.ln_out = mlp(dim), nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, 32, 32):
            raise ValueError(f"images must be (B, 3, 32, 32), got {tuple(images.shape)}")
        grid = self.cnn(images).flatten(2).transpose(1, 2)          # (B, 16, D)
        x = torch.cat([self.cls.expand(len(grid), -1, -1), grid], 1) + self.pos
        x = x + self.attn(self.ln(x))
        return self.ln_out(x + self.mlp(x))


class TextBlock(nn.Module):
    """Pre-norm block: self-attention (encoder or decoder copy), cross-attention, feed-forward."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_sa, self.sa = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_sa_dec, self.sa_dec = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_ca, self.ca = nn.LayerNorm(dim), Attention(dim, heads)
        self.mlp = mlp(dim)

    def forward(self, x, mask, image=None, decoder=False):
        if decoder:
            x = x + self.sa_dec(self.ln_sa_dec(x), mask=mask)
        else:
            x = x + self.sa(self.ln_sa(x), mask=mask)
        if image is not None:
            x = x + self.ca(self.ln_ca(x), image)
        return x + self.mlp(x)


class BLIP(nn.Module):
    """Image encoder, text transformer (encoder, grounded encoder, decoder), ITC/ITM/LM heads."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, embed_dim: int = 32,
                 max_len: int = MAX_LEN):
        super().__init__()
        self.config = dict(dim=dim, depth=depth, heads=heads, embed_dim=embed_dim, max_len=max_len)
        self.vision = ImageEncoder(dim, heads)
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(TextBlock(dim, heads) for _ in range(depth))
        self.ln_out = nn.LayerNorm(dim)
        self.vision_proj, self.text_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))   # 1 / temperature
        self.itm_head, self.lm_head = nn.Linear(dim, 2), nn.Linear(dim, len(VOCAB))

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Cap exp(log_scale) at 100 after each optimiser step (``diffkit.train``), as CLIP does."""
        self.log_scale.clamp_(max=MAX_LOG_SCALE)

    def text(self, ids: torch.Tensor, image: torch.Tensor | None = None, decoder: bool = False):
        """Hidden states (B, L, D) of ids (B, L); grounded on image tokens (B, M, D) if given."""
        if ids.dim() != 2 or ids.shape[1] > self.pos.shape[1]:
            raise ValueError(f"ids must be (B, L) with L <= {self.pos.shape[1]}, "
                             f"got {tuple(ids.shape)}")
        L = ids.shape[1]
        mask = (ids != PAD)[:, None, None, :]                        # keys that are words
        if decoder:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        x = self.embed(ids) + self.pos[:, :L]
        for block in self.blocks:
            x = block(x, mask, image, decoder)
        return self.ln_out(x)

    # unimodal features: the shared ITC space (and the raw encoder outputs before projection)
    def image_features(self, images, project: bool = True) -> torch.Tensor:
        cls = self.vision(images)[:, 0]
        return F.normalize(self.vision_proj(cls) if project else cls, dim=-1)

    def text_features(self, ids, project: bool = True) -> torch.Tensor:
        cls = self.text(ids)[:, 0]
        return F.normalize(self.text_proj(cls) if project else cls, dim=-1)

    def itm_logits(self, image_tokens, ids) -> torch.Tensor:
        """No-match / match logits (B, 2) of pairs, from the grounded encoder's fused [ENC]."""
        ids = ids.clone()
        ids[:, 0] = ENC
        return self.itm_head(self.text(ids, image_tokens)[:, 0])

    def itm_score(self, images, ids) -> torch.Tensor:
        """P(match) (B,) of image-caption pairs."""
        return self.itm_logits(self.vision(images), ids).softmax(-1)[:, 1]

    def lm_logits(self, image_tokens, ids) -> torch.Tensor:
        """Next-word logits (B, L, V) of the decoder reading [DEC] + ids[:, 1:]."""
        ids = ids.clone()
        ids[:, 0] = DEC
        return self.lm_head(self.text(ids, image_tokens, decoder=True))

    def losses(self, images, ids, text_codes, scene_codes_, generator=None) -> dict:
        """ITC, ITM and LM losses of a batch of matched pairs (BLIP Sec. 3.2)."""
        image_tokens = self.vision(images)
        img = F.normalize(self.vision_proj(image_tokens[:, 0]), dim=-1)
        txt = F.normalize(self.text_proj(self.text(ids)[:, 0]), dim=-1)
        sim = self.log_scale.exp() * img @ txt.T                               # (B, B)
        positive = consistent(text_codes, scene_codes_).T.float()              # [image, text]
        itc, itm = contrastive_and_matching_losses(sim, positive, image_tokens, ids,
                                                   self.itm_logits, generator)
        logits = self.lm_logits(image_tokens, ids)
        lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD)
        return {"itc": itc, "itm": itm, "lm": lm}

    @torch.no_grad()
    def caption(self, images, max_len: int | None = None) -> list[str]:
        """Greedy captions of images (B, 3, 32, 32): argmax word until [EOS] or max_len tokens."""
        image_tokens = self.vision(images)
        return greedy_decode(lambda ids: self.lm_logits(image_tokens, ids)[:, -1], len(images),
                             max_len or self.pos.shape[1], images.device)


def greedy_decode(next_logits, batch: int, max_len: int, device="cpu") -> list[str]:
    """Greedy decoding from [DEC]: next_logits(ids (B, l)) -> logits (B, V) of token l + 1.

    Only words and [EOS] can be picked. Stops when every row has produced [EOS] or at max_len
    tokens, so it always terminates.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    ids = torch.full((batch, 1), DEC, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    while ids.shape[1] < max_len and not done.all():
        logits = next_logits(ids).clone()
        logits[:, [PAD, CLS, ENC, DEC]] = float("-inf")
        word = torch.where(done, PAD, logits.argmax(-1))
        ids = torch.cat([ids, word[:, None]], 1)
        done |= word == EOS
    return detokenize(ids)
