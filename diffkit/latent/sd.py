"""Stable Diffusion on diffkit's own pieces: one loader, and the text-to-image loop written out.

``load_pipeline`` is the one way the book gets a pipeline: with no argument the book's tiny model
(``checkpoints/shapes-sd``), or ``DIFFKIT_SD_MODEL`` when the reader sets it, or any diffusers
folder or hub id, choosing the pipeline class from its ``model_index.json``.

``text_to_image`` is what ``StableDiffusionPipeline.__call__`` does, in diffkit's vocabulary:
encode the prompts and the empty prompt with the pipeline's text encoder (SD 1.x's negative
prompt is the encoded empty string, not zeros), draw the initial latent x_T ~ N(0, I) (in sigma
units x = sqrt(1 + sigma_max^2) x_T), wrap the UNet as a denoiser D(x, sigma) with the text as
a keyword argument and classifier-free guidance as a wrapper, run a diffkit sampler on the
scheduler's noise levels, and decode with 1 / scaling_factor. The tests check it equals the
pipeline on the same model, prompt and seed.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch

from diffkit import checkpoints, config
from diffkit.diffusion.contract import draw_noise
from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.diffusion.samplers import sample_dpmpp_2m, sample_euler, sample_euler_ancestral
from diffkit.latent.vae import downsampling_factor

PIPELINE_CLASSES = checkpoints.PIPELINE_CLASSES
SAMPLERS = {"euler": sample_euler, "euler_ancestral": sample_euler_ancestral,
            "dpmpp_2m": sample_dpmpp_2m}
TINY_SD = "shapes-sd"
# the diffusers scheduler each diffkit sampler reproduces (what compare_with_pipeline accepts)
SCHEDULER_SAMPLERS = {"EulerDiscreteScheduler": "euler", "DPMSolverMultistepScheduler": "dpmpp_2m",
                      "EulerAncestralDiscreteScheduler": "euler_ancestral"}


def load_pipeline(name_or_path: str | None = None, *, device=None, torch_dtype=None):
    """A diffusers pipeline: the book's tiny SD by default, else ``DIFFKIT_SD_MODEL`` or the
    folder / hub id given. Progress bars off; moved to ``device`` (default: config.device())."""
    import diffusers

    source = name_or_path or config.sd_model() or str(checkpoints.checkpoint_dir(TINY_SD))
    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        name = json.loads(index.read_text()).get("_class_name")
        if name not in PIPELINE_CLASSES:
            raise ValueError(f"{path} holds a {name}; expected one of {PIPELINE_CLASSES}")
        cls = getattr(diffusers, name)
    elif source.count("/") == 1 and not path.exists():   # a hub id: the hub's index decides
        cls = diffusers.DiffusionPipeline
    else:
        raise ValueError(f"{source!r} is neither a pipeline folder nor a hub id (owner/name); "
                         f"train the tiny model with `python -m diffkit.train {TINY_SD}`")
    pipe = cls.from_pretrained(source, torch_dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or config.device())


@torch.no_grad()
def encode_prompt(pipe, prompts: list[str]) -> torch.Tensor:
    """Per-token text states (B, L, D) of the pipeline's text encoder, padded to its length."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    tokenizer = pipe.tokenizer
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=False, return_tensors="pt").input_ids
    if ids.shape[1] > tokenizer.model_max_length:
        raise ValueError(f"a prompt has {ids.shape[1]} tokens; the tokenizer allows "
                         f"{tokenizer.model_max_length}")
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


class TextGuidance:
    """Classifier-free guidance on text: D_w = D(x; uncond) + w (D(x; cond) - D(x; uncond)).

    ``denoiser(x, sigma, encoder_hidden_states=...)``; both halves run as one batch, the
    unconditional first (as the pipeline does). w <= 1 runs the conditional model alone, as
    ``StableDiffusionPipeline`` does (its ``do_classifier_free_guidance`` is w > 1).
    """

    def __init__(self, denoiser, cond: torch.Tensor, uncond: torch.Tensor, scale: float):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or scale < 0:
            raise ValueError(f"guidance_scale must be a non-negative number, got {scale!r}")
        self.denoiser, self.cond, self.uncond, self.scale = denoiser, cond, uncond, float(scale)

    def __call__(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        if self.scale <= 1:
            return self.denoiser(x, sigma, encoder_hidden_states=self.cond)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(len(x))
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             encoder_hidden_states=torch.cat([self.uncond, self.cond]))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


def prediction_type(pipe) -> str:
    """What the pipeline's UNet predicts: "epsilon", "v_prediction" or "sample"."""
    return pipe.scheduler.config.get("prediction_type", "epsilon")


def unet_denoiser(pipe, model=None) -> DiscreteTimeDenoiser:
    """The pipeline's UNet, or ``model(x_t, t, encoder_hidden_states)`` in its place (a UNet
    with a ControlNet), as D(x, sigma; encoder_hidden_states) on the scheduler's table."""
    def unet(x_t, t, encoder_hidden_states):
        return pipe.unet(x_t, t, encoder_hidden_states=encoder_hidden_states).sample

    return DiscreteTimeDenoiser(model or unet, pipe.scheduler.alphas_cumprod,
                                prediction=prediction_type(pipe))


def _check_size(pipe, height: int, width: int) -> None:
    factor = downsampling_factor(pipe.vae)
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
            raise ValueError(f"{name} must be a positive multiple of the VAE factor {factor}, "
                             f"got {value!r}")


