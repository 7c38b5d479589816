"""diffkit.latent.cross_attention: SD's cross-attention written out, equal to diffusers'
``Attention`` on the same weights, and the recorder of attention maps inside a real UNet."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from diffkit.latent.cross_attention import AttentionRecorder, cross_attention, from_diffusers


@pytest.fixture(scope="module")
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).eval()


def test_cross_attention_equals_diffusers_attention(attn):
    x, text = torch.randn(3, 64, 32), torch.randn(3, 7, 16)
    with torch.no_grad():
        theirs = attn(x, encoder_hidden_states=text)
        ours, probs = from_diffusers(attn, x, text, return_probs=True)
    assert (ours - theirs).abs().max() <= 1e-6
    assert probs.shape == (3, 4, 64, 7)           # per head, each image token over the text tokens
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 64))


def test_cross_attention_in_float64_and_by_hand(attn):
    double = Attention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8).double().eval()
    double.load_state_dict({k: v.double() for k, v in attn.state_dict().items()})
    x, text = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        gap = from_diffusers(double, x, text) - double(x, encoder_hidden_states=text)
        assert gap.abs().max() < 1e-12
        # one head by hand: softmax over the text tokens of q k / sqrt(d)
        q, k, v = double.to_q(x)[0, :, :8], double.to_k(text)[0, :, :8], double.to_v(text)[0, :, :8]
        p = torch.softmax(q @ k.T / 8 ** 0.5, -1)
        _, probs = from_diffusers(double, x, text, return_probs=True)
        assert torch.allclose(probs[0, 0], p, atol=1e-12)
        assert torch.allclose((p @ v), (probs[0, 0] @ v))


def test_bad_shapes_raise(attn):
    with pytest.raises(ValueError, match="image tokens"):
        cross_attention(torch.zeros(2, 4, 32), torch.zeros(3, 7, 16), attn.to_q, attn.to_k,
                        attn.to_v, attn.to_out[0], 4)
    with pytest.raises(ValueError, match="divisible by heads"):
        cross_attention(torch.zeros(2, 4, 32), torch.zeros(2, 7, 16), attn.to_q, attn.to_k,
                        attn.to_v, attn.to_out[0], 5)


def test_recorder_inside_a_unet_changes_nothing_and_keeps_the_maps():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8,
                                cross_attention_dim=16, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    x, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.tensor([10, 500])
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        reference = unet(x, t, encoder_hidden_states=text).sample
        recorder = AttentionRecorder().name_layers(unet)
        unet.set_attn_processor(recorder)
        recorded = unet(x, t, encoder_hidden_states=text).sample
    assert (recorded - reference).abs().max() <= 1e-5
    names = [name for name, _ in recorder.maps]
    # one map per cross-attention layer (attn2), none of the self-attention ones (attn1)
    assert names and all(name.endswith("attn2") for name in names)
    assert len(names) == sum(1 for n, m in unet.named_modules() if n.endswith("attn2"))
    for _, probs in recorder.maps:
        assert probs.shape[0] == 2 and probs.shape[-1] == 5
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
