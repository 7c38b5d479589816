"""Checkpoints: a folder with ``model.safetensors`` (or a diffusers ``save_pretrained`` folder)
and ``card.json``, written atomically.

The card records the recipe, seed, steps, wall time, device, library versions, the model's
class and constructor arguments, and the quality figures measured when it was trained.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent / "checkpoints"


def checkpoint_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """checkpoints/NAME (or ROOT/NAME under another root)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"checkpoint name must be a plain folder name, got {name!r}")
    return (Path(root) if root is not None else ROOT) / name


def library_versions() -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "numpy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return versions


def _replace_folder(folder: Path, write) -> Path:
    """Call ``write(tmp)`` on a fresh temporary sibling folder, then swap it in for ``folder``:
    a crash leaves either the old folder or the new one, never half of each."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        for path in (tmp, *tmp.rglob("*")):  # mkdtemp makes 0700
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except OSError:
            if old.exists() and not folder.exists():
                os.replace(old, folder)  # put the previous checkpoint back
            raise
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _card_text(card: dict) -> str:
    try:
        return json.dumps(card, indent=2) + "\n"
    except TypeError as error:
        raise ValueError(f"card must be JSON-serialisable: {error}") from None


def save(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], card: dict) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/card.json`` all at once (atomically)."""
    if not tensors:
        raise ValueError("nothing to save: tensors is empty")
    text = _card_text(card)

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp / "model.safetensors"))
        (tmp / "card.json").write_text(text)
    return _replace_folder(Path(folder), write)


def _pretrained_members(model) -> dict[str, torch.nn.Module] | None:
    """{subfolder: model} for a diffusers model or pipeline ("" = the folder itself) or a
    ModuleDict of models; None for a plain diffkit network."""
    if hasattr(model, "save_pretrained"):
        return {"": model}
    if isinstance(model, torch.nn.ModuleDict) and len(model) and all(
            hasattr(m, "save_pretrained") for m in model.values()):
        return dict(model.items())
    return None


def describe(model: torch.nn.Module) -> dict:
    """The card's ``model`` entry: what ``load_model`` needs to rebuild the network."""
    members = _pretrained_members(model)
    if members is None:
        return {"class": type(model).__name__, "module": type(model).__module__,
                "kwargs": model.config}
    classes = {sub: type(m).__name__ for sub, m in members.items()}
    if list(classes) == [""]:
        return {"class": classes[""], "library": "diffusers"}
    return {"class": "ModuleDict", "library": "diffusers", "members": classes}


def save_model(folder: str | os.PathLike, model: torch.nn.Module, card: dict) -> Path:
    """Save a trained model with its card: diffusers models with ``save_pretrained`` (a family
    in a ModuleDict: one subfolder each), so ``from_pretrained`` loads them offline; a model
    with ``write_files(folder)`` (and ``read_files`` to load) writes its own files; other
    diffkit networks as ``model.safetensors``."""
    members = _pretrained_members(model)
    if members is None and hasattr(model, "write_files"):
        # a model that ships in its ecosystem's own files (an adapter: diffusers' LoRA file)
        text = _card_text(card)

        def write_own(tmp: Path) -> None:
            model.write_files(tmp)
            (tmp / "card.json").write_text(text)
        return _replace_folder(Path(folder), write_own)
    if members is None:
        return save(folder, model.state_dict(), card)
    text = _card_text(card)

    def write(tmp: Path) -> None:
        for sub, member in members.items():
            member.save_pretrained(str(tmp / sub) if sub else str(tmp), safe_serialization=True)
        (tmp / "card.json").write_text(text)
    return _replace_folder(Path(folder), write)


def write_card(folder: str | os.PathLike, card: dict) -> None:
    """Replace ``folder/card.json`` atomically (temp + rename), leaving the weights alone."""
    path = Path(folder) / "card.json"
    tmp = path.with_name("card.json.tmp")
    tmp.write_text(_card_text(card))
    os.replace(tmp, path)


def has_weights(name: str, root=None) -> bool:
    folder = checkpoint_dir(name, root)
    # model.safetensors, a diffusers folder, or an adapter's own files
    return any(folder.glob("**/*.safetensors")) or any(folder.glob("**/config.json"))


