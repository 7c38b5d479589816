"""The sinusoidal timestep embedding every network here shares, and its input checks.

t has shape (B,): integer timesteps, or fractional ones for the samplers' interpolation.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (B,) -> (B, dim) (Vaswani et al. 2017; Ho et al. 2020 App. B)."""
    if t.ndim != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if dim < 2 or dim % 2:
        raise ValueError(f"embedding dim must be even and >= 2, got {dim}")
    half = dim // 2
    # float64 timesteps stay float64 (a network run in double precision); anything else is
    # embedded in float32, as the shipped models were trained
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a 2-layer MLP, optionally plus a class embedding.

    Built with ``num_classes=C`` it requires labels y (B,) in [0, C], where C is the "no label"
    token of classifier-free guidance: the unconditional model is asked for explicitly.
    """

    def __init__(self, dim: int, num_classes: int | None = None):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # index num_classes is the "no label" token used for classifier-free guidance
        self.label = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.num_classes = num_classes

    def forward(self, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        # sinusoids in t's precision, then the network's own dtype (float64 t into a float32
        # network is fine; a network made .double() keeps float64 all the way)
        features = timestep_embedding(t, self.dim)
        emb = self.mlp(features.to(self.mlp[0].weight.dtype))
        if self.label is not None:
            if y is None:
                raise ValueError(f"this network was built with num_classes={self.num_classes}: "
                                 f"pass labels y (B,), with y = {self.num_classes} (the null "
                                 f"label) for the unconditional model")
            if y.shape != t.shape:
                raise ValueError(f"y must have shape {tuple(t.shape)}, got {tuple(y.shape)}")
            emb = emb + self.label(y.long())
        elif y is not None:
            raise ValueError("this network was built without num_classes; it takes no labels y")
        return emb


def check_network_input(x: torch.Tensor, t: torch.Tensor, ndim: int, channels: int, what: str):
    if x.ndim != ndim or x.shape[1] != channels:
        raise ValueError(f"x must be {what} with {channels} channels/features, got {tuple(x.shape)}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
