"""diffkit.latent.vae, diffkit.eval.blur and diffkit.data.patches: the loss, the scaling factor,
the encode/decode helpers, the frequency bands, and the errors bad input gets."""

import math

import pytest
import torch
from diffusers import AutoencoderKL

from diffkit import checkpoints
from diffkit.data.patches import TEST_IMAGES, TRAIN_IMAGES, natural_patches
from diffkit.eval import blur
from diffkit.latent import vae as V


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return V.make_vae().eval()


def test_tiny_vae_maps_32_pixels_to_a_4x8x8_latent(tiny):
    assert V.downsampling_factor(tiny) == 4
    z = V.encode(tiny, torch.zeros(2, 3, 32, 32), sample=False)
    assert z.shape == (2, 4, 8, 8)
    assert 3 * 32 * 32 / z[0].numel() == 12          # the 12x of chapter 8
    assert V.decode(tiny, z).shape == (2, 3, 32, 32)
    assert sum(p.numel() for p in tiny.parameters()) < 300_000


def test_kl_is_the_closed_form_gaussian_kl():
    mean, logvar = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2,
                                                                              dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(V.kl_to_standard_normal(mean, logvar), expected, atol=1e-12)
    assert V.kl_to_standard_normal(torch.zeros(1, 4), torch.zeros(1, 4)).item() == 0


def test_loss_is_l1_plus_mse_plus_weighted_kl(tiny):
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    recon, kl = V.reconstruction_terms(tiny, x, torch.Generator().manual_seed(1))
    err = recon - x
    expected = (err.abs().mean((1, 2, 3)) + err.pow(2).mean((1, 2, 3)) + 0.5 * kl).mean()
    got = V.vae_loss(tiny, (x,), torch.Generator().manual_seed(1), kl_weight=0.5)
    assert torch.allclose(got, expected, atol=1e-6)
    # the KL is per pixel, like the reconstruction: LDM's ratio of sums, so 1e-6 means SD's 1e-6
    post = tiny.encode(x).latent_dist
    per_image = V.kl_to_standard_normal(post.mean, post.logvar)
    assert torch.allclose(kl, per_image / x[0].numel(), rtol=1e-5)


def test_adversarial_loss_gives_each_player_only_its_own_gradient(tiny):
    torch.manual_seed(0)
    model = V.AdversarialVAE(V.make_vae(), V.PatchDiscriminator())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    loss = V.adversarial_vae_loss(model, (x,), torch.Generator().manual_seed(0),
                                  adversarial_weight=0.0)
    loss.backward()
    # with weight 0, the VAE's gradient is that of the plain loss (no discriminator term)
    plain = V.make_vae()
    plain.load_state_dict(model.vae.state_dict())
    V.vae_loss(plain, (x,), torch.Generator().manual_seed(0)).backward()
    for a, b in zip(model.vae.parameters(), plain.parameters()):
        assert a.grad is None and b.grad is None or torch.allclose(a.grad, b.grad, atol=1e-6)
    assert all(p.grad is not None for p in model.discriminator.parameters())
    # the generator's term moves the VAE but never the discriminator
    model.zero_grad()
    recon, _ = V.reconstruction_terms(model.vae, x, torch.Generator().manual_seed(0))
    frozen = {k: v.detach() for k, v in model.discriminator.named_parameters()}
    (-torch.func.functional_call(model.discriminator, frozen, (recon,)).mean()).backward()
    assert all(p.grad is None for p in model.discriminator.parameters())


def test_scaling_factor_is_one_over_latent_std_and_reaches_save_pretrained(tiny, tmp_path):
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    vae = V.make_vae().eval()
    vae.load_state_dict(tiny.state_dict())
    factor = V.set_scaling_factor(vae, x)
    assert factor == pytest.approx(1 / V.latent_std(vae, x))
    z = V.encode(vae, x, generator=torch.Generator().manual_seed(0))
    assert z.std().item() == pytest.approx(1.0, abs=0.02)
    vae.save_pretrained(tmp_path)
    assert AutoencoderKL.from_pretrained(tmp_path).config.scaling_factor == pytest.approx(factor)
    # decode divides by the factor: a round trip through encode's mean equals the raw one
    raw = vae.decode(vae.encode(x[:4]).latent_dist.mean).sample.clamp(-1, 1)
    assert torch.allclose(V.reconstruct(vae, x[:4]), raw, atol=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 30, 32),
                                 torch.zeros(3, 32, 32), torch.zeros(2, 3, 32, 32,
                                                                     dtype=torch.long)])
