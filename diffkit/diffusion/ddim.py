"""DDIM (Song, Meng and Ermon 2021): the non-Markovian forward family, eta, inversion, the ODE view.

The samplers themselves live in :mod:`diffkit.diffusion.samplers` (``sample_ddim(..., eta=...)``,
``sample_ddpm``), with diffusers parity. This module holds what is DDIM-specific and is not a
sampler loop over the shared contract, all in the DDPM variables of the paper (x_t, abar_t):

* :func:`ddim_sigma` -- the standard deviation sigma_t(eta) of the reverse step (eq. 16), and
  :func:`sigma_hat` -- DDPM's larger choice sqrt(1 - abar_t / abar_prev) (Table 1, "sigma-hat").
* :func:`posterior` -- mean and variance of q_sigma(x_{t-1} | x_t, x_0) (eq. 7), the one-step
  kernel of the family of forward processes that share DDPM's marginals (Lemma 1).
* :func:`sample_forward` -- draw a whole trajectory of that family (x_T first, then backwards),
  to check by simulation that the marginals q(x_t | x_0) do not depend on the variances.
* :func:`ddim_step` -- the generative step, eq. 12, in x_t units.
* :func:`euler_step` -- one Euler step of the probability-flow ODE dx/dsigma = (x - D) / sigma in
  x = x_t / sqrt(abar_t), sigma = sqrt((1 - abar_t) / abar_t): DDIM(eta = 0) is exactly this
  (eq. 13).
* :func:`invert` -- DDIM inversion: the eta = 0 update run from low to high noise (sec. 5.4), as
  diffusers' ``DDIMInverseScheduler`` does it.
* :func:`sample_ddpm_mean` -- DDPM's posterior mean plus noise of a chosen variance, by default
  the "sigma-hat" sampler of Table 1 (1 - abar_t / abar_prev; diffusers' ``DDPMScheduler(
  variance_type="fixed_large")``): chapter 3's name for :func:`diffkit.diffusion.ddpm.sample_ddpm`
  with ``variance="large"``.

Here the DDIM paper's sigma_t is called ``std`` in code and varsigma_t in the book, because
sigma already names the continuous noise level (book/notation.md). ``abar_prev`` is abar of the
previous *listed* timestep (t - 1 for the full chain, the next entry of a subsequence tau when
skipping), and 1 for the step to x_0.
"""

from __future__ import annotations

import torch

from diffkit.diffusion.contract import Denoiser, check_sampler_input, draw_noise, report_step
from diffkit.diffusion.ddpm import sample_ddpm


def _pair(abar_t, abar_prev) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate 0 < abar_t < abar_prev <= 1 (elementwise); return both as float64 tensors."""
    abar_t = torch.as_tensor(abar_t, dtype=torch.float64)
    abar_prev = torch.as_tensor(abar_prev, dtype=torch.float64)
    if not bool(torch.isfinite(abar_t).all()) or not bool(torch.isfinite(abar_prev).all()):
        raise ValueError("abar_t and abar_prev must be finite")
    if not bool((abar_t > 0).all()) or not bool((abar_prev <= 1).all()):
        raise ValueError("need 0 < abar_t and abar_prev <= 1")
    if not bool((abar_t < abar_prev).all()):
        raise ValueError("need abar_t < abar_prev: the previous step is the less noisy one")
    return abar_t, abar_prev


def ddim_sigma(abar_t, abar_prev, eta: float = 0.0) -> torch.Tensor:
    """sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev), eq. 16.

    eta = 1 gives the DDPM posterior's standard deviation sqrt(beta-tilde_t) (on a subsequence,
    with beta_t replaced by 1 - abar_t / abar_prev); eta = 0 the deterministic DDIM.
    """
    abar_t, abar_prev = _pair(abar_t, abar_prev)
    eta = torch.as_tensor(eta, dtype=torch.float64)
    if not bool(torch.isfinite(eta).all()) or bool((eta < 0).any()):
        raise ValueError(f"eta must be finite and >= 0, got {eta.tolist()}")
    return eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).sqrt()


def sigma_hat(abar_t, abar_prev) -> torch.Tensor:
    """sqrt(1 - abar_t / abar_prev): DDPM's larger variance choice sigma_t^2 = beta_t (Ho et al.
    sec. 3.2), the "sigma-hat" row of DDIM's Table 1. It exceeds sigma_t(eta = 1)."""
    abar_t, abar_prev = _pair(abar_t, abar_prev)
    return (1 - abar_t / abar_prev).sqrt()


