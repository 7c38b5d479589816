"""An adapter of a shipped UNet as a checkpoint of the book: ``checkpoints/NAME`` holds the
adapter in the files the ecosystem loads (:mod:`diffkit.adapters.lora_io`: diffusers'
``pytorch_lora_weights.safetensors`` for LoRA / LoCon, peft's files for LoHa) and the card; no
copy of the base model. ``diffkit.checkpoints.load_model(NAME)`` rebuilds it: the base
pipeline's UNet with the updates attached and filled from those files.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from diffkit.adapters import lora, lora_io


class UNetAdapter(torch.nn.Module):
    """The UNet of the shipped pipeline ``base`` with a ``kind`` update of rank ``rank`` on
    ``targets`` (peft's rule); called like the UNet. The base stays frozen; the factors train."""

    def __init__(self, base: str, kind: str, rank: int, targets: list[str],
                 alpha: float | None = None):
        from diffkit import checkpoints

        super().__init__()
        pipe, _ = checkpoints.load_model(base)
        self.unet = copy.deepcopy(pipe.unet)
        lora.attach(self.unet, list(targets), kind=kind, rank=rank, alpha=alpha)
        self.config = dict(base=base, kind=kind, rank=rank, targets=list(targets),
                           alpha=rank if alpha is None else alpha)

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)

    def factor_count(self) -> int:
        """The numbers the adapter trains (its factors; frozen or not, as in an EMA copy)."""
        return sum(p.numel() for update in lora.updates(self.unet).values()
                   for p in update.parameters())

    def write_files(self, folder) -> None:
        lora_io.write(self.unet, folder)

    def read_files(self, folder) -> None:
        lora_io.fill(self.unet, folder)


class AdapterFamily(torch.nn.Module):
    """Several ``UNetAdapter`` of one base as one checkpoint, a subfolder per member (a sweep)."""

    def __init__(self, members: dict[str, dict]):
        super().__init__()
        self.members = torch.nn.ModuleDict({name: UNetAdapter(**spec)
                                            for name, spec in members.items()})
        self.config = dict(members={name: m.config for name, m in self.members.items()})

    def write_files(self, folder) -> None:
        for name, member in self.members.items():
            (Path(folder) / name).mkdir()
            member.write_files(Path(folder) / name)

    def read_files(self, folder) -> None:
        for name, member in self.members.items():
            member.read_files(Path(folder) / name)
