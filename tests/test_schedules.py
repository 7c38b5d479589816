"""diffkit.schedules: betas equal diffusers' DDPMScheduler; derived tables; validation."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffkit.schedules import KINDS, Schedule, make_schedule

DIFFUSERS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1000, 50])
def test_betas_equal_diffusers(kind, T):
    ours = make_schedule(kind, T)
    theirs = DDPMScheduler(num_train_timesteps=T, **DIFFUSERS[kind])
    assert ours.betas.dtype == torch.float64 and ours.T == T and ours.kind == kind
    # diffusers stores float32: agree to float32 precision
    torch.testing.assert_close(ours.betas, theirs.betas.double(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.double(),
                               rtol=2e-5, atol=1e-8)


def test_scaled_linear_ends():
    s = make_schedule("scaled_linear")
    assert math.isclose(float(s.betas[0]), 0.00085, rel_tol=1e-12)
    assert math.isclose(float(s.betas[-1]), 0.012, rel_tol=1e-12)
    # sqrt(beta) is linear in t
    root = s.betas.sqrt()
    diffs = root[1:] - root[:-1]
    torch.testing.assert_close(diffs, diffs.mean().expand_as(diffs), rtol=1e-9, atol=1e-12)


def test_linear_custom_range():
    s = make_schedule("linear", 11, beta_start=0.01, beta_end=0.11)
    torch.testing.assert_close(s.betas, torch.arange(1, 12, dtype=torch.float64) / 100)


def test_cosine_alpha_bar_and_cap():
    T, s_ = 1000, 0.008
    s = make_schedule("cosine", T)
    assert float(s.betas[-1]) == pytest.approx(0.999, abs=1e-12)  # the cap binds at the end
    assert float(s.betas.max()) <= 0.999 + 1e-12

    def f(u):
        return math.cos((u / T + s_) / (1 + s_) * math.pi / 2) ** 2

    expected = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    # abar_t = f(t+1)/f(0) wherever the cap did not bind (all but the last step)
    torch.testing.assert_close(s.alphas_cumprod[:-1], expected[:-1], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("kind", KINDS)
def test_tables(kind):
    s = make_schedule(kind, 200)
    abar = s.alphas_cumprod
    assert bool((abar[1:] < abar[:-1]).all()), "abar must be strictly decreasing"
    assert bool((abar > 0).all()) and bool((abar < 1).all())
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    expected_abar = torch.from_numpy(np.cumprod(1 - s.betas.numpy()))
    torch.testing.assert_close(abar, expected_abar)
    torch.testing.assert_close(s.sigmas, ((1 - abar) / abar).sqrt())
    assert bool((s.sigmas[1:] > s.sigmas[:-1]).all())
    torch.testing.assert_close(s.snr, 1 / s.sigmas ** 2)
    torch.testing.assert_close(s.log_snr, -2 * s.sigmas.log())
    # the forward identity of the core contract: sqrt(abar) * sqrt(1 + sigma^2) = 1
    torch.testing.assert_close(abar.sqrt() * (1 + s.sigmas ** 2).sqrt(), torch.ones_like(abar))


def test_to_dtype_keeps_kind():
    s = make_schedule("cosine", 10).to(dtype=torch.float32)
    assert s.betas.dtype == torch.float32 and s.kind == "cosine"
    assert make_schedule("linear", 10, dtype=torch.float32).betas.dtype == torch.float32


@pytest.mark.parametrize("kwargs", [
    dict(kind="quadratic"), dict(kind="squaredcos_cap_v2"),
    dict(kind="linear", T=1), dict(kind="linear", T=0), dict(kind="linear", T=1000.0),
    dict(kind="linear", T="1000"), dict(kind="linear", T=True),
    dict(kind="linear", beta_start=0.02, beta_end=0.01),
    dict(kind="linear", beta_start=0.0), dict(kind="linear", beta_end=1.0),
    dict(kind="scaled_linear", beta_start=-0.1),
    dict(kind="cosine", beta_start=1e-4), dict(kind="cosine", beta_end=0.02),
])
def test_make_schedule_errors(kwargs):
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError):
        make_schedule(kind, **kwargs)


@pytest.mark.parametrize("betas", [
    torch.tensor([0.1, 1.0]), torch.tensor([0.0, 0.1]), torch.tensor([0.1, -0.2]),
    torch.tensor([0.1, 1.5]), torch.full((2, 3), 0.1), torch.tensor(0.1), torch.tensor([]),
    torch.tensor([1, 2]), [0.1, 0.2],
])
def test_schedule_rejects_bad_betas(betas):
    with pytest.raises(ValueError):
        Schedule(betas)


def test_check_t():
    s = make_schedule("linear", 10)
    out = s.check_t(torch.tensor([0, 9, 3], dtype=torch.int32))
    assert out.dtype == torch.int64 and out.tolist() == [0, 9, 3]
    for bad in (torch.tensor([0, 10]), torch.tensor([-1]), torch.tensor([0.0, 1.0]),
                torch.tensor([[1, 2]]), torch.tensor(3), 3, [1, 2], torch.tensor([True])):
        with pytest.raises(ValueError):
            s.check_t(bad)
