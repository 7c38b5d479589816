"""Guidance as denoiser wrappers: classifier guidance and classifier-free guidance (chapter 7).

Every object here is a denoiser ``D(x, sigma, *, y, ...) -> x0_hat`` on the contract of
:mod:`diffkit.diffusion.samplers` (x = x_sigma = x_0 + sigma eps), so every sampler runs guided: pass the
labels with ``extra_args={"y": y}``. By Tweedie's formula (chapter 4) the score, the noise
prediction and the denoiser are one function in three units,

    s = grad_x log p_sigma(x) = (D - x) / sigma^2,    eps_hat = (x - D) / sigma = -sigma s,

so adding a field g to the score is, in the three units,

    s' = s + w g    <=>    eps' = eps_hat - w sigma g    <=>    D' = D + w sigma^2 g.      (*)

Classifier guidance (Dhariwal & Nichol 2021, sec. 4, Algorithms 1-2) takes g = grad_x log
p_phi(y | x, sigma) from a classifier trained on *noised* inputs. Their DDIM form
eps_hat - sqrt(1 - abar) grad_{x_t} log p_phi is (*) in x_t units: grad_{x_t} = grad_x / sqrt(abar)
and sqrt(1 - abar) / sqrt(abar) = sigma. With the exact noisy classifier and w = 1 the result is
the exact conditional denoiser, by Bayes: grad log p(x | y) = grad log p(x) + grad log p(y | x).

Classifier-free guidance (Ho & Salimans 2022, eq. 6, whose w is our w - 1) combines a
conditional and an unconditional prediction of one network trained with label dropout,

    eps_w = eps_u + w (eps_c - eps_u),   D_w = D_u + w (D_c - D_u),   s_w = s_u + w (s_c - s_u):

the maps between the units are affine with the same coefficients for both terms, so the
combination reads the same in all three. With exact models s_c - s_u = grad log p_sigma(y | x):
CFG is classifier guidance with the implicit classifier p(x | y) p(y) / p(x).

:class:`LabelledMixture` gives both exactly for a Gaussian mixture whose components carry class
labels. :class:`NoisyDigitsClassifier` is the network of the ``digits-classifier-noisy`` recipe.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.diffusion.gmm import GaussianMixture


def _scale(value) -> float:
    """A guidance scale: a finite float >= 0 (w = 0: unconditional, w = 1: conditional)."""
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_scale must be a number >= 0, got {value!r}") from None
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"guidance_scale must be finite and >= 0, got {value!r}")
    return w


def _labels(y, x: torch.Tensor, num_classes: int | None, *, allow: tuple[int, ...] = ()):
    """Class labels as a long tensor (B,): an int is broadcast; values in [0, num_classes)."""
    if y is None:
        raise ValueError("guidance needs class labels: pass y, an int or an integer tensor (B,)")
    if isinstance(y, bool):
        raise ValueError(f"y must be an int or an integer tensor (B,), got {y!r}")
    if isinstance(y, numbers.Integral):
        y = torch.full((x.shape[0],), int(y), dtype=torch.long, device=x.device)
    if not isinstance(y, torch.Tensor) or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must be an int or an integer tensor (B,), got {y!r}")
    y = y.to(x.device).long().reshape(-1) if y.ndim == 0 else y.to(x.device).long()
    if y.ndim != 1 or y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"y must have shape (B={x.shape[0]},), got {tuple(y.shape)}")
    y = y.expand(x.shape[0])
    if num_classes is not None:
        allowed = torch.tensor(allow, dtype=torch.long, device=y.device)
        bad = ((y < 0) | (y >= num_classes)) & ~torch.isin(y, allowed)
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {num_classes})"
                             + (f" or be {list(allow)}" if allow else "")
                             + f", got {sorted(set(y[bad].tolist()))}")
    return y


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as (B,) on x's device and dtype (from a float, a 0-d or a (B,) tensor)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
    if sigma.numel() not in (1, x.shape[0]):
        raise ValueError(f"sigma must be 0-d or of shape (B={x.shape[0]},), "
                         f"got {sigma.numel()} values")
    return sigma.expand(x.shape[0])


class ClassifierGuidance:
    """D_w(x, sigma; y) = D(x, sigma) + w sigma^2 grad_x log p(y | x, sigma)  (eq. (*) above).

    ``denoiser(x, sigma, **kwargs) -> x0_hat`` is unconditional (y is not passed to it);
    ``classifier(x, sigma) -> logits (B, C)`` sees the same x = x_sigma and noise level (wrap a
    network over (x_t, t) with :class:`SigmaClassifier`; :meth:`LabelledMixture.classifier` is
    exact). ``scale`` is w, overridden per call by ``guidance_scale``. Gradients are taken with
    autograd inside ``torch.enable_grad()``, since the samplers run under ``no_grad``.
    Dhariwal & Nichol 2021, sec. 4.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor],
                 classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 scale: float = 1.0):
        self.denoiser, self.classifier, self.scale = denoiser, classifier, _scale(scale)

    def grad_log_prob(self, x: torch.Tensor, sigma, y) -> torch.Tensor:
        """grad_x log p(y | x, sigma) for x (B, ...), labels y (B,): (B, ...)."""
        sigma = _per_sample(sigma, x)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.classifier(xg, sigma)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"classifier must return logits (B={x.shape[0]}, C), "
                                 f"got {tuple(logits.shape)}")
            y = _labels(y, x, logits.shape[1])
            log_p = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).sum()
            grad, = torch.autograd.grad(log_p, xg)
        return grad

    def __call__(self, x: torch.Tensor, sigma, *, y=None, guidance_scale=None,
                 **kwargs) -> torch.Tensor:
        w = self.scale if guidance_scale is None else _scale(guidance_scale)
        sigma = _per_sample(sigma, x)
        x0_hat = self.denoiser(x, sigma, **kwargs)
        if w == 0:
            _labels(y, x, None)   # still insist on labels: a missing y is a caller's bug
            return x0_hat
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x0_hat + w * s ** 2 * self.grad_log_prob(x, sigma, y).to(x0_hat.dtype)


