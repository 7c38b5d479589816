"""The chapter-11 recipes: an adapter checkpoint is diffusers' LoRA file plus a card, loads with
``checkpoints.load_model`` and with ``pipe.load_lora_weights``, and both give the same UNet."""

import pytest
import torch

from diffkit import checkpoints, recipes
from diffkit.adapters import finetune, lora, lora_io
from diffkit.eval import lora_probes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(recipes.lora.LORA_HYPER, "concept_scenes", 32)
        mp.setitem(recipes.lora.LORA_HYPER, "base_scenes", 32)
        mp.setattr(recipes.lora, "MEASURE_N", 4)
        report = lora_probes.report
        mp.setattr(lora_probes, "report", lambda *a, **kw: report(*a, **{**kw, "steps": 2}))
        card = recipes.run("shapes-lora-ring", root=root, steps=3, progress=False,
                           device="cpu")
    return root, card


def test_the_checkpoint_is_the_adapter_in_diffusers_format(trained):
    root, card = trained
    folder = root / "shapes-lora-ring"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["card.json", lora_io.LORA_FILE, lora_io.META_FILE])
    assert sorted(p.name for p in root.iterdir()) == ["shapes-lora-ring"]    # no state left
    hyper = card["hyperparameters"]
    assert hyper["kind"] == "lora" and hyper["rank"] == 4 and hyper["concept"] == "ring"
    assert "conv1" in " ".join(hyper["target_modules"]) and hyper["prompt"].count("ring") == 1
    assert {"concept_adapted", "concept_base", "damage", "damage_se",
            "base_colour_shape_base"} <= set(card["measured"])
    # the file holds the factors and nothing of the base model
    assert lora_io.file_size(folder) < 4 * hyper["trainable_parameters"] + 64 * 1024


def test_load_model_and_load_lora_weights_give_the_same_unet(trained):
    root, _ = trained
    adapter, _ = checkpoints.load_model("shapes-lora-ring", root=root)
    assert any(u.lora_B.abs().max() > 0 for u in lora.updates(adapter.unet).values())
    pipe = finetune.concept_pipeline("cpu")
    pipe.load_lora_weights(str(root / "shapes-lora-ring"), weight_name=lora_io.LORA_FILE)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    states = torch.randn(2, 20, pipe.text_encoder.config.hidden_size, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        ours = adapter(z, t, encoder_hidden_states=states).sample
        theirs = pipe.unet(z, t, encoder_hidden_states=states).sample
    assert (ours - theirs).abs().max() < 1e-5


def test_concept_pipeline_decodes_with_the_fine_tuned_decoder():
    pipe = finetune.concept_pipeline("cpu")
    tuned, _ = checkpoints.load_model("shapes-vae-ft")
    sd_vae = pipe.vae.state_dict()
    assert all(torch.equal(v, sd_vae[k]) for k, v in tuned.state_dict().items())


def test_report_refuses_an_unknown_concept():
    with pytest.raises(ValueError, match="concept must be one of"):
        lora_probes.report(None, None, "purple", n=2, steps=2, guidance_scale=3.0)


def test_the_sweep_trains_traces_and_measures_every_member(tmp_path, monkeypatch):
    from diffkit.recipes import lora as R

    monkeypatch.setitem(R.LORA_HYPER, "concept_scenes", 16)
    monkeypatch.setitem(R.LORA_HYPER, "base_scenes", 16)
    monkeypatch.setattr(R, "SWEEP_RANKS", (1, 2))
    monkeypatch.setattr(R, "ADAPTERS", {"ring": R.ADAPTERS["ring"]})
    monkeypatch.setattr(R, "TRACE_EVERY", 2)
    monkeypatch.setattr(R, "TRACE_N", 3)
    monkeypatch.setattr(R, "SWEEP_MEASURE_N", 3)
    monkeypatch.setattr(R, "_sampling", lambda: dict(steps=2, guidance_scale=3.0,
                                                     sampler="dpmpp_2m"))
    card = recipes.run("shapes-lora-sweep", root=tmp_path, steps=4, progress=False,
                       device="cpu")
    names = {f"ring-{k}-r{r}" for k in ("lora", "locon", "loha") for r in (1, 2)}
    assert set(card["measured"]) == names == set(card["hyperparameters"]["training"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes-lora-sweep"]
    for name, figures in card["measured"].items():
        trace = card["hyperparameters"]["training"][name]["concept_trace"]
        assert trace["steps"] == [2, 4] and all(0 <= a <= 1 for a in trace["concept"])
        assert figures["trainable_parameters"] > 0 and figures["file_bytes"] > 0
    count = {name: figures["trainable_parameters"] for name, figures in card["measured"].items()}
    # the counts the formulas give: rank doubles the factors; LoHa has two pairs per layer
    assert count["ring-lora-r2"] == 2 * count["ring-lora-r1"]
    assert count["ring-loha-r1"] == 2 * count["ring-locon-r1"] > 2 * count["ring-lora-r1"]
    m = card["measured"]
    family, _ = checkpoints.load_model("shapes-lora-sweep", root=tmp_path)
    folder = tmp_path / "shapes-lora-sweep" / "ring-loha-r2"
    assert lora_io.read_meta(folder)["kind"] == "loha"
    assert lora_io.file_size(folder) == m["ring-loha-r2"]["file_bytes"]
    assert set(family.members) == names
