"""Discrete noise schedules: beta_t, alpha_t, abar_t and the continuous noise level sigma_t.

Symbols as in book/notation.md: ``betas`` = beta_t, ``alphas`` = alpha_t = 1 - beta_t,
``alphas_cumprod`` = abar_t = prod_{s<=t} alpha_s, ``sigmas`` = sigma_t = sqrt((1 - abar_t) / abar_t).
Index t runs over 0..T-1 (diffusers' convention; the DDPM paper counts 1..T).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

KINDS = ("linear", "scaled_linear", "cosine")


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete variance schedule; every table is derived from ``betas`` (T,).

    ``eq=False``: two schedules compare (and hash) by identity, since the generated ``__eq__``
    would compare tensor fields and raise; compare ``betas`` with ``torch.equal`` instead.
    """

    betas: torch.Tensor
    kind: str = "custom"

    def __post_init__(self):
        b = self.betas
        if not isinstance(b, torch.Tensor) or b.ndim != 1 or b.numel() == 0:
            raise ValueError("Schedule.betas must be a non-empty 1-D tensor of shape (T,)")
        if not torch.is_floating_point(b):
            raise ValueError(f"Schedule.betas must be floating point, got {b.dtype}")
        if bool((b <= 0).any()) or bool((b >= 1).any()):
            raise ValueError("Schedule.betas must lie strictly inside (0, 1)")

    @property
    def T(self) -> int:
        return self.betas.numel()

    @cached_property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(self.alphas, dim=0)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t): x_t / sqrt(abar_t) = x_0 + sigma_t * eps."""
        abar = self.alphas_cumprod
        return ((1 - abar) / abar).sqrt()

    @cached_property
    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) = 1 / sigma_t^2."""
        abar = self.alphas_cumprod
        return abar / (1 - abar)

    @cached_property
    def log_snr(self) -> torch.Tensor:
        return self.snr.log()

    def to(self, device=None, dtype=None) -> "Schedule":
        return Schedule(self.betas.to(device=device, dtype=dtype), self.kind)

    def check_t(self, t: torch.Tensor) -> torch.Tensor:
        """Validate an integer timestep tensor ``t`` of shape (B,) with values in [0, T)."""
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise ValueError(f"t must be a 1-D integer tensor of shape (B,), got {_describe(t)}")
        if t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"t must be an integer tensor, got dtype {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
            raise ValueError(f"t must lie in [0, {self.T}), got values in "
                             f"[{int(t.min())}, {int(t.max())}]")
        return t.long()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _cosine_betas(T: int, max_beta: float = 0.999, s: float = 0.008) -> torch.Tensor:
    """Improved DDPM (Nichol & Dhariwal 2021), eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def make_schedule(kind: str, T: int = 1000, *, beta_start: float | None = None,
                  beta_end: float | None = None, dtype: torch.dtype = torch.float64) -> Schedule:
    """Build a named schedule with the same betas as diffusers' ``DDPMScheduler``.

    ``linear``: beta from 1e-4 to 0.02 (Ho et al. 2020).
    ``scaled_linear``: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012) (Stable Diffusion).
    ``cosine``: Nichol & Dhariwal's cosine abar with beta capped at 0.999 (``squaredcos_cap_v2``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {KINDS}")
    if not isinstance(T, numbers.Integral) or isinstance(T, bool) or T < 2:
        raise ValueError(f"T must be an integer >= 2, got {T!r}")
    if kind == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start / beta_end")
        betas = _cosine_betas(int(T))
    else:
        defaults = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}[kind]
        start = defaults[0] if beta_start is None else float(beta_start)
        end = defaults[1] if beta_end is None else float(beta_end)
        if not 0 < start < end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {start}, {end}")
        if kind == "linear":
            betas = torch.linspace(start, end, int(T), dtype=torch.float64)
        else:
            betas = torch.linspace(start ** 0.5, end ** 0.5, int(T), dtype=torch.float64) ** 2
    return Schedule(betas.to(dtype), kind)


# --- zero terminal SNR (Lin et al. 2024) ----------------------------------------------------

