"""Recipes of chapter 12: ``shapes-dreambooth-orange`` / ``-ring``, ``shapes-ti-orange`` /
``-ring`` and ``shapes-lora-fewshot`` (the comparison's LoRA): the LoRA chapter's two concepts
taught to ``shapes-sd`` from five instance images each (:mod:`diffkit.eval.personalize_probes`
names the subjects and measures them).

* DreamBooth fine-tunes the whole UNet; the checkpoint is a pair of diffusers
  ``UNet2DConditionModel`` folders, ``with-prior`` (prior preservation on 200 class images that
  the base draws for class prompts, lambda = 0.5) and ``without-prior`` (lambda = 0), each loaded
  with ``UNet2DConditionModel.from_pretrained`` into the base pipeline.
* Textual Inversion learns one new token's embedding; the checkpoint is diffusers'
  ``learned_embeds.safetensors``, loaded with ``pipe.load_textual_inversion(folder)``.

Every run records a trace: the fidelity of the live weights on the instance prompts (N = 20)
every 50 steps, with the seconds spent training so far, for the chapter's time-to-fidelity.
"""

from __future__ import annotations

import copy
import time

import torch

from diffkit.adapters import finetune
from diffkit.adapters import personalize as P
from diffkit.eval import lora_probes, personalize_probes, sd_probes
from diffkit.eval.shapes_judge import judge_accuracy
from diffkit.recipes.registry import SEED, member_state_path, recipe
from diffkit.recipes.sd import RECOMMENDED
from diffkit.train import TrainResult

PERSONAL_TRAIN_SEED = 1212
STEPS = 400
DREAMBOOTH_HYPER = dict(batch_size=4, lr=2e-4, caption_dropout=0.1, prior_weight=0.5,
                        class_images=200)
TI_HYPER = dict(batch_size=4, lr=5e-3, caption_dropout=0.0)
TRACE_EVERY, TRACE_N = 50, 20
MEASURE_N = 200
PRIOR_MEMBERS = {"with-prior": DREAMBOOTH_HYPER["prior_weight"], "without-prior": 0.0}


def sampling() -> dict:
    return dict(steps=RECOMMENDED["num_inference_steps"],
                guidance_scale=RECOMMENDED["guidance_scale"], sampler=RECOMMENDED["scheduler"])


def class_data(pipe, concept: str):
    """The prior's data: class prompts and the base model's own images of them."""
    scenes = personalize_probes.class_scenes(concept, DREAMBOOTH_HYPER["class_images"],
                                             seed=PERSONAL_TRAIN_SEED)
    return scenes.captions, sd_probes.generate(pipe, scenes.captions, seed=PERSONAL_TRAIN_SEED,
                                               **sampling())


def _tracer(concept: str, method: str, live_pipe, trace: dict):
    """A training callback: every TRACE_EVERY steps, the instance-prompt fidelity of the live
    weights (``live_pipe()`` builds the pipeline that samples with them)."""
    name = personalize_probes.NAMING[method]
    cycled = personalize_probes.cycled_instances(concept, TRACE_N)
    prompts = [name(concept, text) for text in cycled.captions]
    key = lora_probes.CONCEPT_KEY[concept]
    clock = {"start": time.perf_counter(), "measuring": 0.0}

    def callback(step, loss):
        if (step + 1) % TRACE_EVERY:
            return
        begin = time.perf_counter()
        with torch.no_grad():
            drawn = sd_probes.generate(live_pipe(), prompts, seed=1, **sampling())
        figures = judge_accuracy(cycled, drawn, **finetune.concept_vocabulary())
        trace["steps"].append(step + 1)
        trace["fidelity"].append(figures[key])
        trace["seconds"].append(round(begin - clock["start"] - clock["measuring"], 2))
        clock["measuring"] += time.perf_counter() - begin
    return callback


def _dreambooth_quality(concept: str):
    def measure(family, device, *, n: int = MEASURE_N) -> dict:
        pipe = finetune.concept_pipeline(device)
        return {label: personalize_probes.report(
                    pipe, P.pipeline_with(pipe, unet=unet.to(device)), concept, "dreambooth",
                    n=n, **sampling())
                for label, unet in family.items()} | RECOMMENDED
    return measure