def load(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read (tensors, card) from a checkpoint folder."""
    folder = Path(folder)
    weights, card = folder / "model.safetensors", folder / "card.json"
    if not weights.exists() or not card.exists():
        raise ValueError(f"{folder} is not a checkpoint: expected model.safetensors and card.json "
                         f"(train it with `python -m diffkit.train {folder.name}`)")
    return load_file(str(weights)), json.loads(card.read_text())


def build_model(card: dict) -> torch.nn.Module:
    """Instantiate the network class named in ``card['model']`` with its saved arguments.

    The card names the class and the diffkit module that defines it (``module``). Cards written
    before the package was split into subpackages name a flat module (``diffkit.nets``) or none;
    :data:`LEGACY_CLASS_HOMES` maps those classes to their homes now. Only modules of this
    package are imported, so a card cannot make us import arbitrary code.
    """
    import importlib

    spec = card.get("model", {})
    module_name = spec.get("module")
    if module_name is None or module_name in LEGACY_MODULES:
        module_name = LEGACY_CLASS_HOMES.get(spec.get("class"), module_name)
    if not isinstance(module_name, str) or not (module_name == __package__
                                                or module_name.startswith(__package__ + ".")):
        raise ValueError(f"card names unknown model class {spec.get('class')!r} (module "
                         f"{module_name!r}); expected a class of a {__package__} module, e.g. one "
                         f"of {sorted(LEGACY_CLASS_HOMES)}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(f"card names module {module_name!r}, which {__package__} does not "
                         f"have") from error
    cls = getattr(module, spec["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{module_name} has no model class {spec['class']!r}")
    return cls(**spec.get("kwargs", {}))


# the flat modules of diffkit before its subpackages, as old cards name them
LEGACY_MODULES = {"diffkit.nets", "diffkit.metrics", "diffkit.guidance", "diffkit.clip",
                  "diffkit.blip", "diffkit.blip2", "diffkit.score"}
LEGACY_CLASS_HOMES = {"MLPDenoiser": "diffkit.nn.mlp", "UNet": "diffkit.nn.unet",
                      "DigitsJudge": "diffkit.nn.classifiers",
                      "NoisyDigitsClassifier": "diffkit.nn.classifiers",
                      "TinyCLIP": "diffkit.text.clip", "BLIPFamily": "diffkit.text.blip2"}


# the diffusers classes a card may name (from_pretrained on the checkpoint's folder)
DIFFUSERS_CLASSES = ("AutoencoderKL", "UNet2DConditionModel", "ControlNetModel", "T2IAdapter")
# whole pipelines (a model_index.json folder of components) a card may name
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def _from_pretrained(class_name: str, folder: Path):
    import diffusers

    if class_name not in DIFFUSERS_CLASSES + PIPELINE_CLASSES:
        raise ValueError(f"card names diffusers class {class_name!r}; expected one of "
                         f"{DIFFUSERS_CLASSES + PIPELINE_CLASSES}")
    index = "model_index.json" if class_name in PIPELINE_CLASSES else "config.json"
    if not (folder / index).exists():
        raise ValueError(f"{folder} holds no diffusers {class_name} ({index} missing)")
    model = getattr(diffusers, class_name).from_pretrained(str(folder))
    if class_name in PIPELINE_CLASSES:
        model.set_progress_bar_config(disable=True)
    return model


def _eval(model, device):
    """Move to ``device`` in eval mode; a pipeline (no ``eval``) has its components put there."""
    model = model.to(device or "cpu")
    if isinstance(model, torch.nn.Module):
        return model.eval()
    for component in model.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return model


def load_model(name: str, *, root=None, device=None) -> tuple[torch.nn.Module, dict]:
    """Load the EMA weights of checkpoint NAME into a fresh model (or diffusers pipeline), in
    eval mode."""
    folder = checkpoint_dir(name, root)
    if not (folder / "card.json").exists():
        raise ValueError(f"{folder} is not a checkpoint: card.json is missing (train it with "
                         f"`python -m diffkit.train {name}`)")
    card = json.loads((folder / "card.json").read_text())
    if card.get("model", {}).get("library") == "diffusers":
        spec = card["model"]
        if "members" in spec:
            model = torch.nn.ModuleDict({sub: _from_pretrained(cls, folder / sub)
                                         for sub, cls in spec["members"].items()})
        else:
            model = _from_pretrained(spec["class"], folder)
        return _eval(model, device), card
    model = build_model(card)
    if hasattr(model, "read_files"):       # its weights are in its ecosystem's own files
        model.read_files(folder)
        return model.to(device or "cpu").eval(), card
    tensors, card = load(folder)
    model.load_state_dict(tensors)
    return model.to(device or "cpu").eval(), card
