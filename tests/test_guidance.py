"""diffkit.diffusion.guidance: classifier and classifier-free guidance as denoiser wrappers, exact on a
labelled Gaussian mixture (Bayes: grad log p(x|y) = grad log p(x) + grad log p(y|x))."""

import math

import pytest
import torch

from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.diffusion.gmm import GaussianMixture
from diffkit.diffusion.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    LabelledMixture,
    SigmaClassifier,
)
from diffkit.diffusion.samplers import sample_euler, sample_heun, sigmas_karras
from diffkit.diffusion.schedules import make_schedule
from diffkit.nn import unet
from diffkit.nn.classifiers import NoisyDigitsClassifier

F64 = torch.float64


def mixture():
    # class 0: two components, class 1: one component, class 2: one component (unequal stds)
    gmm = GaussianMixture([[0.0, 0.0], [1.5, 0.2], [-1.0, 1.0], [0.5, -1.2]],
                          [0.3, 0.5, 0.4, 0.25], [0.2, 0.3, 0.35, 0.15])
    return LabelledMixture(gmm, [0, 0, 1, 2])


def points(n=64, seed=0, scale=2.0):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_labelled_mixture_tables():
    mix = mixture()
    assert mix.num_classes == 3 and mix.null_label == 3
    assert torch.allclose(mix.class_prior, torch.tensor([0.5, 0.35, 0.15], dtype=F64))
    assert mix.conditionals[0].K == 2 and mix.conditionals[1].K == 1
    x = points()
    log_p = mix.classifier(x, 0.3)
    assert log_p.shape == (64, 3)
    assert torch.allclose(torch.logsumexp(log_p, 1), torch.zeros(64, dtype=F64), atol=1e-12)
    # p(x) = sum_y pi_y p(x | y)
    joint = torch.stack([mix.class_prior[c].log() + mix.log_prob(x, 0.3, y=c) for c in range(3)], 1)
    assert torch.allclose(torch.logsumexp(joint, 1), mix.log_prob(x, 0.3), atol=1e-12)
    # the tilted density: w = 0 is p(x), w = 1 is p(x, y)
    assert torch.allclose(mix.tilted_log_prob(x, 1, 0.0), mix.gmm.log_prob(x), atol=1e-12)
    joint_0 = mix.class_prior[1].log() + mix.log_prob(x, y=1)
    assert torch.allclose(mix.tilted_log_prob(x, 1, 1.0), joint_0, atol=1e-12)
    assert mix.sample(10, 2, torch.Generator().manual_seed(0)).shape == (10, 2)


def test_conditional_denoiser_is_the_class_mixture():
    mix = mixture()
    x, y = points(), torch.arange(64) % 4          # 3 = null label: unconditional rows
    out = mix(x, 0.7, y=y)
    for c in range(3):
        rows = y == c
        assert torch.allclose(out[rows], mix.conditionals[c].denoise(x[rows], 0.7), atol=1e-14)
    assert torch.allclose(out[y == 3], mix.gmm.denoise(x[y == 3], 0.7), atol=1e-14)
    assert torch.allclose(mix(x, 0.7), mix.gmm.denoise(x, 0.7), atol=1e-14)
    # Tweedie holds for the conditional as well
    assert torch.allclose(mix.score(x, 0.7, y=1), (mix(x, 0.7, y=1) - x) / 0.49, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_classifier_guidance_with_the_exact_classifier_is_the_conditional(sigma):
    mix = mixture()
    x, y = points(seed=1), torch.arange(64) % 3
    guided = ClassifierGuidance(mix.gmm, mix.classifier, scale=1.0)
    exact = mix(x, sigma, y=y)
    err = (guided(x, sigma, y=y) - exact).abs().max() / exact.abs().max()
    assert err < 1e-10, float(err)
    # w = 0: the unconditional denoiser, untouched
    assert torch.equal(guided(x, sigma, y=y, guidance_scale=0), mix.gmm.denoise(x, sigma))


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, 7.0])
def test_cfg_with_exact_models(w):
    mix = mixture()
    x, y, sigma = points(seed=2), torch.arange(64) % 3, 0.4
    cfg = ClassifierFreeGuidance(mix, null_label=mix.null_label, scale=w)
    d_c, d_u = mix(x, sigma, y=y), mix(x, sigma)
    out = cfg(x, sigma, y=y)
    assert torch.allclose(out, d_u + w * (d_c - d_u), atol=1e-13)
    if w == 0:
        assert torch.allclose(out, d_u, atol=1e-14)
    if w == 1:
        assert torch.allclose(out, d_c, atol=1e-14)
    # exact CFG is classifier guidance with the implicit classifier p(y | x) = p(x|y) p(y) / p(x)
    cg = ClassifierGuidance(mix.gmm, mix.classifier, scale=w)
    assert torch.allclose(out, cg(x, sigma, y=y), atol=1e-10)


