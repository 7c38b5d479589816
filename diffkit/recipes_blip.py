"""Recipe of chapter 6 (BLIP, BLIP-2) on the captioned-shapes world.

``shapes-blip`` trains, in four stages that each resume on their own:
1. BLIP (``diffkit.blip``): image encoder + text transformer, ITC + ITM + LM, jointly;
2. a tiny GPT-2 pre-trained on text alone, scenes described twice (the "LLM", frozen from then on);
3. BLIP-2 stage 1 (``diffkit.blip2``): the Q-Former on BLIP's frozen image encoder, ITC + ITM + ITG;
4. BLIP-2 stage 2: the Q-Former's queries as a soft prompt to the frozen GPT-2, LM loss.
The checkpoint is one ``blip2.BLIPFamily``: BLIP, BLIP-2 after stage 2, and the Q-Former as it
was after stage 1. The measurement helpers below are shared by the card and by chapter 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blip import BLIP, caption_codes, consistent, recall_at_1, scene_codes, tokenize
from .blip2 import BLIP2, BLIPFamily, documents, lm_loss, tiny_gpt2
from .recipes import SEED, recipe
from .shapes import (COLOURS, SHAPES, SIZES, TEMPLATES, ShapeObject, caption, caption_matches,
                     make_shapes)
from .train import TrainResult, train

TRAIN_SEED, TEST_SEED = 6100, 6101     # data seeds: training scenes and held-out test scenes
N_TRAIN = 20000
BLIP_CONFIG = dict(dim=64, depth=2, heads=4, embed_dim=32)
BLIP2_CONFIG = dict(dim=64, depth=2, heads=4, num_queries=8, embed_dim=32, lm_dim=64,
                    lm_layers=2, lm_heads=4)
STAGES = (("blip", 0.5), ("lm", 0.2), ("qformer-stage1", 0.15), ("qformer-stage2", 0.15))
BATCH = 32


def training_data(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(images, ids, caption codes, scene codes, documents) of n scenes with 1-2 objects.

    Captions use random templates; the documents describe each scene twice (a second caption in
    freshly drawn templates) for the text-only pre-training of the LM.
    """
    batch = make_shapes(n, seed=seed, objects=(1, 2))
    g = torch.Generator().manual_seed(seed + 1)
    second = [caption(objs, torch.randint(0, len(TEMPLATES), (len(objs),), generator=g).tolist())
              for objs in batch.objects]
    ids = tokenize(batch.captions)
    return (batch.images, ids, caption_codes(batch.captions), scene_codes(batch.objects),
            documents(ids, tokenize(second)))


def blip_objective(model, batch, generator):
    return sum(model.losses(*batch[:4], generator=generator).values())


def lm_objective(model, batch, generator):
    """LM loss on the text-only documents (``blip2.documents``), the last tensor of the batch."""
    return lm_loss(model, batch[-1])


def stage1_objective(model, batch, generator):
    return sum(model.stage1_losses(*batch[:4], generator=generator).values())


def stage2_objective(model, batch, generator):
    return model.stage2_loss(batch[0], batch[1])


def stage_steps(steps: int) -> dict[str, int]:
    """Split the recipe's step count over the four stages (at least one step each)."""
    return {name: max(1, round(steps * share)) for name, share in STAGES}


# --- measurements ---------------------------------------------------------------------------

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


