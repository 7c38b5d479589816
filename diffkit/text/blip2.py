"""BLIP-2 on a tiny scale: a Q-Former bridging a frozen image encoder and a frozen language model.

Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and
Large Language Models" (Sec. 3, Fig. 2-3). A set of learned queries cross-attends to the frozen
image tokens; queries and text share the self-attention layers of one transformer, and an
attention mask decides who sees whom (Fig. 2, right):
* ITC (unimodal mask): queries see queries, text sees text; similarity = max over queries,
* ITM (bidirectional mask): queries and text see each other; logits averaged over queries,
* ITG (multimodal causal mask): queries see queries, text sees all queries and earlier text.
That is stage 1. In stage 2 the query outputs, projected by one linear layer, are prepended as a
soft prompt to a frozen decoder-only LM (here a tiny ``transformers`` GPT-2 pre-trained on the
captions alone), and only the Q-Former and the projection learn, from the LM loss.
The frozen image encoder is a copy of BLIP's (``diffkit.text.blip.ImageEncoder``), and the Q-Former
starts from BLIP's text transformer (BLIP-2 starts it from BERT).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from diffkit.nn.attention import Attention
from diffkit.text.blip import (
    BLIP,
    DEC,
    EOS,
    MAX_LEN,
    MAX_LOG_SCALE,
    PAD,
    VOCAB,
    ImageEncoder,
    consistent,
    contrastive_and_matching_losses,
    greedy_decode,
    mlp,
)


def tiny_gpt2(dim: int = 64, layers: int = 2, heads: int = 4,
              positions: int = 2 * MAX_LEN) -> GPT2LMHeadModel:
    """A GPT-2 over the shapes vocabulary; untied head so safetensors stores each tensor once."""
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=positions, n_embd=dim, n_layer=layers,
                        n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=DEC, eos_token_id=EOS, pad_token_id=PAD,
                        tie_word_embeddings=False)
    return GPT2LMHeadModel(config)


def documents(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Text-only pre-training documents (B, 2 * L): "[DEC] caption [EOS] [DEC] caption [EOS]".

    first, second: ids (B, L) from ``blip.tokenize`` of two captions of the same scene. A real
    LLM learns from long documents that earlier text determines later text; our LM learns it
    from scenes described twice, and that is what lets a soft prompt steer it later.
    """
    if first.shape != second.shape or first.dim() != 2:
        raise ValueError(f"first and second must be (B, L) ids of one shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    out = torch.full((len(first), 2 * first.shape[1]), PAD, dtype=torch.long)
    for i, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
        words = [DEC] + [t for t in a[1:] if t != PAD] + [DEC] + [t for t in b[1:] if t != PAD]
        out[i, :len(words)] = torch.tensor(words)
    return out


def lm_loss(lm: GPT2LMHeadModel, ids: torch.Tensor,
            prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Next-word loss of the LM on [DEC] + ids[:, 1:] (ids from ``blip.tokenize``, or documents),
    after an optional soft prompt prefix (B, Q, lm_dim); pads are ignored."""
    ids = ids.clone()
    ids[:, 0] = DEC
    logits = lm_logits(lm, ids, prefix)[:, -ids.shape[1]:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), ignore_index=PAD)


def lm_logits(lm: GPT2LMHeadModel, ids: torch.Tensor,
              prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, Q + L, V) of the LM on [prefix; embedded ids]; right padding needs no mask."""
    embeds = lm.get_input_embeddings()(ids)
    if prefix is not None:
        embeds = torch.cat([prefix, embeds], 1)
    if embeds.shape[1] > lm.config.n_positions:
        raise ValueError(f"{embeds.shape[1]} positions; the LM has {lm.config.n_positions}")
    return lm(inputs_embeds=embeds).logits


def attention_mask(num_queries: int, text_len: int, mode: str) -> torch.Tensor:
    """Who may attend to whom in the Q-Former, (Q + L, Q + L) bool (BLIP-2 Fig. 2, right).

    Rows attend, columns are attended; the first Q positions are the queries. "itc": queries and
    text see only themselves; "itm": everything sees everything; "itg": queries see queries, the
    text sees all queries and the text before it (causal).
    """
    if mode not in ("itc", "itm", "itg"):
        raise ValueError(f"mode must be 'itc', 'itm' or 'itg', got {mode!r}")
    Q, L = num_queries, text_len
    see = torch.ones(Q + L, Q + L, dtype=torch.bool)
    if mode in ("itc", "itg"):
        see[:Q, Q:] = False                                   # queries never see the text
    if mode == "itc":
        see[Q:, :Q] = False                                   # nor the text the queries
    if mode == "itg":
        see[Q:, Q:] = torch.ones(L, L, dtype=torch.bool).tril()
    return see


class QFormerBlock(nn.Module):
    """Self-attention over [queries; text] under a mask, cross-attention for the queries only, and
    separate feed-forward layers for queries and text (as BLIP-2's Q-Former)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_sa, self.sa = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_ca, self.ca = nn.LayerNorm(dim), Attention(dim, heads)
        self.mlp_query, self.mlp_text = mlp(dim), mlp(dim)

    def forward(self, x, mask, image, num_queries):
        x = x + self.sa(self.ln_sa(x), mask=mask)
        q, t = x[:, :num_queries], x[:, num_queries:]
        q = q + self.ca(self.ln_ca(q), image)
        return torch.cat([q + self.mlp_query(q), t + self.mlp_text(t)], 1)


class BLIP2(nn.Module):
    """Frozen image encoder -> Q-Former (queries) -> linear -> frozen tiny GPT-2."""

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, num_queries: int = 8,
                 embed_dim: int = 32, lm_dim: int = 64, lm_layers: int = 2, lm_heads: int = 4,
                 max_len: int = MAX_LEN, lm: bool = True):
        super().__init__()
        self.config = dict(dim=dim, depth=depth, heads=heads, num_queries=num_queries,
                           embed_dim=embed_dim, lm_dim=lm_dim, lm_layers=lm_layers,
                           lm_heads=lm_heads, max_len=max_len, lm=lm)
        self.vision = ImageEncoder(dim, heads).requires_grad_(False)          # frozen
        # lm=False: a stage-1 Q-Former kept on its own (no LM, no use for the projection)
        self.lm = (tiny_gpt2(lm_dim, lm_layers, lm_heads, 2 * max_len).requires_grad_(False)
                   if lm else None)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.embed = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(dim, heads) for _ in range(depth))
        self.ln_out = nn.LayerNorm(dim)
        self.vision_proj, self.text_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.itm_head, self.itg_head = nn.Linear(dim, 2), nn.Linear(dim, len(VOCAB))
        self.llm_proj = nn.Linear(dim, lm_dim)           # stage 2: queries -> LM input space

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Cap exp(log_scale) at 100 after each optimiser step (``diffkit.train``), as CLIP does."""
        self.log_scale.clamp_(max=MAX_LOG_SCALE)

    @torch.no_grad()
    def init_from_blip(self, model: BLIP) -> None:
        """Start the Q-Former from a pre-trained text encoder, as BLIP-2 starts from BERT-base:
        word and position embeddings, self-attention and both feed-forward layers (queries and
        text) are copied from BLIP's text transformer; cross-attention and queries stay random.
        The frozen image encoder is a copy of BLIP's."""
        keys = ("dim", "depth")
        if [model.config[k] for k in keys] != [self.config[k] for k in keys]:
            raise ValueError(f"BLIP (dim, depth) {model.config['dim'], model.config['depth']} must "
                             f"match the Q-Former's {self.config['dim'], self.config['depth']}")
        self.vision.load_state_dict(model.vision.state_dict())
        self.embed.load_state_dict(model.embed.state_dict())
        self.pos.copy_(model.pos[:, :self.pos.shape[1]])
        self.ln_out.load_state_dict(model.ln_out.state_dict())
        for mine, theirs in zip(self.blocks, model.blocks):
            mine.ln_sa.load_state_dict(theirs.ln_sa.state_dict())
            mine.sa.load_state_dict(theirs.sa.state_dict())
            mine.mlp_query.load_state_dict(theirs.mlp.state_dict())
            mine.mlp_text.load_state_dict(theirs.mlp.state_dict())

    def qformer(self, image_tokens, ids=None, mode: str = "itc"):
        """Outputs (queries (B, Q, D), text (B, L, D) or None) under the mode's attention mask."""
        B, Q = image_tokens.shape[0], self.queries.shape[1]
        x = self.queries.expand(B, -1, -1)
        L = 0 if ids is None else ids.shape[1]
        if ids is not None:
            if ids.dim() != 2 or L > self.pos.shape[1] or len(ids) != B:
                raise ValueError(f"ids must be (B, L <= {self.pos.shape[1]}) with B = {B}, "
                                 f"got {tuple(ids.shape)}")
            x = torch.cat([x, self.embed(ids) + self.pos[:, :L]], 1)
        dev = image_tokens.device
        see = attention_mask(Q, L, mode).to(dev)
        keys = torch.ones(B, Q, dtype=torch.bool, device=dev)           # every query is a key
        if ids is not None:
            keys = torch.cat([keys, ids != PAD], 1)                      # and every word
        mask = see[None, None] & keys[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask, image_tokens, Q)
        x = self.ln_out(x)
        return x[:, :Q], (x[:, Q:] if ids is not None else None)

    def image_features(self, images) -> torch.Tensor:
        """Projected, normalised query outputs (B, Q, E): BLIP-2's image side of ITC."""
        return F.normalize(self.vision_proj(self.qformer(self.vision(images))[0]), dim=-1)

    def text_features(self, ids) -> torch.Tensor:
        """Projected, normalised [CLS] output (B, E) of the Q-Former's text side."""
        dummy = torch.zeros(len(ids), 1, self.queries.shape[-1], device=ids.device)
        _, text = self.qformer(dummy, ids, "itc")     # the text never sees the queries here
        return F.normalize(self.text_proj(text[:, 0]), dim=-1)

    @staticmethod
    def similarity(image_feats, text_feats) -> torch.Tensor:
        """ITC similarity (I, T): the best-matching query per pair (BLIP-2 Sec. 3.2)."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(-1)

    def itm_logits(self, image_tokens, ids) -> torch.Tensor:
        queries, _ = self.qformer(image_tokens, ids, "itm")
        return self.itm_head(queries).mean(1)

    def itm_score(self, images, ids) -> torch.Tensor:
        return self.itm_logits(self.vision(images), ids).softmax(-1)[:, 1]

    def stage1_losses(self, images, ids, text_codes, scene_codes_, generator=None) -> dict:
        """ITC, ITM and ITG losses on the Q-Former, the image encoder frozen (BLIP-2 stage 1)."""
        with torch.no_grad():
            image_tokens = self.vision(images)
        queries, _ = self.qformer(image_tokens)
        img = F.normalize(self.vision_proj(queries), dim=-1)
        _, text = self.qformer(image_tokens, ids, "itc")
        txt = F.normalize(self.text_proj(text[:, 0]), dim=-1)
        sim = self.log_scale.exp() * self.similarity(img, txt)
        positive = consistent(text_codes, scene_codes_).T.float()
        itc, itm = contrastive_and_matching_losses(sim, positive, image_tokens, ids,
                                                   self.itm_logits, generator)
        dec = ids.clone()
        dec[:, 0] = DEC
        _, text = self.qformer(image_tokens, dec, "itg")
        logits = self.itg_head(text)
        itg = F.cross_entropy(logits[:, :-1].flatten(0, 1), dec[:, 1:].flatten(), ignore_index=PAD)
        return {"itc": itc, "itm": itm, "itg": itg}

    def soft_prompt(self, images) -> torch.Tensor:
        """Query outputs projected into the LM's input-embedding space: (B, Q, lm_dim)."""
        if self.lm is None:
            raise ValueError("this BLIP2 has no LM (built with lm=False: a stage-1 Q-Former)")
        with torch.no_grad():
            image_tokens = self.vision(images)
        return self.llm_proj(self.qformer(image_tokens)[0])

    def stage2_loss(self, images, ids) -> torch.Tensor:
        """LM loss of the frozen GPT-2 reading the soft prompt then the caption (BLIP-2 stage 2)."""
        return lm_loss(self.lm, ids, self.soft_prompt(images))

    @torch.no_grad()
    def caption(self, images, max_len: int | None = None, prefix: torch.Tensor | None = None,
                lm: GPT2LMHeadModel | None = None) -> list[str]:
        """Greedy captions by the frozen LM after the soft prompt (or after ``prefix``; an empty
        prefix (B, 0, lm_dim) captions with the LM alone). ``lm`` swaps in another LM."""
        lm = self.lm if lm is None else lm
        prefix = self.soft_prompt(images) if prefix is None else prefix
        return greedy_decode(lambda ids: lm_logits(lm, ids, prefix)[:, -1], len(images),
                             max_len or self.pos.shape[1], images.device)


class BLIPFamily(nn.Module):
    """The shipped checkpoint of chapter 6: a BLIP model, the BLIP-2 bridge built on its image
    encoder (after stage 2), and the same Q-Former as it was after stage 1 (BLIP-2 uses the
    stage-1 model for retrieval, Sec. 4.4)."""

    def __init__(self, blip: dict | None = None, blip2: dict | None = None):
        super().__init__()
        blip2 = {k: v for k, v in (blip2 or {}).items() if k != "lm"}
        self.blip, self.blip2 = BLIP(**(blip or {})), BLIP2(**blip2)
        self.blip2_stage1 = BLIP2(**blip2, lm=False)
        self.config = {"blip": self.blip.config, "blip2": self.blip2.config}
