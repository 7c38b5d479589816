"""Networks over integer timesteps wrapped as denoisers ``D(x, sigma) -> x0_hat``, whatever they
predict: the noise eps, the clean sample x_0 or the velocity v (Salimans & Ho 2022)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

PREDICTIONS = ("eps", "x0", "v")
# diffusers' ``prediction_type`` names, so ``prediction=unet.config.prediction_type`` works
DIFFUSERS_NAMES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


class DiscreteTimeDenoiser:
    """Wrap ``model(x_t, t) -> eps_hat, x0_hat or v_hat`` (trained on t in [0, T)) as D(x, sigma).

    For x = x_sigma = x_0 + sigma eps: x_t = x / sqrt(1 + sigma^2) (= sqrt(abar) x_sigma), t = the
    fractional timestep of sigma by interpolation in log sigma (diffusers ``_sigma_to_t``,
    k-diffusion ``DiscreteSchedule``), computed in float64 from sigma. With abar = 1 / (1 +
    sigma^2), x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps and v = sqrt(abar) eps - sqrt(1 - abar) x_0:

        prediction="eps": x0_hat = x - sigma eps_hat
        prediction="x0":  x0_hat = the output
        prediction="v":   x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat
                                 = (x - sigma sqrt(1 + sigma^2) v_hat) / (1 + sigma^2)

    (``prediction`` also takes diffusers' names "epsilon", "sample", "v_prediction"; SD 2.x and
    zero-terminal-SNR models are "v"). ``quantize=True`` rounds t to the nearest integer (as
    DPMSolverMultistepScheduler does with Karras sigmas, and as DDPM's integer chain needs).
    alphas_cumprod: (T,) abar_t; t reaches the model as a tensor (B,) in x's dtype.
    """

    def __init__(self, model: Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor,
                 *, prediction: str = "eps", quantize: bool = False):
        prediction = DIFFUSERS_NAMES.get(prediction, prediction)
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS} "
                             f"(or diffusers' {tuple(DIFFUSERS_NAMES)})")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        if abar.ndim != 1 or abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D tensor (T,), T >= 2, inside (0, 1)")
        if not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing in t")
        self.model, self.prediction, self.quantize = model, prediction, quantize
        self.alphas_cumprod = abar
        self.sigmas = ((1 - abar) / abar).sqrt()          # (T,), increasing in t
        self.log_sigmas = self.sigmas.log()

    @property
    def T(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma, log-sigma interpolation clipped to [0, T-1]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigma = sigma.clamp(min=1e-10).log()
        log_sigmas = self.log_sigmas.to(sigma.device)
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, self.T - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        return t.round() if self.quantize else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at fractional t, log-sigma interpolation (exact table value at integer t)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool((t < 0).any()) or bool((t > self.T - 1).any()):
            raise ValueError(f"t must lie in [0, {self.T - 1}]")
        low = t.floor().long().clamp(max=self.T - 2)
        w = t - low
        sigmas, log_sigmas = self.sigmas.to(t.device), self.log_sigmas.to(t.device)
        log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
        return torch.where(t == t.floor(), sigmas[t.floor().long()], log_sigma.exp())

    def sigmas_for_timesteps(self, timesteps: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Sampler sigmas for decreasing timesteps (e.g. :func:`spaced_timesteps`): (n + 1,)."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
        if t.numel() == 0 or not bool((t[1:] < t[:-1]).all()):
            raise ValueError("timesteps must be a non-empty, strictly decreasing sequence")
        return torch.cat([self.t_to_sigma(t), t.new_zeros(1)])

    def model_input(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, s): the network's input x_t = x / sqrt(1 + sigma^2) (B, ...), its timestep t
        (B,) (from float64 sigma, on the CPU), and sigma as (B, 1, ..., 1), both in x's dtype."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma must be 0-d or of shape (B={x.shape[0]},), "
                             f"got {sigma.numel()} values")
        sigma64 = sigma.detach().cpu().double().reshape(-1).expand(x.shape[0])
        t = self.sigma_to_t(sigma64).to(device=x.device, dtype=x.dtype)
        s = sigma64.to(dtype=x.dtype).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return x / (s ** 2 + 1) ** 0.5, t, s

    def __call__(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        """x: (B, ...) at noise level sigma (0-d or (B,)); returns x0_hat: (B, ...)."""
        x_t, t, s = self.model_input(x, sigma)
        output = self.model(x_t, t, **kwargs)
        if self.prediction == "eps":
            return x - s * output
        if self.prediction == "x0":
            return output
        return (x - s * (s ** 2 + 1) ** 0.5 * output) / (s ** 2 + 1)
