"""diffkit.eval.solvers: NFE counting, exponential sigmas, plain Euler in lambda, slopes."""

from __future__ import annotations

import math

import pytest
import torch

from diffkit.diffusion.gmm import GaussianMixture
from diffkit.diffusion.samplers import sample_euler, sample_heun, sigmas_karras
from diffkit.eval.solvers import (
    CountingDenoiser,
    error_at_sigma_min,
    fewest_nfe,
    loglog_slope,
    sample_euler_lambda,
    sigmas_exponential,
)

F64 = torch.float64
GMM = GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, 2.0]], [0.6, 0.8, 0.5], [0.5, 0.3, 0.2])


def test_counting_denoiser_counts_and_forwards_kwargs():
    seen = []
    counted = CountingDenoiser(lambda x, sigma, cond=None: seen.append(cond) or x)
    for _ in range(3):
        counted(torch.zeros(2, 2), torch.tensor(1.0), cond="c")
    assert counted.nfe == 3 and seen == ["c"] * 3


def test_sigmas_exponential_is_uniform_in_log_sigma():
    s = sigmas_exponential(5, 0.01, 100.0)
    assert s.shape == (6,) and s.dtype == F64 and s[-1] == 0
    assert math.isclose(s[0], 100.0, rel_tol=1e-12) and math.isclose(s[4], 0.01, rel_tol=1e-12)
    steps = (s[:-2] / s[1:-1]).log()
    assert torch.allclose(steps, torch.full((4,), math.log(10.0), dtype=F64))
    for bad in [dict(n=0, sigma_min=0.1, sigma_max=1.0), dict(n=3, sigma_min=1.0, sigma_max=0.5),
                dict(n=3, sigma_min=0.0, sigma_max=1.0), dict(n=2.0, sigma_min=0.1, sigma_max=1.0)]:
        with pytest.raises(ValueError):
            sigmas_exponential(**bad)


def test_euler_lambda_gets_the_linear_part_wrong_and_exponential_euler_does_not():
    """Data at the origin: D = 0, so dx/dlambda = -x and x(sigma') = x sigma'/sigma exactly. Euler
    in sigma (the exponential integrator) is exact; Euler in lambda multiplies by 1 - h instead."""
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 10.0
    sigmas = torch.tensor([10.0, 2.0, 0.5, 0.0], dtype=F64)   # h = log 5, log 4 (> 1: sign flips)
    zero = lambda x, sigma: torch.zeros_like(x)              # noqa: E731
    states = {}
    for name, sampler in [("exp", sample_euler), ("lambda", sample_euler_lambda)]:
        seen = []
        sampler(zero, x, sigmas, callback=lambda d: seen.append(d["x"]))
        states[name] = seen[-1]                                # the state at sigma = 0.5
    assert torch.allclose(states["exp"], x * 0.05, atol=1e-12)
    assert torch.allclose(states["lambda"], x * (1 - math.log(5)) * (1 - math.log(4)), atol=1e-12)


def test_euler_lambda_is_first_order_and_follows_the_contract():
    x = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * 80.0
    ref = GMM.ode_reference(x, [80.0, 0.002])
    nfe, err = zip(*(error_at_sigma_min(sample_euler_lambda, GMM, x, ref,
                                        sigmas_exponential(n, 0.002, 80.0))
                     for n in (64, 128, 256, 512)))
    assert list(nfe) == [63, 127, 255, 511]
    assert -1.2 < loglog_slope(nfe, err) < -0.8
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_euler_lambda(GMM, x, torch.tensor([1.0, 2.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="end in exactly 0"):
        sample_euler_lambda(GMM, x, torch.tensor([2.0, 1.0], dtype=F64))


def test_error_at_sigma_min_counts_nfe_without_the_final_jump():
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 80.0
    ref = GMM.ode_reference(x, [80.0, 0.002])
    sigmas = sigmas_karras(10, 0.002, 80.0)
    assert error_at_sigma_min(sample_euler, GMM, x, ref, sigmas)[0] == 9
    nfe, err = error_at_sigma_min(sample_heun, GMM, x, ref, sigmas)
    assert nfe == 18 and 0 < err < 1.0
    with pytest.raises(ValueError, match="end in 0"):
        error_at_sigma_min(lambda d, x, s, callback: x, GMM, x, ref, sigmas)


def test_loglog_slope_and_fewest_nfe():
    nfe = [5, 10, 20, 50]
    assert math.isclose(loglog_slope(nfe, [3.0 * n ** -2 for n in nfe]), -2.0, rel_tol=1e-9)
    with pytest.raises(ValueError):
        loglog_slope([1], [1.0])
    with pytest.raises(ValueError):
        loglog_slope([1, 2], [1.0, 0.0])
    assert fewest_nfe(nfe, [9.0, 4.0, 2.0, 1.0], bar=4.0) == 10
    assert fewest_nfe(nfe, [9.0, 4.0, 2.0, 1.0], bar=0.5) is None
    with pytest.raises(ValueError):
        fewest_nfe(nfe, [1.0], bar=1.0)