def test_cfg_makes_one_batched_call_and_passes_the_null_label():
    calls = []

    def denoiser(x, sigma, *, y, extra=None):
        calls.append((x.shape[0], sigma.shape, y.clone(), extra))
        return x * 0 + y[:, None].to(x.dtype)       # "x0_hat" = the label, to read the mix

    cfg = ClassifierFreeGuidance(denoiser, null_label=10, scale=3.0)
    x = torch.zeros(4, 2)
    out = cfg(x, torch.tensor(0.5), y=torch.tensor([0, 1, 2, 3]), extra="kw")
    assert len(calls) == 1
    batch, sigma_shape, y, extra = calls[0]
    assert batch == 8 and sigma_shape == (8,) and extra == "kw"
    assert y.tolist() == [0, 1, 2, 3, 10, 10, 10, 10]
    assert torch.allclose(out[:, 0], 10 + 3.0 * (torch.tensor([0., 1, 2, 3]) - 10))
    # an int label is broadcast to the batch
    cfg(x, 0.5, y=7)
    assert calls[-1][2].tolist() == [7] * 4 + [10] * 4


def test_cfg_on_a_conditional_unet_shapes():
    torch.manual_seed(0)
    net = unet.UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, emb_dim=16,
                     num_classes=10).eval()
    denoiser = DiscreteTimeDenoiser(net, make_schedule("linear").alphas_cumprod)
    cfg = ClassifierFreeGuidance(denoiser, null_label=10)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 9])
    with torch.no_grad():
        sigma = torch.tensor(2.0)
        d_c, d_u = denoiser(x, sigma, y=y), denoiser(x, sigma, y=torch.full((3,), 10))
        for w in (0.0, 1.0, 4.0):
            out = cfg(x, torch.tensor(2.0), y=y, guidance_scale=w)
            assert out.shape == (3, 1, 8, 8)
            assert torch.allclose(out, d_u + w * (d_c - d_u), atol=1e-5)
    sigmas = sigmas_karras(4, denoiser.sigma_min, denoiser.sigma_max)
    out = sample_euler(cfg, torch.randn(3, 1, 8, 8) * sigmas[0], sigmas, extra_args={"y": y})
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_classifier_guidance_under_no_grad_samplers():
    # samplers run under torch.no_grad(): the wrapper must still get its gradient
    mix = mixture()
    guided = ClassifierGuidance(mix.gmm, mix.classifier, scale=1.0)
    start = 20.0 * torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    sigmas = sigmas_karras(30, 0.01, 20.0, rho=7.0)
    y = torch.full((32,), 1)
    a = sample_heun(guided, start, sigmas, extra_args={"y": y})
    b = sample_heun(mix, start, sigmas, extra_args={"y": y})
    assert (a - b).abs().max() < 1e-8
    # all samples end near class 1's single component at (-1, 1)
    assert (a - torch.tensor([-1.0, 1.0], dtype=F64)).norm(dim=1).max() < 2.0


