"""A time-conditioned residual MLP for 2-D (or D-dim) points: the toy-data denoiser.

The sinusoidal timestep embedding enters inside every residual block.
"""

from __future__ import annotations

import torch
from torch import nn

from diffkit.nn.embeddings import TimeEmbedding, check_network_input


class MLPBlock(nn.Module):
    """h + W2 silu(W1 norm(h) + E(t)): the embedding enters inside the residual branch."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + self.emb(emb)))


class MLPDenoiser(nn.Module):
    """Time-conditioned residual MLP for 2-D (or D-dim) points: (B, D), (B,) -> (B, D)."""

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4, emb_dim: int = 128,
                 num_classes: int | None = None):
        super().__init__()
        if min(dim, width, depth, emb_dim) <= 0:
            raise ValueError("dim, width, depth and emb_dim must be positive")
        self.config = dict(dim=dim, width=width, depth=depth, emb_dim=emb_dim,
                           num_classes=num_classes)
        self.embed = TimeEmbedding(emb_dim, num_classes)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(MLPBlock(width, emb_dim) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        check_network_input(x, t, 2, self.config["dim"], "(B, D)")
        emb = self.embed(t, y)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
