"""Benchmarks: ``python -m diffkit.bench NAME`` prints timings and records them in benchmarks/.

Speed is measured here, never asserted in tests. Each comparison runs its baseline in the same
process, on the same model and inputs, and is reported as a ratio, so the figure means the same
on a laptop and on CI. Names: ``train-throughput`` (every recipe's steps per second and projected
training time), ``ddpm-sampling`` (the 1000-step ancestral loop vs diffusers' ``DDPMScheduler``),
``samplers`` (Euler, Euler-ancestral, Heun, DPM-Solver++(2M), DDIM at equal NFE vs diffusers'
loops), ``latent`` (a training step on pixels vs latents: time, FLOPs, activation memory), ``sd``
(the tiny SD: diffkit's loop vs ``StableDiffusionPipeline.__call__``), ``control`` (the control
models over prompt-only sampling) and ``lora`` (LoRA, LoCon, LoHa: training step, UNet call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from diffkit import checkpoints, config, recipes
from diffkit.diffusion import ddpm
from diffkit.diffusion.schedules import make_schedule
from diffkit.nn import unet

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHES: dict[str, Callable] = {}


def bench(fn):
    BENCHES[fn.__name__.replace("_", "-")] = fn
    return fn


def timed(fn: Callable, repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@bench
def train_throughput(device: torch.device, quick: bool) -> dict:
    """Every recipe's training, timed at two short lengths, projected to its full length; and
    the rate of two of them on 1, 2, ... processes (:mod:`diffkit.train.throughput`).

    Each recipe's own ``train`` function runs k1 and then k2 optimiser steps (fresh state each
    time); the difference gives the cost per step with the set-up (data generation, model
    building) removed, and ``projected_train_minutes`` = set-up + the recipe's steps x per-step
    cost. The final measurement a recipe runs after training (e.g. sampling 1000 digits) is not
    included: the checkpoints' cards record it as ``measure_seconds``. ``NAME@N-processes``:
    steps per second (of the recipe's whole batch) on N processes launched by ``accelerate``,
    N up to the GPUs here, or 1 and 2 on a CPU of two cores or more.
    """
    from diffkit.train import throughput

    k1, k2 = (5, 25) if quick else (20, 120)
    out = {name: throughput.rate(name, device, k1, k2) for name in recipes.RECIPES}
    most = torch.cuda.device_count() if device.type == "cuda" else min(2, os.cpu_count() or 1)
    names = ["toy2d-ddpm"] if quick else ["digits-ddpm", "shapes-sd"]
    out.update(throughput.per_process_count(names, device, list(range(1, most + 1)), k1, k2))
    return out


def _digits_model(device) -> torch.nn.Module:
    try:
        model, _ = checkpoints.load_model("digits-ddpm", device=device)
    except ValueError:  # no checkpoint yet: timing does not depend on the weights
        model = unet.UNet(**recipes.DIGITS_UNET).to(device).eval()
    return model


@bench
def ddpm_sampling(device: torch.device, quick: bool) -> dict:
    """The ancestral loop: diffkit's ``p_step`` vs ``DDPMScheduler.step``, same model and batch."""
    from diffusers import DDPMScheduler

    batch, T = (16, 100) if quick else (64, 1000)
    schedule = make_schedule("linear", T)
    table = schedule.to(device=device, dtype=torch.float32)
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(T)
    shape = (batch, 1, 8, 8)
    unet = _digits_model(device)
    models = {"unet": unet, "zero": lambda x, t: torch.zeros_like(x)}
    out = {}
    for model_name, model in models.items():
        @torch.no_grad()
        def ours():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(device)
            for step in reversed(range(T)):
                t = torch.full((batch,), step, device=device)
                noise = torch.randn(shape, generator=g).to(device)
                x = ddpm.p_step(table, model(x, t), x, t, noise)
            return x

        @torch.no_grad()
        def theirs():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=g).to(device)
            for step in scheduler.timesteps:
                t = torch.full((batch,), int(step), device=device)
                x = scheduler.step(model(x, t), step, x, generator=g).prev_sample
            return x

        repeats = 1 if (model_name == "unet" and not quick) else 3
        a, b = timed(ours, repeats), timed(theirs, repeats)
        out[model_name] = {"diffkit_seconds": a, "diffusers_seconds": b, "batch": batch,
                           "ratio_diffkit_over_diffusers": a / b, "steps": T}
    return out