@torch.no_grad()
def blip_card_quality(model: BLIPFamily, device, *, n_caption: int = 300,
                      n_retrieval: int = 300) -> dict:
    """The card's figures: captions (BLIP, BLIP-2, the frozen LM alone), ITM, retrieval R@1."""
    model = model.to(device).eval()
    single = make_shapes(n_caption, seed=TEST_SEED, objects=1)
    images = single.images.to(device)
    no_prompt = torch.zeros(len(images), 0, model.blip2.config["lm_dim"], device=device)
    out = {"n_caption": n_caption, "n_retrieval": n_retrieval}
    for name, captions in (("blip", model.blip.caption(images)),
                           ("blip2", model.blip2.caption(images)),
                           ("lm_alone", model.blip2.caption(images, prefix=no_prompt))):
        for key, value in caption_accuracy(captions, single.objects).items():
            out[f"{name}_caption_{key}"] = value
    for name, part in (("blip", model.blip), ("blip2_stage1", model.blip2_stage1)):
        out.update({f"{name}_{k}": v for k, v in itm_pairs(part, single, device).items()
                    if "ranks" not in k})                 # the rankings are in chapter 6
    mixed = make_shapes(n_retrieval, seed=TEST_SEED + 1, objects=(1, 2))
    out.update({f"blip_{k}": v for k, v in retrieval(model.blip, mixed, device).items()})
    out["blip2_stage1_r1_itc"] = qformer_recall(model.blip2_stage1, mixed, device)
    out["blip2_after_stage2_r1_itc"] = qformer_recall(model.blip2, mixed, device)
    return out


@recipe("shapes-blip", "BLIP (ITC+ITM+LM) and a BLIP-2 Q-Former bridge to a frozen tiny GPT-2, "
        "captioned shapes (chapter 6)", 4000, blip_card_quality)
def shapes_blip(steps, device, state_path, progress):
    data = training_data(N_TRAIN, TRAIN_SEED)
    split = stage_steps(steps)
    common = dict(batch_size=BATCH, lr=1e-3, weight_decay=0.01, ema_decay=0.995, seed=SEED,
                  device=device, progress=progress)
    path = {name: None if state_path is None else    # each stage resumes from its own file
            state_path.with_name(state_path.name.replace(".state", f".{name}.state"))
            for name in split}
    losses = {}
    torch.manual_seed(SEED)
    run = train(BLIP(**BLIP_CONFIG), blip_objective, data, steps=split["blip"],
                state_path=path["blip"], **common)
    losses["blip"] = run.losses
    family = BLIPFamily(BLIP_CONFIG, BLIP2_CONFIG)
    family.blip.load_state_dict(run.ema.state_dict())
    torch.manual_seed(SEED + 1)
    lm = tiny_gpt2(BLIP2_CONFIG["lm_dim"], BLIP2_CONFIG["lm_layers"], BLIP2_CONFIG["lm_heads"])
    lm_run = train(lm, lm_objective, data, steps=split["lm"], state_path=path["lm"], **common)
    losses["lm"] = lm_run.losses
    family.blip2.lm.load_state_dict(lm_run.ema.state_dict())
    family.blip2.init_from_blip(run.ema)        # frozen image encoder, Q-Former's text side
    wall, resumed = run.wall_time + lm_run.wall_time, run.resumed_from
    for stage, objective in (("qformer-stage1", stage1_objective),
                             ("qformer-stage2", stage2_objective)):
        model = BLIP2(**BLIP2_CONFIG)                                  # vision and LM frozen
        model.load_state_dict(family.blip2.state_dict())
        stage_run = train(model, objective, data, steps=split[stage], state_path=path[stage],
                          **common)
        family.blip2.load_state_dict(stage_run.ema.state_dict())
        if stage == "qformer-stage1":       # kept: BLIP-2 retrieves with its stage-1 model
            family.blip2_stage1.load_state_dict(
                {k: v for k, v in stage_run.ema.state_dict().items() if not k.startswith("lm.")})
        losses[stage], wall = stage_run.losses, wall + stage_run.wall_time
    for p in path.values():
        if p is not None:
            p.unlink(missing_ok=True)
    family.eval().requires_grad_(False)
    result = TrainResult(family, family, losses["qformer-stage2"], steps, wall, resumed)
    return result, {"batch_size": BATCH, "lr": 1e-3, "weight_decay": 0.01, "ema_decay": 0.995,
                    "n_train": N_TRAIN, "train_seed": TRAIN_SEED, "test_seed": TEST_SEED,
                    "stage_steps": split,
                    "stage_final_losses": {k: sum(v[-100:]) / len(v[-100:])
                                           for k, v in losses.items()}}
