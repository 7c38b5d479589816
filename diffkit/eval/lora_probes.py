"""What an adapter taught the tiny SD and what it cost, read by the shapes judge.

Concept accuracy: on n held-out one-object prompts of the concept (template 0: size, colour,
shape, position), the fraction of images in which the judge, with the concept vocabularies,
reads the concept (orange prompts read orange; ring prompts read a ring), and "colour_shape"
(both right). Damage: on n held-out one-object prompts of the base world, colour-and-shape
accuracy with the base UNet and with the adapted one on the same prompts and the same noise,
the gap and its paired standard error (:func:`diffkit.eval.sd_probes.paired_gap`).
"""

from __future__ import annotations

import contextlib

import torch

from diffkit.adapters import finetune
from diffkit.eval import sd_probes
from diffkit.eval.shapes_judge import judge_accuracy

CONCEPT_TEST_SEED = 1911    # held-out concept prompts (the recipes train on other seeds)
CONCEPT_KEY = {"orange": "colour", "ring": "shape"}    # the attribute the concept is


def concept_prompts(concept: str, n: int, *, seed: int = CONCEPT_TEST_SEED):
    """n held-out one-object scenes of the concept with full captions."""
    return finetune.concept_scenes(concept, n, seed=seed, objects=1, caption_template=0)


@contextlib.contextmanager
def using_unet(pipe, unet):
    """The pipeline with ``unet`` in place of its own for the block (put back after)."""
    own, pipe.unet = pipe.unet, unet
    try:
        yield pipe
    finally:
        pipe.unet = own


def concept_figures(concept: str, scenes, images: torch.Tensor) -> dict[str, float]:
    """{"concept": the concept's attribute read right, "colour_shape": both right}."""
    figures = judge_accuracy(scenes, images, **finetune.concept_vocabulary())
    return {"concept": figures[CONCEPT_KEY[concept]], "colour_shape": figures["colour_shape"]}


@torch.no_grad()
def report(pipe, unet, concept: str, *, n: int, steps: int, guidance_scale: float,
           sampler: str = "dpmpp_2m", seed: int = CONCEPT_TEST_SEED) -> dict[str, float]:
    """Concept accuracy of ``unet`` (an adapted copy of ``pipe.unet``) and of the base on the
    concept prompts, and the base prompts' colour-and-shape accuracy with each (paired)."""
    if concept not in CONCEPT_KEY:
        raise ValueError(f"concept must be one of {sorted(CONCEPT_KEY)}, got {concept!r}")
    settings = dict(steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed)
    prompts = concept_prompts(concept, n, seed=seed)
    base_prompts = sd_probes.prompt_scenes(n, 1, seed=seed + 1)
    out, base_drawn = {}, {}
    for label, model in (("base", pipe.unet), ("adapted", unet)):
        with using_unet(pipe, model):
            drawn = sd_probes.generate(pipe, prompts.captions, **settings)
            out.update({f"{k}_{label}": v for k, v in concept_figures(concept, prompts,
                                                                       drawn).items()})
            base_drawn[label] = sd_probes.generate(pipe, base_prompts.captions, **settings)
        out[f"base_colour_shape_{label}"] = judge_accuracy(base_prompts,
                                                           base_drawn[label])["colour_shape"]
    gap = sd_probes.paired_gap(base_prompts, base_drawn["base"], base_drawn["adapted"])
    out.update(damage=gap["gap"], damage_se=gap["se"])
    return {k: round(float(v), 4) for k, v in out.items()} | {"n": n, "seed": seed}
