"""Measurements of chapter 3 (DDIM): digits sampled on diffusers' "leading" timesteps from seeded
starting noise, cached so that every table cell, distance and inversion reuses one run; the
per-image RMS distance between two sets of images; the (abar_t, abar_prev) pairs of a subsequence;
and the path of a few pixels along one DDIM run."""

from __future__ import annotations

import time

import torch

from diffkit.diffusion import ddim
from diffkit.diffusion.samplers import sample_ddim, spaced_timesteps
from diffkit.eval import metrics

DDPM_MEAN_VARIANTS = {"hat": "large", "none": "none"}


# the per-image distance chapter 3 calls ``rms``
rms = metrics.rms_per_image


def leading_pairs(alphas_cumprod: torch.Tensor, steps: int):
    """(abar_t, abar_prev, t) along the ``steps`` "leading" timesteps (t = ..., T/S, 0), each (S,),
    with abar_prev = 1 after the last step: the jumps a sampler on that subsequence takes."""
    ts = spaced_timesteps(steps, alphas_cumprod.shape[0], "leading")
    a = alphas_cumprod[ts]
    return a, torch.cat([a[1:], a.new_ones(1)]), torch.tensor(ts)


class LeadingRuns:
    """Digits (n, 1, 8, 8) sampled by ``denoiser`` on S "leading" timesteps, cached by
    (S, eta, n, seed, gen_seed).

    The starting noise of ``seed`` is drawn on the CPU (so every device and every sampler start
    from the same x_T) and the generator of the injected noise is seeded with 1000 + seed unless
    ``gen_seed`` is given. eta is a DDIM eta (``sample_ddim``), or "hat" / "none" for DDPM's
    posterior mean with its larger variance / with no noise (``ddim.sample_ddpm_mean``).
    ``seconds`` sums the time spent sampling.
    """

    def __init__(self, denoiser, *, default_n: int, device="cpu"):
        if default_n < 1:
            raise ValueError(f"default_n must be positive, got {default_n}")
        self.denoiser, self.default_n, self.device = denoiser, default_n, device
        self.cache: dict = {}

    def sigmas(self, steps: int) -> torch.Tensor:
        """The sampler's sigmas (S + 1,) for S "leading" timesteps."""
        return self.denoiser.sigmas_for_timesteps(
            spaced_timesteps(steps, self.denoiser.T, "leading"))

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """Standard-normal starting noise (n, 1, 8, 8) of ``seed``, on the device."""
        return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(self.device)

    def __call__(self, steps: int, eta, n: int | None = None, seed: int = 1,
                 gen_seed: int | None = None) -> torch.Tensor:
        """Samples (n, 1, 8, 8) on the CPU, from the cache when this run was made before."""
        n = self.default_n if n is None else n
        if not (eta in DDPM_MEAN_VARIANTS or isinstance(eta, (int, float))):
            raise ValueError(f"eta must be a number or one of {tuple(DDPM_MEAN_VARIANTS)}, "
                             f"got {eta!r}")
        key = (steps, eta, n, seed, gen_seed)
        if key not in self.cache:
            sigmas = self.sigmas(steps)
            x = self.noise(n, seed) * sigmas[0]
            gen = torch.Generator().manual_seed(1000 + seed if gen_seed is None else gen_seed)
            start = time.perf_counter()
            if eta in DDPM_MEAN_VARIANTS:
                out = ddim.sample_ddpm_mean(self.denoiser, x, sigmas, generator=gen,
                                            variance=DDPM_MEAN_VARIANTS[eta])
            else:
                out = sample_ddim(self.denoiser, x, sigmas, eta=float(eta), generator=gen)
            self.cache[key] = (out.cpu(), time.perf_counter() - start)
        return self.cache[key][0]

    @property
    def seconds(self) -> float:
        return sum(seconds for _, seconds in self.cache.values())


def pixel_path(denoiser, sigmas: torch.Tensor, noise: torch.Tensor, pixels) -> list:
    """Run ``sample_ddim`` (eta = 0) on ``sigmas`` from ``noise`` * sigmas[0] (1, C, H, W) and
    record, at each step, (sigma, the chosen flat ``pixels`` of the state as the network sees
    it, x_t = x / sqrt(1 + sigma^2)): a list of (float, (len(pixels),) tensor)."""
    if noise.ndim != 4 or noise.shape[0] != 1:
        raise ValueError(f"noise must be one image (1, C, H, W), got {tuple(noise.shape)}")
    seen = []

    def record(info):
        x_t = info["x"][0, 0].flatten()[list(pixels)] / (1 + info["sigma"] ** 2) ** 0.5
        seen.append((float(info["sigma"]), x_t.cpu()))

    sample_ddim(denoiser, noise * sigmas[0], sigmas, callback=record)
    return seen
