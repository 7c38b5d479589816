"""Steps per second of a recipe's training, in this process or on N launched processes.

``rate`` times a recipe's own ``train`` function at two short lengths, so that the set-up (data,
model building) drops out of the cost per step. ``per_process_count`` runs ``rate`` under
``accelerate launch`` on 1, 2, ... processes (``python -m diffkit.train.throughput`` is the
launched side) and reports the steps per second at each count: a step is always the recipe's
whole batch, so the figures compare directly. On a CPU the cores are shared out among the
processes (``OMP_NUM_THREADS`` = cores / N); on GPUs each process has its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffkit.train.processes import launch_command


def rate(name: str, device: torch.device, k1: int, k2: int) -> dict:
    """Recipe ``name``'s steps per second and set-up seconds (fresh state for each length)."""
    from diffkit import recipes

    spec = recipes.RECIPES[name]
    seconds = []
    for k in (k1, k2):
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(recipes.SEED)
            start = time.perf_counter()
            spec.train(k, device, Path(tmp) / f"{name}.state.safetensors", False)
            seconds.append(time.perf_counter() - start)
    per_step = max(seconds[1] - seconds[0], 1e-9) / (k2 - k1)
    setup = max(seconds[0] - k1 * per_step, 0.0)
    return {"steps_per_second": 1 / per_step, "setup_seconds": setup, "recipe_steps": spec.steps,
            "projected_train_minutes": (setup + spec.steps * per_step) / 60}


def _launch(processes: int, name: str, device: torch.device, k1: int, k2: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rate.json"
        child = ["-m", "diffkit.train.throughput", str(out), name, str(device.type), str(k1),
                 str(k2)]
        env = dict(os.environ)
        command = ([sys.executable, *child] if processes == 1
                   else launch_command(processes, *child))
        if device.type == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=3600)
        return json.loads(out.read_text())


def per_process_count(names: list[str], device: torch.device, counts: list[int], k1: int,
                      k2: int) -> dict:
    """``{"NAME@N-processes": figures}``: each recipe's training rate on each process count,
    with the speed-up over one process and the threads each process had."""
    if not counts or counts[0] != 1:
        raise ValueError(f"counts must start with 1 (the baseline), got {counts}")
    out = {}
    for name in names:
        for n in counts:
            figures = _launch(n, name, device, k1, k2)
            if n == 1:
                base = figures["steps_per_second"]
            out[f"{name}@{n}-processes"] = {
                "processes": n, "threads_per_process": figures["threads"],
                "steps_per_second": figures["steps_per_second"],
                "speedup_over_1_process": figures["steps_per_second"] / base}
    return out


def main(argv: list[str]) -> int:
    """The launched side: every process trains, the main one writes the figures."""
    from diffkit.train import processes

    out, name, device_type, k1, k2 = argv
    device = processes.process_device(torch.device(device_type))
    figures = rate(name, device, int(k1), int(k2))
    if processes.main_process(device):
        figures["threads"] = torch.get_num_threads()
        Path(out).write_text(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
