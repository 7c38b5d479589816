"""The VAE of latent diffusion: a diffusers ``AutoencoderKL`` and what the library leaves out.

diffusers supplies the network (``AutoencoderKL``: encoder to a diagonal Gaussian q(z | x),
decoder back to pixels). This module adds what it does not: the training objective, the latent
scaling factor computed from data, encode/decode helpers that apply it, and the patch
discriminator of the adversarial term.

The objective (chapter 8, eqs. ``vae-elbo`` and ``vae-loss``) is the negative ELBO of the
latent-variable model p(x) = integral of p(x | z) p(z) dz with p(z) = N(0, I):

    -log p(x) <= E_q[-log p(x | z)] + beta * KL(q(z | x) || N(0, I)),

with a Laplace likelihood (the L1 distance, as in SD's autoencoder) plus a Gaussian one (MSE),
and beta = 1 giving the true bound. For q = N(mu, diag sigma^2) the KL term is closed-form
(eq. ``vae-kl``): 0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2). Both terms are sums over an
image's pixels and latent entries, as in the LDM code; dividing both by the pixel count leaves
their ratio, so beta = 1e-6 means here what it means for SD 1.x. An optional adversarial term
(a hinge-loss patch discriminator, eq. ``vae-hinge``) is the second loss SD's autoencoder was
trained with.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.func import functional_call

TINY_VAE = dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                latent_channels=4)


def make_vae(*, latent_channels: int = 4, block_out_channels=(16, 32, 32),
             layers_per_block: int = 1, norm_num_groups: int = 8) -> AutoencoderKL:
    """A tiny ``AutoencoderKL``; it downsamples by 2 ** (len(block_out_channels) - 1)."""
    levels = len(block_out_channels)
    if levels < 1 or latent_channels < 1:
        raise ValueError(f"need at least one block and one latent channel, got "
                         f"{block_out_channels}, {latent_channels}")
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=tuple(block_out_channels),
                         layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
                         sample_size=32)


def downsampling_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_images(vae: AutoencoderKL, images) -> None:
    """ValueError unless images is a float (N, C, H, W) tensor the VAE can encode."""
    f, c = downsampling_factor(vae), vae.config.in_channels
    ok = (isinstance(images, torch.Tensor) and images.is_floating_point() and images.ndim == 4
          and images.shape[1] == c and images.shape[2] % f == 0 and images.shape[3] % f == 0
          and images.shape[2] > 0 and images.shape[3] > 0)
    if not ok:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (N, {c}, H, W) in [-1, 1] with H and W "
                         f"divisible by {f}, got {got}")


def check_latents(vae: AutoencoderKL, latents) -> None:
    c = vae.config.latent_channels
    if not (isinstance(latents, torch.Tensor) and latents.is_floating_point()
            and latents.ndim == 4 and latents.shape[1] == c):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a float tensor (N, {c}, h, w), got {got}")


def _check_weight(name: str, value) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value
            or value < 0):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image (eq. ``vae-kl``), summed over its latent
    entries."""
    return 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def reconstruction_terms(vae: AutoencoderKL, images: torch.Tensor, generator=None):
    """(reconstruction, kl per pixel): one pass of x -> q(z | x) -> z ~ q -> decoded x."""
    posterior = vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(images.device)
    z = posterior.mean + posterior.std * noise
    recon = vae.decode(z).sample
    pixels = images[0].numel()
    kl = kl_to_standard_normal(posterior.mean, posterior.logvar) / pixels
    return recon, kl


def vae_loss(vae: AutoencoderKL, batch, generator=None, *, kl_weight: float = 1e-6,
             mse_weight: float = 1.0) -> torch.Tensor:
    """Negative ELBO per pixel (eq. ``vae-loss``): L1 + mse_weight * MSE + kl_weight * KL, the
    batch's mean."""
    return _negative_elbo(vae, batch, generator, kl_weight, mse_weight)[0]


