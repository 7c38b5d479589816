"""LoRA-family adapters on disk, in the formats the ecosystem loads.

* LoRA and LoCon: ``pytorch_lora_weights.safetensors`` written by diffusers'
  ``StableDiffusionPipeline.save_lora_weights`` with the adapter's peft configuration as metadata
  (without it the loader assumes alpha = r), and the raw peft key names (diffusers' conversion
  renames attention keys only, and a file mixing the two styles loses its attention weights on
  load). ``pipe.load_lora_weights(folder)`` reads it.
* LoHa: diffusers' loader rejects it, so it ships as peft does, ``adapter_model.safetensors`` and
  ``adapter_config.json``, loaded by ``inject_adapter_in_model`` and ``set_peft_model_state_dict``;
  after that diffusers' ``set_adapters``, ``fuse_lora`` and ``unload_lora_weights`` work on it.

Both also get ``diffkit_adapter.json``: the kind, rank and alpha and a fingerprint of the base
UNet (its class and the shapes of the adapted weights), so that loading an adapter into another
base model fails with a ValueError before any weight is touched. Saves are atomic.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from diffkit.adapters import lora

LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
META_FILE = "diffkit_adapter.json"


def describe(unet) -> dict:
    """Kind, rank, alpha, target layers and the base fingerprint of the attached updates (one
    kind, rank and alpha for all: that is what one peft configuration can express)."""
    found = lora.updates(unet)
    if not found:
        raise ValueError("the model has no attached update (call lora.attach first)")
    settings = {(u.kind, u.rank, u.alpha) for u in found.values()}
    if len(settings) != 1:
        raise ValueError(f"the updates mix kinds, ranks or alphas {sorted(settings)}; one "
                         "adapter file holds one setting")
    kind, rank, alpha = settings.pop()
    return {"kind": kind, "rank": rank, "alpha": alpha, "targets": sorted(found),
            "base": {"class": type(unet).__name__,
                     "weights": {name: list(u.shape) for name, u in sorted(found.items())}}}


def peft_config(meta: dict):
    """The peft configuration equal to an adapter's ``describe`` record."""
    from peft import LoHaConfig, LoraConfig

    if meta["kind"] == "lora":
        return LoraConfig(r=meta["rank"], lora_alpha=meta["alpha"],
                          target_modules=meta["targets"], init_lora_weights=True)
    return LoHaConfig(r=meta["rank"], alpha=meta["alpha"], target_modules=meta["targets"])


def write(unet, folder) -> None:
    """Write the UNet's attached updates into the existing folder ``folder``."""
    from diffusers import StableDiffusionPipeline

    meta, folder = describe(unet), Path(folder)
    state = {k: v.contiguous() for k, v in lora.state_dict(unet).items()}
    if meta["kind"] == "lora":
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=state, weight_name=LORA_FILE,
            unet_lora_adapter_metadata=peft_config(meta).to_dict())
    else:
        save_file(state, str(folder / PEFT_FILE))
        peft_config(meta).save_pretrained(str(folder))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save(unet, folder) -> Path:
    """Write the UNet's attached updates to ``folder`` (replaced atomically)."""
    from diffkit.checkpoints import _replace_folder

    describe(unet)          # refuse a model without updates before touching the folder
    return _replace_folder(Path(folder), lambda tmp: write(unet, tmp))


def read_meta(folder, unet=None) -> dict:
    """The adapter's ``describe`` record, checked to fit ``unet`` when one is given."""
    path = Path(folder) / META_FILE
    if not path.exists():
        raise ValueError(f"{folder} holds no {META_FILE}: not an adapter saved by lora_io.save")
    meta = json.loads(path.read_text())
    if unet is not None:
        check_fits(unet, meta)
    return meta


def check_fits(unet, meta: dict) -> None:
    """ValueError unless every adapted layer exists in ``unet`` with the weight shape the adapter
    was trained on (an adapter of another base model)."""
    modules = dict(unet.named_modules())
    misfits = []
    for name, shape in meta["base"]["weights"].items():
        layer = modules.get(name)
        weight = getattr(layer, "weight", None)
        if weight is None or list(weight.shape) != shape:
            misfits.append(f"{name}: adapter {shape}, model "
                           f"{list(weight.shape) if weight is not None else 'no such layer'}")
    if misfits:
        raise ValueError(f"the adapter was trained on another base model: {misfits[:3]}"
                         f"{' ...' if len(misfits) > 3 else ''}")


def load_into(pipe, folder, adapter_name: str) -> dict:
    """Load a saved adapter into a diffusers pipeline under ``adapter_name``, with diffusers'
    own call for LoRA / LoCon and peft's for LoHa. Returns the adapter's record."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    meta, folder = read_meta(folder, pipe.unet), Path(folder)
    if meta["kind"] == "lora":
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(peft_config(meta), pipe.unet, adapter_name=adapter_name)
        state = load_file(str(folder / PEFT_FILE), device=str(pipe.unet.device))
        result = set_peft_model_state_dict(pipe.unet, state, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise ValueError(f"{folder}: keys the model has no place for "
                             f"{result.unexpected_keys[:3]}")
    return meta


def fill(unet, folder) -> dict:
    """Fill the updates already attached to ``unet`` (as the adapter's record says) from a saved
    adapter."""
    meta, folder = read_meta(folder, unet), Path(folder)
    if meta["kind"] == "lora":
        state = {k.removeprefix("unet."): v for k, v in load_file(str(folder / LORA_FILE)).items()}
    else:
        state = load_file(str(folder / PEFT_FILE))
    lora.load_state_dict(unet, {k: v.to(unet.device) for k, v in state.items()})
    return meta


def load_attached(unet, folder) -> dict:
    """Attach diffkit's own updates to ``unet`` and fill them from a saved adapter."""
    meta = read_meta(folder, unet)
    lora.attach(unet, meta["targets"], kind=meta["kind"], rank=meta["rank"], alpha=meta["alpha"])
    return fill(unet, folder)


def file_size(folder) -> int:
    """Bytes of the adapter's weight file."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in (folder / LORA_FILE, folder / PEFT_FILE) if p.exists())

