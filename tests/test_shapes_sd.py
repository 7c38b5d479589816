"""The shipped tiny Stable Diffusion (checkpoints/shapes-sd) through the ecosystem's own calls,
the chapter's real-model path on it, and the sd benchmark (speed is recorded, not asserted)."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

from diffkit import bench, checkpoints, config
from diffkit.latent import sd
from diffkit.recipes.sd import RECOMMENDED

FOLDER = checkpoints.checkpoint_dir("shapes-sd")


def test_from_pretrained_offline_with_the_pipeline_defaults(shipped_card, monkeypatch):
    card = shipped_card("shapes-sd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(FOLDER, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert {"vae", "text_encoder", "tokenizer", "unet", "scheduler"} <= index.keys()
    # the saved scheduler is the recommended one, and the card says how to call it
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert card["hyperparameters"]["recommended"] == RECOMMENDED
    out = pipe(["a large red circle on the left", "a small blue square at the top"],
               num_inference_steps=RECOMMENDED["num_inference_steps"],
               guidance_scale=RECOMMENDED["guidance_scale"],
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 32, 32)              # the default size is the model's: 32 x 32
    # a red object on the left: the left half is redder than the right half
    red = out[0, 0] - out[0, 1:].mean(0)
    assert red[:, :16].mean() > red[:, 16:].mean() + 0.02
    sizes = [p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()]
    assert sum(sizes) < 16 * 2 ** 20


def test_the_real_model_path_on_the_tiny_folder(monkeypatch):
    # the chapter's last section: DIFFKIT_SD_MODEL names the model, diffkit's loop equals the
    # pipeline on it
    monkeypatch.setenv("DIFFKIT_SD_MODEL", str(FOLDER))
    assert config.sd_model() == str(FOLDER)
    pipe = sd.load_pipeline(device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    ours, theirs, gap = sd.compare_with_pipeline(pipe, ["a small green triangle in the centre"],
                                                 steps=8, guidance_scale=3.0, seed=1)
    assert ours.shape == theirs.shape == (1, 3, 32, 32) and gap <= 1e-4
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # diffkit has no twin
    with pytest.raises(ValueError, match="expected one of"):
        sd.compare_with_pipeline(pipe, ["a red circle"], steps=2, guidance_scale=1.0)


def test_sd_bench_quick_runs():
    figures = bench.BENCHES["sd"](torch.device("cpu"), True)["shapes-sd"]
    assert figures["batch"] == 4 and figures["diffkit_images_per_second"] > 0
    assert figures["pipeline_over_diffkit_time"] > 0


def test_benchmark_records_are_cases_of_figures():
    # book/performance.md renders every record as {case: {figure: value}}
    for path in sorted(bench.RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        assert record["figures"] and all(isinstance(v, dict) and v
                                         for v in record["figures"].values()), path.name