def _timesteps(pipe, steps: int) -> list[int]:
    # the discretisation is the scheduler's (its spacing and offset differ between schedulers:
    # DPM-Solver's "leading" divides T by steps + 1, Euler's by steps); the steps are diffkit's
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    pipe.scheduler.set_timesteps(steps)
    return [int(round(float(t))) for t in pipe.scheduler.timesteps]


def _denoise(pipe, prompts, x, timesteps, guidance_scale, sampler, generator, denoiser=None):
    """Run a diffkit sampler from x (sigma units, at timesteps[0]) to sigma = 0 and decode;
    ``denoiser``: D(x, sigma; encoder_hidden_states), default the pipeline's UNet."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    cond = encode_prompt(pipe, prompts)
    uncond = encode_prompt(pipe, [""] * len(prompts))
    denoiser = denoiser or unet_denoiser(pipe)
    guided = TextGuidance(denoiser, cond, uncond, guidance_scale)
    sigmas = denoiser.sigmas_for_timesteps(timesteps)
    x = x(sigmas[0])
    latents = SAMPLERS[sampler](guided, x, sigmas.to(x.device), generator=generator)
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return images.clamp(-1, 1)


@torch.no_grad()
def text_to_image(pipe, prompts: list[str], *, steps: int = 20, guidance_scale: float = 7.5,
                  sampler: str = "dpmpp_2m", height: int | None = None, width: int | None = None,
                  generator: torch.Generator | None = None, denoiser=None) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for ``prompts``, with a diffkit sampler ("euler",
    "euler_ancestral" or "dpmpp_2m") on the timesteps the pipeline's scheduler would use (its
    spacing and offset).
    The initial noise x_T ~ N(0, I) is drawn from ``generator`` as the pipeline draws it.
    ``denoiser``: another D(x, sigma; encoder_hidden_states) on the scheduler's table (a UNet
    with a ControlNet: :mod:`diffkit.latent.controlnet`); default the pipeline's UNet."""
    factor = downsampling_factor(pipe.vae)
    size = pipe.unet.config.sample_size * factor
    height, width = height or size, width or size
    _check_size(pipe, height, width)
    timesteps = _timesteps(pipe, steps)
    shape = (len(prompts), pipe.unet.config.in_channels, height // factor, width // factor)
    x_T = draw_noise(torch.empty(shape, device=pipe.unet.device, dtype=pipe.unet.dtype),
                     generator)
    # x_sigma = sqrt(1 + sigma^2) x_T: the pure-noise start in sigma units
    start = lambda sigma: x_T * (1 + sigma ** 2).sqrt().to(x_T.dtype)   # noqa: E731
    return _denoise(pipe, prompts, start, timesteps, guidance_scale, sampler, generator,
                    denoiser)


@torch.no_grad()
def image_to_image(pipe, images: torch.Tensor, prompts: list[str], *, strength: float = 0.6,
                   steps: int = 20, guidance_scale: float = 7.5, sampler: str = "dpmpp_2m",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """SDEdit (Meng et al. 2022): encode ``images`` (B, 3, H, W) in [-1, 1], noise the latent
    to the level of the last ``strength`` fraction of the schedule, x = z_0 + sigma eps, and
    denoise it under ``prompts``. strength 1 starts from (almost) pure noise, small strength
    keeps the input. The latent sample and then eps come from ``generator``, in the order of
    ``StableDiffusionImg2ImgPipeline``, which this equals on the same inputs."""
    from diffkit.latent.vae import encode

    if (isinstance(strength, bool) or not isinstance(strength, numbers.Real)
            or not 0 < strength <= 1):
        raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    timesteps = _timesteps(pipe, steps)
    kept = min(int(steps * strength), steps)      # the pipeline's get_timesteps
    if kept == 0:
        raise ValueError(f"strength {strength} x {steps} steps leaves no step; raise either")
    z_0 = encode(pipe.vae, images.to(pipe.vae.device, pipe.vae.dtype), generator=generator)
    eps = draw_noise(z_0, generator)
    start = lambda sigma: z_0 + sigma.to(z_0.dtype) * eps              # noqa: E731
    return _denoise(pipe, prompts, start, timesteps[steps - kept:], guidance_scale, sampler,
                    generator)


@torch.no_grad()
def compare_with_pipeline(pipe, prompts: list[str], *, steps: int, guidance_scale: float,
                          seed: int = 0):
    """(diffkit's images, the pipeline's, max abs difference in [0, 1] pixels) on the same
    prompts and seed, with the sampler that matches the pipeline's scheduler: the check that
    ``text_to_image`` is ``StableDiffusionPipeline.__call__`` on any SD model."""
    names = SCHEDULER_SAMPLERS
    scheduler = type(pipe.scheduler).__name__
    if scheduler not in names:
        raise ValueError(f"the pipeline's scheduler is {scheduler}; expected one of "
                         f"{sorted(names)} (set pipe.scheduler to one of them)")
    generator = torch.Generator().manual_seed(seed)
    ours = text_to_image(pipe, prompts, steps=steps, guidance_scale=guidance_scale,
                         sampler=names[scheduler], generator=generator)
    theirs = pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    theirs = torch.as_tensor(theirs).to(ours.device) * 2 - 1
    return ours, theirs, float(((ours - theirs) / 2).abs().max())