def test_sigma_classifier_feeds_x_t_and_t():
    schedule = make_schedule("linear")
    seen = {}

    def net(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros(x_t.shape[0], 10)

    clf = SigmaClassifier(net, schedule.alphas_cumprod)
    t = torch.tensor([0, 250, 999])
    sigma = schedule.sigmas[t].float()
    x = torch.randn(3, 1, 8, 8)
    assert clf(x, sigma).shape == (3, 10)
    assert torch.allclose(seen["t"], t.float(), atol=1e-3)
    abar = schedule.alphas_cumprod[t].float()
    assert torch.allclose(seen["x_t"], abar.sqrt()[:, None, None, None] * x, rtol=1e-5)


def test_noisy_digits_classifier_gradient_guides():
    torch.manual_seed(0)
    net = NoisyDigitsClassifier(channels=8, emb_dim=16, hidden=16)
    clf = SigmaClassifier(net, make_schedule("linear").alphas_cumprod)
    x = torch.randn(5, 1, 8, 8)
    assert net(x, torch.arange(5).float()).shape == (5, 10)
    guided = ClassifierGuidance(lambda x, s: torch.zeros_like(x), clf, scale=2.0)
    y = torch.arange(5)
    grad = guided.grad_log_prob(x, torch.tensor(1.5), y)
    # a small step along the gradient raises log p(y | x)
    before = clf(x, torch.tensor(1.5)).log_softmax(1).gather(1, y[:, None])
    after = clf(x + 1e-3 * grad, torch.tensor(1.5)).log_softmax(1).gather(1, y[:, None])
    assert bool((after > before).all())
    with torch.no_grad():
        out = guided(x, torch.tensor(1.5), y=y)
    assert torch.allclose(out, 2.0 * 1.5 ** 2 * grad, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="t must have shape"):
        net(x, torch.zeros(4))


def test_errors():
    mix = mixture()
    x = points(4)
    with pytest.raises(ValueError, match=">= 0"):
        ClassifierGuidance(mix.gmm, mix.classifier, scale=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        ClassifierFreeGuidance(mix, null_label=3, scale=-0.5)
    cfg = ClassifierFreeGuidance(mix, null_label=3)
    cg = ClassifierGuidance(mix.gmm, mix.classifier)
    for bad in (-1, float("nan"), float("inf"), "big"):
        with pytest.raises(ValueError, match="guidance_scale"):
            cfg(x, 0.5, y=0, guidance_scale=bad)
        with pytest.raises(ValueError, match="guidance_scale"):
            cg(x, 0.5, y=0, guidance_scale=bad)
    with pytest.raises(ValueError, match="labels must lie in"):
        cg(x, 0.5, y=torch.tensor([0, 1, 2, 3]))       # 3 classes: 3 is out of range
    with pytest.raises(ValueError, match="labels must lie in"):
        cfg(x, 0.5, y=torch.tensor([0, 1, 2, 4]))      # 4 is past the null label
    with pytest.raises(ValueError, match="labels must lie in"):
        mix(x, 0.5, y=torch.tensor([-1, 0, 0, 0]))
    with pytest.raises(ValueError, match="integer tensor"):
        cfg(x, 0.5, y=torch.tensor([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        cfg(x, 0.5, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs class labels"):
        cfg(x, 0.5)
    with pytest.raises(ValueError, match="needs class labels"):
        cg(x, 0.5, guidance_scale=0)
    with pytest.raises(ValueError, match="sigma"):
        cfg(x, torch.ones(3), y=0)
    with pytest.raises(ValueError, match="null_label"):
        ClassifierFreeGuidance(mix, null_label=-1)
    with pytest.raises(ValueError, match="every class"):
        LabelledMixture(mix.gmm, [0, 0, 2, 2])
    with pytest.raises(ValueError, match="shape"):
        LabelledMixture(mix.gmm, [0, 1])
    with pytest.raises(ValueError, match="logits"):
        ClassifierGuidance(mix.gmm, lambda x, s: torch.zeros(x.shape[0]))(x, 0.5, y=0)
    assert math.isclose(float(mix.tilted_log_prob(x, 0, 2.0)[0]),
                        float(mix.gmm.log_prob(x)[0] + 2 * mix.classifier(x)[0, 0]))
