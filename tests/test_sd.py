"""diffkit.latent.sd: the loader, and the text-to-image loop written with diffkit's samplers equal
to ``StableDiffusionPipeline`` on the same (tiny, untrained) model, prompts and seed."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from diffkit import checkpoints
from diffkit.latent import sd, tiny_sd
from diffkit.latent.vae import make_vae
from diffkit.text import clip

SCHEDULERS = {"euler": lambda: tiny_sd.make_scheduler("euler"),
              "dpmpp_2m": lambda: tiny_sd.make_scheduler("dpmpp_2m")}
PROMPTS = ["a red circle on the left", "a large blue square and a small green triangle"]


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    """A tiny SD pipeline folder: shapes-clip's text encoder, an untrained VAE and UNet."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    model, _ = checkpoints.load_model("shapes-clip")
    clip.export_text_encoder(model, folder)
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    vae = make_vae()
    vae.register_to_config(scaling_factor=0.5)
    unet = tiny_sd.make_unet(cross_attention_dim=text_encoder.config.hidden_size)
    pipe = tiny_sd.build_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_loop_equals_the_pipeline(pipeline_folder, name, guidance_scale):
    pipe = sd.load_pipeline(str(pipeline_folder), device="cpu")
    pipe.scheduler = SCHEDULERS[name]()
    theirs = pipe(PROMPTS, num_inference_steps=12, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    ours = sd.text_to_image(pipe, PROMPTS, steps=12, guidance_scale=guidance_scale, sampler=name,
                            generator=torch.Generator().manual_seed(3))
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert ((ours + 1) / 2 - theirs).abs().max() <= 1e-4
    if guidance_scale > 1:   # the check can fail: guidance moves the images far beyond 1e-4
        unguided = sd.text_to_image(pipe, PROMPTS, steps=12, guidance_scale=1.0, sampler=name,
                                    generator=torch.Generator().manual_seed(3))
        assert (ours - unguided).abs().max() > 1e-2


def test_load_pipeline_chooses_the_class_and_refuses_other_folders(pipeline_folder, tmp_path):
    assert isinstance(sd.load_pipeline(str(pipeline_folder), device="cpu"),
                      StableDiffusionPipeline)
    with pytest.raises(ValueError, match="model_index.json"):
        sd.load_pipeline(str(tmp_path), device="cpu")
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="expected one of"):
        sd.load_pipeline(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="neither a pipeline folder nor a hub id"):
        sd.load_pipeline(str(tmp_path / "missing" / "deeper" / "x"), device="cpu")


def test_bad_input_raises(pipeline_folder):
    pipe = sd.load_pipeline(str(pipeline_folder), device="cpu")
    with pytest.raises(ValueError, match="tokenizer allows"):
        sd.text_to_image(pipe, ["a red circle " * 30], steps=2)
    with pytest.raises(ValueError, match="multiple of the VAE factor 4"):
        sd.text_to_image(pipe, PROMPTS, steps=2, height=30)
    with pytest.raises(ValueError, match="guidance_scale"):
        sd.text_to_image(pipe, PROMPTS, steps=2, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="steps must be a positive"):
        sd.text_to_image(pipe, PROMPTS, steps=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sd.text_to_image(pipe, PROMPTS, steps=2, sampler="plms")
