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

import torch

KINDS = ("linear", "scaled_linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """A discrete variance schedule; every table is derived from ``betas`` (T,)."""

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
