"""diffkit.recipes and ``python -m diffkit.train``: cards, the CLI, the shipped checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffkit import checkpoints, data, recipes
from diffkit.eval import distributions, metrics
from diffkit.train import __main__ as train_cli

NAMES = ("digits-judge", "toy2d-ddpm", "digits-ddpm")
CARD_KEYS = {"recipe", "seed", "steps", "train_seconds", "device", "versions", "model", "measured"}




def _env():
    # one thread: faster on a shared 2-core machine; cpu: never pick up a GPU in a smoke test
    return {**os.environ, "OMP_NUM_THREADS": "1", "DIFFKIT_DEVICE": "cpu"}


def test_registry():
    assert set(NAMES) <= set(recipes.RECIPES)
    for name in NAMES:
        spec = recipes.RECIPES[name]
        assert spec.name == name and spec.steps > 0 and spec.description


def test_run_toy2d_writes_a_card(tmp_path, monkeypatch):
    # the full quality measurement samples 2000 points through 1000 steps (~1 min on 2 cores);
    # the card's structure is the same with fewer points
    monkeypatch.setattr(recipes.ddpm, "toy2d_quality",
                        lambda *args, **kw: distributions.toy2d_quality(*args, **{**kw, "n": 64}))
    card = recipes.run("toy2d-ddpm", root=tmp_path, steps=30, progress=False, device="cpu")
    assert CARD_KEYS <= card.keys()
    assert card["recipe"] == "toy2d-ddpm" and card["steps"] == 30 and card["seed"] == recipes.SEED
    assert card["device"] == "cpu"
    # the wall times add up: training and measuring are both inside the total
    assert 0 < card["train_seconds"] <= card["total_seconds"]
    assert 0 < card["measure_seconds"] <= card["total_seconds"]
    assert card["train_seconds"] + card["measure_seconds"] <= card["total_seconds"] + 0.2
    assert "torch" in card["versions"]
    assert card["model"]["class"] == "MLPDenoiser"
    assert {"sliced_w2", "sliced_w2_floor", "ratio", "n"} <= card["measured"].keys()
    assert card["measured"]["n"] == 64
    assert card["measured"]["ratio"] == pytest.approx(
        card["measured"]["sliced_w2"] / card["measured"]["sliced_w2_floor"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy2d-ddpm"]  # no .state file left
    assert json.loads((tmp_path / "toy2d-ddpm" / "card.json").read_text()) == card
    model, _ = checkpoints.load_model("toy2d-ddpm", root=tmp_path)
    assert model(torch.zeros(2, 2), torch.tensor([0, 1])).shape == (2, 2)


def test_unknown_recipe_and_bad_steps(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.run("toy3d", root=tmp_path)
    with pytest.raises(ValueError, match="steps"):
        recipes.run("toy2d-ddpm", root=tmp_path, steps=0)
    assert list(tmp_path.iterdir()) == []


def test_cli_needs_a_recipe(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main([])
    assert exit_info.value.code == 2
    assert train_cli.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in NAMES)


def test_cli_list_subprocess():
    done = subprocess.run([sys.executable, "-m", "diffkit.train", "--list"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    assert set(NAMES) <= set(listed)


def test_cli_smoke_run(tmp_path):
    done = subprocess.run([sys.executable, "-m", "diffkit.train", "digits-judge", "--steps", "20",
                           "--out", str(tmp_path)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    card = json.loads(done.stdout)
    assert card["recipe"] == "digits-judge" and card["steps"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-judge"]
    saved = json.loads((tmp_path / "digits-judge" / "card.json").read_text())
    assert saved == card
    # the card's accuracy is that of the saved weights, recomputed here; 20 of 3000 steps (the
    # learning rate still warming up) leave the judge far below the shipped one's bar of 0.97
    judge, _ = checkpoints.load_model("digits-judge", root=tmp_path)
    x, y = data.digits("test")
    assert card["measured"]["test_accuracy"] == metrics.accuracy(judge, x, y)
    assert card["measured"]["test_accuracy"] < 0.9


def test_shipped_toy2d_quality_bar(shipped_card):
    # the card's figures; tests/test_shipped_models.py re-measures every shipped model live
    card = shipped_card("toy2d-ddpm")
    assert card["recipe"] == "toy2d-ddpm" and CARD_KEYS <= card.keys()
    # the sample distance is within 2x of what two true sample sets already differ by
    assert card["measured"]["ratio"] <= 2.0
    assert card["steps"] == recipes.RECIPES["toy2d-ddpm"].steps


def test_shipped_judge_accuracy(shipped_card):
    card = shipped_card("digits-judge")
    assert CARD_KEYS <= card.keys()
    assert card["measured"]["test_accuracy"] >= 0.97
    assert card["steps"] == recipes.RECIPES["digits-judge"].steps


def test_shipped_digits_ddpm_quality(shipped_card):
    card = shipped_card("digits-ddpm")
    assert CARD_KEYS <= card.keys()
    assert card["measured"]["n"] == 1000
    assert card["measured"]["confident_fraction"] >= 0.9
    assert card["measured"]["classes_present"] == 10
    assert card["measured"]["frechet"] < 3 * card["measured"]["frechet_floor"]


def test_shipped_files_are_small_safetensors():
    root = checkpoints.ROOT
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp"))
    assert folders, "no shipped checkpoints found"
    for folder in folders:
        weights = sorted(folder.rglob("*.safetensors"))
        assert weights, f"{folder} holds no safetensors weights"
        for path in weights:
            assert path.stat().st_size < 16 * 2 ** 20, f"{path} is over 16 MiB"
        leftovers = [p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]
        assert leftovers == [], f"half-written files in {folder}"
    # (a NAME.state.safetensors next to the folders is a training in progress, not shipped)
    pickles = [p for p in root.rglob("*") if p.suffix in {".pt", ".pth", ".pkl", ".pickle",
                                                          ".bin", ".ckpt"}]
    assert pickles == [], "weights must be safetensors only"


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_ships_a_loadable_checkpoint(name, shipped_model):
    # each registered recipe has its checkpoint in the repository, trained with the recipe's own
    # step count within the recipe time bar (30 min on a 2-core CPU), and the card rebuilds the
    # model that the weights fit
    model, card = shipped_model(name)
    spec = recipes.RECIPES[name]
    assert CARD_KEYS <= card.keys() and card["recipe"] == name
    assert card["steps"] == spec.steps
    assert card["total_seconds"] <= spec.time_bar_seconds, (
        f"{name} took {card['total_seconds'] / 60:.1f} min to train and measure; the bar is "
        f"{spec.time_bar_seconds / 60:.0f} min: make the recipe cheaper")
    assert card["train_seconds"] <= card["total_seconds"]
    # a pipeline is not a module: its networks are what must be in eval mode
    networks = [model] if isinstance(model, torch.nn.Module) else [
        c for c in model.components.values() if isinstance(c, torch.nn.Module)]
    assert networks and not any(n.training for n in networks)


def test_time_bars():
    # 30 min for every recipe but the one its issue grants 45 (the tiny Stable Diffusion)
    bars = {name: spec.time_bar_seconds for name, spec in recipes.RECIPES.items()}
    assert {n: b for n, b in bars.items() if b != recipes.TIME_BAR_SECONDS} == {
        "shapes-sd": 45 * 60}


def test_every_shipped_folder_is_a_recipe():
    # nothing ships that no recipe makes (and so no test measures)
    folders = {p.name for p in checkpoints.ROOT.iterdir() if p.is_dir()
               and not p.name.endswith((".tmp", ".old"))}
    assert folders == set(recipes.RECIPES), folders ^ set(recipes.RECIPES)
