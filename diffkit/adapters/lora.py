"""The LoRA family written out: LoRA, LoCon and LoHa as updates of a frozen layer's weight.

Fine-tuning moves a pretrained weight W (out x in, or out x in x k x k) by a delta that is
assumed to have low intrinsic rank (Aghajanyan et al. 2021), so the delta is trained in
factored form and W stays frozen:

* LoRA (Hu et al. 2022): W + (alpha / r) B A with A (r x in) and B (out x r); A is drawn as
  ``nn.Linear`` draws a weight (Kaiming-uniform) and B starts at zero, so training starts at
  the base model. r (in + out) numbers per layer instead of in * out.
* LoCon (LyCORIS): the same on a convolution. A is a k x k convolution to r channels and B a
  1 x 1 convolution back, i.e. delta = B A with A (r x in k^2): r (in k^2 + out) numbers.
* LoHa (FedPara, Hyeon-Woo et al. 2022; LyCORIS): the Hadamard (elementwise) product of two
  rank-r products, delta = (alpha / r) (W1a W1b) * (W2a W2b), whose rank can reach r^2 for
  2 r (in k^2 + out) numbers; W2b starts at zero.

Each update is a ``torch.nn.utils.parametrize`` parametrization of the layer's ``weight`` (the
layer computes with W + multiplier * delta and its other code is untouched, as in minLoRA), with
the factors named and shaped as peft names them, so a state dict moves between the two. The
tests check the outputs equal peft's ``LoraConfig`` / ``LoHaConfig`` layers on the same weights.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn.utils import parametrize

KINDS = ("lora", "loha")
# the factors of each kind, in peft's names (peft's state-dict keys add ".weight" for LoRA)
FACTORS = {"lora": ("lora_A", "lora_B"),
           "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}


def _fan_in(weight_shape) -> int:
    return math.prod(weight_shape[1:])


def parameter_count(layer: nn.Module, kind: str, rank: int) -> int:
    """Trainable numbers of a ``kind`` update of rank ``rank`` on ``layer``, from the formulas:
    LoRA r (in k^2 + out), LoHa 2 r (in k^2 + out) (k = 1 for a Linear)."""
    _check_layer("layer", layer)
    out, fan_in = layer.weight.shape[0], _fan_in(layer.weight.shape)
    return (1 if _check_kind(kind) == "lora" else 2) * rank * (fan_in + out)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} (LoCon is 'lora' on a Conv2d), got {kind!r}")
    return kind


def _check_layer(name: str, layer: nn.Module) -> None:
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise ValueError(f"{name} is a {type(layer).__name__}; expected an nn.Linear or nn.Conv2d")
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.dilation != (1, 1)):
        raise ValueError(f"{name}: only convolutions with groups=1 and dilation=1 are supported")


class LowRankUpdate(nn.Module):
    """The parametrization weight -> weight + multiplier * delta of one layer.

    ``multiplier`` scales the update at use (diffusers' adapter weight, 1 by default);
    ``enabled`` False returns the base weight. The factors are parameters of this module.
    """

    def __init__(self, weight: torch.Tensor, kind: str, rank: int, alpha: float):
        super().__init__()
        self.kind, self.shape = _check_kind(kind), tuple(weight.shape)
        out, fan_in = self.shape[0], _fan_in(self.shape)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.multiplier, self.enabled = 1.0, True
        like = dict(dtype=weight.dtype, device=weight.device)
        if kind == "lora":
            # A has the layer's own input shape: (r, in) or (r, in, k, k), a k x k conv to r
            self.lora_A = nn.Parameter(torch.empty(rank, *self.shape[1:], **like))
            self.lora_B = nn.Parameter(torch.zeros(out, rank, **like))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            self.hada_w1_a = nn.Parameter(torch.empty(out, rank, **like))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, fan_in, **like))
            self.hada_w2_a = nn.Parameter(torch.empty(out, rank, **like))
            self.hada_w2_b = nn.Parameter(torch.zeros(rank, fan_in, **like))
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A for LoRA, (alpha / r) (W1a W1b) * (W2a W2b) for LoHa, layer-shaped."""
        if self.kind == "lora":
            product = self.lora_B @ self.lora_A.flatten(1)
        else:
            product = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (product * self.scaling).view(self.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + self.multiplier * self.delta().to(weight.dtype)


def matches(name: str, target: str) -> bool:
    """peft's ``target_modules`` rule: the module's name is, or ends with ".", the target."""
    return name == target or name.endswith("." + target)


def attach(model: nn.Module, targets: list[str], *, kind: str = "lora", rank: int,
           alpha: float | None = None) -> list[str]:
    """Freeze ``model`` and put a ``kind`` update of rank ``rank`` on every Linear / Conv2d whose
    name is, or ends with, one of ``targets`` (peft's ``target_modules`` rule); alpha defaults
    to the rank (scaling 1). Returns the names of the layers adapted. Copy a model before
    attaching, not after: a deep copy of a parametrized layer cannot be detached (torch swaps
    the layer's class and the copy's class is not the one it knows)."""
    _check_kind(kind)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(targets, str) or not targets:
        raise ValueError("targets must be a non-empty list of module names")
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    chosen = {name: m for name, m in model.named_modules()
              if name and any(matches(name, t) for t in targets)}
    missing = [t for t in targets if not any(matches(name, t) for name in chosen)]
    if missing:
        raise ValueError(f"no module of the model is named {missing}; expected names such as "
                         f"{[n for n, _ in model.named_modules() if n][:5]}")
    for name, layer in chosen.items():
        _check_layer(name, layer)
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"{name} already has an update; detach or merge it first")
        out, fan_in = layer.weight.shape[0], _fan_in(layer.weight.shape)
        if rank > min(out, fan_in):
            raise ValueError(f"rank {rank} is larger than {name} allows: at most "
                             f"min(out {out}, in x k x k {fan_in}) = {min(out, fan_in)}")
    model.requires_grad_(False)
    for layer in chosen.values():
        parametrize.register_parametrization(layer, "weight",
                                             LowRankUpdate(layer.weight, kind, rank, alpha))
    return list(chosen)


def updates(model: nn.Module) -> dict[str, LowRankUpdate]:
    """{layer name: its update} for every attached (not merged) update."""
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, LowRankUpdate):
                    found[name] = p
    return found


