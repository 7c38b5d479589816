"""Multi-head attention, written out once: self-attention in the UNet and the BLIP family, and
cross-attention (queries from one sequence, keys and values from another) for text conditioning.

softmax(Q K^T / sqrt(d_head)) V per head (Vaswani et al. 2017, eq. 1), with Q = x W_q and
K, V = context W_k, context W_v; ``context`` defaults to x (self-attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention of x (B, L, D) over context (B, M, D_context), returning (B, L, D).

    mask: bool, broadcastable to (B, heads, L, M); True where a query may see a key.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)      # keys and values in one matrix
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        k, v = self.kv(context).chunk(2, -1)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(k), split(v), attn_mask=mask)
        return self.out(y.transpose(1, 2).flatten(2))
