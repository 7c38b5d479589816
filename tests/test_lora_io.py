"""diffkit.adapters.lora_io: adapters saved in the ecosystem's formats and loaded with its calls."""

import copy
import json

import pytest
import torch

from diffkit.adapters import lora, lora_io
from diffkit.latent import tiny_sd

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
CONVOLUTIONS = ["conv1", "conv2"]


@pytest.fixture()
def pipe(untrained_tiny_sd):
    yield untrained_tiny_sd
    untrained_tiny_sd.unload_lora_weights()        # leave the shared pipeline as it was
    assert not any("lora" in k or "hada" in k for k in untrained_tiny_sd.unet.state_dict())


def trained_copy(unet, kind, targets, rank=2, alpha=3.0, seed=0):
    adapted = copy.deepcopy(unet)
    lora.attach(adapted, targets, kind=kind, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for update in lora.updates(adapted).values():
            for p in update.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapted


def unet_output(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=text).sample


@pytest.mark.parametrize("kind,targets", [("lora", ATTENTION), ("lora", ATTENTION + CONVOLUTIONS),
                                          ("loha", ATTENTION + CONVOLUTIONS)])
def test_saved_adapter_loads_into_the_pipeline_with_the_same_outputs(pipe, tmp_path, kind,
                                                                     targets):
    adapted = trained_copy(pipe.unet, kind, targets)
    folder = lora_io.save(adapted, tmp_path / "adapter")
    meta = json.loads((folder / lora_io.META_FILE).read_text())
    assert (meta["kind"], meta["rank"], meta["alpha"]) == (kind, 2, 3.0)
    base = unet_output(pipe.unet)
    if kind == "lora":          # diffusers' own loader reads the file
        assert (folder / lora_io.LORA_FILE).exists()
        pipe.load_lora_weights(str(folder), weight_name=lora_io.LORA_FILE, adapter_name="new")
    else:                       # diffusers rejects LoHa: peft's files and peft's calls
        assert (folder / lora_io.PEFT_FILE).exists() and (folder / lora_io.PEFT_CONFIG).exists()
        lora_io.load_into(pipe, folder, "new")
    loaded = unet_output(pipe.unet)
    assert float((loaded - unet_output(adapted)).abs().max()) <= 1e-5
    assert float((loaded - base).abs().max()) > 1e-3                  # the adapter acts
    pipe.set_adapters(["new"], adapter_weights=[0.0])                  # diffusers' controls
    assert float((unet_output(pipe.unet) - base).abs().max()) <= 1e-5
    # the file holds the factors only: 4 bytes per trainable number plus a small header
    numbers = sum(p.numel() for u in lora.updates(adapted).values() for p in u.parameters())
    assert numbers * 4 <= lora_io.file_size(folder) <= numbers * 4 + 65_536


def test_load_attached_round_trip(untrained_tiny_sd, tmp_path):
    adapted = trained_copy(untrained_tiny_sd.unet, "lora", ATTENTION + CONVOLUTIONS)
    folder = lora_io.save(adapted, tmp_path / "a")
    fresh = copy.deepcopy(untrained_tiny_sd.unet)
    lora_io.load_attached(fresh, folder)
    assert torch.equal(unet_output(fresh), unet_output(adapted))


def test_adapter_of_another_base_model_is_refused(pipe, tmp_path):
    other = tiny_sd.make_unet(pipe.unet.config.cross_attention_dim, block_out_channels=(16, 32),
                              norm_num_groups=8)
    folder = lora_io.save(trained_copy(other, "lora", ATTENTION), tmp_path / "other")
    with pytest.raises(ValueError, match="trained on another base model"):
        lora_io.load_into(pipe, folder, "other")
    with pytest.raises(ValueError, match="trained on another base model"):
        lora_io.load_attached(copy.deepcopy(pipe.unet), folder)
    with pytest.raises(ValueError, match="not an adapter saved by lora_io.save"):
        lora_io.load_into(pipe, tmp_path, "none")
    with pytest.raises(ValueError, match="no attached update"):
        lora_io.save(copy.deepcopy(pipe.unet), tmp_path / "empty")


def test_two_adapters_weights_fuse_unfuse_unload(pipe, tmp_path):
    """diffusers' controls on two of our adapters (a LoRA and a LoCon) in one pipeline."""
    first = trained_copy(pipe.unet, "lora", ATTENTION, seed=3)
    second = trained_copy(pipe.unet, "lora", ATTENTION + CONVOLUTIONS, rank=4, seed=4)
    base = unet_output(pipe.unet)
    delta = {name: unet_output(m) - base for name, m in (("a", first), ("b", second))}
    for name, model in (("a", first), ("b", second)):
        lora_io.load_into(pipe, lora_io.save(model, tmp_path / name), name)
    pipe.set_adapters(["a"], adapter_weights=[1.0])
    assert float((unet_output(pipe.unet) - base - delta["a"]).abs().max()) <= 1e-5
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0])
    both = unet_output(pipe.unet)
    assert float((both - base - delta["a"]).abs().max()) > 1e-3          # the second acts too
    pipe.fuse_lora(adapter_names=["a", "b"])
    assert float((unet_output(pipe.unet) - both).abs().max()) <= 1e-4    # fused = active
    pipe.unfuse_lora()
    pipe.set_adapters(["a", "b"], adapter_weights=[0.0, 0.0])
    # unfused: base again, up to the rounding of adding and then subtracting the fused deltas
    unfused = unet_output(pipe.unet)
    assert float((unfused - base).abs().max()) <= 1e-5
    pipe.unload_lora_weights()
    # unloading removes the (now silent) adapter layers and leaves the weights as they are;
    # comparing with ``base`` instead would re-measure the fuse/unfuse rounding above, which
    # sits at ~1e-6 (it was 1.01e-6 on one CI run)
    assert float((unet_output(pipe.unet) - unfused).abs().max()) <= 1e-6
    assert float((unet_output(pipe.unet) - base).abs().max()) <= 1e-5