def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale ``betas`` (T,) so that abar_T = 0 (Lin et al. 2024, Algorithm 1).

    sqrt(abar_t) is shifted so its last value is 0 and scaled so its first value is unchanged:
    sqrt(abar'_t) = (sqrt(abar_t) - sqrt(abar_T)) * sqrt(abar_0) / (sqrt(abar_0) - sqrt(abar_T)).
    The returned betas end in exactly 1 (x_T is pure noise); equal to diffusers'
    ``scheduling_ddim.rescale_zero_terminal_snr``. A :class:`Schedule` cannot hold beta_T = 1
    (its sigma_T would be infinite): use :func:`zero_terminal_snr` for a usable schedule.
    """
    if not isinstance(betas, torch.Tensor) or betas.ndim != 1 or betas.numel() < 2:
        raise ValueError(f"betas must be a 1-D tensor of shape (T,), T >= 2, "
                         f"got {_describe(betas)}")
    if not torch.is_floating_point(betas) or bool((betas <= 0).any()) or bool((betas >= 1).any()):
        raise ValueError("betas must be floating point and lie strictly inside (0, 1)")
    root = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def zero_terminal_snr(schedule: Schedule, max_beta: float = 0.999) -> Schedule:
    """``schedule`` rescaled to zero terminal SNR, with beta capped at ``max_beta``.

    The cap is the one of the cosine schedule (Nichol & Dhariwal 2021, sec. 3.2): it keeps
    abar_T = (1 - max_beta) abar_{T-1} > 0, so sigma_T and every table stay finite, while the
    terminal SNR is ~1e-10 for T = 1000 (Lin et al. 2024 use 0 exactly; diffusers' sigma-based
    schedulers replace abar_T = 0 by 2**-24 for the same reason).
    """
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")
    betas = rescale_zero_terminal_snr(schedule.betas).clamp(max=max_beta)
    return Schedule(betas, schedule.kind + "+zsnr")


# --- how Gaussian is one reverse step? ----------------------------------------------------

def _gauss_hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes z and weights w with E_{N(0,1)}[f] ~ sum_j w_j f(sqrt(2) z_j)."""
    z, w = np.polynomial.hermite.hermgauss(n)
    return torch.from_numpy(z), torch.from_numpy(w / math.sqrt(math.pi))


def reverse_step_gaussian_gap(schedule: Schedule, levels: torch.Tensor, weights: torch.Tensor,
                              t: torch.Tensor | None = None, *, data_std: float = 0.0,
                              nodes: int = 8, chunk: int = 16) -> torch.Tensor:
    """E_{x_t} KL(q(x_{t-1} | x_t) || best Gaussian), in nats, for 1-D discrete data.

    The data are ``levels`` (K,) with probabilities ``weights`` (K,). The true reverse step is
    the mixture q(x_{t-1} | x_t) = sum_k r_k(x_t) N(mu_t(x_t, c_k), beta~_t) of the DDPM
    posteriors (Ho et al. eq. 7) weighted by r_k = p(x_0 = c_k | x_t); the best Gaussian in
    KL(q || p) matches its mean and variance V, so KL = log(2 pi e V) / 2 - H(q). Summed over t
    it is the part of the negative ELBO that no Gaussian reverse step p_theta(x_{t-1} | x_t)
    can remove (Sohl-Dickstein et al. 2015: reverse steps are Gaussian only for small steps).
    Both expectations use ``nodes``-point Gauss-Hermite rules per mixture component.

    ``data_std`` > 0 makes each level a Gaussian N(c_k, data_std^2) (fine structure below the
    levels' spacing). Then the first step, data -> x_0, is a Gaussian step too and t = 0 is
    allowed. (N(c, s^2) noised to abar is, up to the scale sqrt(1 + abar s^2) that KL ignores,
    the point mass c noised to abar / (1 + abar s^2): the data's own std is one more step.)
    t: integer steps (default all: 1..T-1, or 0..T-1 with data_std > 0); returns float64 (len(t),).
    """
    levels = torch.as_tensor(levels, dtype=torch.float64).flatten()
    weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if levels.numel() == 0 or weights.shape != levels.shape:
        raise ValueError(f"levels and weights must be non-empty and of equal length, got "
                         f"{levels.numel()} and {weights.numel()}")
    if bool((weights <= 0).any()) or abs(float(weights.sum()) - 1) > 1e-9:
        raise ValueError("weights must be positive and sum to 1")
    if not isinstance(nodes, int) or nodes < 2:
        raise ValueError(f"nodes must be an integer >= 2, got {nodes!r}")
    if not data_std >= 0:
        raise ValueError(f"data_std must be >= 0, got {data_std}")
    first = 0 if data_std > 0 else 1
    t = torch.arange(first, schedule.T) if t is None else schedule.check_t(torch.as_tensor(t))
    if bool((t < first).any()):
        raise ValueError("t must be >= 1 unless data_std > 0: for point-mass data q(x_{-1} | x_0) "
                         "is the data itself, not a Gaussian step")
    # abar with abar_{-1} = 1 (the data) prepended, the data's std folded in (see above)
    abar = torch.cat([torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod.double()])
    abar = abar / (1 + abar * data_std ** 2)
    z, w = _gauss_hermite(nodes)
    K, J = levels.numel(), nodes
    out = []
    for ts in t.split(chunk):
        a, ap = abar[ts + 1, None, None], abar[ts, None, None]            # (C, 1, 1)
        al = a / ap
        b = 1 - al
        # x_t at nodes of each component of q(x_t) = sum_k w_k N(sqrt(a) c_k, 1 - a): (C, P)
        x_t = (a.sqrt() * levels[:, None] + (2 * (1 - a)).sqrt() * z).flatten(1)
        p_w = (weights[:, None] * w).flatten()                              # (P,)
        log_r = weights.log() - (x_t[..., None] - a.sqrt() * levels) ** 2 / (2 * (1 - a))
        r = torch.softmax(log_r, -1)                                        # (C, P, K)
        mu = (ap.sqrt() * b * levels + al.sqrt() * (1 - ap) * x_t[..., None]) / (1 - a)
        var = (1 - ap) / (1 - a) * b                                        # (C, 1, 1)
        mean = (r * mu).sum(-1, keepdim=True)
        V = var[..., 0] + (r * (mu - mean) ** 2).sum(-1)                    # (C, P)
        # entropy H(q) = -sum_k r_k E_{N(mu_k, var)}[log q]
        x = (mu[..., None] + (2 * var[..., None]).sqrt() * z).flatten(2)   # (C, P, K*J)
        d2 = (x[..., None] - mu[:, :, None, :]) ** 2                        # (C, P, K*J, K)
        log_q = (torch.logsumexp(r.clamp_min(1e-300).log()[:, :, None, :]
                                 - d2 / (2 * var[..., None]), -1)
                 - 0.5 * torch.log(2 * math.pi * var))
        H = -(r[..., None] * w * log_q.unflatten(-1, (K, J))).sum((-1, -2))
        kl = 0.5 * torch.log(2 * math.pi * math.e * V) - H
        out.append((kl.clamp_min(0) * p_w).sum(-1))
    return torch.cat(out)
