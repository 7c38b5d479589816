"""The training loop's processes, on Hugging Face ``accelerate``: one process or many, CPU or GPU.

``python -m diffkit.train RECIPE`` is one process. Under a launcher that starts several
(``accelerate launch --multi_gpu --num_processes N -m diffkit.train RECIPE``, or ``torchrun
--nproc_per_node N``) every process runs the same recipe: the same data, the same seeded stream
of minibatch indices, each process computing the gradient of its share of every minibatch,
averaged across processes before the one optimiser step that all of them take. ``accelerate``
sets up the process group (gloo on CPUs, NCCL on GPUs), the device of each process, mixed
precision and its gradient scaler.

Gradients are averaged explicitly (one all-reduce of the flattened gradients per step) rather
than by wrapping the model in ``DistributedDataParallel``: the book's loss functions call the
model's own methods and attributes (a VAE's ``encode``, a UNet's ``config``), which DDP's
forward hooks would miss. Numerically it is what DDP does.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class Options:
    """What a caller of ``python -m diffkit.train`` may change without touching a recipe.

    ``grad_accumulation``: micro-batches per process per optimiser step, so that a recipe keeps
    its batch size (the effective batch, summed over processes and micro-batches) on any number
    of processes and on a smaller memory. ``mixed_precision``: ``"bf16"`` or ``"fp16"`` autocast
    (a GPU feature), ``"no"``, or None for accelerate's own default (``accelerate launch
    --mixed_precision``, i.e. the environment variable ``ACCELERATE_MIXED_PRECISION``).
    """
    grad_accumulation: int = 1
    mixed_precision: str | None = None

    def __post_init__(self):
        if not isinstance(self.grad_accumulation, int) or self.grad_accumulation < 1:
            raise ValueError(f"grad_accumulation must be a positive integer, "
                             f"got {self.grad_accumulation!r}")
        if self.mixed_precision not in (None, *MIXED_PRECISION):
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION} or None, "
                             f"got {self.mixed_precision!r}")


_options = Options()


def options() -> Options:
    """The options in force for ``train`` calls that do not pass their own."""
    return _options


def using(**changes):
    """``with using(grad_accumulation=4): recipe.train(...)``: options for every ``train`` call
    inside, which is how the command line reaches the recipes' own calls of the loop. Bad
    values raise ValueError here, before the ``with`` starts."""
    return _in_force(Options(**{**_options.__dict__, **changes}))


@contextlib.contextmanager
def _in_force(new: Options):
    global _options
    saved, _options = _options, new
    try:
        yield new
    finally:
        _options = saved


def launch_command(processes: int, *command: str) -> list[str]:
    """``accelerate launch`` of ``command`` (a script and its arguments, or ``-m MODULE ...``)
    on ``processes`` processes of this machine, on a free port. ``--multi_gpu`` is what fans out
    on a CPU too: ``--cpu --num_processes N`` would start one process (accelerate's simple
    launcher spreads only over an MPI hostfile)."""
    import socket
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), *command]


def launched_processes() -> int:
    """How many processes a launcher (torchrun, ``accelerate launch``) started, 1 if none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerator(device: torch.device, mixed_precision: str | None):
    """An ``accelerate.Accelerator`` for a loop on ``device`` (CPU processes use gloo).

    Model and data placement stay with the loop (``device_placement=False``): one process keeps
    the device it was given, several use each process's own (``accelerator.device``).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    wanted = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if wanted == "fp16" and device.type == "cpu":
        raise ValueError("mixed_precision='fp16' needs a GPU; use 'bf16' or 'no' on the CPU")
    state = AcceleratorState._shared_state
    if (launched_processes() == 1 and state
            and str(state.get("_mixed_precision", "no")) != wanted):
        # accelerate fixes mixed precision per process; in a single process nothing else
        # depends on that state, so a later loop may ask for another one
        AcceleratorState._reset_state()
    return Accelerator(cpu=device.type == "cpu", mixed_precision=wanted,
                       device_placement=False)


def _state(device: torch.device):
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def process_device(device: torch.device) -> torch.device:
    """The device this process works on: ``device`` itself without a launcher, else the one
    accelerate gives this process (``cuda:LOCAL_RANK``, or the CPU)."""
    return device if launched_processes() == 1 else torch.device(_state(device).device)


def main_process(device: torch.device) -> bool:
    """Whether this is the process that saves, measures and prints (always, without a launcher)."""
    return launched_processes() == 1 or _state(device).is_main_process


def broadcast_parameters(module: torch.nn.Module, accelerator) -> None:
    """Give every process the main process's weights and buffers, as DDP does when it wraps."""
    from accelerate.utils import broadcast

    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            tensor.copy_(broadcast(tensor.detach().clone(), from_process=0))


def average_gradients(parameters: list[torch.nn.Parameter], accelerator) -> None:
    """Replace each gradient by its mean over the processes (one all-reduce of all of them).

    A parameter that got no gradient here counts as a zero gradient, so that every process
    sends a buffer of the same size whatever its micro-batches touched.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def backward(loss: torch.Tensor, accelerator) -> None:
    """``loss.backward()``, through fp16's gradient scaler when there is one. Not
    ``accelerator.backward``: that divides by accelerate's own accumulation count (read from
    the environment), and the loop divides by its own."""
    (accelerator.scaler.scale(loss) if accelerator.scaler is not None else loss).backward()


def mean_over_processes(value: torch.Tensor, accelerator) -> float:
    """The mean of a scalar over the processes (every process logs the same loss)."""
    if accelerator.num_processes == 1:
        return value.item()
    return accelerator.reduce(value.detach().reshape(1).float(), reduction="mean").item()
