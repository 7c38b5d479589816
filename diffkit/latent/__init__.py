"""Latent-space models built on diffusers parts (the VAE, Stable Diffusion, SDXL, ControlNet; chapters 8-13)."""
