"""diffkit.checkpoints: atomic save/load, cards, building models, the shipped checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffkit import checkpoints
from diffkit.nn.classifiers import DigitsJudge
from diffkit.nn.mlp import MLPDenoiser
from diffkit.nn.unet import UNet


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.arange(5)}


def test_round_trip(tmp_path):
    card = {"recipe": "x", "measured": {"ratio": 0.5}, "list": [1, 2]}
    folder = checkpoints.save(tmp_path / "m", _tensors(), card)
    assert folder == tmp_path / "m"
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "model.safetensors"]
    tensors, loaded = checkpoints.load(folder)
    assert loaded == card
    assert json.loads((folder / "card.json").read_text()) == card
    assert tensors.keys() == {"w", "b"}
    assert all(torch.equal(tensors[k], v) for k, v in _tensors().items())


def test_save_replaces_atomically(tmp_path):
    checkpoints.save(tmp_path / "m", _tensors(0), {"version": 1})
    (tmp_path / "m.old").mkdir()  # a leftover of an earlier crash is cleaned too
    checkpoints.save(tmp_path / "m", _tensors(1), {"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    tensors, card = checkpoints.load(tmp_path / "m")
    assert card == {"version": 2} and torch.equal(tensors["w"], _tensors(1)["w"])


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    checkpoints.save(tmp_path / "m", _tensors(0), {"version": 1})
    with pytest.raises(Exception):
        checkpoints.save(tmp_path / "m", {"w": "not a tensor"}, {"version": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert checkpoints.load(tmp_path / "m")[1] == {"version": 1}


def _fail_final_rename(monkeypatch):
    """Make the rename of the temporary folder onto the checkpoint's name fail."""
    real = checkpoints.os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("simulated failure of the final rename")
        return real(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", replace)


def test_old_checkpoint_survives_a_failed_final_rename(tmp_path, monkeypatch):
    checkpoints.save(tmp_path / "m", _tensors(0), {"version": 1})
    _fail_final_rename(monkeypatch)
    with pytest.raises(OSError):
        checkpoints.save(tmp_path / "m", _tensors(1), {"version": 2})
    # the old data must not be destroyed before the new is in place
    survivors = [f for f in (tmp_path / "m", tmp_path / "m.old") if f.exists()]
    assert [checkpoints.load(f)[1] for f in survivors] == [{"version": 1}]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_old_checkpoint_stays_loadable_after_a_failed_final_rename(tmp_path, monkeypatch):
    checkpoints.save(tmp_path / "m", _tensors(0), {"version": 1})
    _fail_final_rename(monkeypatch)
    with pytest.raises(OSError):
        checkpoints.save(tmp_path / "m", _tensors(1), {"version": 2})
    assert checkpoints.load(tmp_path / "m")[1] == {"version": 1}


def test_bad_card_or_tensors_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        checkpoints.save(tmp_path / "sub" / "m", _tensors(), {"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        checkpoints.save(tmp_path / "m", _tensors(), {"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="empty"):
        checkpoints.save(tmp_path / "m", {}, {})
    assert list(tmp_path.iterdir()) == []


def test_load_missing_names_the_recipe_command(tmp_path):
    with pytest.raises(ValueError, match="python -m diffkit.train my-recipe"):
        checkpoints.load(tmp_path / "my-recipe")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "card.json").write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors"):
        checkpoints.load(tmp_path / "half")
    with pytest.raises(ValueError, match="python -m diffkit.train nothing-here"):
        checkpoints.load_model("nothing-here", root=tmp_path)


def test_checkpoint_dir(tmp_path):
    assert checkpoints.checkpoint_dir("toy2d-ddpm", tmp_path) == tmp_path / "toy2d-ddpm"
    assert checkpoints.checkpoint_dir("toy2d-ddpm") == checkpoints.ROOT / "toy2d-ddpm"
    assert checkpoints.ROOT.name == "checkpoints"
    for bad in ("", "a/b", "../x", ".", "..", ".hidden", "/abs"):
        with pytest.raises(ValueError, match="plain folder name"):
            checkpoints.checkpoint_dir(bad, tmp_path)


@pytest.mark.parametrize("cls, kwargs", [
    (MLPDenoiser, dict(dim=2, width=16, depth=1, emb_dim=8, num_classes=None)),
    (UNet, dict(in_channels=1, base_channels=8, channel_mults=[1, 2], num_res_blocks=1,
                emb_dim=16, num_classes=10, dropout=0.0, attention=True)),
    (DigitsJudge, {}),
])
def test_build_and_load_model(tmp_path, cls, kwargs):
    torch.manual_seed(0)
    model = cls(**kwargs).eval()
    card = {"model": {"class": cls.__name__, "kwargs": model.config}}
    card = json.loads(json.dumps(card))  # as it comes back from card.json
    built = checkpoints.build_model(card)
    assert type(built) is cls and built.config == model.config
    checkpoints.save(tmp_path / "net", model.state_dict(), card)
    loaded, loaded_card = checkpoints.load_model("net", root=tmp_path)
    assert type(loaded) is cls and not loaded.training and loaded_card == card
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("card", [{}, {"model": {}}, {"model": {"class": "ResNet"}},
                                  {"model": {"class": "nn.Linear", "kwargs": {}}}])
def test_build_model_unknown_class(card):
    with pytest.raises(ValueError, match="unknown model class"):
        checkpoints.build_model(card)


def test_build_model_from_named_module_only_inside_the_package():
    card = {"model": {"class": "UNet", "module": "diffkit.nn.unet",
                      "kwargs": dict(in_channels=1, base_channels=8, channel_mults=[1])}}
    assert type(checkpoints.build_model(card)) is UNet
    for module, cls, match in [("os", "system", "unknown model class"),
                               ("diffkitx.nets", "UNet", "unknown model class"),
                               ("diffkit.nn.unet", "timestep_embedding", "no model class"),
                               ("diffkit.nn.unet", "Missing", "no model class")]:
        with pytest.raises(ValueError, match=match):
            checkpoints.build_model({"model": {"class": cls, "module": module}})


def test_library_versions():
    versions = checkpoints.library_versions()
    assert {"python", "torch", "numpy"} <= versions.keys()
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_shipped_digits_judge(shipped_model):
    judge, card = shipped_model("digits-judge")
    assert isinstance(judge, DigitsJudge) and not judge.training
    assert card["recipe"] == "digits-judge"
    assert judge(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_shipped_toy2d_ddpm(shipped_model):
    model, card = shipped_model("toy2d-ddpm")
    assert isinstance(model, MLPDenoiser) and not model.training
    assert card["recipe"] == "toy2d-ddpm"
    with torch.no_grad():
        out = model(torch.zeros(3, 2), torch.tensor([0, 500, 999]))
    assert out.shape == (3, 2) and torch.isfinite(out).all()
    # the weights on disk are exactly what was loaded
    on_disk = load_file(str(checkpoints.ROOT / "toy2d-ddpm" / "model.safetensors"))
    state = model.state_dict()
    assert on_disk.keys() == state.keys() and all(torch.equal(on_disk[k], state[k]) for k in state)


def test_shipped_digits_ddpm(shipped_model):
    model, card = shipped_model("digits-ddpm")
    assert isinstance(model, UNet) and not model.training and card["recipe"] == "digits-ddpm"
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 999])).shape == (2, 1, 8, 8)
