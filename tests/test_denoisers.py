"""diffkit.diffusion.denoisers and the contract's noise: one discrete-time wrapper for eps, x0 and
v networks, its timestep computed from float64 sigma, and noise drawn on the CPU only.

Parity of the three parametrisations with diffusers' schedulers is in tests/test_samplers.py
(test_parity_v_and_x0_prediction*).
"""

from __future__ import annotations

import pytest
import torch

from diffkit.diffusion import contract, ddpm, guidance
from diffkit.diffusion.denoisers import PREDICTIONS, DiscreteTimeDenoiser
from diffkit.diffusion.samplers import sample_ddim, sample_euler_ancestral, sigmas_karras
from diffkit.diffusion.schedules import Schedule, make_schedule

F64 = torch.float64
SCHEDULE = make_schedule("linear")


class Recorder:
    """A fixed random 'network' output (B, 3) that records the (x_t, t) it is called with."""

    def __init__(self, batch=5, dim=3, seed=0):
        self.output = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed),
                                  dtype=F64)
        self.calls = []

    def __call__(self, x_t, t):
        self.calls.append((x_t, t))
        return self.output.to(x_t.dtype)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_x0_hat_agrees_with_predict_x0_eps(prediction):
    """D(x_sigma, sigma_t) == ddpm.predict_x0_eps's x0_hat on the same network output, at integer t
    (the schedule's own sigmas), per sample t included."""
    t = torch.tensor([0, 3, 250, 640, 999])
    x_t = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    net = Recorder()
    den = DiscreteTimeDenoiser(net, SCHEDULE.alphas_cumprod, prediction=prediction)
    sigma = SCHEDULE.sigmas[t]
    x_sigma = x_t * (1 + sigma[:, None] ** 2).sqrt()             # x_t = x_sigma / sqrt(1 + sigma^2)
    x0_hat = den(x_sigma, sigma)
    seen_x_t, seen_t = net.calls[-1]
    torch.testing.assert_close(seen_x_t, x_t, rtol=1e-12, atol=1e-12)
    assert torch.equal(seen_t, t.to(F64))                        # exact integer timesteps
    expected, _ = ddpm.predict_x0_eps(SCHEDULE, net.output, x_t, t, prediction)
    torch.testing.assert_close(x0_hat, expected, rtol=1e-9, atol=1e-9)


def test_the_three_predictions_of_one_function_give_one_denoiser():
    """An exact eps model re-expressed as x0 and v networks: the three wrappers agree."""
    abar = SCHEDULE.alphas_cumprod

    def exact(x_t, t, kind):      # data x_0 ~ N(0, I): eps = sqrt(1 - abar) x_t, x0 = sqrt(abar) x_t
        a = abar[t.long()][:, None].to(x_t.dtype)
        eps, x0 = (1 - a).sqrt() * x_t, a.sqrt() * x_t
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[kind]
    x = 4 * torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    sigma = SCHEDULE.sigmas[torch.tensor([1, 10, 100, 400, 800, 999])]
    out = {kind: DiscreteTimeDenoiser(lambda x_t, t, k=kind: exact(x_t, t, k), abar,
                                      prediction=kind)(x, sigma) for kind in PREDICTIONS}
    expected = x / (1 + sigma[:, None] ** 2)                      # E[x_0 | x_sigma] for N(0, I)
    for kind in PREDICTIONS:
        torch.testing.assert_close(out[kind], expected, rtol=1e-10, atol=1e-10)


def test_prediction_names_and_errors():
    for name, short in [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v")]:
        assert DiscreteTimeDenoiser(Recorder(), SCHEDULE.alphas_cumprod,
                                    prediction=name).prediction == short
    for bad in ("score", "flow_prediction", ""):
        with pytest.raises(ValueError, match="unknown prediction"):
            DiscreteTimeDenoiser(Recorder(), SCHEDULE.alphas_cumprod, prediction=bad)


def test_timestep_is_computed_from_float64_sigma():
    """float32 x with the schedule's float64 sigmas: the network sees the exact integer t. Rounding
    sigma to float32 first (the old behaviour) moves t off the integers."""
    net = Recorder()
    den = DiscreteTimeDenoiser(net, SCHEDULE.alphas_cumprod)
    ks = torch.arange(0, 1000, 37)
    x = torch.zeros(len(ks), 3)
    net.output = torch.zeros(len(ks), 3, dtype=F64)
    den(x, SCHEDULE.sigmas[ks])
    _, t = net.calls[-1]
    assert t.dtype == torch.float32 and torch.equal(t, ks.float())
    rounded_first = den.sigma_to_t(SCHEDULE.sigmas[ks].float()).float()
    assert not torch.equal(rounded_first, ks.float())
    # a Python float is read as float64 too
    den(x[:1], float(SCHEDULE.sigmas[500]))
    assert float(net.calls[-1][1]) == 500.0


def test_sigma_classifier_uses_the_same_network_input():
    net = Recorder()
    clf = guidance.SigmaClassifier(net, SCHEDULE.alphas_cumprod)
    x = torch.randn(5, 3, dtype=F64)
    sigma = SCHEDULE.sigmas[torch.tensor([2, 20, 200, 500, 990])]
    logits = clf(x, sigma)
    x_t, t = net.calls[-1]
    assert torch.equal(logits, net.output)
    torch.testing.assert_close(x_t, x / (1 + sigma[:, None] ** 2).sqrt())
    assert torch.equal(t, torch.tensor([2.0, 20, 200, 500, 990], dtype=F64))


# ---- noise: drawn on the CPU, from a CPU generator, in one function ------------------------------
class GeneratorOnCuda(torch.Generator):
    """A real torch.Generator that reports a CUDA device (this machine may have none)."""
    device = torch.device("cuda")


def test_draw_noise_is_cpu_randn_moved_to_x():
    x = torch.zeros(4, 3, dtype=F64)
    got = contract.draw_noise(x, torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.randn(4, 3, generator=torch.Generator().manual_seed(3),
                                        dtype=F64))
    assert contract.draw_noise(x.float(), None).dtype == torch.float32


@pytest.mark.parametrize("bad", [GeneratorOnCuda(), "seed", 3])
def test_non_cpu_generators_are_refused_everywhere(bad):
    x = torch.zeros(4, 2, dtype=F64)
    sigmas = sigmas_karras(3, 0.1, 10.0)
    calls = [lambda: contract.draw_noise(x, bad),
             lambda: sample_euler_ancestral(lambda y, s: y, x, sigmas, generator=bad),
             lambda: ddpm.training_loss(lambda y, t: y, make_schedule("linear", 10), x,
                                        generator=bad),
             lambda: ddpm.sample(lambda y, t: y, make_schedule("linear", 10), (2, 2),
                                 generator=bad)]
    for call in calls:
        with pytest.raises(ValueError, match="CPU torch.Generator"):
            call()


def test_sample_ddim_refuses_eta_above_one():
    x, sigmas = torch.zeros(2, 3, dtype=F64), sigmas_karras(4, 0.1, 10.0)
    with pytest.raises(ValueError, match="eta must be <= 1"):
        sample_ddim(lambda y, s: y, x, sigmas, eta=1.5, generator=torch.Generator())
    sample_ddim(lambda y, s: y, x, sigmas, eta=1.0, generator=torch.Generator())   # the bound


def test_schedule_compares_by_identity():
    a = make_schedule("linear", 10)
    b = Schedule(a.betas.clone(), a.kind)
    assert a == a and a != b and len({a, b}) == 2          # the generated __eq__ raised here
    assert torch.equal(a.betas, b.betas)
