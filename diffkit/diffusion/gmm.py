"""An isotropic Gaussian mixture whose noised score, denoiser and ODE solution are exact.

Component k is N(mu_k, s_k^2 I) with weight w_k. Noising with x_sigma = x_0 + sigma * eps keeps it
a mixture: p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I). Everything a sampler needs is then
closed form (Karras et al. 2022, "EDM", sec. 2 and app. B.3 use the same construction):

* posterior over components r_k(x) = w_k N(x; mu_k, v_k I) / p_sigma(x), v_k = s_k^2 + sigma^2;
* denoiser D(x, sigma) = E[x_0 | x_sigma = x] = sum_k r_k (mu_k + (s_k^2 / v_k)(x - mu_k));
* score grad log p_sigma(x) = sum_k r_k (mu_k - x) / v_k = (D(x, sigma) - x) / sigma^2 (Tweedie).

The mixture object is itself a denoiser, ``gmm(x, sigma) == gmm.denoise(x, sigma)``, so every
sampler of :mod:`diffkit.diffusion.samplers` runs on it, and :meth:`GaussianMixture.ode_reference` solves the
probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3 with sigma(t) = t) to
1e-10 relative tolerance: the ground truth for sampler error versus number of evaluations.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from scipy.integrate import solve_ivp


class GaussianMixture:
    """Isotropic Gaussian mixture: means (K, D), stds (K,), weights (K,) (normalised to sum 1)."""

    def __init__(self, means, stds, weights=None, dtype: torch.dtype = torch.float64):
        means = torch.as_tensor(means, dtype=dtype)
        if means.ndim != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(f"means must have shape (K, D) with K, D >= 1, "
                             f"got {tuple(means.shape)}")
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=dtype)
        if stds.shape != (K,):
            raise ValueError(f"stds must have shape (K,) = ({K},), got {tuple(stds.shape)}")
        if not bool((stds > 0).all()) or not bool(torch.isfinite(stds).all()):
            raise ValueError("stds must be finite and > 0")
        weights = torch.full((K,), 1.0 / K, dtype=dtype) if weights is None \
            else torch.as_tensor(weights, dtype=dtype)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape (K,) = ({K},), got {tuple(weights.shape)}")
        if not bool((weights > 0).all()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("weights must be finite and > 0 (they are normalised to sum to 1)")
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()

    @property
    def K(self) -> int:
        return self.means.shape[0]

    @property
    def D(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, D={self.D})"

    # ---- input checks -------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """Return x (B, D) and the per-sample noise variance sigma^2 as (B, 1)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != self.D:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape (B, D={self.D}), got {shape}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape[0] not in (1, x.shape[0])):
            raise ValueError(f"sigma must be a float, a 0-d tensor or shape (B={x.shape[0]},), "
                             f"got shape {tuple(sigma.shape)}")
        if not bool((sigma >= 0).all()) or not bool(torch.isfinite(sigma).all()):
            raise ValueError("sigma must be finite and >= 0")
        return x, sigma.reshape(-1, 1).expand(x.shape[0], 1) ** 2

    def _tables(self, x: torch.Tensor):
        return (t.to(device=x.device, dtype=x.dtype) for t in (self.means, self.stds, self.weights))

    def _log_joint(self, x: torch.Tensor, sigma2: torch.Tensor):
        """log w_k + log N(x; mu_k, v_k I): (B, K), and v_k = s_k^2 + sigma^2: (B, K)."""
        mu, s, w = self._tables(x)
        v = s ** 2 + sigma2                                         # (B, K)
        dist2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)          # |x - mu_k|^2: (B, K)
        log_n = -0.5 * dist2 / v - 0.5 * self.D * torch.log(2 * math.pi * v)
        return w.log() + log_n, v

    # ---- exact quantities ---------------------------------------------------------------------
    def component_posterior(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """r_k(x) = P(component k | x_sigma = x): (B, K), rows sum to 1."""
        x, sigma2 = self._check(x, sigma)
        log_joint, _ = self._log_joint(x, sigma2)
        return torch.softmax(log_joint, dim=1)

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log p_sigma(x) of the noised marginal sum_k w_k N(mu_k, (s_k^2 + sigma^2) I): (B,)."""
        x, sigma2 = self._check(x, sigma)
        log_joint, _ = self._log_joint(x, sigma2)
        return torch.logsumexp(log_joint, dim=1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x0_hat = E[x_0 | x_0 + sigma eps = x]: (B, D). Per component the Wiener mean."""
        x, sigma2 = self._check(x, sigma)
        log_joint, v = self._log_joint(x, sigma2)
        r = torch.softmax(log_joint, dim=1)                         # (B, K)
        mu, s, _ = self._tables(x)
        gain = s ** 2 / v                                           # s_k^2 / (s_k^2 + sigma^2)
        # sum_k r_k (mu_k + gain_k (x - mu_k)) = (r (1-gain)) @ mu + (r gain).sum x
        return (r * (1 - gain)) @ mu + (r * gain).sum(1, keepdim=True) * x

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The denoiser contract ``denoiser(x, sigma) -> x0_hat`` (same as :meth:`denoise`)."""
        return self.denoise(x, sigma)

    def score(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """grad_x log p_sigma(x) = sum_k r_k (mu_k - x) / (s_k^2 + sigma^2): (B, D); sigma >= 0."""
        x, sigma2 = self._check(x, sigma)
        log_joint, v = self._log_joint(x, sigma2)
        r = torch.softmax(log_joint, dim=1) / v                     # (B, K)
        mu, _, _ = self._tables(x)
        return r @ mu - r.sum(1, keepdim=True) * x

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws x_0 ~ p_0: (n, D). Randomness only from ``generator``."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.D, generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * eps

    # ---- the probability-flow ODE, solved to high accuracy --------------------------------------
    def ode_reference(self, x: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, *,
                      rtol: float = 1e-10, atol: float = 1e-10,
                      return_all: bool = False) -> torch.Tensor:
        """Solve the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (EDM eq. 3).

        x: (B, D), the state at sigma = sigmas[0]. sigmas: a strictly decreasing sequence of
        noise levels (a pair ``(sigma_from, sigma_to)`` or a whole sampler schedule; the last may
        be 0). Returns the state at sigmas[-1], (B, D), or at every listed sigma,
        (len(sigmas), B, D) with ``return_all``. Float64 throughout.

        Solved with scipy's DOP853 (order 8, adaptive) at ``rtol``/``atol``: in u = log sigma,
        dx/du = -sigma^2 score(x, sigma), while sigma > 1e-3; below that (and down to sigma = 0)
        in sigma itself, where Tweedie makes the field dx/dsigma = -sigma * score smooth.
        """
        x, _ = self._check(x, 0.0)
        s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if s.numel() < 2 or not bool((s[1:] < s[:-1]).all()) or float(s[-1]) < 0:
            raise ValueError("sigmas must hold at least 2 strictly decreasing values >= 0")
        shape, sigma_switch = x.shape, 1e-3

        def field_log(u, y):      # dx/du with sigma = e^u
            sig = math.exp(u)
            xt = torch.from_numpy(y).reshape(shape)
            return (-sig ** 2 * self.score(xt, sig)).reshape(-1).numpy()

        def field_lin(sig, y):    # dx/dsigma
            xt = torch.from_numpy(y).reshape(shape)
            return (-sig * self.score(xt, max(sig, 0.0))).reshape(-1).numpy()

        out = [x.detach().to(device="cpu", dtype=torch.float64)]
        y = out[0].reshape(-1).numpy().copy()
        for a, b in zip(s[:-1].tolist(), s[1:].tolist()):
            legs = [("log", a, max(b, sigma_switch)), ("lin", min(a, sigma_switch), b)]
            for kind, lo_a, lo_b in legs:
                if lo_a <= lo_b:
                    continue
                if kind == "log":
                    sol = solve_ivp(field_log, (math.log(lo_a), math.log(lo_b)), y,
                                    method="DOP853", rtol=rtol, atol=atol)
                else:
                    sol = solve_ivp(field_lin, (lo_a, lo_b), y, method="DOP853",
                                    rtol=rtol, atol=atol)
                if not sol.success:
                    raise RuntimeError(f"ode_reference failed: {sol.message}")
                y = sol.y[:, -1].copy()
            out.append(torch.from_numpy(np.array(y)).reshape(shape))
        return torch.stack(out) if return_all else out[-1]
