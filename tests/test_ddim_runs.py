"""Chapter 3's run cache and distances, on the exact-denoiser contract with a tiny stand-in."""

import pytest
import torch

from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.diffusion.schedules import make_schedule
from diffkit.eval import ddim_runs


def _denoiser():
    # an "eps network" that predicts zero noise: D(x, sigma) = x, enough to exercise the plumbing
    return DiscreteTimeDenoiser(lambda x, t: torch.zeros_like(x), make_schedule("linear").alphas_cumprod)


def test_rms_per_image():
    a = torch.zeros(3, 1, 2, 2)
    b = torch.ones(3, 1, 2, 2) * torch.tensor([0.0, 1.0, 2.0])[:, None, None, None]
    assert torch.equal(ddim_runs.rms(a, b), torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="shape"):
        ddim_runs.rms(a, b[:2])


def test_leading_pairs_end_at_abar_one():
    abar = make_schedule("linear").alphas_cumprod
    a, a_prev, ts = ddim_runs.leading_pairs(abar, 10)
    assert ts.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert float(a_prev[-1]) == 1.0 and torch.equal(a_prev[:-1], a[1:])


def test_runs_are_cached_seeded_and_deterministic_for_eta_zero():
    runs = ddim_runs.LeadingRuns(_denoiser(), default_n=4)
    first = runs(10, 0.0)
    assert first.shape == (4, 1, 8, 8) and runs(10, 0.0) is first
    assert torch.equal(runs(10, 0.0, gen_seed=7), first)          # eta = 0 ignores the generator
    assert not torch.equal(runs(10, 1.0), runs(10, 1.0, gen_seed=7))
    assert not torch.equal(runs(10, 0.0, seed=2), first)
    assert runs(10, "hat").shape == runs(10, "none").shape == (4, 1, 8, 8)
    assert runs.seconds >= 0 and len(runs.cache) == 7
    with pytest.raises(ValueError, match="eta"):
        runs(10, "large")


def test_pixel_path_records_every_step():
    den = _denoiser()
    sigmas = den.sigmas_for_timesteps([900, 500, 0])
    seen = ddim_runs.pixel_path(den, sigmas, torch.randn(1, 1, 8, 8), [0, 5])
    assert len(seen) == 3 and seen[0][0] == pytest.approx(float(sigmas[0]))
    assert seen[0][1].shape == (2,)
    with pytest.raises(ValueError, match="one image"):
        ddim_runs.pixel_path(den, sigmas, torch.randn(2, 1, 8, 8), [0])
