"""diffkit.latent.tiny_sd: the tiny UNet, SD's latent-diffusion loss with caption dropout, and a
pipeline of the parts that saves and loads with diffusers' own calls."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffkit.latent import tiny_sd
from diffkit.latent.vae import make_vae
from diffkit.train import train


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet = tiny_sd.make_unet(cross_attention_dim=16)
    scheduler = tiny_sd.make_scheduler()
    empty = torch.randn(1, 5, 16)
    return unet, scheduler, empty


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 5, 16, generator=g)


def test_loss_is_the_noise_regression_of_sd(parts):
    unet, scheduler, empty = parts
    loss = tiny_sd.LatentDiffusionLoss(scheduler.alphas_cumprod, empty, caption_dropout=0.0)
    latents, states = _batch()
    got = loss(unet, (latents, states), torch.Generator().manual_seed(5))
    # the same draws by hand: t, then the noise, then the dropout coin
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (6,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    with torch.no_grad():
        expected = ((unet(z_t, t, encoder_hidden_states=states).sample - noise) ** 2).mean()
    assert torch.allclose(got.detach(), expected, atol=1e-6)


def test_caption_dropout_uses_the_empty_prompt(parts):
    unet, scheduler, empty = parts
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, z_t, t, encoder_hidden_states):
            seen.append(encoder_hidden_states)
            return type("Out", (), {"sample": torch.zeros_like(z_t)})()

    loss = tiny_sd.LatentDiffusionLoss(scheduler.alphas_cumprod, empty, caption_dropout=0.5)
    latents, states = _batch(400)
    loss(Spy(), (latents, states), torch.Generator().manual_seed(0))
    dropped = (seen[0] == empty).flatten(1).all(1)
    kept = (seen[0] == states).flatten(1).all(1)
    assert (dropped | kept).all() and 0.4 < dropped.float().mean() < 0.6


def test_v_target_and_bad_settings(parts):
    unet, scheduler, empty = parts
    v = tiny_sd.LatentDiffusionLoss(scheduler.alphas_cumprod, empty, target="v_prediction")
    assert v(unet, _batch(), torch.Generator().manual_seed(0)).item() > 0
    with pytest.raises(ValueError, match="target"):
        tiny_sd.LatentDiffusionLoss(scheduler.alphas_cumprod, empty, target="x0")
    with pytest.raises(ValueError, match="caption_dropout"):
        tiny_sd.LatentDiffusionLoss(scheduler.alphas_cumprod, empty, caption_dropout=1.0)
    with pytest.raises(ValueError, match="empty prompt"):
        tiny_sd.LatentDiffusionLoss(scheduler.alphas_cumprod, empty[0])
    with pytest.raises(ValueError, match="unknown scheduler"):
        tiny_sd.make_scheduler("plms")


def test_the_training_loop_lowers_the_loss(parts):
    _, scheduler, empty = parts
    torch.manual_seed(0)
    unet = tiny_sd.make_unet(cross_attention_dim=16)
    latents, states = _batch(64)
    loss = tiny_sd.LatentDiffusionLoss(scheduler.alphas_cumprod, empty)
    result = train(unet, loss, (latents, states), steps=40, batch_size=16, lr=1e-3, warmup=5,
                   progress=False)
    assert sum(result.losses[-10:]) < 0.8 * sum(result.losses[:10])


def test_pipeline_of_the_parts_saves_and_loads(tmp_path, parts):
    from diffkit import checkpoints
    from diffkit.text import clip

    unet, scheduler, _ = parts
    model, _ = checkpoints.load_model("shapes-clip")
    clip.export_text_encoder(model, tmp_path / "te")
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel.from_pretrained(tmp_path / "te" / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "te" / "tokenizer")
    unet = tiny_sd.make_unet(cross_attention_dim=text_encoder.config.hidden_size)
    pipe = tiny_sd.build_pipeline(make_vae(), text_encoder, tokenizer, unet)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    image = loaded("a red circle", num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32)        # the pipeline's default size: 8 x the VAE's 4
    assert loaded.scheduler.config.steps_offset == 1