def _like(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) table value as (B, 1, ..., 1) (or a scalar) in x's dtype and device."""
    value = value.to(device=x.device, dtype=x.dtype)
    return value.reshape(-1, *([1] * (x.ndim - 1))) if value.ndim == 1 else value


def posterior(x0: torch.Tensor, x_t: torch.Tensor, abar_t, abar_prev,
              std) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q_sigma(x_{t-1} | x_t, x_0), DDIM eq. 7.

    mean = sqrt(abar_prev) x_0
           + sqrt(1 - abar_prev - std^2) (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t),
    variance = std^2. x0, x_t: (B, ...); abar_t, abar_prev, std: scalars or (B,). Any
    0 <= std^2 <= 1 - abar_prev is allowed: every choice keeps q(x_t | x_0) of DDPM (Lemma 1).
    """
    abar_t, abar_prev = _pair(abar_t, abar_prev)
    if not isinstance(x0, torch.Tensor) or not isinstance(x_t, torch.Tensor) \
            or x0.shape != x_t.shape or x0.ndim < 1:
        raise ValueError("x0 and x_t must be tensors of the same shape (B, ...)")
    std = torch.as_tensor(std, dtype=torch.float64)
    room = 1 - abar_prev - std ** 2
    if bool((std < 0).any()) or bool((room < -1e-12).any()):
        raise ValueError("std must satisfy 0 <= std^2 <= 1 - abar_prev")
    direction = room.clamp(min=0).sqrt() / (1 - abar_t).sqrt()   # weight of the noise direction
    a_t, a_prev, w = (_like(v, x_t) for v in (abar_t.sqrt(), abar_prev.sqrt(), direction))
    mean = a_prev * x0 + w * (x_t - a_t * x0)
    variance = (std ** 2).to(device=x_t.device, dtype=x_t.dtype).expand(x_t.shape[0])
    return mean, variance.reshape(-1, *([1] * (x_t.ndim - 1)))          # (B, 1, ..., 1)


def sample_forward(x0: torch.Tensor, alphas_cumprod: torch.Tensor, eta=0.0, *,
                   generator: torch.Generator | None = None,
                   keep: set[int] | None = None) -> dict[int, torch.Tensor]:
    """Draw the non-Markovian forward process q_sigma of DDIM eqs. 6-7 for data x0 (B, ...).

    x_{T-1} ~ N(sqrt(abar) x_0, (1 - abar) I), then for t = T-1 .. 1, x_{t-1} ~
    q_sigma(x_{t-1} | x_t, x_0) with std sigma_t(eta_t) (eq. 16). ``eta``: a float or a (T,) tensor
    (eta_t per step; entries must keep std^2 <= 1 - abar_{t-1}). Returns {t: x_t} for t in
    ``keep`` (default: every t). By Lemma 1 each x_t is N(sqrt(abar_t) x_0, (1 - abar_t) I)
    whatever eta is, although the joint law of the trajectory (and q(x_t | x_{t-1}, x_0), eq. 8)
    changes with it.
    """
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if abar.ndim != 1 or abar.numel() < 2:
        raise ValueError("alphas_cumprod must be a 1-D tensor (T,) with T >= 2")
    _pair(abar[1:], abar[:-1])
    T = abar.numel()
    etas = torch.as_tensor(eta, dtype=torch.float64).expand(T) if torch.as_tensor(eta).ndim == 0 \
        else torch.as_tensor(eta, dtype=torch.float64)
    if etas.shape != (T,):
        raise ValueError(f"eta must be a float or a tensor of shape (T,) = ({T},)")
    keep = set(range(T)) if keep is None else set(keep)

    a = _like(abar[-1], x0)
    x = a.sqrt() * x0 + (1 - a).sqrt() * draw_noise(x0, generator)
    out = {T - 1: x} if T - 1 in keep else {}
    for t in range(T - 1, 0, -1):
        std = ddim_sigma(abar[t], abar[t - 1], etas[t])
        mean, var = posterior(x0, x, abar[t], abar[t - 1], std)
        x = mean + var.sqrt() * draw_noise(x0, generator)
        if t - 1 in keep:
            out[t - 1] = x
    return out


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, abar_t, abar_prev, *, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One generative step x_t -> x_{t-1}, DDIM eq. 12, in x_t units.

    x_{t-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - std^2) eps + std z, with
    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) and std = sigma_t(eta) (eq. 16): the mean
    is :func:`posterior` at x_0 = x0_hat. ``noise`` z (same shape as x_t) is needed when eta > 0.
    """
    if not isinstance(x_t, torch.Tensor) or not isinstance(eps, torch.Tensor) \
            or x_t.shape != eps.shape:
        raise ValueError("x_t and eps must be tensors of the same shape (B, ...)")
    std = ddim_sigma(abar_t, abar_prev, eta)
    a_t = _like(torch.as_tensor(abar_t, dtype=torch.float64), x_t)
    x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean, var = posterior(x0_hat, x_t, abar_t, abar_prev, std)
    if bool((std > 0).any()):
        if noise is None or noise.shape != x_t.shape:
            raise ValueError("eta > 0 needs noise of the same shape as x_t")
        return mean + var.sqrt() * noise
    return mean


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

    x = x_t / sqrt(abar_t) at noise level sigma > 0, ``denoised`` = D(x, sigma), both (B, ...);
    returns x at sigma_next (>= 0). DDIM eq. 13 / Karras et al. 2022 eq. 3.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(denoised, torch.Tensor) \
            or x.shape != denoised.shape:
        raise ValueError("x and denoised must be tensors of the same shape (B, ...)")
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float64)
    if not bool((sigma > 0).all()) or not bool((sigma_next >= 0).all()):
        raise ValueError("need sigma > 0 and sigma_next >= 0")
    s, s_next = _like(sigma, x), _like(sigma_next, x)
    return x + (s_next - s) * (x - denoised) / s