def _register_dreambooth(concept: str) -> None:
    subject = personalize_probes.SUBJECTS[concept]

    @recipe(f"shapes-dreambooth-{concept}", f"DreamBooth: the whole shapes-sd UNet fine-tuned on "
            f"five images of {concept}, with and without prior preservation (chapter 12)", STEPS,
            _dreambooth_quality(concept))
    def train(steps, device, state_path, progress):
        pipe = finetune.concept_pipeline(device)
        instances = personalize_probes.instance_scenes(concept)
        captions = [personalize_probes.dreambooth_caption(concept, t) for t in instances.captions]
        class_captions, class_images = class_data(pipe, concept)
        options = {k: DREAMBOOTH_HYPER[k] for k in ("batch_size", "lr", "caption_dropout")}
        members, traces, results = torch.nn.ModuleDict(), {}, []
        for label, weight in PRIOR_MEMBERS.items():
            live = copy.deepcopy(pipe.unet).requires_grad_(True)
            traces[label] = {"steps": [], "fidelity": [], "seconds": []}
            callback = _tracer(concept, "dreambooth",
                               lambda live=live: P.pipeline_with(pipe, unet=live), traces[label])
            members[label], result = P.train_dreambooth(
                pipe, instances.images, captions, steps=steps, class_images=class_images,
                class_captions=class_captions, prior_weight=weight, seed=SEED, device=device,
                state_path=member_state_path(state_path, label), progress=progress,
                callback=callback, unet=live, **options)
            results.append(result)
        hyper = {**DREAMBOOTH_HYPER, "identifier": personalize_probes.IDENTIFIER,
                 "class_word": subject["class_word"], "instance_captions": captions,
                 "instance_seed": personalize_probes.INSTANCE_SEED,
                 "class_prompt_example": class_captions[0], "members": PRIOR_MEMBERS,
                 "trace": traces, "train_seconds": {
                     label: round(r.wall_time, 1) for label, r in zip(PRIOR_MEMBERS, results)},
                 "trainable_parameters": sum(p.numel() for p in pipe.unet.parameters()),
                 "train_seed": PERSONAL_TRAIN_SEED, "vae": "shapes-vae-ft", "base": "shapes-sd"}
        return (TrainResult(members, members, results[0].losses, steps,
                            sum(r.wall_time for r in results), results[0].resumed_from), hyper)


def _ti_quality(concept: str):
    def measure(model, device, *, n: int = MEASURE_N) -> dict:
        pipe = finetune.concept_pipeline(device)
        model = model.to(device)
        personal = P.pipeline_with(pipe, text_encoder=model.text_encoder,
                                   tokenizer=model.tokenizer)
        return personalize_probes.report(pipe, personal, concept, "textual_inversion", n=n,
                                         **sampling()) | RECOMMENDED
    return measure


def _register_ti(concept: str) -> None:
    subject = personalize_probes.SUBJECTS[concept]

    @recipe(f"shapes-ti-{concept}", f"Textual Inversion: one new token {subject['token']} for "
            f"{concept}, its embedding learnt from five images, shapes-sd frozen (chapter 12)",
            STEPS, _ti_quality(concept))
    def train(steps, device, state_path, progress):
        pipe = finetune.concept_pipeline(device)
        instances = personalize_probes.instance_scenes(concept)
        captions = [personalize_probes.ti_caption(concept, t) for t in instances.captions]
        model = P.TextualInversion(subject["token"], subject["init_word"], pipe=pipe)
        trace = {"steps": [], "fidelity": [], "seconds": []}
        callback = _tracer(concept, "textual_inversion", lambda: P.pipeline_with(
            pipe, text_encoder=model.text_encoder, tokenizer=model.tokenizer), trace)
        ema, result = P.train_textual_inversion(
            pipe, instances.images, captions, token=subject["token"],
            init_word=subject["init_word"], steps=steps, model=model, seed=SEED, device=device,
            state_path=state_path, progress=progress, callback=callback, **TI_HYPER)
        hyper = {**TI_HYPER, "token": subject["token"], "init_word": subject["init_word"],
                 "instance_captions": captions, "instance_seed": personalize_probes.INSTANCE_SEED,
                 "trace": trace, "trainable_parameters": int(model.vector.numel()),
                 "train_seed": PERSONAL_TRAIN_SEED, "vae": "shapes-vae-ft", "base": "shapes-sd"}
        return result, hyper