def _negative_elbo(vae, batch, generator, kl_weight, mse_weight):
    """(loss of eq. vae-loss, reconstruction, images) after checking the input and weights."""
    images = batch[0] if isinstance(batch, (tuple, list)) else batch
    kl_weight = _check_weight("kl_weight", kl_weight)
    mse_weight = _check_weight("mse_weight", mse_weight)
    check_images(vae, images)
    recon, kl = reconstruction_terms(vae, images, generator)
    error = recon - images
    rec = error.abs().mean((1, 2, 3)) + mse_weight * error.pow(2).mean((1, 2, 3))
    return (rec + kl_weight * kl).mean(), recon, images


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch."""

    def __init__(self, channels: int = 32, layers: int = 2):
        super().__init__()
        blocks, width = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(8, width * 2),
                       nn.LeakyReLU(0.2)]
            width *= 2
        blocks.append(nn.Conv2d(width, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.config = dict(channels=channels, layers=layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class AdversarialVAE(nn.Module):
    """A VAE and its patch discriminator, trained together by ``adversarial_vae_loss``."""

    def __init__(self, vae: AutoencoderKL, discriminator: PatchDiscriminator):
        super().__init__()
        self.vae, self.discriminator = vae, discriminator


def adversarial_vae_loss(model: AdversarialVAE, batch, generator=None, *, kl_weight: float = 1e-6,
                         mse_weight: float = 1.0, adversarial_weight: float = 0.05) -> torch.Tensor:
    """Eq. ``vae-loss`` plus adversarial_weight * the generator's hinge term, plus the
    discriminator's hinge loss (eq. ``vae-hinge``).

    One optimiser updates both players at once: the discriminator's hinge loss sees detached
    reconstructions, and the VAE's adversarial term runs the discriminator with detached
    weights (``functional_call``), so each player's gradient comes only from its own loss.
    """
    adversarial_weight = _check_weight("adversarial_weight", adversarial_weight)
    elbo, recon, images = _negative_elbo(model.vae, batch, generator, kl_weight, mse_weight)
    frozen = {k: v.detach() for k, v in model.discriminator.named_parameters()}
    fooled = -functional_call(model.discriminator, frozen, (recon,)).mean()
    real, fake = model.discriminator(images), model.discriminator(recon.detach())
    disc = F.relu(1 - real).mean() + F.relu(1 + fake).mean()   # hinge loss (eq. vae-hinge)
    return elbo + adversarial_weight * fooled + disc


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 256,
               seed: int = 0) -> float:
    """Standard deviation of posterior samples z ~ q(z | x) over the images (all entries)."""
    check_images(vae, images)
    g = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    total, total_sq, count = 0.0, 0.0, 0
    for chunk in images.split(batch_size):
        post = vae.encode(chunk.to(device)).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        total += z.double().sum().item()
        total_sq += z.double().pow(2).sum().item()
        count += z.numel()
    mean = total / count
    return (total_sq / count - mean ** 2) ** 0.5


def set_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, **kw) -> float:
    """Compute SD's scaling factor the way 0.18215 was chosen (1 / std of the latents over the
    data) and store it in the config, where ``save_pretrained`` and the pipelines read it."""
    factor = 1.0 / latent_std(vae, images, **kw)
    # assigning vae.config.scaling_factor would not reach save_pretrained (a frozen dict)
    vae.register_to_config(scaling_factor=factor)
    return factor


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, *, generator=None, sample: bool = True,
           batch_size: int = 256) -> torch.Tensor:
    """Scaled latents scaling_factor * z of images (N, 3, H, W) in [-1, 1]; z ~ q(z | x), or
    its mean with sample=False. These are what the latent diffusion model of chapter 9 sees."""
    check_images(vae, images)
    device = next(vae.parameters()).device
    out = []
    for chunk in images.split(batch_size):
        post = vae.encode(chunk.to(device)).latent_dist
        z = post.mean
        if sample:
            z = z + post.std * torch.randn(z.shape, generator=generator).to(device)
        out.append(z * vae.config.scaling_factor)
    return torch.cat(out)


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor, *, batch_size: int = 256,
           clamp: bool = True) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents (divided by scaling_factor first, as SD does)."""
    check_latents(vae, latents)
    device = next(vae.parameters()).device
    out = [vae.decode(chunk.to(device) / vae.config.scaling_factor).sample
           for chunk in latents.split(batch_size)]
    images = torch.cat(out)
    return images.clamp(-1, 1) if clamp else images


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, *, sample: bool = False,
                generator=None, batch_size: int = 256) -> torch.Tensor:
    """decode(encode(images)): the round trip every latent diffusion image goes through."""
    return decode(vae, encode(vae, images, sample=sample, generator=generator,
                              batch_size=batch_size), batch_size=batch_size)
