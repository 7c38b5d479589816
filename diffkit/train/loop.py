"""One training loop for every chapter: AdamW, EMA weights, seeded, atomic saves, exact resume.

``python -m diffkit.train RECIPE`` trains a named recipe (see ``diffkit.recipes``) and writes
``checkpoints/RECIPE/``; ``--list`` shows the recipes and ``--all`` trains every one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffkit.train import processes

STATE_FORMAT = "diffkit-train-state-v1"


@dataclass
class TrainResult:
    model: torch.nn.Module
    ema: torch.nn.Module
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    wall_time: float = 0.0
    resumed_from: int = 0


def _as_tensors(data) -> tuple[torch.Tensor, ...]:
    tensors = (data,) if isinstance(data, torch.Tensor) else tuple(data)
    if not tensors or not all(isinstance(x, torch.Tensor) for x in tensors):
        raise ValueError("data must be a tensor or a sequence of tensors")
    n = tensors[0].shape[0]
    if n == 0 or any(x.shape[0] != n for x in tensors):
        raise ValueError(f"data tensors must share a non-zero first dimension, got "
                         f"{[tuple(x.shape) for x in tensors]}")
    return tensors


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)  # cosine decay to 10% of the peak
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def save_state(path: Path, step: int, model, ema, optimizer, generator, losses,
               settings: dict | None = None) -> None:
    """Write the full training state to one safetensors file, atomically (temp + rename)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng"] = generator.get_state()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    meta = {"format": STATE_FORMAT, "step": str(step),
            "param_groups": json.dumps(opt["param_groups"]),
            "settings": json.dumps(settings or {}, sort_keys=True)}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_state(path: Path, model, ema, optimizer, generator,
               settings: dict | None = None) -> tuple[int, list[float]]:
    """Restore what ``save_state`` wrote; returns (step, losses).

    With ``settings``, refuse (ValueError) a state saved by a run with other settings: resuming
    it would silently continue a different run (another learning-rate schedule, batch, seed).
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a diffkit training state (format {meta.get('format')!r})")
    saved = json.loads(meta.get("settings", "{}"))
    wanted = json.loads(json.dumps(settings, sort_keys=True)) if settings is not None else saved
    was, now = saved.get("micro_batches", 1), wanted.get("micro_batches", 1)
    if was != now:
        raise ValueError(
            f"{path} was saved by a run of {was} micro-batches per step (processes x gradient "
            f"accumulation) and this run has {now}; resume with processes x --grad-accumulation "
            f"= {was} (e.g. 1 process with --grad-accumulation {was}), or delete it to start "
            "afresh")
    if saved != wanted:
        raise ValueError(f"{path} was saved by a run with settings {saved}, not {settings}; "
                         "delete it to start afresh")
    tensors = load_file(str(path))
    device = next(model.parameters()).device

    def part(prefix):
        return {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    if ema is not None:                 # processes other than the main one keep no EMA
        ema.load_state_dict(part("ema."))
    state: dict[int, dict] = {}
    for key, value in part("optim.").items():
        index, slot = key.split(".", 1)
        # Adam keeps its step count on the CPU unless it is capturable/fused
        state.setdefault(int(index), {})[slot] = value.cpu() if slot == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    generator.set_state(tensors["rng"])
    return int(meta["step"]), tensors["losses"].tolist()


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train(model: torch.nn.Module, loss_fn: Callable, data, *, steps: int, batch_size: int = 128,
          lr: float = 1e-3, weight_decay: float = 0.0, ema_decay: float = 0.999,
          warmup: int = 100, lr_schedule: str = "cosine", grad_clip: float | None = 1.0,
          seed: int = 0, state_path: str | os.PathLike | None = None, save_every: int = 500,
          device=None, progress: bool = True, callback: Callable | None = None,
          grad_accumulation: int | None = None, mixed_precision: str | None = None
          ) -> TrainResult:
    """Train ``model`` for ``steps`` minibatch steps of ``loss_fn(model, batch, generator)``.

    ``data``: a tensor or tuple of tensors sharing their first dimension; each step draws
    ``batch_size`` rows uniformly with replacement from the seeded CPU generator, which also
    feeds the loss's own randomness, so a run is a pure function of ``seed``. With
    ``state_path`` the state is saved every ``save_every`` steps (atomically) and a later call
    resumes from it, ending with the same weights as an uninterrupted run.
    ``callback(step, loss)`` runs after each step (it may raise to stop training).

    Processes and micro-batches (:mod:`diffkit.train.processes`): under a launcher with P
    processes and ``grad_accumulation`` A (default: the options of ``processes.using``), each
    step's ``batch_size`` rows are cut into K = P x A micro-batches; process p computes the
    gradients of micro-batches pA .. pA + A - 1 and the mean over all K is applied once. The
    indices come from the one seeded stream every process shares, and so does one seed per
    micro-batch for its loss's randomness, so a run depends on K, not on how K is split into
    processes: 2 processes give the weights of 1 process with A = 2, and a state saved under
    one split resumes under another with the same K. With K = 1 (one process, no
    accumulation) the loss draws from the shared generator itself, as it always has.
    The EMA, the progress bar and the saves happen on the main process only; elsewhere the
    result's ``ema`` is the trained model. ``mixed_precision``: ``"bf16"``/``"fp16"`` autocast.

    A model that defines ``clamp_parameters()`` has it called right after every optimiser step,
    to project parameters back into their allowed range (CLIP caps its inverse temperature at
    100 this way: a clamp in the forward pass would zero that parameter's gradient above the cap).
    """
    if steps <= 0 or batch_size <= 0 or save_every <= 0:
        raise ValueError(f"steps, batch_size and save_every must be positive, got "
                         f"{steps}, {batch_size}, {save_every}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    tensors = _as_tensors(data)
    defaults = processes.options()
    opts = processes.Options(
        defaults.grad_accumulation if grad_accumulation is None else grad_accumulation,
        defaults.mixed_precision if mixed_precision is None else mixed_precision)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    accelerator = processes.accelerator(device, opts.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batches = world * opts.grad_accumulation
    if batch_size % micro_batches:
        raise ValueError(f"batch_size {batch_size} must split evenly into {world} processes x "
                         f"{opts.grad_accumulation} accumulation steps = {micro_batches} "
                         "micro-batches")
    if world > 1:
        device = accelerator.device
    main = accelerator.is_main_process
    model.to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if main else None
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    clamp = getattr(model, "clamp_parameters", None)       # see the docstring
    generator = torch.Generator().manual_seed(seed)
    step, losses = 0, []
    path = Path(state_path) if state_path is not None else None
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                    ema_decay=ema_decay, warmup=warmup, lr_schedule=lr_schedule,
                    grad_clip=grad_clip, seed=seed)
    if micro_batches > 1:       # a state resumes only with the same number of micro-batches
        settings["micro_batches"] = micro_batches
    if path is not None and path.exists():
        step, losses = load_state(path, model, ema, optimizer, generator, settings)
    if world > 1:
        processes.broadcast_parameters(model, accelerator)
    optimizer = accelerator.prepare(optimizer)     # the gradient scaler of fp16, if any
    resumed_from, start = step, time.perf_counter()
    bar = tqdm(total=steps, initial=step, disable=not (progress and main), desc="train",
               mininterval=1.0)
    while step < steps:
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, warmup, lr_schedule)
        index = torch.randint(0, tensors[0].shape[0], (batch_size,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows, loss_generator, dropout_seed in _micro_batches(
                index, generator, seed, step, micro_batches, rank, opts.grad_accumulation):
            batch = tuple(x[rows].to(device) for x in tensors)
            # layers like Dropout draw from torch's global RNG: seed it from (seed, step) so a
            # resumed run sees the same masks, and fork it so the caller's global state is kept
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(dropout_seed)
                with accelerator.autocast():
                    loss = loss_fn(model, batch, loss_generator)
            processes.backward(loss if micro_batches == 1 else loss / opts.grad_accumulation,
                               accelerator)
            total = total + loss.detach()
        if world > 1:
            processes.average_gradients(parameters, accelerator)
        if grad_clip is not None:
            accelerator.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if clamp is not None:
            clamp()
        if main:    # the usual EMA warm-up: average over roughly the steps seen so far early on
            _ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        step += 1
        losses.append(processes.mean_over_processes(total / opts.grad_accumulation, accelerator))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        if path is not None and (step % save_every == 0 or step == steps):
            if main:
                save_state(path, step, model, ema, optimizer, generator, losses, settings)
            accelerator.wait_for_everyone()     # no process runs ahead of the last save
        if callback is not None:
            callback(step, losses[-1])
    bar.close()
    model.eval()
    return TrainResult(model, ema if main else model, losses, step, time.perf_counter() - start,
                       resumed_from)


def _micro_batches(index, generator, seed, step, micro_batches, rank, accumulation):
    """This process's (rows, loss generator, dropout seed) triples for one optimiser step."""
    if micro_batches == 1:
        yield index, generator, seed * 1_000_003 + step
        return
    # one seed per micro-batch from the shared stream: micro-batch k draws the same noise
    # whichever process computes it
    seeds = torch.randint(0, 2 ** 62, (micro_batches,), generator=generator).tolist()
    chunks = index.chunk(micro_batches)
    for k in range(rank * accumulation, (rank + 1) * accumulation):
        yield chunks[k], torch.Generator().manual_seed(seeds[k]), seeds[k]
