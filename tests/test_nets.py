"""diffkit.nn.unet: timestep embedding, the MLP denoiser and the UNet."""

import copy
import math

import pytest
import torch

from diffkit.nn import embeddings
from diffkit.nn.embeddings import timestep_embedding
from diffkit.nn.mlp import MLPDenoiser
from diffkit.nn.unet import UNet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 1, 500]), 6)
    assert emb.shape == (3, 6)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    # dim 4: frequencies 1 and 10000^(-1/2) = 0.01
    emb = timestep_embedding(torch.tensor([1.0, 2.5]), 4)
    for row, t in zip(emb, (1.0, 2.5)):
        expected = [math.cos(t), math.cos(0.01 * t), math.sin(t), math.sin(0.01 * t)]
        torch.testing.assert_close(row, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [0, 1, 3, 7])
def test_timestep_embedding_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(torch.tensor([1]), dim)


def test_timestep_embedding_bad_t():
    with pytest.raises(ValueError, match="shape"):
        timestep_embedding(torch.tensor([[1, 2]]), 4)


def test_mlp_shapes_and_time_dependence():
    net = MLPDenoiser(dim=3, width=32, depth=2, emb_dim=16)
    x = torch.randn(5, 3)
    out0 = net(x, torch.zeros(5, dtype=torch.long))
    out1 = net(x, torch.full((5,), 500))
    assert out0.shape == (5, 3)
    assert (out0 - out1).abs().max() > 1e-4
    frac = net(x, torch.full((5,), 0.5))  # fractional t is allowed
    assert frac.shape == (5, 3) and torch.isfinite(frac).all()
    assert net.config == dict(dim=3, width=32, depth=2, emb_dim=16, num_classes=None)


def test_mlp_errors():
    net = MLPDenoiser(dim=2, width=16, depth=1, emb_dim=8)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError):
        net(torch.randn(4, 3), t)
    with pytest.raises(ValueError):
        net(torch.randn(4, 2, 1), t)
    with pytest.raises(ValueError, match="t must"):
        net(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        net(torch.randn(4, 2), t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        MLPDenoiser(dim=0)
    with pytest.raises(ValueError):
        MLPDenoiser(depth=0)


def test_mlp_class_conditional():
    net = MLPDenoiser(dim=2, width=16, depth=1, emb_dim=8, num_classes=3)
    x, t = torch.randn(4, 2), torch.full((4,), 10)
    y = torch.tensor([0, 1, 2, 0])
    assert not torch.allclose(net(x, t, y), net(x, t, (y + 1) % 3))
    with pytest.raises(ValueError, match="num_classes=3: pass labels y"):  # no silent null label
        net(x, t)
    assert not torch.allclose(net(x, t, torch.full((4,), 3)), net(x, t, y))  # the null label
    with pytest.raises(ValueError, match="y must"):
        net(x, t, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("shape, kwargs", [
    ((2, 1, 8, 8), dict(in_channels=1, base_channels=8)),
    ((2, 3, 32, 32), dict(in_channels=3, base_channels=8, channel_mults=(1, 2, 2),
                          num_res_blocks=1)),
])
def test_unet_shapes_and_time_dependence(shape, kwargs):
    net = UNet(emb_dim=16, **kwargs).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        a = net(x, torch.zeros(shape[0], dtype=torch.long))
        b = net(x, torch.full((shape[0],), 700))
    assert a.shape == shape
    assert (a - b).abs().max() > 1e-4


def test_unet_rows_are_independent():
    net = UNet(in_channels=1, base_channels=8, emb_dim=16).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 200, 900])
    with torch.no_grad():
        full = net(x, t)
        single = net(x[1:2], t[1:2])
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


def _float32_embedding(t, dim, max_period=10000.0):
    """The embedding as the shipped models were trained: t of any dtype embedded in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def test_unet_double_runs_in_float64_and_float32_is_unchanged(monkeypatch):
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, emb_dim=16, num_classes=10).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([3.0, 250.5, 999.0]), torch.tensor([1, 4, 10])
    with torch.no_grad():
        out32 = net(x, t, y)
        out_long = net(x, torch.tensor([3, 250, 999]), y)
        net64 = copy.deepcopy(net).double()
        out64 = net64(x.double(), t.double(), y)
        with monkeypatch.context() as m:   # the float32 path is the old one, bit for bit
            m.setattr(embeddings, "timestep_embedding", _float32_embedding)
            old32 = net(x, t, y)
            old_long = net(x, torch.tensor([3, 250, 999]), y)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    assert torch.equal(out32, old32) and torch.equal(out_long, old_long)
    assert timestep_embedding(t.double(), 16).dtype == torch.float64
    # float64 keeps the fractional t that float32 rounds (t = 250.5 is exact in both; the
    # outputs agree to float32 rounding)
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-4)
    assert (out64 - out32.double()).abs().max() > 0      # really computed in float64


def test_unet_without_attention():
    net = UNet(in_channels=1, base_channels=8, emb_dim=16, attention=False)
    assert net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).shape == (2, 1, 8, 8)


def test_unet_class_conditional():
    net = UNet(in_channels=1, base_channels=8, emb_dim=16, num_classes=10).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([3, 3, 3])
    with torch.no_grad():
        y3 = net(x, t, torch.tensor([3, 3, 3]))
        y7 = net(x, t, torch.tensor([7, 7, 7]))
        null = net(x, t, torch.full((3,), 10))
        with pytest.raises(ValueError, match="pass labels y.*null label"):
            net(x, t)                     # the unconditional model is asked for explicitly
    assert y3.shape == (3, 1, 8, 8)
    assert (y3 - y7).abs().max() > 1e-5 and (y3 - null).abs().max() > 1e-5
    with pytest.raises(ValueError, match="y must"):
        net(x, t, torch.tensor([1, 2]))


def test_unet_errors():
    net = UNet(in_channels=1, base_channels=8, emb_dim=16)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="channels"):
        net(torch.randn(2, 3, 8, 8), t)
    with pytest.raises(ValueError):
        net(torch.randn(2, 8, 8), t)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 1, 9, 8), t)
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(2, 1, 8, 7), t)
    with pytest.raises(ValueError, match="t must"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        net(torch.randn(2, 1, 8, 8), t, torch.zeros(2, dtype=torch.long))
    deep = UNet(in_channels=1, base_channels=8, emb_dim=16, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="divisible by 4"):
        deep(torch.randn(1, 1, 6, 6), torch.zeros(1, dtype=torch.long))
    for bad in (dict(base_channels=0), dict(channel_mults=()), dict(num_res_blocks=0),
                dict(in_channels=0)):
        with pytest.raises(ValueError):
            UNet(**bad)


@pytest.mark.parametrize("make, x, kw", [
    (lambda: MLPDenoiser(dim=2, width=16, depth=2, emb_dim=8, num_classes=3),
     torch.randn(6, 2), {"y": torch.tensor([0, 1, 2, 3, 0, 1])}),
    (lambda: UNet(in_channels=1, base_channels=8, emb_dim=16, num_classes=3, dropout=0.1),
     torch.randn(4, 1, 8, 8), {"y": torch.tensor([0, 1, 2, 3])}),
])
def test_gradients_reach_every_parameter(make, x, kw):
    net = make()
    t = torch.randint(0, 1000, (x.shape[0],))
    net(x, t, **kw).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_float64_timesteps_into_a_float32_network():
    net = UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, emb_dim=16).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 500.0])
    with torch.no_grad():
        assert torch.allclose(net(x, t.double()), net(x, t), atol=1e-6)
