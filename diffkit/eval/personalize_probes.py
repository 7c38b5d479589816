"""What DreamBooth and Textual Inversion taught the tiny SD, read by the shapes judge.

The subjects are the LoRA chapter's concepts, learnt from the same five instance images each
(one-object scenes of seed ``INSTANCE_SEED``). How the subject is named in a prompt:

* DreamBooth: the identifier ``sks`` before the subject's class word, which the base knows
  (orange: "a large sks red circle ..." -- a special red; the ring: "a large red sks circle ...");
* Textual Inversion: a new token in the concept word's place ("a large <orange> circle ...").

Figures (each on n prompts, all noise from one seeded generator per setting):

* fidelity: the instance captions, cycled with new noise; the judge reads the concept;
* editability: held-out concept prompts (other sizes, positions, colours or shapes than the
  instances): the concept read, and the whole object right (concept, the other attribute, size
  and position);
* drift: held-out prompts of the class (red objects for orange, circles for the ring) drawn by
  the base and by the personalised model with the same noise: the fraction read as the concept
  (red drawn orange, circles drawn as rings) and the class prompts' colour-and-shape accuracy,
  with the paired gap.
"""

from __future__ import annotations

import re

import torch

from diffkit.adapters import finetune
from diffkit.data.shapes import make_shapes
from diffkit.eval import sd_probes
from diffkit.eval.lora_probes import CONCEPT_KEY, CONCEPT_TEST_SEED, concept_prompts
from diffkit.eval.shapes_judge import judge, judge_accuracy

INSTANCE_SEED = 1412        # the five instance images of each subject
N_INSTANCES = 5
IDENTIFIER = "sks"
SUBJECTS = {"orange": dict(word="orange", class_word="red", token="<orange>", init_word="red",
                           class_scenes=dict(colours=("red",))),
            "ring": dict(word="ring", class_word="circle", token="<ring>", init_word="circle",
                         class_scenes=dict(shapes=("circle",)))}


def _subject(concept: str) -> dict:
    if concept not in SUBJECTS:
        raise ValueError(f"concept must be one of {sorted(SUBJECTS)}, got {concept!r}")
    return SUBJECTS[concept]


def _replace(concept: str, caption: str, name: str) -> str:
    word = _subject(concept)["word"]
    named, count = re.subn(rf"\b{word}\b", name, caption)
    if count != 1:
        raise ValueError(f"caption {caption!r} must name {word!r} once")
    return named


def dreambooth_caption(concept: str, caption: str) -> str:
    """The concept word replaced by the identifier and the class word."""
    return _replace(concept, caption, f"{IDENTIFIER} {_subject(concept)['class_word']}")


def ti_caption(concept: str, caption: str) -> str:
    """The concept word replaced by the new token."""
    return _replace(concept, caption, _subject(concept)["token"])


def class_caption(concept: str, caption: str) -> str:
    """The concept word replaced by the class word (the prompt the prior is kept on)."""
    return _replace(concept, caption, _subject(concept)["class_word"])


NAMING = {"dreambooth": dreambooth_caption, "textual_inversion": ti_caption}


def instance_scenes(concept: str, n: int = N_INSTANCES):
    """The instance images of the subject and their plain captions (the concept word)."""
    _subject(concept)
    return finetune.concept_scenes(concept, n, seed=INSTANCE_SEED, caption_template=0)


def cycled_instances(concept: str, n: int):
    """The instance scenes repeated in turn to n (for n drawings of the instance prompts)."""
    instances = instance_scenes(concept)
    return sd_probes.subset(instances, [i % len(instances) for i in range(n)])


def class_scenes(concept: str, n: int, *, seed: int):
    """n one-object scenes of the subject's class (full captions)."""
    return make_shapes(n, objects=1, caption_template=0, seed=seed,
                       **_subject(concept)["class_scenes"])


def read_as_concept(concept: str, images: torch.Tensor) -> float:
    """Fraction of images in which the judge (concept vocabularies) finds an object of the
    concept: an orange one, or a ring."""
    attribute, value = CONCEPT_KEY[concept], _subject(concept)["word"]
    seen = judge(images, **finetune.concept_vocabulary())
    return sum(any(getattr(o, attribute) == value for o in found) for found in seen) / len(seen)


@torch.no_grad()
def report(base_pipe, personal_pipe, concept: str, method: str, *, n: int, steps: int,
           guidance_scale: float, sampler: str = "dpmpp_2m",
           seed: int = CONCEPT_TEST_SEED) -> dict[str, float]:
    """Fidelity, editability and drift of ``personal_pipe`` (a pipeline sharing the base's VAE)
    for the subject ``concept`` named as ``method`` names it ("dreambooth" or
    "textual_inversion")."""
    if method not in NAMING:
        raise ValueError(f"method must be one of {sorted(NAMING)}, got {method!r}")
    name = NAMING[method]
    settings = dict(steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed)
    vocabulary = finetune.concept_vocabulary()
    key = CONCEPT_KEY[concept]
    cycled = cycled_instances(concept, n)
    drawn = sd_probes.generate(personal_pipe, [name(concept, t) for t in cycled.captions],
                               **settings)
    out = {"fidelity": judge_accuracy(cycled, drawn, **vocabulary)[key]}
    held_out = concept_prompts(concept, n, seed=seed)
    drawn = sd_probes.generate(personal_pipe, [name(concept, t) for t in held_out.captions],
                               **settings)
    figures = judge_accuracy(held_out, drawn, **vocabulary)
    out.update(editability_concept=figures[key], editability_object=figures["object"])
    classes = class_scenes(concept, n, seed=seed + 2)
    before = sd_probes.generate(base_pipe, classes.captions, **settings)
    after = sd_probes.generate(personal_pipe, classes.captions, **settings)
    out.update(class_as_concept_base=read_as_concept(concept, before),
               class_as_concept_after=read_as_concept(concept, after),
               class_colour_shape_base=judge_accuracy(classes, before)["colour_shape"],
               class_colour_shape_after=judge_accuracy(classes, after)["colour_shape"])
    gap = sd_probes.paired_gap(classes, before, after)
    out.update(class_damage=gap["gap"], class_damage_se=gap["se"])
    return {k: round(float(v), 4) for k, v in out.items()} | {"n": n, "seed": seed}
