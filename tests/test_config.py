"""diffkit.config: the one place reading DIFFKIT_* environment variables."""

import pytest
import torch

from diffkit import config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("DIFFKIT_FAST", "DIFFKIT_DEVICE", "DIFFKIT_SD_MODEL"):
        monkeypatch.delenv(name, raising=False)


def _cuda(monkeypatch, available: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


def _mps(monkeypatch, available: bool):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)


@pytest.mark.parametrize("value", ["1", "true", "TRUE", " yes ", "on"])
def test_fast_mode_true_values(monkeypatch, value):
    _cuda(monkeypatch, True)  # the default would be False: the variable must win
    monkeypatch.setenv("DIFFKIT_FAST", value)
    assert config.fast_mode() is True


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "off"])
def test_fast_mode_false_values(monkeypatch, value):
    _cuda(monkeypatch, False)  # the default would be True: the variable must win
    monkeypatch.setenv("DIFFKIT_FAST", value)
    assert config.fast_mode() is False


@pytest.mark.parametrize("value", ["2", "maybe", "fast", "-1"])
def test_fast_mode_invalid_raises(monkeypatch, value):
    monkeypatch.setenv("DIFFKIT_FAST", value)
    with pytest.raises(ValueError, match="DIFFKIT_FAST"):
        config.fast_mode()


@pytest.mark.parametrize("cuda, expected", [(True, False), (False, True)])
def test_fast_mode_default_follows_cuda(monkeypatch, cuda, expected):
    _cuda(monkeypatch, cuda)
    assert config.fast_mode() is expected
    monkeypatch.setenv("DIFFKIT_FAST", "  ")  # blank counts as unset
    assert config.fast_mode() is expected


def test_device_cpu_from_env(monkeypatch):
    _cuda(monkeypatch, True)  # auto would pick cuda; the variable must win
    monkeypatch.setenv("DIFFKIT_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")


def test_device_cuda_index_when_available(monkeypatch):
    _cuda(monkeypatch, True)
    monkeypatch.setenv("DIFFKIT_DEVICE", "cuda:1")
    assert config.device() == torch.device("cuda", 1)


@pytest.mark.parametrize("value", ["tpu", "gpu", "CPUX", "xla:0"])
def test_device_invalid_raises(monkeypatch, value):
    monkeypatch.setenv("DIFFKIT_DEVICE", value)
    with pytest.raises(ValueError, match="DIFFKIT_DEVICE"):
        config.device()


@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_device_cuda_unavailable_raises(monkeypatch, value):
    _cuda(monkeypatch, False)
    monkeypatch.setenv("DIFFKIT_DEVICE", value)
    with pytest.raises(ValueError, match="cuda"):
        config.device()


def test_device_mps_unavailable_raises(monkeypatch):
    _mps(monkeypatch, False)
    monkeypatch.setenv("DIFFKIT_DEVICE", "mps")
    with pytest.raises(ValueError, match="mps"):
        config.device()


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_default_order(monkeypatch, cuda, mps, expected):
    _cuda(monkeypatch, cuda)
    _mps(monkeypatch, mps)
    assert config.device().type == expected


def test_sd_model(monkeypatch):
    assert config.sd_model() is None
    monkeypatch.setenv("DIFFKIT_SD_MODEL", "   ")
    assert config.sd_model() is None
    monkeypatch.setenv("DIFFKIT_SD_MODEL", " /models/sd15 ")
    assert config.sd_model() == "/models/sd15"


def test_pick(monkeypatch):
    monkeypatch.setenv("DIFFKIT_FAST", "1")
    assert config.pick(10, 1000) == 10
    monkeypatch.setenv("DIFFKIT_FAST", "0")
    assert config.pick(10, 1000) == 1000
    monkeypatch.delenv("DIFFKIT_FAST")
    _cuda(monkeypatch, False)
    assert config.pick("fast", "full") == "fast"
    _cuda(monkeypatch, True)
    assert config.pick("fast", "full") == "full"
    monkeypatch.setenv("DIFFKIT_FAST", "nope")
    with pytest.raises(ValueError):
        config.pick(1, 2)
