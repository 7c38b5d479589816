"""Shared test setup, and the shipped checkpoints: a missing one fails, it never skips."""

import functools
import json

import pytest
import torch

from diffkit import checkpoints


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # the tests run many tiny ops; on a shared 2-core machine one thread is several times faster
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _missing(name: str) -> str:
    return (f"checkpoints/{name} is missing; every recipe ships its checkpoint: train it with "
            f"python -m diffkit.train {name}")


@pytest.fixture(scope="session")
def shipped_card():
    """shipped_card(name) -> the card.json of checkpoints/NAME; a missing one fails the test."""
    def card(name: str) -> dict:
        path = checkpoints.ROOT / name / "card.json"
        if not path.exists():
            pytest.fail(_missing(name))
        return json.loads(path.read_text())
    return card


@pytest.fixture(scope="session")
def shipped_model(shipped_card):
    """shipped_model(name) -> (model in eval mode, card) of checkpoints/NAME, loaded once per
    session (do not modify it); a missing checkpoint fails the test."""
    @functools.cache
    def model(name: str):
        shipped_card(name)
        if not checkpoints.has_weights(name):
            pytest.fail(_missing(name))
        return checkpoints.load_model(name)
    return model


@pytest.fixture(scope="module")
def untrained_tiny_sd():
    """A tiny StableDiffusionPipeline: shapes-clip's text encoder, an untrained VAE and UNet
    (seed 0), one per test module (tests install attention processors on it)."""
    from diffkit.latent import tiny_sd
    from diffkit.latent.vae import make_vae

    clip_model, _ = checkpoints.load_model("shapes-clip")
    torch.manual_seed(0)
    vae = make_vae()
    unet = tiny_sd.make_unet(cross_attention_dim=clip_model.text_model.config.hidden_size)
    pipe = tiny_sd.build_pipeline(vae, clip_model.text_model, clip_model.tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe
