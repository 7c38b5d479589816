"""Classifiers of digits: the clean judge that scores samples, and the noise-conditional
classifier whose input gradient guides sampling (chapter 7)."""

from __future__ import annotations

import torch
from torch import nn

from diffkit.nn.embeddings import TimeEmbedding


class DigitsJudge(nn.Module):
    """A small CNN classifier for 8x8 digits in [-1, 1]; ``features`` is its 128-d layer."""

    def __init__(self):
        super().__init__()
        self.config = {}
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the judge expects digits of shape (B, 1, 8, 8), got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self(x).softmax(-1)


def judge_loss(judge: DigitsJudge, batch, generator: torch.Generator) -> torch.Tensor:
    """Cross-entropy on digits with a small random shift (+-1 pixel) as augmentation."""
    x, y = batch
    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    return nn.functional.cross_entropy(judge(x), y)


class NoisyDigitsClassifier(nn.Module):
    """log p(y | x_t, t) for 8x8 digits: a small CNN whose every layer adds a projection of the
    timestep embedding (as the UNet's ResBlocks do). x: (B, 1, 8, 8), t: (B,) -> logits (B, C).

    SiLU (smooth) rather than ReLU, and average pooling, so that grad_x log p is smooth: the
    guidance signal is this network's input gradient.
    """

    def __init__(self, channels: int = 32, emb_dim: int = 64, hidden: int = 128,
                 num_classes: int = 10):
        super().__init__()
        if min(channels, emb_dim, hidden, num_classes) <= 0:
            raise ValueError("channels, emb_dim, hidden and num_classes must be positive")
        self.config = dict(channels=channels, emb_dim=emb_dim, hidden=hidden,
                           num_classes=num_classes)
        c = channels
        self.embed = TimeEmbedding(emb_dim)
        self.convs = nn.ModuleList([nn.Conv2d(1, c, 3, padding=1),
                                    nn.Conv2d(c, 2 * c, 3, padding=1),
                                    nn.Conv2d(2 * c, 2 * c, 3, padding=1)])
        self.norms = nn.ModuleList([nn.GroupNorm(8, c), nn.GroupNorm(8, 2 * c),
                                    nn.GroupNorm(8, 2 * c)])
        self.embs = nn.ModuleList([nn.Linear(emb_dim, c), nn.Linear(emb_dim, 2 * c),
                                   nn.Linear(emb_dim, 2 * c), nn.Linear(emb_dim, hidden)])
        self.fc = nn.Linear(2 * c * 16, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"x must be digits of shape (B, 1, 8, 8), got {tuple(x.shape)}")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.embed(t)
        h = x
        for i, (conv, norm, proj) in enumerate(zip(self.convs, self.norms, self.embs)):
            h = nn.functional.silu(norm(conv(h)) + proj(emb)[:, :, None, None])
            if i == 1:
                h = nn.functional.avg_pool2d(h, 2)            # 8x8 -> 4x4
        h = nn.functional.silu(self.fc(h.flatten(1)) + self.embs[3](emb))
        return self.head(h)
