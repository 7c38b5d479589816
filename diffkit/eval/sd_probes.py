"""What the tiny Stable Diffusion draws, read back by the shapes judge against its prompts.

A prompt is the full caption of a held-out scene (template 0: size, colour, shape and
position of every object), so every attribute of every object can be scored. For one-object
prompts the figures are per attribute plus "colour_shape" (both right, the book's quality bar);
for two-object prompts also "both_right" (the image holds exactly two objects, each of the
right colour and shape) and "binding": among scenes whose two objects differ in colour and in
shape and whose image shows the right two colours and the right two shapes, the fraction that
paints each colour on its own shape (0.5 is a model that knows the words but not which goes
with which).
"""

from __future__ import annotations

import numbers

import torch

from diffkit.data.shapes import ShapesBatch, make_shapes
from diffkit.eval.shapes_judge import judge, judge_accuracy

SD_TEST_SEED = 1909      # the held-out prompts (the recipe trains on scenes of seed 909)


def prompt_scenes(n: int, objects: int, *, seed: int = SD_TEST_SEED) -> ShapesBatch:
    """n held-out scenes with ``objects`` objects and their full captions (template 0)."""
    return make_shapes(n, objects=objects, caption_template=0, seed=seed)


@torch.no_grad()
def generate(pipe, prompts: list[str], *, steps: int, guidance_scale: float,
             sampler: str = "dpmpp_2m", seed: int = 0, batch: int = 100,
             denoiser_for=None) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] from diffkit's text-to-image loop, ``batch`` prompts at
    a time, all noise from one generator seeded with ``seed``. ``denoiser_for(rows)``, given
    the slice of prompts of a batch, returns the denoiser to sample that batch with (a UNet with
    a control model, :mod:`diffkit.eval.control_probes`); default the pipeline's UNet."""
    from diffkit.latent.sd import text_to_image

    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    generator = torch.Generator(pipe.unet.device).manual_seed(seed)
    rows = [slice(i, i + batch) for i in range(0, len(prompts), batch)]
    return torch.cat([text_to_image(pipe, list(prompts[r]), steps=steps,
                                    guidance_scale=guidance_scale, sampler=sampler,
                                    generator=generator,
                                    denoiser=None if denoiser_for is None else denoiser_for(r)
                                    ).cpu()
                      for r in rows])


def shape_accuracy(scenes: ShapesBatch, images: torch.Tensor) -> dict[str, dict[str, float]]:
    """For one-object scenes: per true shape, the fraction of images in which the judge reads
    each shape ("none": no object found). Of several objects found, the one of the true shape
    counts if there is one (the pairing that agrees best, as in ``judge_accuracy``)."""
    from diffkit.data.shapes import SHAPES

    seen = judge(images)
    table = {shape: dict.fromkeys(SHAPES + ("none",), 0) for shape in SHAPES}
    for truth, found in zip(scenes.objects, seen):
        if len(truth) != 1:
            raise ValueError("shape_accuracy needs one-object scenes")
        shapes = [o.shape for o in found]
        read = truth[0].shape if truth[0].shape in shapes else shapes[0] if shapes else "none"
        table[truth[0].shape][read] += 1
    return {shape: {k: v / max(1, sum(row.values())) for k, v in row.items()}
            for shape, row in table.items()}


def binding(scenes: ShapesBatch, images: torch.Tensor) -> dict[str, float]:
    """"both_right" over all two-object scenes and "binding" as the module says, with
    "binding_n", the number of scenes binding is measured on."""
    seen = judge(images)
    both = eligible = bound = 0
    for truth, found in zip(scenes.objects, seen):
        if len(truth) != 2:
            raise ValueError("binding needs two-object scenes")
        pairs = sorted((o.colour, o.shape) for o in truth)
        got = sorted((o.colour, o.shape) for o in found)
        both += got == pairs
        distinct = truth[0].colour != truth[1].colour and truth[0].shape != truth[1].shape
        if distinct and len(found) == 2 and (
                sorted(c for c, _ in got) == sorted(c for c, _ in pairs)
                and sorted(s for _, s in got) == sorted(s for _, s in pairs)):
            eligible += 1
            bound += got == pairs
    return {"both_right": both / len(seen),
            "binding": bound / eligible if eligible else float("nan"), "binding_n": eligible}