@torch.no_grad()
def invert(denoiser: Denoiser, x0: torch.Tensor, sigmas: torch.Tensor, *, callback=None,
           extra_args: dict | None = None) -> torch.Tensor:
    """DDIM inversion: encode x0 (B, ...) into the x at sigmas[0] that ``sample_ddim`` decodes.

    ``sigmas`` is the sampler's decreasing schedule ending in 0; inversion walks it backwards,
    0 -> sigmas[-2] -> ... -> sigmas[0], with the eta = 0 update x_next = x + (sigma_next - sigma)
    eps. As in diffusers' ``DDIMInverseScheduler`` (and the prompt-to-prompt / null-text inversion
    code), eps is the network's prediction at the *destination* level sigma_next on the current
    sample x_t = x / sqrt(1 + sigma^2) -- the only level where it is defined at the first step,
    from sigma = 0. The mismatch with sampling, which evaluates at the start of each step, is
    O(step): the round trip is exact only as the number of steps grows (DDIM sec. 5.4, Table 2).
    Returns x in sigma units (x_T = x / sqrt(1 + sigmas[0]^2)).
    """
    sigmas, s_in = check_sampler_input(x0, sigmas)
    up = sigmas.flip(0)                                   # 0, sigma_min, ..., sigma_max
    x = x0
    for i in range(len(up) - 1):
        sigma, sigma_next = up[i], up[i + 1]
        # the model sees the current x_t, labelled with the next level's timestep
        x_in = x * ((1 + sigma_next ** 2) / (1 + sigma ** 2)).sqrt()
        denoised_in = denoiser(x_in, sigma_next * s_in, **(extra_args or {}))
        eps = (x_in - denoised_in) / sigma_next
        report_step(callback, i, x, sigma, sigma_next, x - sigma * eps)
        x = x + (sigma_next - sigma) * eps                # x0_hat + sigma_next * eps
    return x


def sample_ddpm_mean(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *,
                     variance: str = "large", generator=None, callback=None,
                     extra_args: dict | None = None) -> torch.Tensor:
    """Step to DDPM's posterior mean mu-tilde(x_t, x0_hat) (Ho et al. eq. 7), then add noise:
    :func:`diffkit.diffusion.ddpm.sample_ddpm` with ``variance`` "large" by default.

    "large" -- 1 - abar_t / abar_prev, Ho et al.'s sigma_t^2 = beta_t on a subsequence: the
    "sigma-hat" row of DDIM's Table 1 and diffusers' ``DDPMScheduler(variance_type=
    "fixed_large")`` on "leading" timesteps; "small" -- beta-tilde, which is ``sample_ddpm``
    itself (and DDIM with eta = 1); "none" -- no noise: a deterministic sampler that is *not*
    DDIM(eta = 0), whose step also changes the weight of eps (eq. 12).
    """
    return sample_ddpm(denoiser, x, sigmas, variance=variance, generator=generator,
                       callback=callback, extra_args=extra_args)
