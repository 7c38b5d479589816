"""How closely a control model makes the tiny Stable Diffusion follow a layout (chapter 13).

The held-out scenes put their objects anywhere in the frame (``make_shapes(anywhere=True)``),
so the caption's position word (the nearest of the five named places) cannot say where the
object is, nor its exact outline. Adherence is the IoU of the object pixels the shapes judge
sees in the generated image (``foreground``) with the scene's mask, the mask the control image
was made from; the prompt's say is the judge's colour and shape accuracy on the same images.
Prompt-only generation is the base pipeline on the same prompts and noise, which is what a
ControlNet at conditioning scale 0 gives exactly (its residuals are then zero).
"""

from __future__ import annotations

import torch

from diffkit.data.shapes import ShapesBatch, make_shapes
from diffkit.eval.shapes_judge import foreground, judge_accuracy

CONTROL_TEST_SEED = 1913    # held-out layouts (the recipes train on scenes of seed 913)


def control_scenes(n: int, *, objects: int = 1, seed: int = CONTROL_TEST_SEED) -> ShapesBatch:
    """n held-out scenes with objects anywhere and their full captions (template 0)."""
    return make_shapes(n, objects=objects, caption_template=0, seed=seed, anywhere=True)


def mask_iou(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image (N,): IoU of the judge's object pixels in ``images`` (N, 3, S, S) in [-1, 1]
    with ``masks`` (N, S, S) bool (or (N, K, S, S): the union of the K object slots)."""
    if masks.ndim == 4:
        masks = masks.any(1)
    if masks.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(f"masks must be (N, S, S) for images {tuple(images.shape)}, "
                         f"got {tuple(masks.shape)}")
    seen = foreground(images)
    union = (seen | masks).flatten(1).sum(1)
    inter = (seen & masks).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones(len(union)))


@torch.no_grad()
def generate(pipe, prompts: list[str], *, control=None, condition=None, scale: float = 1.0,
             steps: int, guidance_scale: float, sampler: str = "dpmpp_2m", seed: int = 0,
             batch: int = 100) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for ``prompts``: with ``control`` (a ControlNet or a
    T2I-Adapter, see :func:`diffkit.latent.controlnet.make_denoiser`) reading ``condition``
    (N, 3, H, W) in [0, 1] at ``scale``, or the base pipeline's when ``control`` is None. The
    loop and its noise are :func:`diffkit.eval.sd_probes.generate`'s, so two settings see the
    same noise for the same prompt."""
    from diffkit.eval.sd_probes import generate as generate_prompts
    from diffkit.latent.controlnet import make_denoiser

    if control is not None and (condition is None or len(condition) != len(prompts)):
        raise ValueError(f"a control model needs one condition image per prompt "
                         f"({len(prompts)}), got {None if condition is None else len(condition)}")
    denoiser_for = None if control is None else (
        lambda rows: make_denoiser(pipe, control, condition[rows], scale=scale))
    return generate_prompts(pipe, prompts, steps=steps, guidance_scale=guidance_scale,
                            sampler=sampler, seed=seed, batch=batch, denoiser_for=denoiser_for)


def report(scenes: ShapesBatch, images: torch.Tensor) -> dict[str, float]:
    """Adherence and the prompt's say on one set of images: mean mask IoU (and its standard
    error), the fraction of images with IoU >= 0.5, and the judge's colour, shape and
    colour-and-shape accuracy against the prompts."""
    iou = mask_iou(images, scenes.masks).double()
    figures = judge_accuracy(scenes, images)
    return {"iou": float(iou.mean()), "iou_se": float(iou.std() / len(iou) ** 0.5),
            "iou_above_half": float((iou >= 0.5).double().mean()),
            **{k: float(figures[k]) for k in ("colour", "shape", "colour_shape", "count")}}


def adherence(pipe, control, scenes: ShapesBatch, scales, *, kind: str = "masks",
              steps: int, guidance_scale: float, sampler: str = "dpmpp_2m",
              seed: int = CONTROL_TEST_SEED) -> dict[str, dict[str, float]]:
    """``report`` for prompt-only generation ("prompt") and for each conditioning scale
    ("scale=S"), on the same prompts and noise; the control images are the scenes' ``kind``
    ("masks" or "edges")."""
    from diffkit.latent.controlnet import conditions

    condition = conditions(scenes, kind)
    run = dict(steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed)
    out = {"prompt": report(scenes, generate(pipe, scenes.captions, **run))}
    for scale in scales:
        images = generate(pipe, scenes.captions, control=control, condition=condition,
                          scale=scale, **run)
        out[f"scale={scale:g}"] = report(scenes, images)
    return out


CONTROL_CHECKPOINTS = ("shapes-controlnet", "shapes-t2i-adapter")


def sampling_cost(pipe, models: dict, *, batch: int, repeats: int, timer, steps: int,
                  guidance_scale: float, sampler: str) -> dict:
    """Seconds per batch of ``batch`` prompts (scale 1), prompt-only and with each control model
    of ``models`` ({name: model}), best of ``repeats`` by ``timer`` (:func:`diffkit.bench.timed`),
    and each over prompt-only as a ratio from the same run: {setting: {figure: value}}."""
    from diffkit.latent.controlnet import conditions

    scenes = control_scenes(batch)
    run = dict(steps=steps, guidance_scale=guidance_scale, sampler=sampler,
               condition=conditions(scenes, "masks"), batch=batch)
    generate(pipe, scenes.captions, **run)   # warm-up: first calls allocate
    seconds = {name: timer(lambda m=model: generate(pipe, scenes.captions, control=m, **run),
                           repeats)
               for name, model in {"prompt-only": None, **models}.items()}
    return {name: {"batch": batch, "steps": steps, "seconds": t,
                   "over_prompt_only": t / seconds["prompt-only"]} for name, t in seconds.items()}
