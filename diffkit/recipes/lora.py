"""Recipes of chapter 11: ``shapes-lora-orange`` and ``shapes-lora-ring``, two concepts the tiny
SD never saw, each taught by an adapter of its UNet (:mod:`diffkit.adapters`), and
``shapes-lora-sweep``, both concepts taught by LoRA (attention), LoCon and LoHa (attention and
convolutions) at ranks 1, 2, 4, 8, with a trace of concept accuracy during training.

Each trains on one-object scenes of its concept and as many of the base world (the
regularisation that keeps the base prompts as they were), the VAE, text encoder and base UNet
frozen. The checkpoint is the adapter alone, as diffusers' ``pytorch_lora_weights.safetensors``
(``pipe.load_lora_weights(folder)`` on the ``shapes-sd`` pipeline) with its card; the images are
decoded by ``shapes-vae-ft``, whose encoder is ``shapes-vae``'s. The card records the adapter
type, rank, targets, the prompt that invokes the concept and what the judge reads
(:mod:`diffkit.eval.lora_probes`).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from diffkit.adapters import finetune, lora_io
from diffkit.adapters.checkpoint import AdapterFamily, UNetAdapter
from diffkit.eval import lora_probes, sd_probes
from diffkit.recipes.registry import SEED, member_state_path, recipe
from diffkit.recipes.sd import RECOMMENDED
from diffkit.train import TrainResult

LORA_TRAIN_SEED = 911
LORA_HYPER = dict(concept_scenes=2000, base_scenes=2000, batch_size=64, lr=1e-3,
                  caption_dropout=0.1)
TARGETS = {"attention": finetune.ATTENTION,
           "attention+convolutions": finetune.ATTENTION + finetune.CONVOLUTIONS}
# orange lies between two colours the base draws: LoRA on attention suffices. The ring is a
# shape nothing in the base looks like: attention alone reaches 0.76-0.78 in 400 steps, with the
# convolutions (LoCon) 0.97-1.0 (chapter 11 measures the sweep)
ADAPTERS = {
    "orange": dict(kind="lora", rank=4, targets="attention",
                   prompt="a large orange circle in the centre"),
    "ring": dict(kind="lora", rank=4, targets="attention+convolutions",
                 prompt="a large red ring in the centre"),
}
STEPS = 400
MEASURE_N = 200


def _options() -> dict:
    return {k: LORA_HYPER[k] for k in ("batch_size", "lr", "caption_dropout")}


def _quality(concept: str):
    def measure(adapter, device, *, n: int = MEASURE_N) -> dict:
        pipe = finetune.concept_pipeline(device)
        figures = lora_probes.report(pipe, adapter.unet.to(device), concept, n=n,
                                     **_sampling())
        return {**figures, **RECOMMENDED}
    return measure


def _register(concept: str, spec: dict) -> None:
    name = f"shapes-lora-{concept}"
    kind = "LoCon" if "convolutions" in spec["targets"] else "LoRA"

    @recipe(name, f"{kind} rank {spec['rank']} on the shapes-sd UNet ({spec['targets']}) "
            f"teaching the concept {concept} (chapter 11)", STEPS, _quality(concept))
    def train(steps, device, state_path, progress):
        pipe = finetune.concept_pipeline(device)
        adapter = UNetAdapter("shapes-sd", spec["kind"], spec["rank"],
                              finetune.present_targets(pipe.unet, TARGETS[spec["targets"]]))
        images, captions = finetune.training_scenes(
            concept, LORA_HYPER["concept_scenes"], LORA_HYPER["base_scenes"],
            seed=LORA_TRAIN_SEED)
        result = finetune.train_attached(adapter.to(device), pipe, images, captions,
                                         steps=steps, seed=SEED, device=device,
                                         state_path=state_path, progress=progress, **_options())
        trainable = adapter.factor_count()
        return result, {**LORA_HYPER, **spec, "concept": concept,
                        "target_modules": list(adapter.config["targets"]),
                        "trainable_parameters": trainable, "train_seed": LORA_TRAIN_SEED,
                        "vae": "shapes-vae-ft", "base": "shapes-sd"}


for _concept, _spec in ADAPTERS.items():
    _register(_concept, _spec)


# --- shapes-lora-sweep: adapter type x rank, both concepts --------------------------------------

SWEEP_KINDS = {"lora": ("lora", "attention"), "locon": ("lora", "attention+convolutions"),
               "loha": ("loha", "attention+convolutions")}
SWEEP_RANKS = (1, 2, 4, 8)
TRACE_EVERY, TRACE_N = 100, 50     # concept accuracy of the live weights, every 100 steps
SWEEP_MEASURE_N = 100


def sweep_members(pipe) -> dict[str, dict]:
    return {f"{concept}-{kind}-r{rank}": dict(
                base="shapes-sd", kind=SWEEP_KINDS[kind][0], rank=rank,
                targets=finetune.present_targets(pipe.unet, TARGETS[SWEEP_KINDS[kind][1]]))
            for concept in ADAPTERS for kind in SWEEP_KINDS for rank in SWEEP_RANKS}


def _trace(pipe, adapter, concept, steps_done: dict, seconds: dict):
    prompts = lora_probes.concept_prompts(concept, TRACE_N, seed=lora_probes.CONCEPT_TEST_SEED + 7)

    def callback(step, loss):
        if (step + 1) % TRACE_EVERY:
            return
        start = time.perf_counter()
        with lora_probes.using_unet(pipe, adapter.unet):
            drawn = sd_probes.generate(pipe, prompts.captions, seed=1, **_sampling())
        steps_done["steps"].append(step + 1)
        steps_done["concept"].append(
            lora_probes.concept_figures(concept, prompts, drawn)["concept"])
        seconds["trace"] += time.perf_counter() - start
    return callback


def _sampling() -> dict:
    return dict(steps=RECOMMENDED["num_inference_steps"],
                guidance_scale=RECOMMENDED["guidance_scale"], sampler=RECOMMENDED["scheduler"])


def sweep_quality(family, device, *, n: int = SWEEP_MEASURE_N) -> dict:
    pipe = finetune.concept_pipeline(device)
    out = {}
    for name, adapter in family.members.items():
        concept = name.split("-")[0]
        figures = lora_probes.report(pipe, adapter.unet.to(device), concept, n=n,
                                     **_sampling())
        trainable = adapter.factor_count()
        with tempfile.TemporaryDirectory() as tmp:   # the size of the file diffusers loads
            size = lora_io.file_size(lora_io.save(adapter.unet, Path(tmp) / name))
        out[name] = {**figures, "trainable_parameters": trainable, "file_bytes": size}
    return out


@recipe("shapes-lora-sweep", "LoRA (attention), LoCon and LoHa (attention + convolutions) at "
        "ranks 1, 2, 4, 8 teaching orange and the ring to shapes-sd (chapter 11)", STEPS,
        sweep_quality)
def shapes_lora_sweep(steps, device, state_path, progress):
    pipe = finetune.concept_pipeline(device)
    family = AdapterFamily(sweep_members(pipe))
    training, results = {}, []
    for name, adapter in family.members.items():
        concept = name.split("-")[0]
        images, captions = finetune.training_scenes(
            concept, LORA_HYPER["concept_scenes"], LORA_HYPER["base_scenes"],
            seed=LORA_TRAIN_SEED)
        trace, seconds = {"steps": [], "concept": []}, {"trace": 0.0}
        result = finetune.train_attached(
            adapter.to(device), pipe, images, captions, steps=steps, seed=SEED, device=device,
            state_path=member_state_path(state_path, name), progress=progress,
            callback=_trace(pipe, adapter, concept, trace, seconds), **_options())
        family.members[name] = result.ema.eval()
        training[name] = {"train_seconds": round(result.wall_time - seconds["trace"], 1),
                          "concept_trace": trace}
        results.append(result)
    return (TrainResult(family, family, results[0].losses, steps,
                        sum(r.wall_time for r in results), results[0].resumed_from),
            {**LORA_HYPER, "kinds": SWEEP_KINDS, "ranks": list(SWEEP_RANKS),
             "trace_every": TRACE_EVERY, "trace_n": TRACE_N, "training": training,
             "train_seed": LORA_TRAIN_SEED, "vae": "shapes-vae-ft", "base": "shapes-sd"})
