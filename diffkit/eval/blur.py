"""Blur, measured: PSNR and the power a reconstruction keeps in each spatial-frequency band.

A blurred image is one whose high spatial frequencies have lost energy. The radially averaged
power spectrum makes that a number: take the 2-D DFT of each channel (its mean removed), bin
the power |F(k)|^2 by the radius |k| of the frequency in cycles per pixel (0 to the Nyquist
limit 0.5; the corners beyond 0.5 are left out, so every band is a full ring), and compare the
reconstruction's power per band with the input's. A ratio of 1 keeps the band; 0 erases it.
A patch is not periodic, and the DFT sees the jump where its right edge wraps to its left as
a sharp edge that puts power into every band, blurred or not; a Hann window, applied before
the transform, fades the patch to zero at its border and removes that leak.
"""

from __future__ import annotations

import numbers

import torch


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.shape != y.shape \
            or x.ndim != 4:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in (x, y)]
        raise ValueError(f"expected two image tensors (N, C, H, W) of one shape, got {shapes}")


def psnr(reconstruction: torch.Tensor, reference: torch.Tensor, *,
         data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, 10 log10(range^2 / MSE); images in [-1, 1]."""
    _check_pair(reconstruction, reference)
    mse = (reconstruction.double() - reference.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-20))


def band_edges(n_bands: int) -> torch.Tensor:
    """n_bands + 1 radii from 0 to 0.5 cycles per pixel, equally spaced."""
    if isinstance(n_bands, bool) or not isinstance(n_bands, numbers.Integral) or n_bands < 1:
        raise ValueError(f"n_bands must be a positive integer, got {n_bands!r}")
    return torch.linspace(0, 0.5, n_bands + 1, dtype=torch.float64)


def _radius(h: int, w: int) -> torch.Tensor:
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.fftfreq(w, dtype=torch.float64).view(1, -1)
    return (fy ** 2 + fx ** 2).sqrt()


def band_power(images: torch.Tensor, n_bands: int = 8) -> torch.Tensor:
    """Power per frequency band (N, n_bands), summed over channels and the band's frequencies.

    The DC term (each channel's mean) is excluded: it carries brightness, not detail. Each
    channel, its mean removed, is multiplied by a 2-D Hann window first (see the module's note).
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or min(images.shape[2:]) < 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (N, C, H, W) with H, W >= 4, got {got}")
    x = images.double()
    h, w = images.shape[2:]
    window = (torch.hann_window(h, periodic=False, dtype=torch.float64).view(-1, 1)
              * torch.hann_window(w, periodic=False, dtype=torch.float64).view(1, -1))
    x = (x - x.mean((2, 3), keepdim=True)) * window
    power = torch.fft.fft2(x).abs().pow(2).sum(1)                      # (N, H, W)
    radius, edges = _radius(*images.shape[2:]), band_edges(n_bands)
    band = torch.bucketize(radius, edges[1:-1], right=True)            # 0 .. n_bands - 1
    inside = (radius > 0) & (radius <= 0.5)
    out = torch.zeros(len(x), n_bands, dtype=torch.float64)
    out.index_add_(1, band[inside], power[:, inside])
    return out


def band_energy_ratio(reconstruction: torch.Tensor, reference: torch.Tensor,
                      n_bands: int = 8) -> torch.Tensor:
    """Power the reconstruction keeps per band, relative to the reference's (n_bands,), pooled
    over the images (sum of power over the sum), so near-empty bands of one image do not
    dominate."""
    _check_pair(reconstruction, reference)
    return band_power(reconstruction, n_bands).sum(0) / band_power(reference, n_bands).sum(0)


def band_error_ratio(reconstruction: torch.Tensor, reference: torch.Tensor,
                     n_bands: int = 8) -> torch.Tensor:
    """Power of the error per band relative to the reference's (n_bands,): 0 is exact, 1 is an
    error as large as the band itself (a band erased to zero gives exactly 1)."""
    _check_pair(reconstruction, reference)
    return (band_power(reconstruction - reference, n_bands).sum(0)
            / band_power(reference, n_bands).sum(0))


def band_centres(n_bands: int = 8) -> torch.Tensor:
    edges = band_edges(n_bands)
    return (edges[1:] + edges[:-1]) / 2