def test_bad_images_raise(tiny, bad):
    with pytest.raises(ValueError, match="divisible by 4"):
        V.encode(tiny, bad)
    with pytest.raises(ValueError, match="images must be"):
        V.vae_loss(tiny, (bad,))


def test_bad_latents_and_weights_raise(tiny):
    with pytest.raises(ValueError, match=r"latents must be a float tensor \(N, 4, h, w\)"):
        V.decode(tiny, torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="kl_weight must be a non-negative"):
        V.vae_loss(tiny, (torch.zeros(1, 3, 32, 32),), kl_weight=-1e-6)
    with pytest.raises(ValueError, match="adversarial_weight"):
        model = V.AdversarialVAE(tiny, V.PatchDiscriminator())
        V.adversarial_vae_loss(model, (torch.zeros(1, 3, 32, 32),), adversarial_weight=-1)


def test_band_power_sums_to_parseval_energy():
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    power = blur.band_power(x, 4)
    window = torch.hann_window(16, periodic=False, dtype=torch.float64)
    centred = (x - x.mean((2, 3), keepdim=True)) * window[:, None] * window[None, :]
    spectrum = torch.fft.fft2(centred).abs().pow(2).sum(1)
    radius = blur._radius(16, 16)
    assert torch.allclose(power.sum(1), spectrum[:, (radius > 0) & (radius <= 0.5)].sum(-1))
    # Parseval: without the corners beyond Nyquist, the bands hold most of the energy
    assert (power.sum(1) <= centred.pow(2).sum((1, 2, 3)) * 256 + 1e-6).all()


def test_a_blur_loses_high_bands_and_keeps_low_ones():
    x = natural_patches(64, split="test", seed=3)
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"),
                                         k2, groups=3)
    ratio = blur.band_energy_ratio(blurred, x, 4)
    # a [1 2 1] / 4 blur has gain cos^2(pi f) per axis: ~1 at low f, 0 at Nyquist
    assert ratio[0] > 0.85 and ratio[-1] < 0.15 and (ratio.diff() < 0).all()
    assert blur.band_energy_ratio(x, x, 4).allclose(torch.ones(4, dtype=torch.float64))
    assert blur.band_error_ratio(torch.zeros_like(x), x, 4).allclose(torch.ones(4,
                                                                             dtype=torch.float64))
    assert blur.psnr(x, x + 0.02).mean().item() == pytest.approx(20 * math.log10(2 / 0.02))


def test_blur_bad_input_raises():
    with pytest.raises(ValueError, match="one shape"):
        blur.band_energy_ratio(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 4))
    with pytest.raises(ValueError, match="n_bands"):
        blur.band_power(torch.zeros(1, 3, 8, 8), 0)