def run_prompts(pipe, objects: int, *, n: int, steps: int, guidance_scale: float,
                sampler: str = "dpmpp_2m", seed: int = SD_TEST_SEED):
    """(scenes, images): n held-out prompts with ``objects`` objects and what the model draws
    for them, the scenes and the noise fixed by ``seed`` (as ``attribute_report`` draws them)."""
    scenes = prompt_scenes(n, objects, seed=seed + objects)
    return scenes, generate(pipe, scenes.captions, steps=steps, guidance_scale=guidance_scale,
                            sampler=sampler, seed=seed)


def attribute_report(pipe, *, n: int, steps: int, guidance_scale: float,
                     sampler: str = "dpmpp_2m", seed: int = SD_TEST_SEED,
                     objects=(1, 2)) -> dict:
    """Judge accuracies of n prompts per object count, keys suffixed _1obj / _2obj."""
    out = {}
    for k in objects:
        scenes, images = run_prompts(pipe, k, n=n, steps=steps, guidance_scale=guidance_scale,
                                     sampler=sampler, seed=seed)
        figures = judge_accuracy(scenes, images)
        if k == 2:
            figures.update(binding(scenes, images))
        out.update({f"{name}_{k}obj": round(float(v), 4) for name, v in figures.items()})
    return out


def _other_scenes(scenes: ShapesBatch, seed: int) -> ShapesBatch:
    """For each one-object scene, a one-object prompt scene of another colour and shape."""
    pool = prompt_scenes(8 * len(scenes), 1, seed=seed)
    picked, used = [], set()
    for truth in scenes.objects:
        for j, other in enumerate(pool.objects):
            if j not in used and other[0].colour != truth[0].colour and (
                    other[0].shape != truth[0].shape):
                picked.append(j)
                used.add(j)
                break
    if len(picked) != len(scenes):
        raise ValueError("could not find a differing prompt for every scene")  # pragma: no cover
    return subset(pool, picked)


def subset(scenes: ShapesBatch, index: list[int]) -> ShapesBatch:
    """The scenes at ``index`` (images, captions, objects, background, masks, edges)."""
    rows = torch.as_tensor(index, dtype=torch.long)
    return ShapesBatch(scenes.images[rows], [scenes.captions[j] for j in index],
                       [scenes.objects[j] for j in index], scenes.background[rows],
                       scenes.masks[rows], scenes.edges[rows])


def per_image(scenes: ShapesBatch, images: torch.Tensor, key: str = "colour_shape"):
    """``judge_accuracy(...)[key]`` (or ``binding``'s "both_right" for two-object scenes) of each
    image alone (N,): the per-prompt outcomes that a paired comparison of two settings needs."""
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")

    def score(i):
        one, image = subset(scenes, [i]), images[i:i + 1]
        figures = judge_accuracy(one, image)
        if key not in figures:                      # "both_right" of a two-object scene
            figures = binding(one, image)
        return figures[key]

    return torch.tensor([score(i) for i in range(len(scenes))], dtype=torch.float64)


def paired_gap(scenes: ShapesBatch, images_a: torch.Tensor, images_b: torch.Tensor,
               key: str = "colour_shape") -> dict[str, float]:
    """Setting a minus setting b on the same prompts (and noise): the mean difference of
    ``key`` and its standard error (sd of the per-prompt differences / sqrt(N))."""
    diff = per_image(scenes, images_a, key) - per_image(scenes, images_b, key)
    return {"gap": float(diff.mean()), "se": float(diff.std() / len(diff) ** 0.5)}


