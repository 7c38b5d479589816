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

SCHEDULERS = {name: (lambda name=name: tiny_sd.make_scheduler(name))
              for name in ("euler", "euler_ancestral", "dpmpp_2m")}
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


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_image_to_image_equals_the_img2img_pipeline(pipeline_folder, name, strength):
    from diffusers import StableDiffusionImg2ImgPipeline

    from diffkit.data.shapes import make_shapes

    pipe = sd.load_pipeline(str(pipeline_folder), device="cpu")
    pipe.scheduler = SCHEDULERS[name]()
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    images = make_shapes(2, seed=5).images
    theirs = img2img(PROMPTS, image=(images + 1) / 2, strength=strength, num_inference_steps=10,
                     guidance_scale=4.0, generator=torch.Generator().manual_seed(3),
                     output_type="pt").images
    ours = sd.image_to_image(pipe, images, PROMPTS, strength=strength, steps=10,
                             guidance_scale=4.0, sampler=name,
                             generator=torch.Generator().manual_seed(3))
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert ((ours + 1) / 2 - theirs).abs().max() <= 1e-4
    other = sd.image_to_image(pipe, images, PROMPTS, strength=strength / 2, steps=10,
                              guidance_scale=4.0, sampler=name,
                              generator=torch.Generator().manual_seed(3))
    assert (ours - other).abs().max() > 1e-2    # strength changes the result


def test_image_to_image_bad_input(pipeline_folder):
    pipe = sd.load_pipeline(str(pipeline_folder), device="cpu")
    images = torch.zeros(2, 3, 32, 32)
    for strength in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="strength must lie in"):
            sd.image_to_image(pipe, images, PROMPTS, strength=strength, steps=4)
    with pytest.raises(ValueError, match="leaves no step"):
        sd.image_to_image(pipe, images, PROMPTS, strength=0.1, steps=4)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        sd.image_to_image(pipe, images, PROMPTS[:1], strength=0.5, steps=4)


def test_a_pipeline_checkpoint_round_trips(pipeline_folder, tmp_path):
    # checkpoints.save_model writes a pipeline with save_pretrained; load_model gives it back
    pipe = sd.load_pipeline(str(pipeline_folder), device="cpu")
    card = {"model": checkpoints.describe(pipe)}
    assert card["model"] == {"class": "StableDiffusionPipeline", "library": "diffusers"}
    checkpoints.save_model(tmp_path / "p", pipe, card)
    assert (tmp_path / "p" / "model_index.json").exists()
    back, read = checkpoints.load_model("p", root=tmp_path)
    assert isinstance(back, StableDiffusionPipeline) and read == card
    assert not back.unet.training and not back.vae.training
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(back.unet.state_dict()[key], value)
    (tmp_path / "p" / "model_index.json").unlink()
    with pytest.raises(ValueError, match="model_index.json missing"):
        checkpoints.load_model("p", root=tmp_path)
