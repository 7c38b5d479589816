"""diffkit.latent.anatomy and attention_maps: SD 1.5's sizes from its config, the timestep's
path through the UNet, and the attention maps of a sampling run."""

import pytest
import torch

from diffkit.latent import anatomy, attention_maps, sd, tiny_sd
from diffkit.latent.cross_attention import AttentionRecorder


def test_sd15_parameter_counts_from_the_config():
    # the published sizes of SD 1.5: UNet 859.5 M, VAE 83.7 M, CLIP ViT-L/14 text 123.1 M
    counts = anatomy.parameter_counts(anatomy.sd15_modules())
    assert counts == {"vae": 83_653_863, "text_encoder": 123_060_480, "unet": 859_520_964}
    census = anatomy.attention_census(anatomy.sd15_modules()["unet"])
    assert census == {"resnet_blocks": 22, "transformer_blocks": 16, "self_attention": 16,
                      "cross_attention": 16}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_sd.make_unet(cross_attention_dim=16).eval()


def test_the_timestep_enters_after_the_first_convolution(unet):
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    trace = anatomy.timestep_trace(unet, x, (10, 900), context)
    # the image and everything before the addition are the same for both timesteps
    assert trace["input image"] == trace["conv_in output"] == trace["first convolution"] == 0
    assert trace["after adding the timestep"] > 1e-3 and trace["UNet output"] > 1e-3
    before = [p.clone() for p in unet.parameters()]
    with anatomy.without_time_embedding(unet) as names:
        assert len(names) == 8
        cut = anatomy.timestep_trace(unet, x, (10, 900), context)
        assert cut["after adding the timestep"] == 0 and cut["UNet output"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters()))   # restored
    with anatomy.without_time_embedding(unet, ["down_blocks.0.resnets.0"]):
        one = anatomy.timestep_trace(unet, x, (10, 900), context)
        assert one["after adding the timestep"] == 0 and one["UNet output"] > 1e-3


def test_denoising_error_is_per_timestep(unet):
    abar = tiny_sd.make_scheduler().alphas_cumprod
    latents, states = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 16)
    g = torch.Generator().manual_seed(0)
    errors = anatomy.denoising_error(unet, latents, states, abar, [10, 500], generator=g)
    assert len(errors) == 2 and all(e > 0 for e in errors)


@pytest.fixture(scope="module")
def pipe(untrained_tiny_sd):
    return untrained_tiny_sd


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_word_maps_of_a_run(pipe, guidance_scale):
    prompts = ["a large red circle on the left", "a small blue square at the top"]
    g = torch.Generator().manual_seed(0)
    images, maps = attention_maps.record_word_maps(pipe, prompts, steps=3,
                                                   guidance_scale=guidance_scale, generator=g)
    reference = sd.text_to_image(pipe, prompts, steps=3, guidance_scale=guidance_scale,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(images, reference, atol=1e-5)    # recording changes nothing
    assert maps.shape == (3, 2, pipe.tokenizer.model_max_length, 8, 8)
    # every position spreads one unit of attention over the tokens
    torch.testing.assert_close(maps.sum(2), torch.ones(3, 2, 8, 8), atol=1e-5, rtol=0)
    # the pipeline's own processors are back afterwards
    assert not any(isinstance(p, AttentionRecorder) for p in pipe.unet.attn_processors.values())
    # the middle block's layer, at half the latent's side
    _, middle = attention_maps.record_word_maps(pipe, prompts, steps=3, size=4,
                                                guidance_scale=guidance_scale,
                                                generator=torch.Generator().manual_seed(0))
    assert middle.shape == (3, 2, pipe.tokenizer.model_max_length, 4, 4)
    torch.testing.assert_close(middle.sum(2), torch.ones(3, 2, 4, 4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3x3 cross-attention maps"):
        attention_maps.record_word_maps(pipe, prompts, steps=3, size=3,
                                        guidance_scale=guidance_scale)


def test_word_positions_and_map_statistics(pipe):
    tok = pipe.tokenizer
    assert attention_maps.word_positions(tok, "a large red circle on the left", "red") == [3]
    assert attention_maps.word_positions(tok, "a red circle and a red square", "red") == [2, 6]
    with pytest.raises(ValueError, match="not a word of the prompt"):
        attention_maps.word_positions(tok, "a red circle", "blue")
    left = torch.zeros(1, 8, 8)
    left[0, :, :4] = 1.0
    assert attention_maps.centroid(left)[0, 0] == pytest.approx(0.25)
    assert attention_maps.centroid(left)[0, 1] == pytest.approx(0.5)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :, :16] = True
    assert attention_maps.mass_inside(left, mask)[0] == pytest.approx(1.0)
    assert attention_maps.mass_inside(left, ~mask)[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="expected maps"):
        attention_maps.mass_inside(left[0], mask)