@torch.no_grad()
def img2img_report(pipe, strengths, *, n: int, steps: int, guidance_scale: float,
                   sampler: str = "dpmpp_2m", seed: int = SD_TEST_SEED, batch: int = 100):
    """SDEdit against its two pulls: n held-out one-object scenes, each edited under the prompt
    of a scene with another colour and shape. Per strength: "input" and "prompt", the fraction
    of results whose colour and shape are the input's / the prompt's, the same per attribute
    ("input_colour", "prompt_shape", ...), and "rms" (pixel RMS distance to the input).
    Returns (figures per strength, inputs, prompts, outputs per strength)."""
    from diffkit.eval.metrics import rms_per_image
    from diffkit.latent.sd import image_to_image

    inputs = prompt_scenes(n, 1, seed=seed + 11)
    prompts = _other_scenes(inputs, seed + 12)
    figures, outputs = {}, {}
    for strength in strengths:
        g = torch.Generator(pipe.unet.device).manual_seed(seed)
        out = torch.cat([image_to_image(pipe, inputs.images[i:i + batch],
                                        prompts.captions[i:i + batch], strength=strength,
                                        steps=steps, guidance_scale=guidance_scale,
                                        sampler=sampler, generator=g).cpu()
                         for i in range(0, n, batch)])
        kept, followed = judge_accuracy(inputs, out), judge_accuracy(prompts, out)
        figures[strength] = {
            "input": kept["colour_shape"], "prompt": followed["colour_shape"],
            **{f"{who}_{a}": f[a] for who, f in (("input", kept), ("prompt", followed))
               for a in ("colour", "shape")},
            "rms": float(rms_per_image(out, inputs.images).mean())}
        outputs[strength] = out
    return figures, inputs, prompts, outputs


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def outline_spread(images: torch.Tensor) -> dict[str, float]:
    """How much of the picture a prompt leaves open: over images of one prompt (different
    seeds), the mean pairwise IoU of their object masks and the spread (standard deviation,
    in pixels) of the objects' centres."""
    from diffkit.eval.shapes_judge import foreground

    masks = foreground(images)
    if len(masks) < 2 or not all(m.any() for m in masks):
        raise ValueError("outline_spread needs at least two images, each with an object")
    ious = [_iou(masks[i], masks[j]) for i in range(len(masks)) for j in range(i)]
    ys, xs = torch.meshgrid(torch.arange(masks.shape[1]), torch.arange(masks.shape[2]),
                            indexing="ij")
    area = masks.flatten(1).sum(1).float()
    centres = torch.stack([(masks * xs).flatten(1).sum(1), (masks * ys).flatten(1).sum(1)],
                          1) / area[:, None]
    return {"mean_iou": sum(ious) / len(ious), "min_iou": min(ious),
            "centre_spread_px": float(centres.std(0).norm())}


@torch.no_grad()
def word_attention(pipe, scenes: ShapesBatch, *, steps: int, guidance_scale: float,
                   sampler: str = "dpmpp_2m", seed: int = SD_TEST_SEED, batch: int = 50,
                   size: int | None = None):
    """Where the words of one-object prompts look, over a whole sampling run. Returns
    (images, maps (steps, N, tokens, h, w), figures): for the colour, shape, size and position
    words, the share of their attention (averaged over steps) inside the generated object
    ("inside_WORD") against the object's share of the image ("area"), and the attention
    centroid of each position word ("centroid_POSITION": mean (x, y) in [0, 1]). ``size``: the
    resolution of the layers read (``record_word_maps``)."""
    from diffkit.eval.shapes_judge import foreground
    from diffkit.latent.attention_maps import centroid, mass_inside, record_word_maps, \
        word_positions

    g = torch.Generator(pipe.unet.device).manual_seed(seed)
    runs = [record_word_maps(pipe, scenes.captions[i:i + batch], steps=steps,
                             guidance_scale=guidance_scale, sampler=sampler, generator=g,
                             size=size)
            for i in range(0, len(scenes), batch)]
    images = torch.cat([r[0].cpu() for r in runs])
    maps = torch.cat([r[1] for r in runs], 1)
    masks = foreground(images)
    mean_maps = maps.mean(0)
    words = {kind: [] for kind in ("colour", "shape", "size", "position")}
    centroids: dict[str, list[torch.Tensor]] = {}
    for i, (prompt, truth) in enumerate(zip(scenes.captions, scenes.objects)):
        obj, place = truth[0], prompt.split()[-1]   # left, right, top, bottom or centre
        for kind in words:
            word = place if kind == "position" else getattr(obj, kind)
            index = word_positions(pipe.tokenizer, prompt, word)
            word_map = mean_maps[i, index].sum(0, keepdim=True)
            words[kind].append(float(mass_inside(word_map, masks[i:i + 1])[0]))
            if kind == "position":
                centroids.setdefault(obj.position, []).append(centroid(word_map)[0])
    figures = {f"inside_{kind}": sum(v) / len(v) for kind, v in words.items()}
    figures["area"] = float(masks.float().mean())
    figures.update({f"centroid_{p}": torch.stack(c).mean(0).tolist()
                    for p, c in sorted(centroids.items())})
    return images, maps, figures
