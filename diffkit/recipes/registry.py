"""The recipe registry: a recipe turns a seed into a checkpoint folder with its measured quality.

A recipe is two plain functions: ``train(steps, device, state_path, progress) -> (result,
hyperparameters)`` and ``measure(model, device) -> dict`` of quality figures, registered with
the ``recipe`` decorator by the chapter-group modules of this package (this module imports
none of them; ``diffkit.recipes`` imports them all). ``run`` adds the provenance (seed, wall
time, device, versions) and saves ``checkpoints/NAME/`` atomically. The training state is kept
in ``checkpoints/NAME.state.safetensors`` while training, so an interrupted ``python -m
diffkit.train NAME`` resumes where it last saved. ``remeasure`` re-runs only the measurement
of an existing checkpoint (e.g. after the judge changed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from diffkit import checkpoints, config
from diffkit.train import processes

SEED = 0
# every recipe trains on a 2-core CPU within this many seconds (DEVELOPERS.md) unless its issue
# grants it more (``time_bar_seconds``); cards record what it took
TIME_BAR_SECONDS = 30 * 60


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    steps: int
    train: Callable
    measure: Callable
    time_bar_seconds: int = TIME_BAR_SECONDS


RECIPES: dict[str, Recipe] = {}


def recipe(name: str, description: str, steps: int, measure: Callable, *,
           time_bar_seconds: int = TIME_BAR_SECONDS):
    if name in RECIPES:
        raise ValueError(f"recipe {name!r} is registered twice")

    def register(fn):
        RECIPES[name] = Recipe(name, description, steps, fn, measure, time_bar_seconds)
        return fn
    return register


def member_state_path(state_path, member: str):
    """The training state of one member of a family recipe (NAME.MEMBER.state.safetensors,
    which ``run`` deletes with the recipe's own), or None without a state path."""
    if state_path is None:
        return None
    return state_path.with_name(state_path.name.replace(".state", f".{member}.state"))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def _parallelism() -> dict:
    """The card's record of how the run was split; absent for the single-process default, so
    that the cards of the shipped checkpoints read as they always have."""
    opts, world = processes.options(), processes.launched_processes()
    out = {"processes": world} if world > 1 else {}
    if opts.grad_accumulation > 1:
        out["grad_accumulation"] = opts.grad_accumulation
    if opts.mixed_precision not in (None, "no"):
        out["mixed_precision"] = opts.mixed_precision
    return out


def _spec(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}")
    return RECIPES[name]


def run(name: str, *, root=None, device=None, steps: int | None = None,
        progress: bool = True) -> dict:
    """Train recipe ``name``, measure it, and save its checkpoint; returns the card.

    Under a launcher of several processes (:mod:`diffkit.train.processes`) every process
    trains; the main one alone measures, saves and returns the card, the others return None.
    """
    spec = _spec(name)
    steps = spec.steps if steps is None else steps
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    device = torch.device(device) if device is not None else config.device()
    device = processes.process_device(device)
    folder = checkpoints.checkpoint_dir(name, root)
    state_path = folder.with_name(name + ".state.safetensors")
    torch.manual_seed(SEED)  # weight initialisation
    start = time.perf_counter()
    result, hyper = spec.train(steps, device, state_path, progress)
    if not processes.main_process(device):
        return None
    measured_start = time.perf_counter()
    measured = spec.measure(result.ema, device)
    card = {
        "recipe": name, "description": spec.description, "seed": SEED, "steps": steps,
        "train_seconds": round(result.wall_time, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "resumed_from_step": result.resumed_from,
        "device": _device_name(device), "threads": torch.get_num_threads(),
        **_parallelism(),
        "versions": checkpoints.library_versions(),
        "model": checkpoints.describe(result.ema),
        "hyperparameters": hyper,
        "final_loss": sum(result.losses[-100:]) / len(result.losses[-100:]),
        "measured": measured,
        "measure_seconds": round(time.perf_counter() - measured_start, 1),
        "measured_on": _device_name(device),
    }
    checkpoints.save_model(folder, result.ema, card)
    # a recipe that trains a family keeps one state per member (NAME.MEMBER.state.safetensors)
    for path in folder.parent.glob(name + ".*state.safetensors"):
        path.unlink(missing_ok=True)
    return card


def remeasure(name: str, *, root=None, device=None) -> dict | None:
    """Recompute the quality figures of an existing checkpoint and rewrite its card."""
    spec = _spec(name)
    device = torch.device(device) if device is not None else config.device()
    if not processes.main_process(device):
        return None          # measuring is one process's work
    folder = checkpoints.checkpoint_dir(name, root)
    model, card = checkpoints.load_model(name, root=root, device=device)
    start = time.perf_counter()
    card["measured"] = spec.measure(model, device)
    card["measure_seconds"] = round(time.perf_counter() - start, 1)
    card["measured_on"] = _device_name(device)
    checkpoints.write_card(folder, card)
    return card
