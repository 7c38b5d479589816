"""Run by tests/test_train_processes.py under ``accelerate launch`` (one copy per process).

``loop OUT.safetensors STEPS ACCUMULATION [STATE [KILL_AT]]``: train the small MLP of
test_train.py on its points and let the main process write the model and EMA weights to OUT;
with KILL_AT, every process dies hard (``os._exit``) right after that step, as a killed job does.
``recipe ROOT STEPS``: ``python -m diffkit.train`` on a tiny recipe registered here, each process
logging every write it makes of a training state or a checkpoint to ROOT/writes.log.
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffkit.train import loop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import POINTS, ddpm_loss, small_mlp  # noqa: E402

SETTINGS = dict(batch_size=16, lr=1e-2, warmup=5, ema_decay=0.9, save_every=5, progress=False)


def train_loop(out, steps, accumulation, state=None, kill_at=None):
    def die(step, loss):
        if kill_at is not None and step == int(kill_at):
            os._exit(17)
    result = loop.train(small_mlp(), ddpm_loss, POINTS, steps=int(steps), state_path=state,
                        grad_accumulation=int(accumulation), callback=die, **SETTINGS)
    if result.ema is not result.model:          # the main process: it alone has the EMA
        tensors = {f"model.{k}": v for k, v in result.model.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in result.ema.state_dict().items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)


def spy(module, name, log):
    original = getattr(module, name)

    def logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {name}\n")
        return original(*args, **kwargs)
    setattr(module, name, logged)


def train_recipe(root, steps):
    # imported here: the recipes pull in diffusers and transformers, which the loop tasks
    # do not need (each process of a launch pays for its imports)
    from diffkit import checkpoints, recipes
    from diffkit.recipes import registry
    from diffkit.train import __main__ as command

    assert recipes.RECIPES            # the real registry, beside which tiny-test registers
    @registry.recipe("tiny-test", "small MLP on 256 points (a test of the launcher)", 10,
                     lambda model, device: {"parameters": sum(p.numel() for p in
                                                              model.parameters())})
    def tiny(steps, device, state_path, progress):
        torch.manual_seed(0)
        return loop.train(small_mlp(), ddpm_loss, POINTS, steps=steps, state_path=state_path,
                          device=device, **{**SETTINGS, "progress": progress}), {}
    log = Path(root) / "writes.log"
    spy(loop, "save_state", log)
    spy(checkpoints, "save_model", log)
    return command.main(["tiny-test", "--steps", str(steps), "--out", root, "--device", "cpu"])


if __name__ == "__main__":
    task, *args = sys.argv[1:]
    raise SystemExit(train_loop(*args) if task == "loop" else train_recipe(*args))
