"""diffkit.train on several processes (accelerate, gloo on the CPU): the same weights as one
process with the same micro-batches, exact resume after a hard kill, one writer."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from distributed_worker import SETTINGS
from safetensors.torch import load_file
from test_train import POINTS, _equal, ddpm_loss, small_mlp

from diffkit.train import processes
from diffkit.train.loop import train
from diffkit.train.processes import launch_command

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
STEPS = 20


def launch(*args, processes=2, check=True):
    """``accelerate launch`` the worker on ``processes`` CPU processes (one thread each)."""
    command = launch_command(processes, str(WORKER), *map(str, args))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"launch failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def weights(path):
    tensors = load_file(str(path))
    return {k: v for k, v in tensors.items() if k.startswith("model.")}, \
        {k: v for k, v in tensors.items() if k.startswith("ema.")}


def as_tensors(model, prefix):
    return {f"{prefix}.{k}": v for k, v in model.state_dict().items()}


def close(a, b, atol=1e-6):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "weights.safetensors"
    launch("loop", out, STEPS, 1)
    return weights(out)


def test_two_processes_give_the_weights_of_one_with_two_micro_batches(two_process_run):
    model, ema = two_process_run
    one = train(small_mlp(), ddpm_loss, POINTS, steps=STEPS, grad_accumulation=2, **SETTINGS)
    assert close(model, as_tensors(one.model, "model"))
    assert close(ema, as_tensors(one.ema, "ema"))
    # not a vacuous match: one micro-batch per step (the single-process default) is another run
    plain = train(small_mlp(), ddpm_loss, POINTS, steps=STEPS, **SETTINGS)
    assert not close(model, as_tensors(plain.model, "model"), atol=1e-3)


@pytest.fixture(scope="module")
def killed_state(tmp_path_factory):
    """The state a 2-process run left when all its processes died right after step 12."""
    folder = tmp_path_factory.mktemp("killed")
    state, out = folder / "run.state.safetensors", folder / "weights.safetensors"
    killed = launch("loop", out, STEPS, 1, state, 12, check=False)
    assert killed.returncode != 0 and state.exists() and not out.exists()
    return state


def test_a_killed_two_process_run_resumes_to_the_same_weights(
        two_process_run, killed_state, tmp_path):
    state, out = tmp_path / "run.state.safetensors", tmp_path / "weights.safetensors"
    shutil.copy(killed_state, state)
    launch("loop", out, STEPS, 1, state)
    model, ema = weights(out)
    expected_model, expected_ema = two_process_run
    assert all(torch.equal(model[k], expected_model[k]) for k in model)    # same processes: exact
    assert all(torch.equal(ema[k], expected_ema[k]) for k in ema)


def test_a_two_process_state_resumes_on_one_process_with_the_same_micro_batches(
        two_process_run, killed_state, tmp_path):
    state = tmp_path / "run.state.safetensors"
    shutil.copy(killed_state, state)
    with pytest.raises(ValueError, match="2 micro-batches per step"):
        train(small_mlp(), ddpm_loss, POINTS, steps=STEPS, state_path=state, **SETTINGS)
    resumed = train(small_mlp(), ddpm_loss, POINTS, steps=STEPS, state_path=state,
                    grad_accumulation=2, **SETTINGS)
    assert resumed.resumed_from == 10                   # the last save before the kill
    assert close(two_process_run[0], as_tensors(resumed.model, "model"))


def test_the_main_process_alone_writes_states_and_the_checkpoint(tmp_path):
    launch("recipe", tmp_path, 12)
    writes = (tmp_path / "writes.log").read_text().split("\n")[:-1]
    assert sorted(set(writes)) == ["0 save_model", "0 save_state"]
    assert writes.count("0 save_model") == 1
    card = json.loads((tmp_path / "tiny-test" / "card.json").read_text())
    assert card["processes"] == 2 and card["steps"] == 12
    assert not list(tmp_path.glob("*.state.safetensors"))     # removed once the card is saved


def test_batch_must_split_into_the_micro_batches():
    with pytest.raises(ValueError, match="micro-batches"):
        train(small_mlp(), ddpm_loss, POINTS, steps=2, batch_size=15, grad_accumulation=2,
              progress=False)


@pytest.mark.parametrize("options", [dict(grad_accumulation=0), dict(grad_accumulation=1.5),
                                     dict(mixed_precision="fp8")])
def test_bad_options_raise(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        processes.using(**options)


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        train(small_mlp(), ddpm_loss, POINTS, steps=2, mixed_precision="fp16", progress=False)


def test_options_reach_the_calls_inside_and_only_those():
    with processes.using(grad_accumulation=2):
        inside = train(small_mlp(), ddpm_loss, POINTS, steps=5, **SETTINGS)
    explicit = train(small_mlp(), ddpm_loss, POINTS, steps=5, grad_accumulation=2, **SETTINGS)
    after = train(small_mlp(), ddpm_loss, POINTS, steps=5, **SETTINGS)
    assert _equal(inside.model, explicit.model) and not _equal(after.model, explicit.model)
    assert processes.options() == processes.Options()


def test_bf16_autocast_trains_and_a_later_run_is_full_precision_again():
    bf16 = train(small_mlp(), ddpm_loss, POINTS, steps=5, mixed_precision="bf16", **SETTINGS)
    plain = train(small_mlp(), ddpm_loss, POINTS, steps=5, **SETTINGS)
    again = train(small_mlp(), ddpm_loss, POINTS, steps=5, mixed_precision="no", **SETTINGS)
    assert all(torch.isfinite(torch.tensor(bf16.losses)))
    assert bf16.losses != plain.losses                  # the autocast did act
    assert _equal(plain.model, again.model)             # and did not stay on


def test_one_process_is_the_plain_pytorch_loop_bit_for_bit():
    """accelerate changes nothing on one process: the loop before it, written out in plain
    PyTorch (indices and the loss's noise from one generator, Dropout seeded per step, clip,
    AdamW with warm-up and cosine decay, EMA with warm-up), gives the same bits."""
    import copy

    from diffkit.train.loop import _lr_factor

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(small_mlp(), torch.nn.Dropout(0.2))

    def loss_fn(model, batch, generator):        # the MLP denoiser, then Dropout on its output
        t = torch.randint(0, 100, (batch[0].shape[0],), generator=generator)
        noise = torch.randn(batch[0].shape, generator=generator)
        return (model[1](model[0](batch[0] + noise, t)) - noise).square().mean()

    steps, batch_size, lr, warmup, decay, seed = 30, 16, 1e-2, 5, 0.9, 3
    ours = train(make(), loss_fn, POINTS, steps=steps, batch_size=batch_size, lr=lr,
                 warmup=warmup, ema_decay=decay, seed=seed, progress=False)
    model = make()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, warmup, "cosine")
        index = torch.randint(0, len(POINTS), (batch_size,), generator=generator)
        with torch.random.fork_rng():
            torch.manual_seed(seed * 1_000_003 + step)
            loss = loss_fn(model, (POINTS[index],), generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - min(decay, (1 + step) / (10 + step)))
    assert _equal(ours.model, model) and _equal(ours.ema, ema)
