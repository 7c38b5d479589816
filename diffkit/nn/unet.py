"""A small UNet for small images (Ronneberger et al. 2015; the DDPM variant of Ho et al. 2020).

It takes ``(x, t)`` with t of shape (B,) and adds a sinusoidal timestep embedding inside every
residual block.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffkit.nn.attention import Attention
from diffkit.nn.embeddings import TimeEmbedding, check_network_input


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected embedding, GroupNorm-SiLU-conv; skip connection."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, residual."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.attn = Attention(channels, heads)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)
        return x + self.attn(seq).transpose(1, 2).reshape(b, c, h, w)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints saved when this block used torch's nn.MultiheadAttention hold one packed
        # in-projection (q; k; v) and out_proj: split them into q, kv and out
        packed = prefix + "attn.in_proj_weight"
        if packed in state_dict:
            c = self.attn.q.in_features
            for kind in ("weight", "bias"):
                w = state_dict.pop(prefix + f"attn.in_proj_{kind}")
                state_dict[prefix + f"attn.q.{kind}"] = w[:c]
                state_dict[prefix + f"attn.kv.{kind}"] = w[c:]
                state_dict[prefix + f"attn.out.{kind}"] = state_dict.pop(
                    prefix + f"attn.out_proj.{kind}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class UNet(nn.Module):
    """A small UNet (Ronneberger et al. 2015; the DDPM variant of Ho et al. 2020, App. B).

    x: (B, C, H, W) with H, W divisible by 2^(len(channel_mults) - 1); t: (B,);
    y: optional (B,) class labels when built with ``num_classes``. Returns (B, C, H, W).
    Self-attention runs at the lowest resolution.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2), num_res_blocks: int = 2,
                 emb_dim: int = 128, num_classes: int | None = None, dropout: float = 0.0,
                 attention: bool = True):
        super().__init__()
        if min(in_channels, base_channels, num_res_blocks, emb_dim) <= 0 or not channel_mults:
            raise ValueError("in_channels, base_channels, num_res_blocks, emb_dim must be positive")
        self.config = dict(in_channels=in_channels, base_channels=base_channels,
                           channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
                           emb_dim=emb_dim, num_classes=num_classes, dropout=dropout,
                           attention=attention)
        self.embed = TimeEmbedding(emb_dim, num_classes)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        widths = [base_channels * m for m in channel_mults]
        self.down, skips, c = nn.ModuleList(), [base_channels], base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, width, emb_dim, dropout))
                c = width
                skips.append(c)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, dropout),
                                  SelfAttention(c) if attention else nn.Identity(),
                                  ResBlock(c, c, emb_dim, dropout)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb_dim, dropout))
                c = width
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
                self.up.append(nn.Conv2d(c, c, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                 nn.Conv2d(c, in_channels, 3, padding=1))
        self.min_size = 2 ** (len(widths) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        check_network_input(x, t, 4, self.config["in_channels"], "(B, C, H, W)")
        if x.shape[-1] % self.min_size or x.shape[-2] % self.min_size:
            raise ValueError(f"H and W must be divisible by {self.min_size}, got {tuple(x.shape)}")
        emb = self.embed(t, y)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb) if not isinstance(layer, nn.Identity) else h
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.out(h)