class ClassifierFreeGuidance:
    """D_w = D(x, sigma; y=null) + w (D(x, sigma; y) - D(x, sigma; y=null)), Ho & Salimans 2022.

    ``denoiser(x, sigma, y=labels, **kwargs)`` is one conditional model that also takes the
    ``null_label`` (for :class:`diffkit.nn.unet.UNet` built with ``num_classes=C`` it is C). The
    conditional and unconditional halves run as one batch of 2B. w = 0 is the unconditional
    model, w = 1 the conditional one, w > 1 extrapolates past it.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], null_label: int,
                 scale: float = 1.0):
        if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
            raise ValueError(f"null_label must be an int >= 0, got {null_label!r}")
        self.denoiser, self.null_label, self.scale = denoiser, null_label, _scale(scale)

    def __call__(self, x: torch.Tensor, sigma, *, y=None, guidance_scale=None,
                 **kwargs) -> torch.Tensor:
        w = self.scale if guidance_scale is None else _scale(guidance_scale)
        y = _labels(y, x, self.null_label + 1)
        sigma = _per_sample(sigma, x)
        null = torch.full_like(y, self.null_label)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             y=torch.cat([y, null]), **kwargs)
        x0_cond, x0_uncond = both.chunk(2)
        return x0_uncond + w * (x0_cond - x0_uncond)


class SigmaClassifier(DiscreteTimeDenoiser):
    """Wrap ``net(x_t, t) -> logits`` (trained on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps)
    as ``classifier(x, sigma) -> logits`` on x = x_sigma, with the network input of
    :class:`DiscreteTimeDenoiser` (``model_input``): x_t = x / sqrt(sigma^2 + 1) and t = the
    fractional timestep of sigma (log-sigma interpolation, from float64 sigma).
    alphas_cumprod: (T,) of the schedule the net was trained on.
    """

    def __call__(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        x_t, t, _ = self.model_input(x, sigma)
        return self.model(x_t, t, **kwargs)


class LabelledMixture:
    """A :class:`GaussianMixture` whose component k carries class label ``labels[k]``.

    Everything guidance needs is exact: the class-conditional mixtures p(x | y) (the class's
    components, weights renormalised), the noisy classifier log p_sigma(y | x), and conditional
    or unconditional denoisers. As a denoiser, ``mix(x, sigma, y=labels)``: y = ``null_label``
    (= number of classes) or None means unconditional, so CFG runs on it unchanged.
    """

    def __init__(self, gmm: GaussianMixture, labels):
        labels = torch.as_tensor(labels)
        if labels.shape != (gmm.K,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor of shape (K,) = ({gmm.K},), "
                             f"got {labels!r}")
        labels = labels.long()
        C = int(labels.max()) + 1 if labels.numel() else 0
        if int(labels.min()) < 0 or set(labels.tolist()) != set(range(C)):
            raise ValueError(f"labels must use every class 0..C-1 at least once, got "
                             f"{labels.tolist()}")
        self.gmm, self.labels, self.num_classes, self.null_label = gmm, labels, C, C
        self.conditionals = [GaussianMixture(gmm.means[labels == c], gmm.stds[labels == c],
                                             gmm.weights[labels == c], dtype=gmm.means.dtype)
                             for c in range(C)]
        self.class_prior = torch.stack([gmm.weights[labels == c].sum() for c in range(C)])

    def __repr__(self) -> str:
        return f"LabelledMixture(K={self.gmm.K}, D={self.gmm.D}, classes={self.num_classes})"

    def _each_class(self, fn, x: torch.Tensor, sigma, y) -> torch.Tensor:
        """fn(mixture, x, sigma) per sample: the class's mixture, or the full one for null."""
        y = torch.full((x.shape[0],), self.null_label, device=x.device) if y is None \
            else _labels(y, x, self.num_classes, allow=(self.null_label,))
        sigma = _per_sample(sigma, x)
        out = None
        for c in y.unique().tolist():
            rows = y == c
            mix = self.gmm if c == self.null_label else self.conditionals[c]
            part = fn(mix, x[rows], sigma[rows])
            out = x.new_zeros((x.shape[0], *part.shape[1:])) if out is None else out
            out[rows] = part
        return out

    def denoise(self, x: torch.Tensor, sigma, *, y=None) -> torch.Tensor:
        """E[x_0 | x_sigma = x, y]: (B, D); y None or null_label: unconditional."""
        return self._each_class(lambda m, xs, s: m.denoise(xs, s), x, sigma, y)

    def __call__(self, x: torch.Tensor, sigma, *, y=None) -> torch.Tensor:
        return self.denoise(x, sigma, y=y)

    def score(self, x: torch.Tensor, sigma, *, y=None) -> torch.Tensor:
        """grad_x log p_sigma(x | y): (B, D)."""
        return self._each_class(lambda m, xs, s: m.score(xs, s), x, sigma, y)

    def log_prob(self, x: torch.Tensor, sigma=0.0, *, y=None) -> torch.Tensor:
        """log p_sigma(x | y) (or log p_sigma(x) for y None / null): (B,)."""
        return self._each_class(lambda m, xs, s: m.log_prob(xs, s), x, sigma, y)

    def classifier(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """The exact noisy classifier log p_sigma(y | x) for every y: (B, C), rows logsumexp 0.

        log p(y | x) = log pi_y + log p_sigma(x | y) - log p_sigma(x) (Bayes); differentiable.
        """
        log_joint = torch.stack([self.class_prior[c].to(x.dtype).log()
                                 + self.conditionals[c].log_prob(x, sigma)
                                 for c in range(self.num_classes)], dim=1)
        return log_joint - torch.logsumexp(log_joint, dim=1, keepdim=True)

    def tilted_log_prob(self, x: torch.Tensor, y: int, w: float) -> torch.Tensor:
        """Unnormalised log of p(x) p(y | x)^w at sigma = 0, = (1 - w) log p(x) + w log p(x, y):
        the density guidance at scale w is often said to sample. (B,)."""
        w = _scale(w)
        y = int(_labels(y, x[:1], self.num_classes)[0])
        return self.gmm.log_prob(x) + w * self.classifier(x)[:, y]

    def sample(self, n: int, y: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws from p(x | y): (n, D)."""
        dummy = self.gmm.means[:1]
        return self.conditionals[int(_labels(y, dummy, self.num_classes)[0])].sample(n, generator)
