"""Diffusion mathematics on the denoiser contract, with no weights: schedules, the DDPM and DDIM processes, score matching and SDEs, the exact Gaussian mixture, samplers and guidance wrappers."""
