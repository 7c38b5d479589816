"""The shipped DreamBooth and Textual Inversion checkpoints (chapter 12) re-measured live at
n = 50, with the recipes' own measurement (:func:`diffkit.eval.personalize_probes.report`), and
loaded with diffusers' own calls.

Spreads at n = 50 over the seeds 1..6 (mean, sd), from which the bars keep > 4 sd:
DreamBooth with prior: fidelity orange 0.933 (0.030), ring 1.000 (0.000); class read as the
concept orange 0.067 (0.024), ring 0.060 (0.028); without prior: 0.947 (0.027), 0.947 (0.030).
Textual Inversion: fidelity orange 0.873 (0.010), ring 0.007 (0.010).
"""

import pytest
import torch

from diffkit import checkpoints
from diffkit.adapters import finetune
from diffkit.adapters import personalize as P
from diffkit.eval import personalize_probes as PP
from diffkit.eval import sd_probes

N = 50
FIDELITY_BAR = 0.80             # the bar, for DreamBooth and for TI on orange
DRIFT_WITH_PRIOR, DRIFT_WITHOUT_PRIOR = 0.25, 0.70
TI_RING_CEILING = 0.20          # the frozen UNet cannot draw a ring from an embedding


def _report(pipe, personal, concept, method, card):
    rec = card["measured"]
    return PP.report(pipe, personal, concept, method, n=N, steps=rec["num_inference_steps"],
                     guidance_scale=rec["guidance_scale"], sampler=rec["scheduler"])


def _class_drift(pipe, concept):
    """Class prompts read as the concept (the report's drift figure, n = N, same seed)."""
    scenes = PP.class_scenes(concept, N, seed=PP.CONCEPT_TEST_SEED + 2)
    drawn = sd_probes.generate(pipe, scenes.captions, steps=20, guidance_scale=3.0,
                               seed=PP.CONCEPT_TEST_SEED)
    return PP.read_as_concept(concept, drawn)


def _instance_fidelity(pipe, concept):
    """The report's fidelity figure: the identifier's instance prompts, cycled to n = N."""
    prompts = [PP.dreambooth_caption(concept, t) for t in PP.cycled_instances(concept, N).captions]
    drawn = sd_probes.generate(pipe, prompts, steps=20, guidance_scale=3.0,
                               seed=PP.CONCEPT_TEST_SEED)
    return PP.read_as_concept(concept, drawn)


@pytest.mark.parametrize("concept", ["orange", "ring"])
def test_shapes_dreambooth_live(shipped_model, concept):
    family, card = shipped_model(f"shapes-dreambooth-{concept}")
    pipe = finetune.concept_pipeline("cpu")
    with_prior = _report(pipe, P.pipeline_with(pipe, unet=family["with-prior"]), concept,
                         "dreambooth", card)
    assert with_prior["fidelity"] >= FIDELITY_BAR, with_prior
    assert with_prior["class_as_concept_after"] <= DRIFT_WITH_PRIOR, with_prior
    # without the prior the class itself drifts to the subject (the report's figure, alone)
    drift = _class_drift(P.pipeline_with(pipe, unet=family["without-prior"]), concept)
    assert drift >= DRIFT_WITHOUT_PRIOR, drift


@pytest.mark.parametrize("concept", ["orange", "ring"])
def test_the_dreambooth_bar_fails_for_the_base_model(concept):
    # the base UNet, asked for the identifier, does not draw the subject
    fidelity = _instance_fidelity(finetune.concept_pipeline("cpu"), concept)
    assert fidelity < FIDELITY_BAR - 0.3, fidelity


@pytest.mark.parametrize("concept", ["orange", "ring"])
def test_shapes_ti_live(shipped_model, concept):
    model, card = shipped_model(f"shapes-ti-{concept}")
    pipe = finetune.concept_pipeline("cpu")
    personal = P.pipeline_with(pipe, text_encoder=model.text_encoder, tokenizer=model.tokenizer)
    measured = _report(pipe, personal, concept, "textual_inversion", card)
    if concept == "orange":
        assert measured["fidelity"] >= FIDELITY_BAR, measured
    else:
        assert measured["fidelity"] <= TI_RING_CEILING, measured
    # prompts without the token are drawn exactly as by the base: nothing else was trained
    assert measured["class_as_concept_after"] == measured["class_as_concept_base"]
    assert measured["class_damage"] == 0 and measured["class_damage_se"] == 0


@pytest.mark.parametrize("concept", ["orange", "ring"])
def test_shipped_personalisations_load_with_diffusers_own_calls(shipped_card, concept):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    shipped_card(f"shapes-ti-{concept}")
    shipped_card(f"shapes-dreambooth-{concept}")
    root = checkpoints.ROOT
    pipe = StableDiffusionPipeline.from_pretrained(root / "shapes-sd")
    pipe.vae = AutoencoderKL.from_pretrained(root / "shapes-vae-ft")
    pipe.set_progress_bar_config(disable=True)
    token = PP.SUBJECTS[concept]["token"]
    pipe.load_textual_inversion(root / f"shapes-ti-{concept}")     # the file's key is the token
    assert token in pipe.tokenizer.get_vocab()
    ours, _ = checkpoints.load_model(f"shapes-ti-{concept}")
    prompts = [PP.ti_caption(concept, t) for t in PP.instance_scenes(concept).captions]
    with torch.no_grad():
        ids = pipe.tokenizer(prompts, padding="max_length",
                             max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        theirs = pipe.text_encoder(ids)[0]
    assert float((theirs - ours.text_states(prompts)).abs().max()) <= 1e-6
    pipe.unet = UNet2DConditionModel.from_pretrained(
        root / f"shapes-dreambooth-{concept}" / "with-prior")
    images = pipe([PP.dreambooth_caption(concept, t) for t in
                   PP.instance_scenes(concept).captions] * 4, num_inference_steps=20,
                  guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images * 2 - 1
    assert PP.read_as_concept(concept, images) >= FIDELITY_BAR


def test_shapes_lora_fewshot_live(shipped_model):
    # DreamBooth-LoRA on the same five images: instance fidelity (n = 50; seeds 1..6: orange
    # 0.927 sd 0.021, ring 0.997 sd 0.008) against the bar, live weights from the files
    # diffusers reads (pytorch_lora_weights.safetensors per member)
    family, _ = shipped_model("shapes-lora-fewshot")
    pipe = finetune.concept_pipeline("cpu")
    for concept in ("orange", "ring"):
        fidelity = _instance_fidelity(P.pipeline_with(pipe, unet=family.members[concept].unet),
                                      concept)
        assert fidelity >= FIDELITY_BAR, (concept, fidelity)
