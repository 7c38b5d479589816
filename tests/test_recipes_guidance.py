"""diffkit.recipes.guidance: the noisy classifier and the class-conditional DDPM of chapter 7."""

import pytest
import torch

from diffkit import checkpoints, data, recipes
from diffkit.diffusion import guidance
from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.diffusion.schedules import make_schedule
from diffkit.eval import digits
from diffkit.nn import classifiers, unet
from diffkit.recipes import guidance as rg

NAMES = ("digits-classifier-noisy", "digits-cond-ddpm")


def test_registered():
    for name in NAMES:
        spec = recipes.RECIPES[name]
        assert spec.steps > 0 and spec.description
    assert recipes.RECIPES["digits-cond-ddpm"].steps == recipes.RECIPES["digits-ddpm"].steps


def test_label_dropout_rate_and_null_label():
    seen = []

    def model(x_t, t, y):
        seen.append(y.clone())
        return torch.zeros_like(x_t)

    loss_fn = rg.cond_ddpm_loss(make_schedule("linear"), p_uncond=0.2, null_label=10)
    x0, y = torch.zeros(4000, 1, 8, 8), torch.arange(4000) % 10
    loss_fn(model, (x0, y), torch.Generator().manual_seed(0))
    dropped = seen[0] == 10
    # 4000 Bernoulli(0.2) draws: sd 0.0063; the kept labels are untouched
    assert abs(float(dropped.float().mean()) - 0.2) < 4 * 0.0063
    assert torch.equal(seen[0][~dropped], y[~dropped])
    loss_fn(model, (x0, y), torch.Generator().manual_seed(0))
    assert torch.equal(seen[0], seen[1])                      # seeded: the same mask again
    with pytest.raises(ValueError, match="p_uncond"):
        rg.cond_ddpm_loss(make_schedule("linear"), p_uncond=1.0)


def test_noisy_classifier_loss_sees_noised_inputs():
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros(x_t.shape[0], 10, requires_grad=True)

    x0, y = data.digits("test")
    loss = rg.noisy_classifier_loss(make_schedule("linear"))(model, (x0, y),
                                                               torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(torch.log(torch.tensor(10.0)).item())   # uniform logits
    assert seen["t"].min() >= 0 and seen["t"].max() < 1000 and seen["t"].dtype == torch.long
    # most t are noisy: x_t is far from x_0 on average
    assert float((seen["x_t"] - x0).pow(2).mean()) > 0.3


def test_balanced_labels_and_sample_digits():
    assert digits.balanced_labels(20).tolist() == [c for c in range(10) for _ in range(2)]
    with pytest.raises(ValueError, match="multiple of 10"):
        digits.balanced_labels(15)
    torch.manual_seed(0)
    net = unet.UNet(base_channels=8, num_res_blocks=1, emb_dim=16, num_classes=10).eval()
    denoiser = DiscreteTimeDenoiser(net, make_schedule("linear").alphas_cumprod)
    cfg = guidance.ClassifierFreeGuidance(denoiser, null_label=10)
    labels = digits.balanced_labels(10)
    kw = dict(sigma_min=denoiser.sigma_min, sigma_max=denoiser.sigma_max, steps=3)
    a = digits.sample_digits(cfg, labels, guidance_scale=2.0, **kw)
    b = digits.sample_digits(cfg, labels, guidance_scale=2.0, **kw)
    assert a.shape == (10, 1, 8, 8) and a.abs().max() <= 1 and torch.equal(a, b)


def test_judge_requested_on_real_digits(shipped_model):
    judge, _ = shipped_model("digits-judge")
    x, y = data.digits("test")
    report = digits.judge_requested(judge, x, y)
    assert report["requested"] >= 0.97 and report["requested_confident"] <= report["requested"]
    wrong = digits.judge_requested(judge, x, (y + 1) % 10)
    assert wrong["requested"] < 0.05


def test_classifier_recipe_smoke_and_rebuild(tmp_path):
    card = recipes.run("digits-classifier-noisy", root=tmp_path, steps=20, progress=False,
                       device="cpu")
    assert card["model"]["class"] == "NoisyDigitsClassifier"
    assert set(card["measured"]) == {f"accuracy_t{t}" for t in rg.T_GRID}
    model, _ = checkpoints.load_model("digits-classifier-noisy", root=tmp_path)
    assert isinstance(model, classifiers.NoisyDigitsClassifier)
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999])).shape == (2, 10)


def test_cond_ddpm_recipe_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(rg, "CARD_N", 20)       # the card's 1000 samples take about a minute
    card = recipes.run("digits-cond-ddpm", root=tmp_path, steps=10, progress=False, device="cpu")
    assert card["model"]["kwargs"]["num_classes"] == 10 and card["measured"]["n"] == 20
    # the card holds the measurement of the saved weights: the same seeded samples again
    model, _ = checkpoints.load_model("digits-cond-ddpm", root=tmp_path)
    again = rg.cond_digits_quality(model, "cpu", n=20)
    assert again == pytest.approx(card["measured"])
    assert card["measured"]["frechet_floor"] > 0
    # 10 of 6000 steps: the net ignores the label, so the judge finds the requested class about
    # as often as chance (0.1), far below the shipped model's live bar (test_shipped_models.py)
    for w in rg.CARD_SCALES:
        assert card["measured"][f"w{w:g}_requested"] < 0.5


def test_shipped_noisy_classifier(shipped_card):
    # the card's figures; tests/test_shipped_models.py re-measures them live
    card = shipped_card("digits-classifier-noisy")
    acc = [card["measured"][f"accuracy_t{t}"] for t in rg.T_GRID]
    assert acc[0] >= 0.95                          # clean digits: nearly as good as the judge
    assert acc[-1] < 0.2                           # t = 999 is pure noise: chance is 0.1
    assert all(a >= b - 0.02 for a, b in zip(acc, acc[1:]))   # falls with t


def test_shipped_cond_ddpm(shipped_card):
    card = shipped_card("digits-cond-ddpm")
    m = card["measured"]
    assert m["w1_requested"] >= 0.9
    assert m["w3_requested"] >= m["w1_requested"]
    assert m["w1_frechet"] < 3 * m["frechet_floor"]
