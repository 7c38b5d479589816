"""Cross-attention as Stable Diffusion's UNet computes it, written out, and a recorder of its maps.

In every transformer block of SD's UNet the image tokens (the feature map's H*W positions) attend
to the text tokens (the text encoder's per-token states): Q = x W_q from the image, K = c W_k and
V = c W_v from the text, per head softmax(Q K^T / sqrt(d)) over the *text* tokens, and the heads'
outputs concatenated and projected, softmax(Q K^T / sqrt(d)) V W_o + b_o (Vaswani et al. 2017,
eq. 1). ``cross_attention`` computes this from the weights of a diffusers ``Attention`` module
and returns the probabilities as well; ``AttentionRecorder`` is a diffusers attention processor
that computes the same thing inside a real UNet and keeps the maps of its cross-attention layers.
"""

from __future__ import annotations

import math

import torch


def _check(x, context, heads: int, dim: int) -> None:
    if not (isinstance(x, torch.Tensor) and x.ndim == 3 and isinstance(context, torch.Tensor)
            and context.ndim == 3 and x.shape[0] == context.shape[0]):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in (x, context)]
        raise ValueError(f"expected image tokens (B, N, D) and text tokens (B, M, D_text) with the "
                         f"same batch, got {shapes}")
    if dim % heads:
        raise ValueError(f"inner dimension {dim} must be divisible by heads {heads}")


def cross_attention(x: torch.Tensor, context: torch.Tensor, to_q, to_k, to_v, to_out, heads: int,
                    *, return_probs: bool = False):
    """Image tokens x (B, N, D) attend to text tokens context (B, M, D_text).

    to_q, to_k, to_v, to_out: the linear maps (modules or callables), as in diffusers'
    ``Attention`` (``attn.to_q``, ``attn.to_k``, ``attn.to_v``, ``attn.to_out[0]``).
    Returns (B, N, D_out), and the probabilities (B, heads, N, M) with return_probs.
    """
    q, k, v = to_q(x), to_k(context), to_v(context)
    _check(x, context, heads, q.shape[-1])
    q, k, v = (y.unflatten(-1, (heads, -1)).transpose(1, 2) for y in (q, k, v))  # (B, h, L, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])           # (B, heads, N, M)
    probs = scores.softmax(dim=-1)                                      # over the text tokens
    out = to_out((probs @ v).transpose(1, 2).flatten(2))
    return (out, probs) if return_probs else out


def from_diffusers(attn, x: torch.Tensor, context: torch.Tensor | None = None, **kw):
    """``cross_attention`` with the weights of a diffusers ``Attention`` module ``attn``
    (self-attention when context is None, as in diffusers)."""
    context = x if context is None else context
    return cross_attention(x, context, attn.to_q, attn.to_k, attn.to_v, attn.to_out[0],
                           attn.heads, **kw)


class AttentionRecorder:
    """A diffusers attention processor that records cross-attention maps.

    Install with ``unet.set_attn_processor(recorder)``; every call of a cross-attention layer
    (``encoder_hidden_states`` given) appends (layer name, probabilities (B, heads, N, M), or
    ``reduce`` of them) to ``maps`` while ``recording`` is True. Self-attention layers are computed the same way and
    not recorded. The output equals diffusers' own processors (checked in the tests).
    """

    def __init__(self, reduce=None):
        # reduce(probs) -> what to keep (e.g. the head mean), applied before storing: a
        # sampling run calls every layer at every step, and full maps add up
        self.maps: list[tuple[str, torch.Tensor]] = []
        self.recording, self.reduce = True, reduce
        self._names: dict[int, str] = {}

    def name_layers(self, unet) -> "AttentionRecorder":
        """Remember each attention module's name, so recorded maps say where they come from."""
        from diffusers.models.attention_processor import Attention

        self._names = {id(m): name for name, m in unet.named_modules() if isinstance(m, Attention)}
        return self

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if attention_mask is not None or attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("AttentionRecorder supports SD's attention only: no attention mask "
                             "and no query/key normalisation")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_like = hidden_states.ndim == 4
        if image_like:                                   # (B, C, H, W) -> (B, H*W, C)
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        out, probs = cross_attention(hidden_states, context, attn.to_q, attn.to_k, attn.to_v,
                                     attn.to_out[0], attn.heads, return_probs=True)
        out = attn.to_out[1](out)                        # dropout (identity in eval)
        if is_cross and self.recording:
            kept = probs.detach() if self.reduce is None else self.reduce(probs.detach())
            self.maps.append((self._names.get(id(attn), "attention"), kept.cpu()))
        if image_like:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
