"""diffkit.eval.control_probes: the mask IoU on true scenes, and the generation loop's inputs."""

import pytest
import torch

from diffkit.eval import control_probes as P
from diffkit.latent import controlnet as C
from diffkit.latent import tiny_sd


def test_true_scenes_match_their_masks_and_captions_cannot_say_where():
    scenes = P.control_scenes(60)
    iou = P.mask_iou(scenes.images, scenes.masks)
    assert iou.shape == (60,) and float(iou.min()) == 1.0         # the judge sees the true mask
    shifted = P.mask_iou(scenes.images.roll(3, dims=-1), scenes.masks)
    assert float(shifted.mean()) < 0.7                             # three pixels off: it shows
    report = P.report(scenes, scenes.images)
    assert report["iou"] == 1.0 and report["colour_shape"] == 1.0 and report["iou_se"] == 0.0
    # the layouts are continuous: far more distinct centres than the five named places
    first_pixel = scenes.masks.any(1).flatten(1).float().argmax(1)   # top-left object pixel
    assert len(set(first_pixel.tolist())) > 40


def test_bad_inputs(untrained_tiny_sd):
    scenes = P.control_scenes(4)
    with pytest.raises(ValueError, match=r"masks must be \(N, S, S\)"):
        P.mask_iou(scenes.images, scenes.masks[:2])
    shared = untrained_tiny_sd
    pipe = tiny_sd.build_pipeline(shared.vae, shared.text_encoder, shared.tokenizer, shared.unet)
    net = C.make_controlnet(pipe.unet, pipe.vae)
    with pytest.raises(ValueError, match="one condition image per prompt"):
        P.generate(pipe, scenes.captions, control=net, condition=None, steps=2,
                   guidance_scale=1.0)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        P.generate(pipe, scenes.captions, steps=2, guidance_scale=1.0, batch=0)


def test_the_control_at_initialisation_leaves_adherence_at_the_prompts(untrained_tiny_sd):
    shared = untrained_tiny_sd
    pipe = tiny_sd.build_pipeline(shared.vae, shared.text_encoder, shared.tokenizer, shared.unet)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    net = C.make_controlnet(pipe.unet, pipe.vae)
    scenes = P.control_scenes(6)
    figures = P.adherence(pipe, net, scenes, (1.0,), steps=2, guidance_scale=2.0, seed=3)
    assert figures["prompt"] == figures["scale=1"]      # zero residuals: the same images


def test_control_bench_quick_runs():
    from diffkit import bench

    figures = bench.BENCHES["control"](torch.device("cpu"), True)
    # speed is recorded, not asserted: only that the bench times all three on the same batch
    assert set(figures) == {"prompt-only", *P.CONTROL_CHECKPOINTS}
    assert all(f["seconds"] > 0 and f["batch"] == 4 for f in figures.values())
    assert figures["prompt-only"]["over_prompt_only"] == 1.0


@pytest.mark.parametrize("name", P.CONTROL_CHECKPOINTS)
def test_shipped_control_runs_in_the_diffusers_pipeline(name):
    # the reader's path: diffusers' own loaders and pipeline, offline, on the shipped folders
    from diffusers import ControlNetModel, StableDiffusionPipeline, T2IAdapter

    from diffkit import checkpoints
    from diffkit.latent import sd

    base = StableDiffusionPipeline.from_pretrained(str(checkpoints.checkpoint_dir("shapes-sd")),
                                                   local_files_only=True)
    base.set_progress_bar_config(disable=True)
    cls = ControlNetModel if name == "shapes-controlnet" else T2IAdapter
    control = cls.from_pretrained(str(checkpoints.checkpoint_dir(name)), local_files_only=True)
    scenes = P.control_scenes(4, seed=7)
    condition = C.conditions(scenes, "masks")
    run = dict(num_inference_steps=10, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0))
    if cls is ControlNetModel:
        theirs = C.controlnet_pipeline(base, control)(
            scenes.captions, image=condition, output_type="pt", **run).images * 2 - 1
    else:
        theirs = C.adapter_pipeline(base, control)(
            scenes.captions, image=condition, output_type="np", **run).images
        theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1
    ours = sd.text_to_image(base, scenes.captions, steps=10, guidance_scale=3.0,
                            generator=torch.Generator().manual_seed(0),
                            denoiser=C.make_denoiser(base, control, condition))
    assert float(((ours - theirs) / 2).abs().max()) <= 1e-4
    assert float(P.mask_iou(theirs, scenes.masks).mean()) > 0.7      # it follows the masks
