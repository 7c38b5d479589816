"""Training recipes: each turns a seed into a checkpoint folder with its measured quality.

A recipe is two plain functions: ``train(steps, device, state_path, progress) -> (result,
hyperparameters)`` and ``measure(model, device) -> dict`` of quality figures. ``run`` adds the
provenance (seed, wall time, device, versions) and saves ``checkpoints/NAME/`` atomically. The
training state is kept in ``checkpoints/NAME.state.safetensors`` while training, so an
interrupted ``python -m diffkit.train NAME`` resumes where it last saved. ``remeasure``
re-runs only the measurement of an existing checkpoint (e.g. after the judge changed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import checkpoints, config, data, ddpm, metrics, nets
from .schedules import make_schedule
from .train import train

SEED = 0


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: int
    train: Callable
    measure: Callable


RECIPES: dict[str, Recipe] = {}


def recipe(name: str, description: str, steps: int, measure: Callable):
    def register(fn):
        RECIPES[name] = Recipe(name, description, steps, fn, measure)
        return fn
    return register


def ddpm_loss(schedule, target="eps"):
    """loss_fn for ``train``: the simple DDPM loss on the first tensor of the batch."""
    def loss_fn(model, batch, generator):
        return ddpm.training_loss(model, schedule, batch[0], target=target, generator=generator)
    return loss_fn


# --- digits judge ------------------------------------------------------------------------

def judge_quality(judge, device) -> dict:
    test_x, test_y = data.digits("test")
    return {"test_accuracy": metrics.accuracy(judge, test_x.to(device), test_y)}


@recipe("digits-judge", "CNN classifier on the digits train split (the judge)", 3000,
        judge_quality)
def digits_judge(steps, device, state_path, progress):
    result = train(metrics.DigitsJudge(), metrics.judge_loss, data.digits("train"), steps=steps,
                   batch_size=128, lr=2e-3, weight_decay=1e-4, ema_decay=0.995, seed=SEED,
                   device=device, state_path=state_path, progress=progress)
    return result, {"batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4}


# --- 2-D DDPM ----------------------------------------------------------------------------

TOY2D_CONFIG = dict(distribution="ring8", schedule="linear", target="eps")


def toy2d_quality(model, schedule, *, n=2000, seed=1, device="cpu", target="eps",
                  repeats: int = 5) -> dict:
    """Sliced W2 of n DDPM samples to fresh true sets of n points, and of true to true.

    Both are averaged over ``repeats`` fresh true sets: one draw of the floor is noisy (the
    8 modes' counts fluctuate), and the bar compares the two averages. Also returns the
    samples (n, 2) for plotting.
    """
    g = torch.Generator().manual_seed(seed)
    samples = ddpm.sample(model, schedule, (n, 2), target=target, generator=g,
                          device=device).cpu()
    name = TOY2D_CONFIG["distribution"]
    distance, floor = 0.0, 0.0
    for _ in range(repeats):
        truth_a, truth_b = data.toy2d(name, n, generator=g), data.toy2d(name, n, generator=g)
        distance += metrics.sliced_wasserstein(samples, truth_a, generator=g) / repeats
        floor += metrics.sliced_wasserstein(truth_b, truth_a, generator=g) / repeats
    return {"n": n, "sliced_w2": distance, "sliced_w2_floor": floor, "ratio": distance / floor,
            "samples": samples}


def toy2d_card_quality(model, device) -> dict:
    measured = toy2d_quality(model, make_schedule(TOY2D_CONFIG["schedule"]), device=device)
    del measured["samples"]
    return measured


@recipe("toy2d-ddpm", "MLP DDPM on the 8-Gaussian ring (chapter 1)", 8000, toy2d_card_quality)
def toy2d_ddpm(steps, device, state_path, progress):
    points = data.toy2d(TOY2D_CONFIG["distribution"], 20000,
                        generator=torch.Generator().manual_seed(SEED))
    result = train(nets.MLPDenoiser(dim=2, width=256, depth=4),
                   ddpm_loss(make_schedule(TOY2D_CONFIG["schedule"])), points, steps=steps,
                   batch_size=512, lr=2e-3, ema_decay=0.999, seed=SEED, device=device,
                   state_path=state_path, progress=progress)
    return result, {**TOY2D_CONFIG, "batch_size": 512, "lr": 2e-3}


# --- digits DDPM -------------------------------------------------------------------------

DIGITS_UNET = dict(in_channels=1, base_channels=24, channel_mults=(1, 2), num_res_blocks=1)


def digits_quality(model, schedule, *, n: int, seed: int = 1, device="cpu",
                   model_kwargs=None) -> dict:
    """Judge n ancestral DDPM samples of a digits model (see ``metrics.judge_report``)."""
    judge, _ = checkpoints.load_model("digits-judge", device=device)
    samples = ddpm.sample(model, schedule, (n, 1, 8, 8),
                          generator=torch.Generator().manual_seed(seed), device=device,
                          model_kwargs=model_kwargs)
    return metrics.judge_report(judge, samples.clamp(-1, 1))


def digits_card_quality(model, device) -> dict:
    return digits_quality(model, make_schedule("linear"), n=1000, device=device)


@recipe("digits-ddpm", "UNet DDPM on 8x8 digits, linear schedule, eps target (chapter 1)", 6000,
        digits_card_quality)
def digits_ddpm(steps, device, state_path, progress):
    result = train(nets.UNet(**DIGITS_UNET), ddpm_loss(make_schedule("linear")),
                   data.digits("train")[0], steps=steps, batch_size=128, lr=1e-3,
                   ema_decay=0.999, seed=SEED, device=device, state_path=state_path,
                   progress=progress)
    return result, {"schedule": "linear", "target": "eps", "batch_size": 128, "lr": 1e-3}


# --- running -----------------------------------------------------------------------------

def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def _spec(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]


def run(name: str, *, root=None, device=None, steps: int | None = None,
        progress: bool = True) -> dict:
    """Train recipe ``name``, measure it, and save its checkpoint; returns the card."""
    spec = _spec(name)
    steps = spec.steps if steps is None else steps
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    device = torch.device(device) if device is not None else config.device()
    folder = checkpoints.checkpoint_dir(name, root)
    state_path = folder.with_name(name + ".state.safetensors")
    torch.manual_seed(SEED)  # weight initialisation
    start = time.perf_counter()
    result, hyper = spec.train(steps, device, state_path, progress)
    measured_start = time.perf_counter()
    measured = spec.measure(result.ema, device)
    card = {
        "recipe": name, "description": spec.description, "seed": SEED, "steps": steps,
        "train_seconds": round(result.wall_time, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "resumed_from_step": result.resumed_from,
        "device": _device_name(device), "threads": torch.get_num_threads(),
        "versions": checkpoints.library_versions(),
        "model": {"class": type(result.ema).__name__, "module": type(result.ema).__module__,
                  "kwargs": result.ema.config},
        "hyperparameters": hyper,
        "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:]),
        "measured": measured,
        "measure_seconds": round(time.perf_counter() - measured_start, 1),
        "measured_on": _device_name(device),
    }
    checkpoints.save(folder, result.ema.state_dict(), card)
    state_path.unlink(missing_ok=True)
    return card


def remeasure(name: str, *, root=None, device=None) -> dict:
    """Recompute the quality figures of an existing checkpoint and rewrite its card."""
    spec = _spec(name)
    device = torch.device(device) if device is not None else config.device()
    folder = checkpoints.checkpoint_dir(name, root)
    tensors, card = checkpoints.load(folder)
    model, _ = checkpoints.load_model(name, root=root, device=device)
    start = time.perf_counter()
    card["measured"] = spec.measure(model, device)
    card["measure_seconds"] = round(time.perf_counter() - start, 1)
    card["measured_on"] = _device_name(device)
    checkpoints.save(folder, tensors, card)
    return card


# Recipes of later chapters live beside the modules they train and register themselves here
# (imported last: they use ``recipe`` and the helpers above).
from . import recipes_blip, recipes_guidance, recipes_schedules, recipes_shapes  # noqa: E402,F401
