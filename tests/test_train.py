"""diffkit.train: seeded training, EMA, atomic state files and exact resume."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffkit.diffusion import ddpm
from diffkit.diffusion.schedules import make_schedule
from diffkit.nn.mlp import MLPDenoiser
from diffkit.train import loop as train_module
from diffkit.train.loop import STATE_FORMAT, train

SCHEDULE = make_schedule("linear", 100)
POINTS = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))




def ddpm_loss(model, batch, generator):
    # draws t and noise from the training generator: resume must restore its state
    return ddpm.training_loss(model, SCHEDULE, batch[0], generator=generator)


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(dim=2, width=16, depth=2, emb_dim=8)


def run(model=None, **overrides):
    kwargs = dict(steps=25, batch_size=16, lr=1e-2, warmup=5, ema_decay=0.9, progress=False)
    kwargs.update(overrides)
    return train(model if model is not None else small_mlp(), ddpm_loss, POINTS, **kwargs)


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_loss_decreases_on_a_tiny_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    y = x @ torch.randn(4, 3, generator=g)

    def loss_fn(model, batch, generator):
        inputs, targets = batch
        return nn.functional.mse_loss(model(inputs), targets)

    torch.manual_seed(0)
    result = train(nn.Linear(4, 3), loss_fn, (x, y), steps=150, batch_size=32, lr=3e-2,
                   warmup=10, progress=False)
    assert len(result.losses) == 150 and result.steps == 150 and result.resumed_from == 0
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.05 * first
    assert not result.model.training and not result.ema.training
    assert not any(p.requires_grad for p in result.ema.parameters())


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert _equal(a.model, b.model) and _equal(a.ema, b.ema) and a.losses == b.losses
    assert not _equal(a.model, c.model)


def test_ema():
    zero = run(ema_decay=0.0)
    assert _equal(zero.ema, zero.model)  # decay 0: the EMA is the model
    slow = run(ema_decay=0.99)
    assert not _equal(slow.ema, slow.model)
    start = small_mlp()
    # the EMA lies between the start and the end: closer to the end than the start is
    for e, p, s in zip(slow.ema.parameters(), slow.model.parameters(), start.parameters()):
        assert (e - p).norm() < (s - p).norm()


def test_callback_sees_every_step():
    seen = []
    result = run(callback=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == list(range(1, 26))
    assert [loss for _, loss in seen] == result.losses


class Interrupt(Exception):
    pass


def _stop_at(step):
    def callback(s, loss):
        if s == step:
            raise Interrupt
    return callback


def test_resume_is_exact(tmp_path):
    kwargs = dict(steps=25, save_every=10)
    whole = run(state_path=tmp_path / "a" / "state.safetensors", **kwargs)
    path = tmp_path / "b" / "state.safetensors"
    with pytest.raises(Interrupt):
        run(state_path=path, callback=_stop_at(15), **kwargs)  # last save: step 10
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["step"] == "10"
    resumed = run(state_path=path, **kwargs)  # a fresh model, initialised identically
    assert resumed.resumed_from == 10 and resumed.steps == 25
    assert _equal(whole.model, resumed.model)
    assert _equal(whole.ema, resumed.ema)
    assert whole.losses == resumed.losses


def test_state_file_is_atomic_and_valid(tmp_path):
    path = tmp_path / "run.state.safetensors"
    first = run(state_path=path, steps=12, save_every=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no .tmp left
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == STATE_FORMAT and meta["step"] == "12"
    assert isinstance(json.loads(meta["param_groups"]), list)
    assert {"rng", "losses"} <= keys
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("ema.") for k in keys)
    assert any(k.startswith("optim.") for k in keys)
    # a finished run resumes to itself: nothing left to do, same weights
    again = run(state_path=path, steps=12, save_every=5)
    assert again.resumed_from == 12 and again.losses == first.losses
    assert _equal(again.model, first.model) and _equal(again.ema, first.ema)


def test_resume_with_other_settings_raises(tmp_path):
    # a state saved by a 12-step run must not silently continue as a 10-step run (another
    # learning-rate schedule), nor with another learning rate
    path = tmp_path / "state.safetensors"
    run(state_path=path, steps=12, save_every=5)
    with pytest.raises(ValueError, match="settings"):
        run(state_path=path, steps=10, save_every=5)
    with pytest.raises(ValueError, match="settings"):
        run(state_path=path, steps=12, save_every=5, lr=0.5)


def test_foreign_state_file_raises(tmp_path):
    path = tmp_path / "state.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a diffkit training state"):
        run(state_path=path)


def test_resume_is_exact_with_dropout(tmp_path):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.3), nn.Linear(16, 2))

    def loss_fn(model, batch, generator):
        return (model(batch[0]) - batch[0]).square().mean()

    kwargs = dict(steps=20, batch_size=8, save_every=5, progress=False)
    whole = train(make(), loss_fn, POINTS, state_path=tmp_path / "a.st", **kwargs)
    with pytest.raises(Interrupt):
        train(make(), loss_fn, POINTS, state_path=tmp_path / "b.st", callback=_stop_at(7),
              **kwargs)
    resumed = train(make(), loss_fn, POINTS, state_path=tmp_path / "b.st", **kwargs)
    assert _equal(whole.model, resumed.model)


def test_lr_factor():
    f = train_module._lr_factor
    assert [f(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, 100, 4, "cosine") == pytest.approx(1.0)
    assert f(99, 100, 4, "cosine") == pytest.approx(0.1, abs=1e-3)
    assert f(99, 100, 4, "constant") == 1.0


@pytest.mark.parametrize("overrides", [
    dict(steps=0), dict(steps=-3), dict(batch_size=0), dict(save_every=0),
    dict(ema_decay=1.0), dict(ema_decay=-0.1), dict(lr_schedule="linear"),
])
def test_bad_arguments_raise(overrides):
    with pytest.raises(ValueError):
        run(**overrides)


@pytest.mark.parametrize("data", [
    [], (torch.zeros(4, 2), torch.zeros(5)), torch.zeros(0, 2), "points", [torch.zeros(3), 1],
])
def test_bad_data_raises(data):
    with pytest.raises(ValueError, match="data"):
        train(small_mlp(), ddpm_loss, data, steps=2, progress=False)


class Capped(nn.Module):
    """A model with a parameter kept <= 1 by ``clamp_parameters``, counting its calls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5]))
        self.calls = []

    def clamp_parameters(self):
        self.calls.append(float(self.w.detach()))  # what the step left, before the clamp
        with torch.no_grad():
            self.w.clamp_(max=1.0)


def test_clamp_parameters_runs_after_every_optimiser_step():
    def loss_fn(model, batch, generator):
        return -10 * model.w.sum()                 # pushes w up, past the cap of 1

    model = Capped()
    result = train(model, loss_fn, POINTS, steps=20, batch_size=4, lr=0.1, warmup=1,
                   ema_decay=0.5, progress=False)
    assert len(model.calls) == 20                  # once per step
    assert max(model.calls) > 1.0                  # the steps did cross the cap...
    assert result.model.w.item() == 1.0            # ...and the clamp put w back on it
    assert result.ema.w.item() <= 1.0              # an average of capped values
