"""What chapter 6 and the ``shapes-blip`` card measure of BLIP and BLIP-2: caption accuracy
against the true objects, image-text matching against one-word edits, and retrieval R@1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffkit.data.shapes import COLOURS, SHAPES, SIZES, ShapeObject, caption
from diffkit.eval.shapes_judge import caption_matches
from diffkit.text.blip import BLIP, caption_codes, consistent, scene_codes, tokenize
from diffkit.text.blip2 import BLIP2


def caption_accuracy(captions: list[str], objects) -> dict[str, float]:
    """Mean ``caption_matches`` figures of captions against the scenes' true objects."""
    rows = [caption_matches(c, o) for c, o in zip(captions, objects)]
    out = {}
    for key in ("colour", "shape", "colour_shape", "exact"):
        out[key] = sum(r[key] for r in rows) / len(rows)
    return out


def one_word_negative(obj: ShapeObject, attribute: str) -> ShapeObject:
    """The object with one attribute changed to the next value of its list (a hard negative)."""
    words = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[attribute]
    value = words[(words.index(getattr(obj, attribute)) + 1) % len(words)]
    return ShapeObject(**{**obj.__dict__, attribute: value})


def recall_at_1(scores: torch.Tensor, hits: torch.Tensor) -> float:
    """Fraction of rows whose best-scoring column is a hit; scores, hits (Q, N)."""
    if scores.shape != hits.shape:
        raise ValueError(f"scores and hits must have one shape, got {tuple(scores.shape)} and "
                         f"{tuple(hits.shape)}")
    return float(hits.gather(1, scores.argmax(1, keepdim=True)).float().mean())


@torch.no_grad()
def itm_pairs(model, batch, device) -> dict[str, float]:
    """ITM on one-object scenes: each true full caption against one-word edits of it.

    Returns the accuracy of P(match) > 0.5 on the true captions and on each kind of edit (colour,
    shape or size changed), how often ITM scores the true caption above its edit, and (for BLIP)
    how often the ITC cosine does.
    """
    images = batch.images.to(device)
    truth = tokenize([caption(o, 0) for o in batch.objects]).to(device)
    pos = model.itm_score(images, truth)
    out = {"itm_positive_accuracy": float((pos > 0.5).float().mean())}
    if isinstance(model, BLIP):
        img = model.image_features(images)
        itc_pos = (img * model.text_features(truth)).sum(-1)
    for attribute in ("colour", "shape", "size"):
        edited = tokenize([caption([one_word_negative(o[0], attribute)], 0)
                           for o in batch.objects]).to(device)
        neg = model.itm_score(images, edited)
        out[f"itm_negative_{attribute}_accuracy"] = float((neg < 0.5).float().mean())
        out[f"itm_ranks_true_above_{attribute}_edit"] = float((pos > neg).float().mean())
        if isinstance(model, BLIP):
            itc_neg = (img * model.text_features(edited)).sum(-1)
            out[f"itc_ranks_true_above_{attribute}_edit"] = float(
                (itc_pos > itc_neg).float().mean())
    return out


def _hits(batch, device) -> torch.Tensor:
    """(captions, scenes) bool: the scene is one the caption truly describes."""
    return consistent(caption_codes(batch.captions), scene_codes(batch.objects)).to(device)


@torch.no_grad()
def retrieval(model: BLIP, batch, device, *, rerank: int = 16) -> dict[str, float]:
    """Text-to-image R@1 over the batch's scenes (a hit: the retrieved scene fits the caption).

    Scorings: cosine of the raw encoder [CLS] outputs before the ITC projections (as they are,
    and centred on each modality's mean), cosine of the projected ITC features, ITM probability
    re-ranking ITC's top ``rerank`` (as BLIP does); and chance (the mean share of fitting scenes).
    """
    images, ids = batch.images.to(device), tokenize(batch.captions).to(device)
    hits = _hits(batch, device)
    raw_text = model.text_features(ids, project=False)
    raw_image = model.image_features(images, project=False)
    centred_text = F.normalize(raw_text - raw_text.mean(0), dim=-1)
    centred_image = F.normalize(raw_image - raw_image.mean(0), dim=-1)
    itc = model.text_features(ids) @ model.image_features(images).T
    tokens = model.vision(images)
    top = itc.topk(rerank, dim=1).indices                               # (T, k)
    itm = torch.full_like(itc, -1.0)
    for t in range(len(ids)):
        logits = model.itm_logits(tokens[top[t]], ids[t:t + 1].expand(rerank, -1))
        itm[t, top[t]] = logits.softmax(-1)[:, 1]
    return {"r1_raw_cosine": recall_at_1(raw_text @ raw_image.T, hits),
            "r1_raw_centred_cosine": recall_at_1(centred_text @ centred_image.T, hits),
            "r1_itc_cosine": recall_at_1(itc, hits), "r1_itm_rerank": recall_at_1(itm, hits),
            "r1_chance": float(hits.float().mean())}


@torch.no_grad()
def qformer_recall(model: BLIP2, batch, device) -> float:
    """Text-to-image R@1 of a Q-Former's ITC similarity (best query), hits as ``retrieval``."""
    ids = tokenize(batch.captions).to(device)
    sim = BLIP2.similarity(model.image_features(batch.images.to(device)), model.text_features(ids))
    return recall_at_1(sim.T, _hits(batch, device))
