"""diffkit.adapters.lora: LoRA, LoCon and LoHa against peft, merge / unmerge, counts, errors."""

import copy
import math

import pytest
import torch
from peft import LoHaConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft import set_peft_model_state_dict
from torch import nn

from diffkit.adapters import lora
from diffkit.latent import tiny_sd


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, vectors, images):
        return self.fc(vectors), self.conv(images)


def inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 6, generator=g, dtype=dtype), torch.randn(2, 3, 8, 8, generator=g,
                                                                    dtype=dtype)


def randomise(model, seed=1):
    # the zero factor at init would make any parity trivially true
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for update in lora.updates(model).values():
            for p in update.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def peft_twin(model, kind, rank, alpha, targets):
    cls = LoraConfig if kind == "lora" else LoHaConfig
    config = cls(r=rank, lora_alpha=alpha, target_modules=targets) if kind == "lora" else cls(
        r=rank, alpha=alpha, target_modules=targets)
    return inject_adapter_in_model(config, copy.deepcopy(model))


def max_diff(a, b):
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["lora", "loha"])
@pytest.mark.parametrize("rank,alpha", [(1, 1), (2, 3.0), (3, 8)])
def test_equal_to_peft_on_linear_and_conv(kind, rank, alpha):
    base = TwoLayers().double()
    theirs = peft_twin(base, kind, rank, alpha, ["fc", "conv"])
    ours = copy.deepcopy(base)
    assert lora.attach(ours, ["fc", "conv"], kind=kind, rank=rank, alpha=alpha) == ["fc", "conv"]
    randomise(ours)
    state = lora.state_dict(ours)
    assert set(state) == set(get_peft_model_state_dict(theirs))      # peft's own key names
    result = set_peft_model_state_dict(theirs, state)
    assert not result.unexpected_keys
    x = inputs()
    assert max_diff(ours(*x), theirs(*x)) <= 1e-6
    assert max_diff(ours(*x), base(*x)) > 1e-2                     # the update does something
    # the same trainable numbers, and the formula's
    trainable = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    formula = sum(lora.parameter_count(getattr(base, n), kind, rank) for n in ("fc", "conv"))
    assert trainable(ours) == trainable(theirs) == formula
    expected = (1 if kind == "lora" else 2) * rank * ((6 + 5) + (3 * 9 + 4))
    assert formula == expected


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_initialisation_starts_at_the_base_model_with_peft_rule(kind):
    base = TwoLayers().double()
    ours = copy.deepcopy(base)
    lora.attach(ours, ["fc", "conv"], kind=kind, rank=2)
    theirs = peft_twin(base, kind, 2, 2, ["fc", "conv"])
    x = inputs()
    assert max_diff(ours(*x), base(*x)) == 0                        # the zero factor
    ours_state, their_state = lora.state_dict(ours), get_peft_model_state_dict(theirs)
    for key, tensor in ours_state.items():
        peer = their_state[key]
        zero = bool((tensor == 0).all())
        assert zero == bool((peer == 0).all()), key             # the same factor starts at 0
        if not zero:   # Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in) for both
            bound = 1 / math.sqrt(tensor[0].numel())
            assert tensor.abs().max() <= bound and peer.abs().max() <= bound
            assert tensor.abs().max() > 0.5 * bound


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_merge_unmerge_detach_multiplier(kind):
    model = TwoLayers().double()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = copy.deepcopy(model)          # (copy before attaching: see lora.attach)
    lora.attach(model, ["fc", "conv"], kind=kind, rank=2, alpha=4)
    randomise(model)
    x = inputs()
    adapted = model(*x)
    lora.merge(model)
    assert not lora.updates(model)
    assert max_diff(model(*x), adapted) <= 1e-12                    # baked in, same outputs
    lora.unmerge(model)
    for name in ("fc", "conv"):
        weight = getattr(model, name).parametrizations.weight.original
        assert float((weight - original[f"{name}.weight"]).abs().max()) <= 1e-14
    assert max_diff(model(*x), adapted) <= 1e-12
    # after unmerge the base weight is the merged one minus the update: W to float rounding
    lora.set_multiplier(model, 0.0)
    assert max_diff(model(*x), base(*x)) <= 1e-14                   # multiplier 0 = base
    lora.set_multiplier(model, 2.0)
    doubled = [b + 2 * (a - b) for a, b in zip(adapted, base(*x))]
    assert max_diff(model(*x), doubled) <= 1e-12
    lora.set_enabled(model, False)
    assert max_diff(model(*x), base(*x)) <= 1e-14


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_detach_restores_the_weights_bit_for_bit(kind):
    model = TwoLayers().double()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.attach(model, ["fc", "conv"], kind=kind, rank=2)
    randomise(model)
    lora.set_enabled(model, False)
    x = inputs()
    assert max_diff(model(*x), _plain(original)(*x)) == 0          # disabled: the base exactly
    assert lora.detach(model) == ["fc", "conv"] and not lora.updates(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])


def _plain(state):
    model = TwoLayers().double()
    model.load_state_dict(state)
    return model


def test_tiny_sd_unet_attention_and_convolutions_equal_peft():
    torch.manual_seed(0)
    unet = tiny_sd.make_unet(16).double().eval()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    theirs = peft_twin(unet, "lora", 4, 4, targets)
    ours = copy.deepcopy(unet)
    names = lora.attach(ours, targets, rank=4)
    assert any(isinstance(ours.get_submodule(n), nn.Conv2d) for n in names)   # LoCon layers
    randomise(ours)
    assert not set_peft_model_state_dict(theirs, lora.state_dict(ours)).unexpected_keys
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    text = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        a = ours(x, 10, encoder_hidden_states=text).sample
        b = theirs(x, 10, encoder_hidden_states=text).sample
    assert float((a - b).abs().max()) <= 1e-6
    # back into a fresh attachment: the state dict round-trips
    again = copy.deepcopy(unet)
    lora.attach(again, targets, rank=4)
    lora.load_state_dict(again, lora.state_dict(ours))
    with torch.no_grad():
        assert torch.equal(again(x, 10, encoder_hidden_states=text).sample, a)


def test_bad_input_names_what_was_expected():
    model = TwoLayers()
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lora.attach(model, ["fc"], rank=0)
    with pytest.raises(ValueError, match="larger than fc allows"):
        lora.attach(model, ["fc"], rank=6)
    with pytest.raises(ValueError, match=r"no module of the model is named \['fc2'\]"):
        lora.attach(model, ["fc", "fc2"], rank=1)
    with pytest.raises(ValueError, match="expected an nn.Linear or nn.Conv2d"):
        lora.attach(model, ["act"], rank=1)
    with pytest.raises(ValueError, match="kind must be one of"):
        lora.attach(model, ["fc"], kind="lokr", rank=1)
    with pytest.raises(ValueError, match="no attached update"):
        lora.merge(model)
    lora.attach(model, ["fc"], rank=1)
    with pytest.raises(ValueError, match="already has an update"):
        lora.attach(model, ["fc"], rank=1)
    other = TwoLayers()
    lora.attach(other, ["conv"], rank=1)
    with pytest.raises(ValueError, match="does not fit this model"):
        lora.load_state_dict(model, lora.state_dict(other))
    with pytest.raises(ValueError, match="no merged update"):
        lora.unmerge(model)