def test_natural_patches_split_by_image_and_are_deterministic():
    assert not set(TRAIN_IMAGES) & set(TEST_IMAGES)
    a, b = natural_patches(30, seed=1), natural_patches(30, seed=1)
    assert a.shape == (30, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    with pytest.raises(ValueError, match="split"):
        natural_patches(3, split="val")
    with pytest.raises(ValueError, match="positive integer"):
        natural_patches(0)


def test_a_vae_checkpoint_loads_with_from_pretrained(tmp_path, tiny):
    card = {"recipe": "x", "model": checkpoints.describe(tiny)}
    checkpoints.save_model(tmp_path / "x", tiny, card)
    loaded = AutoencoderKL.from_pretrained(tmp_path / "x")
    model, read = checkpoints.load_model("x", root=tmp_path)
    assert read == card and isinstance(model, AutoencoderKL)
    for a, b, c in zip(tiny.parameters(), loaded.parameters(), model.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    family = torch.nn.ModuleDict({"a": tiny, "b": loaded})
    checkpoints.save_model(tmp_path / "f", family, {"model": checkpoints.describe(family)})
    back, _ = checkpoints.load_model("f", root=tmp_path)
    assert set(back) == {"a", "b"}
    assert AutoencoderKL.from_pretrained(tmp_path / "f", subfolder="b").config.latent_channels == 4


def test_recipes_write_diffusers_folders_that_resume(tmp_path, monkeypatch):
    from diffkit import recipes
    from diffkit.eval import vae_probes

    monkeypatch.setitem(recipes.latent.SHAPES_HYPER, "pool", 256)
    monkeypatch.setitem(recipes.latent.PATCHES_HYPER, "pool", 256)
    report = vae_probes.shapes_report
    monkeypatch.setattr(vae_probes, "shapes_report", lambda m, d, **kw: report(m, d, n=16))
    family = vae_probes.family_report
    monkeypatch.setattr(vae_probes, "family_report", lambda m, d, **kw: family(m, d, n=16))
    card = recipes.run("shapes-vae", root=tmp_path, steps=3, progress=False, device="cpu")
    folder = tmp_path / "shapes-vae"
    vae = AutoencoderKL.from_pretrained(folder)
    assert vae.config.scaling_factor == pytest.approx(card["measured"]["scaling_factor"], rel=1e-4)
    assert card["model"] == {"class": "AutoencoderKL", "library": "diffusers"}
    assert {"shape_1obj", "colour_1obj", "position_1obj", "count_1obj", "psnr_1obj"} <= set(
        card["measured"])
    card = recipes.run("patches-vae", root=tmp_path, steps=2, progress=False, device="cpu")
    members = set(recipes.latent.PATCHES_MEMBERS) | set(recipes.latent.FINETUNED)
    assert set(card["measured"]) == members == set(card["model"]["members"])
    for name in members:
        assert AutoencoderKL.from_pretrained(tmp_path / "patches-vae", subfolder=name)
    assert AutoencoderKL.from_pretrained(tmp_path / "patches-vae",
                                         subfolder="factor-2").config.block_out_channels == [16, 32]
    # no training state is left behind, the family's per-member states included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patches-vae", "shapes-vae"]
    # and the measurement re-runs on the saved folders
    again = recipes.remeasure("shapes-vae", root=tmp_path, device="cpu")
    assert again["measured"] == card_measured(tmp_path, "shapes-vae")


def card_measured(root, name):
    import json

    return json.loads((root / name / "card.json").read_text())["measured"]


def test_shapes_vae_ft_trains_only_the_decoder(tmp_path, monkeypatch):
    from diffkit import recipes
    from diffkit.eval import vae_probes

    monkeypatch.setitem(recipes.latent.FT_HYPER, "part", 64)
    for name in ("shapes_report", "concept_report"):
        report = getattr(vae_probes, name)
        monkeypatch.setattr(vae_probes, name,
                            lambda m, d, report=report, **kw: report(m, d, n=16))
    card = recipes.run("shapes-vae-ft", root=tmp_path, steps=4, progress=False, device="cpu")
    tuned = AutoencoderKL.from_pretrained(tmp_path / "shapes-vae-ft")
    base, _ = checkpoints.load_model("shapes-vae")
    assert card["measured"]["encoder_max_change"] == 0.0
    assert recipes.latent.encoder_change(tuned, base) == 0.0
    decoder = [k for k in base.state_dict() if k.startswith(("decoder.", "post_quant_conv."))]
    assert any(not torch.equal(tuned.state_dict()[k], base.state_dict()[k]) for k in decoder)
    assert tuned.config.scaling_factor == base.config.scaling_factor
    assert {"concept_orange_colour", "concept_ring_shape_small"} <= set(card["measured"])
    # the encoder's latents, hence every UNet trained on shapes-vae, are untouched
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(V.encode(tuned, images, sample=False), V.encode(base, images, sample=False))
