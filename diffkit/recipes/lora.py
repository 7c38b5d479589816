"""Recipes of chapter 11: ``shapes-lora-orange`` and ``shapes-lora-ring``, two concepts the tiny
SD never saw, each taught by an adapter of its UNet (:mod:`diffkit.adapters`).

Each trains on one-object scenes of its concept and as many of the base world (the
regularisation that keeps the base prompts as they were), the VAE, text encoder and base UNet
frozen. The checkpoint is the adapter alone, as diffusers' ``pytorch_lora_weights.safetensors``
(``pipe.load_lora_weights(folder)`` on the ``shapes-sd`` pipeline) with its card; the images are
decoded by ``shapes-vae-ft``, whose encoder is ``shapes-vae``'s. The card records the adapter
type, rank, targets, the prompt that invokes the concept and what the judge reads
(:mod:`diffkit.eval.lora_probes`).
"""

from __future__ import annotations

from diffkit.adapters import finetune
from diffkit.adapters.checkpoint import UNetAdapter
from diffkit.eval import lora_probes
from diffkit.recipes.registry import SEED, recipe
from diffkit.recipes.sd import RECOMMENDED

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


def _quality(concept: str):
    def measure(adapter, device, *, n: int = MEASURE_N) -> dict:
        pipe = finetune.concept_pipeline(device)
        figures = lora_probes.report(
            pipe, adapter.unet.to(device), concept, n=n,
            steps=RECOMMENDED["num_inference_steps"],
            guidance_scale=RECOMMENDED["guidance_scale"], sampler=RECOMMENDED["scheduler"])
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
        result = finetune.train_attached(
            adapter.to(device), pipe, images, captions, steps=steps, seed=SEED, device=device,
            state_path=state_path, progress=progress,
            **{k: LORA_HYPER[k] for k in ("batch_size", "lr", "caption_dropout")})
        trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
        return result, {**LORA_HYPER, **spec, "concept": concept,
                        "target_modules": list(adapter.config["targets"]),
                        "trainable_parameters": trainable, "train_seed": LORA_TRAIN_SEED,
                        "vae": "shapes-vae-ft", "base": "shapes-sd"}


for _concept, _spec in ADAPTERS.items():
    _register(_concept, _spec)