for _concept in personalize_probes.SUBJECTS:
    _register_dreambooth(_concept)
    _register_ti(_concept)


# --- shapes-lora-fewshot: the LoRA chapter's adapters, trained as DreamBooth is -----------------
# The same five images, captions, class data, prior weight, batch and steps as the DreamBooth
# recipes, with only the factors of the shipped adapters' kind trained (DreamBooth-LoRA), so that
# chapter 12 compares a full fine-tune with a small plug-in on equal terms.

FEWSHOT_LR = 1e-3           # the LoRA chapter's learning rate (the factors start at zero)


def _fewshot_quality(family, device, *, n: int = MEASURE_N) -> dict:
    pipe = finetune.concept_pipeline(device)
    return {concept: personalize_probes.report(
                pipe, P.pipeline_with(pipe, unet=adapter.unet.to(device)), concept,
                "dreambooth", n=n, **sampling())
            for concept, adapter in family.members.items()} | RECOMMENDED


@recipe("shapes-lora-fewshot", "the shipped adapters' kinds (LoRA r4 for orange, LoCon r4 for the "
        "ring) trained on DreamBooth's five images with its prior preservation (chapter 12)",
        STEPS, _fewshot_quality)
def shapes_lora_fewshot(steps, device, state_path, progress):
    from diffkit.adapters.checkpoint import AdapterFamily
    from diffkit.recipes.lora import ADAPTERS, TARGETS

    pipe = finetune.concept_pipeline(device)
    family = AdapterFamily({concept: dict(
        base="shapes-sd", kind=ADAPTERS[concept]["kind"], rank=ADAPTERS[concept]["rank"],
        targets=finetune.present_targets(pipe.unet, TARGETS[ADAPTERS[concept]["targets"]]))
        for concept in personalize_probes.SUBJECTS})
    options = {k: DREAMBOOTH_HYPER[k] for k in ("batch_size", "caption_dropout")}
    traces, results = {}, []
    for concept, adapter in family.members.items():
        instances = personalize_probes.instance_scenes(concept)
        captions = [personalize_probes.dreambooth_caption(concept, t) for t in instances.captions]
        class_captions, class_images = class_data(pipe, concept)
        live = adapter.unet.to(device)
        traces[concept] = {"steps": [], "fidelity": [], "seconds": []}
        callback = _tracer(concept, "dreambooth", lambda live=live: P.pipeline_with(
            pipe, unet=live), traces[concept])
        adapter.unet, result = P.train_dreambooth(
            pipe, instances.images, captions, steps=steps, class_images=class_images,
            class_captions=class_captions, prior_weight=DREAMBOOTH_HYPER["prior_weight"],
            lr=FEWSHOT_LR, seed=SEED, device=device,
            state_path=member_state_path(state_path, concept), progress=progress,
            callback=callback, unet=live, **options)
        results.append(result)
    hyper = {**DREAMBOOTH_HYPER, "lr": FEWSHOT_LR, "adapters": {
                 c: {**ADAPTERS[c], "trainable_parameters": m.factor_count()}
                 for c, m in family.members.items()},
             "trace": traces, "train_seconds": {
                 c: round(r.wall_time, 1) for c, r in zip(family.members, results)},
             "identifier": personalize_probes.IDENTIFIER,
             "train_seed": PERSONAL_TRAIN_SEED, "vae": "shapes-vae-ft", "base": "shapes-sd"}
    return (TrainResult(family, family, results[0].losses, steps,
                        sum(r.wall_time for r in results), results[0].resumed_from), hyper)
