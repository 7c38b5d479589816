"""diffkit.eval.nfe_sweep: error curves, budgets, a judged sweep, distances, pixel statistics."""

import pytest
import torch

from diffkit import checkpoints
from diffkit.diffusion.gmm import GaussianMixture
from diffkit.diffusion.samplers import sample_dpmpp_2m, sample_euler, sample_heun
from diffkit.eval.nfe_sweep import (
    error_curve,
    noise_band,
    pixel_stats,
    rms_distance,
    steps_for_budget,
    sweep_budgets,
)

F64 = torch.float64
GMM = GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], [0.6, 0.8])


def test_error_curve_falls_with_levels():
    x = 80.0 * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    exact = GMM.ode_reference(x, [80.0, 0.002])
    curve = error_curve(sample_heun, GMM, x, exact, [11, 41], sigma_min=0.002, sigma_max=80.0)
    (n1, e1), (n2, e2) = curve
    assert (n1, n2) == (20, 80) and e2 < e1 / 8
    with pytest.raises(ValueError):
        error_curve(sample_heun, GMM, x, exact, [], sigma_min=0.002, sigma_max=80.0)


def test_steps_for_budget():
    assert [steps_for_budget(sample_heun, b) for b in (5, 10, 20)] == [3, 5, 10]
    assert steps_for_budget(sample_euler, 10) == 10
    with pytest.raises(ValueError):
        steps_for_budget(sample_euler, 0)


def test_sweep_budgets_counts_and_judges():
    judge, _ = checkpoints.load_model("digits-judge")
    noise = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    def denoiser(x, sigma):
        return torch.zeros_like(x)
    runs = sweep_budgets({"Heun": sample_heun, "DPM": sample_dpmpp_2m}, denoiser, noise,
                         [5, 10], judge, sigma_min=0.002, sigma_max=80.0, keep=4)
    assert [runs["Heun", b]["nfe"] for b in (5, 10)] == [5, 9]
    assert runs["DPM", 10]["nfe"] == 10 and runs["DPM", 10]["head"].shape == (4, 1, 8, 8)
    assert runs["DPM", 5]["samples"].abs().max() == 0 and "frechet" in runs["DPM", 5]["report"]
    with pytest.raises(ValueError):
        sweep_budgets({}, denoiser, noise, [5], judge, sigma_min=0.002, sigma_max=80.0, keep=13)


def test_distances_and_pixel_stats():
    x = torch.zeros(3, 1, 2, 2)
    assert torch.equal(rms_distance(x + torch.tensor([0.0, 1.0, 2.0])[:, None, None, None], x),
                       torch.tensor([0.0, 1.0, 2.0]))
    gray = pixel_stats(torch.full((2, 1, 2, 2), 0.1))
    loud = pixel_stats(torch.tensor([[3.0, -3.0, 0.5, -0.5]]))
    assert gray == {"saturated": 0.0, "contrast": 0.0} and loud["saturated"] == 0.5
    assert loud["contrast"] > 2
    assert noise_band([1.0, 3.0, 2.0]) == 2.0
    with pytest.raises(ValueError):
        rms_distance(x, torch.zeros(3, 4))
    with pytest.raises(ValueError):
        noise_band([1.0])
