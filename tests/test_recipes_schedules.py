"""diffkit.recipes.schedules: the digits-ddpm-cosine recipe and its shipped checkpoint."""

import torch

from diffkit import recipes

NAME = "digits-ddpm-cosine"


def test_registered_next_to_digits_ddpm():
    assert NAME in recipes.RECIPES
    spec, base = recipes.RECIPES[NAME], recipes.RECIPES["digits-ddpm"]
    assert spec.name == NAME and spec.description and "cosine" in spec.description
    assert spec.steps == base.steps == 6000


def test_same_recipe_as_digits_ddpm_but_the_schedule(tmp_path):
    # a few steps of each: everything but the schedule must agree (the chapter 2 comparison)
    runs = {}
    for name in ("digits-ddpm", NAME):
        torch.manual_seed(recipes.SEED)
        result, hyper = recipes.RECIPES[name].train(3, torch.device("cpu"),
                                                    tmp_path / f"{name}.state.safetensors", False)
        runs[name] = (result, hyper)
    (lin, lin_hyper), (cos, cos_hyper) = runs["digits-ddpm"], runs[NAME]
    assert lin_hyper.pop("schedule") == "linear" and cos_hyper.pop("schedule") == "cosine"
    assert lin_hyper == cos_hyper
    assert lin.ema.config == cos.ema.config and type(lin.ema) is type(cos.ema)
    # same initial weights and batches, different noise levels: the losses differ
    assert lin.losses != cos.losses


def test_shipped_card_quality(shipped_card):
    # the card's figures; tests/test_shipped_models.py re-measures them live
    card = shipped_card(NAME)
    assert card["recipe"] == NAME and card["steps"] == recipes.RECIPES[NAME].steps
    assert card["hyperparameters"]["schedule"] == "cosine"
    m = card["measured"]
    assert m["n"] == 1000
    # the bar of digits-ddpm (chapter 1): >= 90% confidently classified, all 10 classes,
    # and a Frechet distance within 3x of the real-data floor at the same N
    assert m["confident_fraction"] >= 0.9
    assert m["classes_present"] == 10
    assert m["frechet"] < 3 * m["frechet_floor"]


def test_shipped_checkpoint_loads(shipped_card, shipped_model):
    model, loaded = shipped_model(NAME)
    assert loaded == shipped_card(NAME) and type(model).__name__ == loaded["model"]["class"]
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 8, 8) and bool(torch.isfinite(out).all())
