"""The contract every sampler shares: a denoiser ``D(x, sigma, **cond) -> x0_hat`` and a
strictly decreasing 1-D tensor of sigmas ending in 0; the input check, the noise draw and the
per-step report each sampler makes."""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[..., torch.Tensor]


def check_sampler_input(x: torch.Tensor, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the sampler contract; return sigmas on x's device and s_in = ones (B,)."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or not torch.is_floating_point(x):
        raise ValueError("x must be a floating-point tensor of shape (B, ...)")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels, ending in 0")
    if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be finite and strictly decreasing, got {sigmas.tolist()}")
    if float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must end in exactly 0, got last value {float(sigmas[-1])}")
    return sigmas.to(x.device), x.new_ones(x.shape[0])


def check_generator(generator: torch.Generator | None) -> None:
    """All randomness is drawn on the CPU, so a seed gives the same numbers on every device."""
    if generator is not None and (not isinstance(generator, torch.Generator)
                                  or generator.device.type != "cpu"):
        where = getattr(generator, "device", type(generator).__name__)
        raise ValueError(f"generator must be a CPU torch.Generator (noise is drawn on the CPU, "
                         f"then moved to x's device), got one on {where}: pass "
                         f"torch.Generator().manual_seed(seed)")


def draw_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """eps ~ N(0, I) of x's shape and dtype: drawn on the CPU from ``generator``, then moved to
    x's device (the one place noise is drawn, so CPU and GPU runs of a seed agree)."""
    check_generator(generator)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def report_step(callback, i, x, sigma, sigma_next, denoised) -> None:
    if callback is not None:
        callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
