"""The one place that reads diffkit's environment variables and picks the device.

``DIFFKIT_FAST``     "1"/"0" (also true/false/yes/no). Default: fast unless CUDA is present.
``DIFFKIT_DEVICE``   "cpu", "cuda", "cuda:N" or "mps". Default: cuda, then mps, then cpu.
``DIFFKIT_SD_MODEL`` a diffusers folder or hub id of a pretrained Stable Diffusion (optional).
"""

from __future__ import annotations

import os

import torch

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name} must be one of {sorted(_TRUE | _FALSE)}, got {value!r}")


def fast_mode() -> bool:
    """True when chapters should load checkpoints and use small sample counts."""
    value = os.environ.get("DIFFKIT_FAST")
    if value is None or value.strip() == "":
        return not torch.cuda.is_available()
    return _parse_bool("DIFFKIT_FAST", value)


def device() -> torch.device:
    """The device to compute on: DIFFKIT_DEVICE if set, else cuda, then mps, then cpu."""
    value = os.environ.get("DIFFKIT_DEVICE", "").strip()
    if value:
        kind = value.split(":")[0]
        if kind not in {"cpu", "cuda", "mps"}:
            raise ValueError(f"DIFFKIT_DEVICE must be cpu, cuda, cuda:N or mps, got {value!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError("DIFFKIT_DEVICE asks for cuda but torch sees no CUDA device")
        if kind == "mps" and not torch.backends.mps.is_available():
            raise ValueError("DIFFKIT_DEVICE asks for mps but torch sees no MPS device")
        return torch.device(value)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sd_model() -> str | None:
    """Folder or hub id of a pretrained Stable Diffusion pipeline, if the reader set one."""
    value = os.environ.get("DIFFKIT_SD_MODEL", "").strip()
    return value or None


def pick(fast, full):
    """Return ``fast`` in fast mode and ``full`` otherwise (sample counts, step counts)."""
    return fast if fast_mode() else full