@bench
def samplers(device: torch.device, quick: bool) -> dict:
    """Time per image of each sampler at equal NFE: diffkit's sampler vs diffusers' scheduler loop.

    Same network (the digits UNet; ``zero``, a model returning zeros, isolates the per-step
    overhead), same start noise, "trailing" timesteps (where tests/test_samplers.py shows parity);
    the two loops run alternately, best of 5 each.
    Heun spends 2 evaluations per step but 1 on the last, so it gets 19 where the others get 20.
    ``max_abs_diff`` (UNet only) checks that both loops computed the same samples.
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
    )

    from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
    from diffkit.diffusion.samplers import (
        sample_ddim,
        sample_dpmpp_2m,
        sample_euler,
        sample_euler_ancestral,
        sample_heun,
        spaced_timesteps,
    )

    batch, nfe = (16, 10) if quick else (200, 20)
    schedule = make_schedule("linear")
    config_ = dict(num_train_timesteps=schedule.T, beta_schedule="linear", beta_start=1e-4,
                   beta_end=0.02, timestep_spacing="trailing")
    cases = {  # name: (diffkit sampler, diffusers scheduler, extra config, steps, sigma space?)
        "euler": (sample_euler, EulerDiscreteScheduler, {}, nfe, True),
        "euler_ancestral": (sample_euler_ancestral, EulerAncestralDiscreteScheduler, {}, nfe, True),
        "heun": (sample_heun, HeunDiscreteScheduler, {}, nfe // 2, True),
        "dpmpp_2m": (sample_dpmpp_2m, DPMSolverMultistepScheduler,
                     dict(algorithm_type="dpmsolver++", solver_order=2), nfe, False),
        "ddim": (sample_ddim, DDIMScheduler, dict(clip_sample=False), nfe, False),
    }
    shape = (batch, 1, 8, 8)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    unet = _digits_model(device)
    models = {"unet": unet, "zero": lambda x, t: torch.zeros_like(x)}
    out = {}
    for model_name, model in models.items():
        for name, (sampler, cls, extra, steps, sigma_space) in cases.items():
            denoiser = DiscreteTimeDenoiser(model, schedule.alphas_cumprod)
            sigmas = denoiser.sigmas_for_timesteps(spaced_timesteps(steps, schedule.T, "trailing"))
            sigmas = sigmas.to(device)
            scheduler = cls(**config_, **extra)
            calls = []

            def counted(x, t):
                calls.append(1)
                return model(x, t.reshape(-1).expand(x.shape[0]).to(x.device))

            @torch.no_grad()
            def ours():
                return sampler(denoiser, noise * sigmas[0].float(), sigmas,
                               generator=torch.Generator().manual_seed(1))

            @torch.no_grad()
            def theirs():
                scheduler.set_timesteps(steps)   # a pipeline call resets the scheduler's state
                g = torch.Generator().manual_seed(1)
                kw = {"generator": g} if name == "euler_ancestral" else {}
                if sigma_space:   # k-diffusion-style schedulers: x is x_sigma
                    x = noise * scheduler.init_noise_sigma
                    for t in scheduler.timesteps:
                        eps = counted(scheduler.scale_model_input(x, t), t)
                        x = scheduler.step(eps, t, x, **kw).prev_sample
                    return x
                x = noise * sigmas[0].float() / (1 + sigmas[0].float() ** 2) ** 0.5   # x_t
                for t in scheduler.timesteps:
                    x = scheduler.step(counted(x, t), t, x, **kw).prev_sample
                return x

            ours(), theirs()                 # warm-up (first calls of a shape are slow)
            calls.clear()
            a = b = float("inf")
            for _ in range(5):               # interleaved, best of 5: fair under a varying load
                a, b = min(a, timed(ours, 1)), min(b, timed(theirs, 1))
            figures = {"nfe": len(calls) // 5, "batch": batch,
                       "diffkit_ms_per_image": 1e3 * a / batch,
                       "diffusers_ms_per_image": 1e3 * b / batch,
                       "ratio_diffkit_over_diffusers": a / b}
            if model_name == "unet":
                figures["max_abs_diff"] = float((ours() - theirs()).abs().max())
            out[f"{model_name}/{name}"] = figures
    return out


@bench
def latent(device: torch.device, quick: bool) -> dict:
    """Per-step cost of the same tiny UNet in pixel space and in the VAE's latent space, as the
    ratio pixel / latent from one run (chapter 8); FLOPs and memory are counted, time measured."""
    from diffkit.eval.latent_cost import tiny_comparison

    return tiny_comparison(device, batch=16 if quick else 64, repeats=2 if quick else 5)


@bench
def sd(device: torch.device, quick: bool) -> dict:
    """The tiny SD (``checkpoints/shapes-sd``) at its recommended settings: images per second of
    diffkit's loop (``latent.sd.text_to_image``) and of the diffusers pipeline, same model,
    prompts, steps and batch, and the ratio pipeline time / diffkit time (> 1: diffkit faster)."""
    from diffkit.eval.sd_probes import prompt_scenes
    from diffkit.latent import sd as sd_loop
    from diffkit.recipes.sd import RECOMMENDED

    pipe = sd_loop.load_pipeline(device=device)
    batch, repeats = (4, 1) if quick else (64, 3)
    prompts = prompt_scenes(batch, 1).captions
    steps, scale = RECOMMENDED["num_inference_steps"], RECOMMENDED["guidance_scale"]

    def ours():
        sd_loop.text_to_image(pipe, prompts, steps=steps, guidance_scale=scale,
                              sampler=RECOMMENDED["scheduler"],
                              generator=torch.Generator().manual_seed(0))

    def theirs():
        pipe(prompts, num_inference_steps=steps, guidance_scale=scale, output_type="pt",
             generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        ours()   # warm-up: first calls allocate
        t_ours, t_theirs = timed(ours, repeats), timed(theirs, repeats)
    return {"shapes-sd": {"batch": batch, "steps": steps, "guidance_scale": scale,
                          "diffkit_images_per_second": batch / t_ours,
                          "pipeline_images_per_second": batch / t_theirs,
                          "pipeline_over_diffkit_time": t_theirs / t_ours}}


@bench
def control(device: torch.device, quick: bool) -> dict:
    """Sampling cost of chapter 13's control models against prompt-only generation."""
    from diffkit.eval.control_probes import CONTROL_CHECKPOINTS, sampling_cost
    from diffkit.recipes.control import SAMPLING, base_pipeline

    models = {n: checkpoints.load_model(n, device=device)[0] for n in CONTROL_CHECKPOINTS}
    return sampling_cost(base_pipeline(device), models, batch=4 if quick else 100,
                         repeats=1 if quick else 3, timer=timed, **SAMPLING)


@bench
def lora(device: torch.device, quick: bool) -> dict:
    """Time cost of chapter 11's adapter kinds (:mod:`diffkit.eval.adapter_cost`)."""
    from diffkit.eval.adapter_cost import adapter_cost

    return adapter_cost(device, batch=4 if quick else 64, repeats=1 if quick else 10, timer=timed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffkit.bench", description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHES) + ["all"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = config.device()
    names = sorted(BENCHES) if args.name == "all" else [args.name]
    for name in names:
        figures = BENCHES[name](device, args.quick)
        record = {"bench": name, "quick": args.quick, "device": str(device),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                  else platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%d"), "figures": figures}
        print(json.dumps(record, indent=2))
        if not args.no_record and not args.quick:
            RESULTS.mkdir(exist_ok=True)
            suffix = "" if device.type == "cpu" else f"-{device.type}"
            (RESULTS / f"{name}{suffix}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

