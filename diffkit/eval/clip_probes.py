"""Probes of a CLIP on the captioned-shapes world: zero-shot accuracy per attribute, retrieval,
and caption-versus-altered-caption preferences (binding, word order, counting), in the spirit
of the ARO and Winoground benchmarks for real CLIPs."""

from __future__ import annotations

import itertools

import torch

from diffkit.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapeObject, caption, make_shapes
from diffkit.text import clip

CLIP_TRAIN_SEED, CLIP_TEST_SEED = 1000, 2000   # train and test scenes come from other seeds
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
# the caption template that names each attribute with the fewest other words (diffkit.data.shapes)
ZERO_SHOT_TEMPLATE = {"colour": 1, "shape": 1, "size": 2, "position": 3}


def attribute_prompts(attribute: str) -> tuple[list[str], list[ShapeObject]]:
    """Every caption of one object in the template that names ``attribute`` (and colour, shape)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {list(ATTRIBUTES)}, got {attribute!r}")
    template = ZERO_SHOT_TEMPLATE[attribute]
    sizes = SIZES if template in (0, 2) else SIZES[:1]
    positions = POSITIONS if template in (0, 3) else POSITIONS[:1]
    objects = [ShapeObject(s, c, z, p) for c, s, z, p in
               itertools.product(COLOURS, SHAPES, sizes, positions)]
    return [caption([o], template) for o in objects], objects


def zero_shot_accuracy(model: clip.TinyCLIP, batch, wrap: str = "{}") -> dict[str, float]:
    """Zero-shot accuracy per attribute on one-object scenes: the closest of all prompts of
    ``attribute_prompts`` names the attribute right. ``wrap`` rewrites each prompt."""
    if any(len(objs) != 1 for objs in batch.objects):
        raise ValueError("zero_shot_accuracy needs one-object scenes (make_shapes(objects=1))")
    image_emb, out = model.encode_image(batch.images), {}
    for attribute in ATTRIBUTES:
        prompts, objects = attribute_prompts(attribute)
        best = (image_emb @ model.encode_text([wrap.format(p) for p in prompts]).T).argmax(1)
        right = [getattr(objects[int(b)], attribute) == getattr(objs[0], attribute)
                 for b, objs in zip(best, batch.objects)]
        out[attribute] = sum(right) / len(right)
    return out


@torch.no_grad()
def similarity_gaps(model: clip.TinyCLIP, images, texts_a, texts_b) -> torch.Tensor:
    """(N,) cosine similarity of each image to text a minus that to text b."""
    image_emb = model.encode_image(images)
    return (image_emb * (model.encode_text(texts_a) - model.encode_text(texts_b))).sum(1).cpu()


def preference(model: clip.TinyCLIP, images, texts_a, texts_b) -> dict[str, float]:
    """How often text a beats text b on its image (ties count half), and the similarity gaps."""
    gap = similarity_gaps(model, images, texts_a, texts_b)
    return {"rate": float((gap > 0).float().mean() + (gap == 0).float().mean() / 2),
            "mean_gap": float(gap.mean()), "mean_abs_gap": float(gap.abs().mean())}


def probe_captions(batch) -> dict[str, tuple[list[int], list[str], list[str]]]:
    """(image indices, true captions, altered captions) for each probe, in the colour-shape
    template ("a red circle and a blue square"):

    binding: two objects of different colours and shapes; the colours swapped between them.
    order: the same scenes, the two object phrases swapped (the meaning is unchanged).
    count_drop: two-object scenes against the caption of their first object alone.
    count_add: one-object scenes against the caption with a second, absent object added.
    """
    out = {k: ([], [], []) for k in ("binding", "order", "count_drop", "count_add")}
    for i, objs in enumerate(batch.objects):
        if len(objs) == 2:
            a, b = objs
            out["count_drop"][0].append(i)
            out["count_drop"][1].append(caption([a, b], 1))
            out["count_drop"][2].append(caption([a], 1))
            if a.colour != b.colour and a.shape != b.shape:
                swapped = [ShapeObject(a.shape, b.colour, a.size, a.position),
                           ShapeObject(b.shape, a.colour, b.size, b.position)]
                for key, altered in (("binding", swapped), ("order", [b, a])):
                    out[key][0].append(i)
                    out[key][1].append(caption([a, b], 1))
                    out[key][2].append(caption(altered, 1))
        else:
            (a,) = objs
            k = (i * 7) % 17 + 1   # a deterministic other colour-shape pair
            colour = COLOURS[(COLOURS.index(a.colour) + k // 3 % 5 + 1) % 6]  # never a's
            other = ShapeObject(SHAPES[(SHAPES.index(a.shape) + k) % 3], colour, "small", "left")
            out["count_add"][0].append(i)
            out["count_add"][1].append(caption([a], 1))
            out["count_add"][2].append(caption([a, other], 1))
    return out


def scene_groups(batch) -> torch.Tensor:
    """(N,) ids equal for scenes with the same set of objects (their full captions are
    interchangeable, whatever the order of the phrases)."""
    keys = [tuple(sorted((o.shape, o.colour, o.size, o.position) for o in objs))
            for objs in batch.objects]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return torch.tensor([index[k] for k in keys])


def clip_report(model: clip.TinyCLIP, *, n: int = 1000, seed: int = CLIP_TEST_SEED) -> dict:
    """The card's figures on held-out scenes: zero-shot accuracy per attribute (one object),
    retrieval R@1/R@5 both ways (full captions, one or two objects), and the probes."""
    model.eval()
    out = {"inverse_temperature": float(model.scale().detach())}
    single = make_shapes(n, seed=seed, objects=1)
    out.update({f"zero_shot_{k}": v for k, v in zero_shot_accuracy(model, single).items()})
    pairs = make_shapes(n, seed=seed + 1, caption_template=0)
    recall = clip.retrieval_recall(model.encode_image(pairs.images),
                                   model.encode_text(pairs.captions), groups=scene_groups(pairs))
    out.update(recall)
    mixed = make_shapes(n, seed=seed + 2)
    for name, (idx, true, altered) in probe_captions(mixed).items():
        measured = preference(model, mixed.images[idx], true, altered)
        out[f"{name}_rate"] = measured["rate"]
        out[f"{name}_abs_gap"] = measured["mean_abs_gap"]
    return {k: round(v, 4) for k, v in out.items()}