def _require(model: nn.Module) -> dict[str, LowRankUpdate]:
    found = updates(model)
    if not found:
        raise ValueError("the model has no attached update (call attach first)")
    return found


def set_multiplier(model: nn.Module, multiplier: float) -> None:
    """Scale every update at use: W + multiplier * delta (0 is the base model)."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, numbers.Real):
        raise ValueError(f"multiplier must be a number, got {multiplier!r}")
    for update in _require(model).values():
        update.multiplier = float(multiplier)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every update on or off (off: the layers compute with their base weights)."""
    for update in _require(model).values():
        update.enabled = bool(enabled)


def merge(model: nn.Module) -> list[str]:
    """Bake each update into its layer's weight (no extra cost at inference); the update is kept
    on the layer so that :func:`unmerge` can take it out again."""
    names = []
    for name, update in _require(model).items():
        layer = model.get_submodule(name)
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        layer.merged_update = update
        names.append(name)
    return names


@torch.no_grad()
def unmerge(model: nn.Module) -> list[str]:
    """Undo :func:`merge`: subtract each update from its weight and attach it again."""
    names = [name for name, m in model.named_modules() if hasattr(m, "merged_update")]
    if not names:
        raise ValueError("the model has no merged update (call merge first)")
    for name in names:
        layer = model.get_submodule(name)
        update = layer.merged_update
        del layer.merged_update
        layer.weight -= update(torch.zeros_like(layer.weight))
        parametrize.register_parametrization(layer, "weight", update)
    return names


def detach(model: nn.Module) -> list[str]:
    """Remove every attached update; the layers get their original weights back, bit for bit."""
    names = list(_require(model))
    for name in names:
        parametrize.remove_parametrizations(model.get_submodule(name), "weight",
                                            leave_parametrized=False)
    return names


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The updates' factors under peft's keys (``<layer>.lora_A.weight``, ``<layer>.hada_w1_a``),
    shaped as peft's (a conv LoRA's B as (out, r, 1, 1))."""
    out = {}
    for name, update in _require(model).items():
        for factor in FACTORS[update.kind]:
            tensor = getattr(update, factor).detach()
            if factor == "lora_B" and len(update.shape) == 4:
                tensor = tensor[..., None, None]
            key = f"{name}.{factor}.weight" if update.kind == "lora" else f"{name}.{factor}"
            out[key] = tensor.clone()
    return out


@torch.no_grad()
def load_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy factors saved by :func:`state_dict` (or peft) into the attached updates; every key
    must match an update and every update must be filled."""
    expected = {k: v.shape for k, v in state_dict(model).items()}
    if set(state) != set(expected):
        extra, lacking = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise ValueError(f"the adapter does not fit this model: unexpected keys {extra[:3]}, "
                         f"missing keys {lacking[:3]}")
    attached = updates(model)
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key]):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(expected[key])}")
        layer_name, factor = key.removesuffix(".weight").rsplit(".", 1)
        target = getattr(attached[layer_name], factor)
        target.copy_(tensor.reshape(target.shape))
