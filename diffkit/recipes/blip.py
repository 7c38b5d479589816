"""Recipe of chapter 6 (BLIP, BLIP-2) on the captioned-shapes world.

``shapes-blip`` trains, in four stages that each resume on their own:
1. BLIP (``diffkit.text.blip``): image encoder + text transformer, ITC + ITM + LM, jointly;
2. a tiny GPT-2 pre-trained on text alone, scenes described twice (the "LLM", frozen from then on);
3. BLIP-2 stage 1 (``diffkit.text.blip2``): the Q-Former on BLIP's frozen image encoder,
   ITC + ITM + ITG;
4. BLIP-2 stage 2: the Q-Former's queries as a soft prompt to the frozen GPT-2, LM loss.
The checkpoint is one ``blip2.BLIPFamily``: BLIP, BLIP-2 after stage 2, and the Q-Former as it
was after stage 1. What the card measures is computed by :mod:`diffkit.eval.blip_probes`
(shared with chapter 6).
"""

from __future__ import annotations

import torch

from diffkit.data.shapes import TEMPLATES, caption, make_shapes
from diffkit.eval.blip_probes import caption_accuracy, itm_pairs, qformer_recall, retrieval
from diffkit.recipes.registry import SEED, recipe
from diffkit.text.blip import BLIP, caption_codes, scene_codes, tokenize
from diffkit.text.blip2 import BLIP2, BLIPFamily, documents, lm_loss, tiny_gpt2
from diffkit.train import TrainResult, train

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


@torch.no_grad()
def blip_card_quality(model: BLIPFamily, device, *, n_caption: int = 300,
                      n_retrieval: int = 300, seed: int = TEST_SEED) -> dict:
    """The card's figures: captions (BLIP, BLIP-2, the frozen LM alone), ITM, retrieval R@1,
    on test scenes of data seeds ``seed`` and ``seed + 1`` (never TRAIN_SEED)."""
    if seed in (TRAIN_SEED, TRAIN_SEED - 1):
        raise ValueError(f"seed {seed} would measure on the training scenes (seed {TRAIN_SEED})")
    model = model.to(device).eval()
    single = make_shapes(n_caption, seed=seed, objects=1)
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
    mixed = make_shapes(n_retrieval, seed=seed + 1, objects=(1, 2))
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
