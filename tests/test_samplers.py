"""Samplers: the contract, identities between samplers, and parity with diffusers' schedulers.

Parity runs diffusers' own loop (``scale_model_input`` / ``step``) and the diffkit sampler on the
same eps model and starting point. The model (ToyEps) is the exact eps of N(0, I) data plus a
random smooth perturbation, and takes fractional t, so any mismatch in the t the network sees
shows up. Two tiers, printed as ``PARITY ...`` lines with ``pytest -s``:

* float32 tables, diffusers as shipped (the DiscreteTimeDenoiser is built on its alphas_cumprod):
  max abs difference <= 1e-4. The cosine schedule reaches sigma = 2.0e4 at t = 999, where
  diffusers' float32 scalars alone move the result by 1e-3..1 (test_fp32_tables_cannot_...), so
  in this tier it runs with "leading" spacing only (sigma_max = 6.3).
* float64 tables (diffkit's schedule written into the scheduler after ``set_timesteps``):
  <= 1e-6. Euler, Euler-ancestral and DPM-Solver round the sample to float32 inside ``step``:
  for them <= 1e-5, and u32 * max|sample| * n where the cosine samples reach 1e3..6e4; with that
  one line removed they agree to 1e-10 (test_float64_residual_is_the_float32_cast_in_step).
"""

from __future__ import annotations

import inspect
import math
import sys
import types

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from diffkit.diffusion.denoisers import DiscreteTimeDenoiser
from diffkit.diffusion.samplers import (
    get_ancestral_step,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sigmas_karras,
    spaced_timesteps,
)
from diffkit.diffusion.schedules import make_schedule

KIND = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
BETAS = {"linear": dict(beta_start=1e-4, beta_end=0.02),
         "scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "squaredcos_cap_v2": {}}
U32 = 2.0 ** -24
F64 = torch.float64


class ToyEps:
    """A fixed random eps model, smooth in x_t and in fractional t: x_t (B, 2, 3, 3), t () or (B,).

    eps = sqrt(1 - abar(t)) x_t (the exact eps of data x_0 ~ N(0, I)) plus a random smooth
    perturbation 0.3 tanh(W x_t + a sin(6 t/T) + b t/T + c), so samples end at the data scale.
    """

    def __init__(self, kind: str, shape=(2, 3, 3), seed=0):
        g = torch.Generator().manual_seed(seed)
        D = math.prod(shape)
        def r(*s):
            return torch.randn(*s, generator=g, dtype=F64)
        self.W, self.a, self.b, self.c = r(D, D) / D ** 0.5, r(D), r(D), 0.3 * r(D)
        self.abar = make_schedule(kind).alphas_cumprod
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        t = torch.as_tensor(t, dtype=F64).reshape(-1)
        low = t.floor().long().clamp(0, len(self.abar) - 2)
        abar = torch.lerp(self.abar[low], self.abar[low + 1], t - low).to(x.dtype)[:, None]
        t = (t / len(self.abar)).to(x.dtype)[:, None]
        W, a, b, c = (p.to(x.dtype) for p in (self.W, self.a, self.b, self.c))
        h = x.flatten(1) @ W + a * torch.sin(6 * t) + b * t + c
        eps = (1 - abar).sqrt() * x.flatten(1) + 0.3 * torch.tanh(h)
        return eps.reshape(x.shape)


class Predicts:
    """A ToyEps re-expressed as an x0 or v network (diffusers' prediction_type "sample" or
    "v_prediction"): x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), v = sqrt(abar) eps -
    sqrt(1 - abar) x0, abar(t) interpolated as ToyEps does. The same function of (x_t, t), so
    each sampler's path is the eps model's; what differs is the parametrisation undone."""

    def __init__(self, eps_model: ToyEps, prediction: str):
        self.eps_model, self.prediction = eps_model, prediction

    def __call__(self, x, t):
        eps = self.eps_model(x, t)
        t = torch.as_tensor(t, dtype=F64).reshape(-1)
        abar_table = self.eps_model.abar
        low = t.floor().long().clamp(0, len(abar_table) - 2)
        abar = torch.lerp(abar_table[low], abar_table[low + 1], t - low).to(x.dtype)
        a, s = (v.reshape(-1, *[1] * (x.ndim - 1)) for v in (abar.sqrt(), (1 - abar).sqrt()))
        x0 = (x - s * eps) / a
        return x0 if self.prediction == "x0" else a * eps - s * x0


MODELS = {beta: ToyEps(KIND[beta]) for beta in BETAS}
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def model_for(beta, prediction="eps"):
    return MODELS[beta] if prediction == "eps" else Predicts(MODELS[beta], prediction)
NOISE = torch.randn(4, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))


def make(cls, beta, **cfg):
    return cls(num_train_timesteps=1000, beta_schedule=beta, **BETAS[beta], **cfg)


def k_loop(sched, model, x, **kw):
    """diffusers' loop for sigma-space schedulers (Euler, Heun, Euler-ancestral); x = x_sigma.
    Returns the final sample and the largest |sample| that entered ``step``."""
    peak = 0.0
    for t in sched.timesteps:
        peak = max(peak, x.abs().max().item())
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x, peak


def vp_loop(sched, model, x_t, **kw):
    """diffusers' loop for x_t-space schedulers (DDIM, DDPM, DPM-Solver): x_t = sqrt(abar) x."""
    peak = 0.0
    for t in sched.timesteps:
        peak = max(peak, x_t.abs().max().item())
        x_t = sched.step(model(x_t, t), t, x_t, **kw).prev_sample
    return x_t, peak


def distinct(timesteps):
    return torch.unique_consecutive(torch.as_tensor(timesteps))


# ---------------------------------------------------------------------------------------------
# One parity run: build both sides on the same tables, return (diffusers, diffkit, tolerance).
# ---------------------------------------------------------------------------------------------
K_SAMPLERS = {"euler": (EulerDiscreteScheduler, sample_euler),
              "heun": (HeunDiscreteScheduler, sample_heun),
              "euler_ancestral": (EulerAncestralDiscreteScheduler, sample_euler_ancestral)}
VP_SAMPLERS = {"ddim": (DDIMScheduler, sample_ddim), "ddpm": (DDPMScheduler, sample_ddpm),
               "dpmpp_2m": (DPMSolverMultistepScheduler, sample_dpmpp_2m)}


CASTS_SAMPLE_TO_FP32 = ("euler", "euler_ancestral", "dpmpp_2m")   # sample.to(float32) in step


def build(name, beta, n, spacing, *, karras=False, float64=False, steps_offset=0,
          prediction="eps", **cfg):
    """The diffusers scheduler after set_timesteps, diffkit's denoiser and sigmas on its tables."""
    cfg.update(timestep_spacing=spacing, steps_offset=steps_offset,
               prediction_type=PREDICTION_TYPE[prediction])
    if karras:
        cfg["use_karras_sigmas"] = True
    if name in ("ddim", "ddpm"):
        cfg.setdefault("clip_sample", False)
    if name == "dpmpp_2m":
        cfg.update(algorithm_type="dpmsolver++", solver_order=2)
    sched = make({**K_SAMPLERS, **VP_SAMPLERS}[name][0], beta, **cfg)
    sched.set_timesteps(n)
    abar = make_schedule(KIND[beta]).alphas_cumprod if float64 else sched.alphas_cumprod
    quantize = name == "dpmpp_2m" and karras and beta != "squaredcos_cap_v2"
    den = DiscreteTimeDenoiser(model_for(beta, prediction), abar, prediction=prediction,
                               quantize=quantize)
    if karras:   # with "linspace" spacing: from the table's sigma_max down to its sigma_min
        sigmas = sigmas_karras(n, den.sigma_min, den.sigma_max)
    else:
        sigmas = den.sigmas_for_timesteps(distinct(sched.timesteps))
    if float64:
        write_float64_tables(name, sched, den, sigmas, abar)
    return sched, den, sigmas


def write_float64_tables(name, sched, den, sigmas, abar):
    """Replace the scheduler's float32 tables by diffkit's float64 ones (after set_timesteps)."""
    ts = den.sigma_to_t(sigmas[:-1])
    if name in ("euler", "euler_ancestral"):
        sched.sigmas, sched.timesteps = sigmas.clone(), ts
    elif name == "heun":
        sched.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        sched.timesteps = torch.cat([ts[:1], ts[1:].repeat_interleave(2)])
    elif name == "dpmpp_2m":
        sched.sigmas, sched.timesteps = sigmas.clone(), ts.round().long()
    elif name == "ddim":
        sched.alphas_cumprod, sched.final_alpha_cumprod = abar.clone(), torch.tensor(1.0, dtype=F64)
    elif name == "ddpm":
        sched.alphas_cumprod, sched.one = abar.clone(), torch.tensor(1.0, dtype=F64)


def run_both(name, beta, sched, den, sigmas, *, eta=0.0, seed=7):
    """Run diffusers' loop and diffkit's sampler from the same start: (ref, ours, peak |sample|).
    Both run the network the denoiser wraps (``den.model``)."""
    sampler = {**K_SAMPLERS, **VP_SAMPLERS}[name][1]
    kw_ref, options = ({"eta": eta}, {"eta": eta}) if name == "ddim" else ({}, {})
    if name in ("euler_ancestral", "ddpm") or eta > 0:   # same seed, noise drawn in the same order
        kw_ref["generator"] = torch.Generator().manual_seed(seed)
        options["generator"] = torch.Generator().manual_seed(seed)
    if name in K_SAMPLERS:
        x = NOISE * float(sched.init_noise_sigma)     # sigma_max, or sqrt(sigma_max^2+1) if leading
        ref, peak = k_loop(sched, den.model, x.clone(), **kw_ref)
    else:
        x = NOISE * sigmas[0]                            # x_t = sqrt(abar) x_sigma:
        ref, peak = vp_loop(sched, den.model, x / (1 + sigmas[0] ** 2) ** 0.5, **kw_ref)
    ours = sampler(den, x.clone(), sigmas, **options)
    return ref, ours, peak


def parity(name, beta, n, spacing, *, float64, eta=0.0, **kw):
    sched, den, sigmas = build(name, beta, n, spacing, float64=float64, **kw)
    ref, ours, peak = run_both(name, beta, sched, den, sigmas, eta=eta)
    tol = 1e-4
    if float64:
        tol = 1e-6
        if name in CASTS_SAMPLE_TO_FP32:   # their step() rounds the sample to float32
            tol = 1e-5 if float(sigmas[0]) < 1e3 else U32 * peak * n
    diff = (ref - ours).abs().max().item()
    label = f"{name} {beta} {spacing} n={n} {kw or ''} eta={eta} {'fp64' if float64 else 'fp32'}"
    print(f"PARITY {label}: max|diff| = {diff:.2e} (tol {tol:.1e})")
    assert torch.isfinite(ours).all()
    assert diff <= tol, f"{label}: {diff:.3e} > {tol:.1e}"
    return diff


# Grids where diffusers is self-consistent (see the discrepancy tests below). Euler and Heun take
# "linspace" only where (T - 1) / (n - 1) is an integer (n = 10, 28), DDIM "trailing" only where
# n divides T. With float32 tables squaredcos_cap_v2 is only run with "leading" spacing, whose
# sigma_max is 6.3 instead of 2.0e4 (test_fp32_tables_cannot_resolve_sigma_max_2e4).
GRIDS = {
    "euler": [("leading", 5), ("leading", 50), ("trailing", 10), ("trailing", 25),
              ("linspace", 10), ("linspace", 28)],
    "ddim": [("leading", 5), ("leading", 50), ("trailing", 10), ("trailing", 25)],
    "ddpm": [("leading", 10), ("trailing", 5), ("linspace", 25), ("linspace", 50)],
    "dpmpp_2m": [("leading", 5), ("trailing", 10), ("linspace", 20), ("linspace", 25),
                 ("trailing", 50)],
}
GRIDS["heun"] = GRIDS["euler_ancestral"] = GRIDS["euler"]
TIERS = pytest.mark.parametrize("float64", [False, True], ids=["fp32tables", "fp64tables"])


def grid(name, beta, float64):
    cosine32 = beta == "squaredcos_cap_v2" and not float64
    cases = GRIDS[name] if not cosine32 else [("leading", 5), ("leading", 10), ("leading", 50)]
    return cases


@TIERS
@pytest.mark.parametrize("beta", list(BETAS))
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "ddim", "ddpm"])
def test_parity_with_diffusers(name, beta, float64):
    for spacing, n in grid(name, beta, float64):
        parity(name, beta, n, spacing, float64=float64)


@TIERS
@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("beta", list(BETAS))
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "ddim", "ddpm"])
def test_parity_v_and_x0_prediction(name, beta, prediction, float64):
    """DiscreteTimeDenoiser(prediction="v" / "x0") against the schedulers configured with
    prediction_type="v_prediction" / "sample", at the eps parity's tolerances (SD 2.x and
    zero-terminal-SNR models are v-prediction). Diffusers' Euler-ancestral has no "sample": it
    runs with "v" only, in the next test."""
    for spacing, n in grid(name, beta, float64)[:2]:
        parity(name, beta, n, spacing, float64=float64, prediction=prediction)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_parity_v_and_x0_prediction_karras_and_stochastic(prediction):
    parity("dpmpp_2m", "scaled_linear", 25, "linspace", float64=True, karras=True,
           prediction=prediction)
    parity("ddim", "scaled_linear", 10, "trailing", float64=True, eta=1.0, prediction=prediction)
    parity("ddpm", "linear", 25, "linspace", float64=True, prediction=prediction)
    if prediction == "v":   # EulerAncestralDiscreteScheduler has no "sample"
        parity("euler_ancestral", "scaled_linear", 10, "trailing", float64=True,
               prediction=prediction)


@TIERS
@pytest.mark.parametrize("beta", ["linear", "scaled_linear"])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_parity_karras_sigmas(name, beta, float64):
    """use_karras_sigmas=True. DPM-Solver rounds t for the model, so DiscreteTimeDenoiser(quantize=True)."""
    for n in (5, 25):
        parity(name, beta, n, "linspace", float64=float64, karras=True)


def test_parity_karras_sigmas_cosine_float64():
    for name in ("euler", "heun"):
        parity(name, "squaredcos_cap_v2", 10, "linspace", float64=True, karras=True)


@TIERS
@pytest.mark.parametrize("beta", list(BETAS))
def test_parity_euler_ancestral_same_noise(beta, float64):
    cases = grid("euler_ancestral", beta, float64)
    for spacing, n in cases[:3] + cases[-1:]:
        parity("euler_ancestral", beta, n, spacing, float64=float64)


@TIERS
@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("beta", list(BETAS))
def test_parity_ddim_eta_positive_same_noise(beta, eta, float64):
    """DDIMScheduler.step draws its variance noise from the generator in the same order."""
    for spacing, n in grid("ddim", beta, float64)[:3]:
        parity("ddim", beta, n, spacing, eta=eta, float64=float64)


def test_parity_stable_diffusion_ddim_config_with_alpha_one_and_ddpm_1000_steps():
    parity("ddim", "scaled_linear", 50, "leading", float64=True, steps_offset=1)
    parity("ddpm", "linear", 1000, "leading", float64=True)


FP32_CAST = "sample = sample.to(torch.float32)"


def without_fp32_cast(cls):
    """A private copy of a diffusers scheduler class whose ``step`` keeps the sample's dtype
    (its module source re-executed with the cast line removed; diffusers itself is untouched)."""
    module = sys.modules[cls.__module__]
    source = inspect.getsource(module)
    assert source.count(FP32_CAST) == 1
    copy = types.ModuleType(module.__name__ + "_without_fp32_cast")
    copy.__package__, copy.__file__ = module.__package__, module.__file__
    exec(compile(source.replace(FP32_CAST, "pass"), module.__file__, "exec"), copy.__dict__)
    return getattr(copy, cls.__name__)


@pytest.mark.parametrize("name", CASTS_SAMPLE_TO_FP32)
def test_float64_residual_is_the_float32_cast_in_step(name, monkeypatch):
    """Without the ``sample.to(torch.float32)`` line, Euler, Euler-ancestral and DPM-Solver agree
    with diffkit to 1e-10 on float64 tables, the cosine schedule at sigma = 2.0e4 included."""
    table = K_SAMPLERS if name in K_SAMPLERS else VP_SAMPLERS
    cls, sampler = table[name]
    monkeypatch.setitem(table, name, (without_fp32_cast(cls), sampler))
    for beta in BETAS:
        for spacing, n in GRIDS[name][:4]:
            sched, den, sigmas = build(name, beta, n, spacing, float64=True)
            ref, ours, _ = run_both(name, beta, sched, den, sigmas)
            assert (ref - ours).abs().max().item() < 1e-10, (beta, spacing, n)


# ---- where diffusers is not self-consistent: assert the discrepancy, and what explains it -------
def test_fp32_tables_cannot_resolve_sigma_max_2e4():
    """squaredcos_cap_v2 reaches sigma = 2.0e4 at t = 999. diffusers' float32 scalars (dt, sigma)
    carry ~1e-3 absolute error there, and Heun's 5-step first jump (2.0e4 -> 3.1) multiplies it by
    dt / 2 ~ 1e4; with float64 tables written into the scheduler the two agree to rounding."""
    runs = {}
    for float64 in (False, True):
        sched, den, sigmas = build("heun", "squaredcos_cap_v2", 5, "trailing", float64=float64)
        ref, ours, _ = run_both("heun", "squaredcos_cap_v2", sched, den, sigmas)
        runs[float64] = (ref - ours).abs().max().item()
    print(f"DISCREPANCY heun cosine trailing n=5: fp32 tables {runs[False]:.2e}, "
          f"fp64 {runs[True]:.2e}")
    assert runs[False] > 1e-2 and runs[True] < 1e-12


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_discrepancy_euler_linspace_fractional_timesteps(name):
    """Euler/Heun "linspace" with n = 25: t = 999 k / 24 is fractional. diffusers takes sigma(t)
    by linear interpolation of the table in t; diffkit (like k-diffusion) interpolates log sigma,
    and its sigma -> t map is the same log-sigma rule diffusers' own ``_sigma_to_t`` uses. So the
    step sizes differ (sigmas by up to 5.5e-5 relative), and even on diffusers' own sigmas the t its
    model sees is not the t of its sigma (off by 0.0025). Each moves the output by ~1e-5 here."""
    sched, den, sigmas = build(name, "linear", 25, "linspace", float64=False)
    t_ref = distinct(sched.timesteps).double()
    assert (t_ref != t_ref.round()).any()
    theirs = torch.cat([distinct(sched.sigmas[:-1]).double(), torch.zeros(1, dtype=F64)])
    rel = ((sigmas - theirs).abs() / theirs.clamp(min=1e-9)).max().item()
    ref, ours, _ = run_both(name, "linear", sched, den, sigmas)
    diff = (ref - ours).abs().max().item()
    gap = (den.sigma_to_t(theirs[:-1]) - t_ref).abs().max().item()
    sched.set_timesteps(25)
    ref, ours_on_theirs, _ = run_both(name, "linear", sched, den, theirs)
    diff_t = (ref - ours_on_theirs).abs().max().item()
    print(f"DISCREPANCY {name} linspace n=25: sigmas differ {rel:.1e} rel, outputs {diff:.2e}; "
          f"on diffusers' sigmas model t off by {gap:.4f}, outputs {diff_t:.2e}")
    assert rel > 1e-5 and 3e-6 < diff < 1e-4      # above float64 parity, below float32 tolerance
    assert gap > 1e-3 and 3e-6 < diff_t < 1e-4
    # with n = 10 the timesteps are the integers 999, 888, ..., 0 and parity holds (above)
    assert torch.equal(distinct(build(name, "linear", 10, "linspace", float64=False)[0]
                                .timesteps), torch.arange(999, -1, -111, dtype=torch.float32))


def test_discrepancy_init_noise_sigma_depends_on_spacing():
    for spacing in ("leading", "trailing", "linspace"):
        sched, den, sigmas = build("euler", "linear", 10, spacing, float64=False)
        expected = sigmas[0] if spacing != "leading" else (sigmas[0] ** 2 + 1) ** 0.5
        assert abs(float(sched.init_noise_sigma) - float(expected)) < 1e-3 * float(expected)


def test_discrepancy_dpm_karras_rounds_model_timestep():
    """DPM-Solver with Karras sigmas keeps the sigmas but rounds t: parity needs quantize=True."""
    sched, den, sigmas = build("dpmpp_2m", "scaled_linear", 10, "linspace", karras=True,
                               float64=True)
    t_exact = DiscreteTimeDenoiser(MODELS["scaled_linear"], den.alphas_cumprod).sigma_to_t(sigmas[:-1])
    assert torch.equal(sched.timesteps, t_exact.round().long())
    assert (t_exact != t_exact.round()).sum() >= 8
    unquantized = DiscreteTimeDenoiser(MODELS["scaled_linear"], den.alphas_cumprod)
    ref, ours, _ = run_both("dpmpp_2m", "scaled_linear", sched, unquantized, sigmas)
    diff = (ref - ours).abs().max().item()
    print(f"DISCREPANCY dpmpp_2m karras: unquantized t differs by {diff:.2e}")
    assert diff > 1e-5


def test_discrepancy_dpm_karras_cosine_truncates_timestep_and_breaks_the_loop():
    """For squaredcos_cap_v2 diffusers skips the rounding (comment: "don't round") but then casts
    t to int64, which truncates: the model sees floor(t). The Karras sigmas 2.0e4 ... 1.8e3 all lie
    between t = 998 and 999, so the first timesteps repeat 998; index_for_timestep then starts at
    the second copy and the plain loop runs off the sigma table (IndexError). With the pipeline's
    ``set_begin_index(0)`` it runs, and a floor-quantising denoiser matches it."""
    sched = make(DPMSolverMultistepScheduler, "squaredcos_cap_v2", use_karras_sigmas=True)
    sched.set_timesteps(10)
    den = DiscreteTimeDenoiser(MODELS["squaredcos_cap_v2"], sched.alphas_cumprod)
    sigmas = torch.cat([sched.sigmas[:-1].double(), torch.zeros(1, dtype=F64)])
    t_exact = den.sigma_to_t(sigmas[:-1])
    assert torch.equal(sched.timesteps, t_exact.floor().long())
    assert (t_exact.floor() != t_exact.round()).any()
    assert sched.timesteps[:4].tolist() == [998] * 4
    x = NOISE * sigmas[0]
    with pytest.raises(IndexError):
        vp_loop(sched, MODELS["squaredcos_cap_v2"], x / (1 + sigmas[0] ** 2) ** 0.5)

    class FloorEps(DiscreteTimeDenoiser):
        def sigma_to_t(self, sigma):
            return super().sigma_to_t(sigma).floor()

    def diff_with(denoiser):
        sched.set_timesteps(10)
        sched.set_begin_index(0)
        sched.sigmas = sigmas
        ref, ours, _ = run_both("dpmpp_2m", "squaredcos_cap_v2", sched, denoiser, sigmas)
        return (ref - ours).abs().max().item()
    floor_diff = diff_with(FloorEps(MODELS["squaredcos_cap_v2"], sched.alphas_cumprod))
    exact_diff = diff_with(den)
    print(f"DISCREPANCY dpmpp_2m karras cosine: floor(t) denoiser {floor_diff:.1e}, "
          f"exact t {exact_diff:.1e}")
    assert floor_diff < 1e-5 and exact_diff > 1e-3


@pytest.mark.parametrize("spacing, n", [("linspace", 10), ("trailing", 3)])
def test_discrepancy_ddim_prev_timestep_is_not_next_listed(spacing, n):
    """DDIMScheduler steps from t to t - T // n. With "linspace" (999, 888, ...) it lands on 899
    and then feeds that sample to the model as t = 888; with "trailing" and n = 3 (999, 666, 332)
    it lands on 333. diffkit follows the listed timesteps, so the results differ."""
    sched, den, sigmas = build("ddim", "linear", n, spacing, float64=True)
    ts = sched.timesteps.tolist()
    prev = [t - 1000 // n for t in ts[:-1]]
    assert prev != ts[1:]
    ref, ours, _ = run_both("ddim", "linear", sched, den, sigmas)
    diff = (ref - ours).abs().max().item()
    print(f"DISCREPANCY ddim {spacing} n={n}: timesteps {ts[:3]}... prev {prev[:2]}...; "
          f"outputs differ {diff:.2e}")
    assert diff > 1e-3


def test_discrepancy_ddim_set_alpha_to_one_false_skips_final_denoise():
    """Stable Diffusion's DDIM config (steps_offset=1, set_alpha_to_one=False) ends at abar_0, so
    it returns x_t at t = 0 (noise level sigma_0 = sigma(t=0) > 0), not x0_hat. On the contract:
    run DDIM on the listed timesteps plus t = 0 and read the state at sigma_0 from the callback."""
    sched, den, _ = build("ddim", "scaled_linear", 10, "leading", float64=True, steps_offset=1,
                          set_alpha_to_one=False)
    sched.final_alpha_cumprod = den.alphas_cumprod[0]
    ts = sched.timesteps.tolist()
    assert ts[-1] == 1
    sigmas = den.sigmas_for_timesteps(ts + [0])
    x = NOISE * sigmas[0]
    ref, _ = vp_loop(sched, MODELS["scaled_linear"], x / (1 + sigmas[0] ** 2) ** 0.5)
    seen = {}
    ours = sample_ddim(den, x.clone(), sigmas,
                       callback=lambda d: seen.update(x=d["x"]) if d["sigma_next"] == 0 else None)
    x_sigma0 = seen["x"] * den.alphas_cumprod[0].sqrt()        # x_t at t = 0
    assert (ref - x_sigma0).abs().max().item() < 1e-6
    assert (ref - ours).abs().max().item() > 1e-3 * float(den.sigmas[0])


# ---- the contract --------------------------------------------------------------------------------
def toy_denoiser(x, sigma):
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)   # exact for x0 ~ N(0, I)


ALL = [sample_euler, sample_euler_ancestral, sample_heun, sample_dpmpp_2m, sample_ddim,
       sample_ddpm]


@pytest.mark.parametrize("sampler", ALL, ids=lambda f: f.__name__)
@pytest.mark.parametrize("sigmas, match", [
    (torch.tensor([[2.0, 0.0]], dtype=F64), "1-D"),
    (torch.tensor([0.0], dtype=F64), "at least 2"),
    ([2.0, 1.0, 0.0], "1-D tensor"),
    (torch.tensor([2.0, 3.0, 0.0], dtype=F64), "strictly decreasing"),
    (torch.tensor([2.0, 2.0, 0.0], dtype=F64), "strictly decreasing"),
    (torch.tensor([2.0, float("nan"), 0.0], dtype=F64), "finite"),
    (torch.tensor([2.0, 1.0, 0.5], dtype=F64), "end in exactly 0"),
])
def test_samplers_reject_bad_sigmas(sampler, sigmas, match):
    with pytest.raises(ValueError, match=match):
        sampler(toy_denoiser, torch.zeros(2, 3, dtype=F64), sigmas)


def test_samplers_reject_bad_x_and_eta():
    sig = torch.tensor([1.0, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="floating-point tensor"):
        sample_euler(toy_denoiser, torch.zeros(2, 3, dtype=torch.long), sig)
    with pytest.raises(ValueError, match="floating-point tensor"):
        sample_euler(toy_denoiser, [[0.0]], sig)
    for sampler in (sample_ddim, sample_euler_ancestral):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            sampler(toy_denoiser, torch.zeros(2, 3, dtype=F64), sig, eta=-0.1)


@pytest.mark.parametrize("sampler, nfe", [(sample_euler, 8), (sample_heun, 15),
                                          (sample_dpmpp_2m, 8), (sample_ddim, 8)])
def test_callback_and_nfe(sampler, nfe):
    sigmas, seen, calls = sigmas_karras(8, 0.01, 10.0), [], []

    def counting(x, sigma):
        calls.append(sigma.shape)
        return toy_denoiser(x, sigma)
    x = sampler(counting, NOISE * 10.0, sigmas, callback=seen.append)
    assert len(calls) == nfe and all(shape == (4,) for shape in calls)   # sigma passed as (B,)
    assert [d["i"] for d in seen] == list(range(8))
    assert set(seen[0]) == {"i", "x", "sigma", "sigma_next", "denoised"}
    assert [float(d["sigma"]) for d in seen] == sigmas[:-1].tolist()
    assert x.shape == NOISE.shape


def test_extra_args_reach_the_denoiser():
    got = []
    sample_euler(lambda x, sigma, cond: got.append(cond) or x, NOISE, sigmas_karras(3, 0.1, 1.0),
                 extra_args={"cond": "a cat"})
    assert got == ["a cat"] * 3


@pytest.mark.parametrize("sampler", [sample_euler_ancestral, sample_ddpm,
                                     lambda *a, **k: sample_ddim(*a, eta=0.7, **k)])
def test_stochastic_samplers_are_deterministic_given_a_generator(sampler):
    sigmas = sigmas_karras(6, 0.01, 10.0)
    def run(seed):
        return sampler(toy_denoiser, NOISE * 10.0, sigmas,
                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert (run(0) - run(1)).abs().max() > 1e-3


def test_deterministic_samplers_ignore_the_generator():
    sigmas = sigmas_karras(6, 0.01, 10.0)
    for sampler in (sample_euler, sample_heun, sample_dpmpp_2m, sample_ddim):
        a = sampler(toy_denoiser, NOISE * 10.0, sigmas, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a, sampler(toy_denoiser, NOISE * 10.0, sigmas))


def test_identities_between_samplers():
    """DDIM(eta=0) is Euler in sigma; DDIM(eta=1) is the DDPM posterior step and Euler-ancestral."""
    den = DiscreteTimeDenoiser(MODELS["linear"], make_schedule("linear").alphas_cumprod)
    sigmas = den.sigmas_for_timesteps(spaced_timesteps(20, spacing="trailing"))
    x = NOISE * sigmas[0]
    assert torch.allclose(sample_ddim(den, x, sigmas), sample_euler(den, x, sigmas), atol=1e-12)
    g = lambda: torch.Generator().manual_seed(3)
    ddim1 = sample_ddim(den, x, sigmas, eta=1.0, generator=g())
    assert torch.allclose(ddim1, sample_ddpm(den, x, sigmas, generator=g()), atol=1e-12)
    assert torch.allclose(ddim1, sample_euler_ancestral(den, x, sigmas, generator=g()), atol=1e-12)
    assert (ddim1 - sample_ddim(den, x, sigmas)).abs().max() > 1e-2


def test_get_ancestral_step_splits_the_variance():
    sigma, sigma_next = torch.tensor(3.0, dtype=F64), torch.tensor(1.2, dtype=F64)
    down, up = get_ancestral_step(sigma, sigma_next, eta=1.0)
    assert torch.allclose(down ** 2 + up ** 2, sigma_next ** 2)
    assert torch.allclose(up ** 2, sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    down0, up0 = get_ancestral_step(sigma, sigma_next, eta=0.0)
    assert float(up0) == 0.0 and float(down0) == float(sigma_next)
    down_big, up_big = get_ancestral_step(sigma, sigma_next, eta=10.0)   # capped at sigma_next
    assert float(up_big) == float(sigma_next) and float(down_big) == 0.0


def test_float32_input_runs_and_matches_float64():
    den = DiscreteTimeDenoiser(MODELS["scaled_linear"], make_schedule("scaled_linear").alphas_cumprod)
    sigmas = sigmas_karras(10, den.sigma_min, den.sigma_max)
    x = NOISE * sigmas[0]
    out32 = sample_dpmpp_2m(den, x.float(), sigmas)
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), sample_dpmpp_2m(den, x, sigmas), atol=1e-4)


# ---- schedules of sigmas and timesteps -----------------------------------------------------------
def test_sigmas_karras_values():
    s = sigmas_karras(5, 0.1, 10.0, rho=7.0)
    assert s.shape == (6,) and s.dtype == F64 and s[-1] == 0
    assert math.isclose(s[0], 10.0, rel_tol=1e-14) and math.isclose(s[4], 0.1, rel_tol=1e-14)
    ramp = torch.arange(5, dtype=F64) / 4
    expected = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7   # eq. 5
    assert torch.allclose(s[:-1], expected, rtol=1e-14)
    ref = EulerDiscreteScheduler()._convert_to_karras(torch.tensor([10.0, 0.1]), 5)
    assert torch.allclose(s[:-1], torch.as_tensor(ref, dtype=F64), rtol=1e-12)
    assert torch.allclose(sigmas_karras(4, 1.0, 2.0, rho=1.0)[:-1],
                          torch.tensor([2.0, 5 / 3, 4 / 3, 1.0], dtype=F64))
    for bad in [dict(n=0, sigma_min=0.1, sigma_max=1.0), dict(n=3, sigma_min=1.0, sigma_max=0.5),
                dict(n=3, sigma_min=0.0, sigma_max=1.0), dict(n=3, sigma_min=0.1, sigma_max=1.0,
                                                               rho=0.0)]:
        with pytest.raises(ValueError):
            sigmas_karras(**bad)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spaced_timesteps_match_diffusers(spacing):
    for n in (1, 3, 7, 10, 25, 50, 999, 1000):
        for offset in ((0, 1) if spacing == "leading" else (0,)):
            ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
            ddim.set_timesteps(n)
            assert spaced_timesteps(n, 1000, spacing, offset) == ddim.timesteps.tolist()
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(10, spacing="uniform")
    with pytest.raises(ValueError, match="n must be"):
        spaced_timesteps(1001)


@pytest.mark.parametrize("beta", list(BETAS))
def test_sigmas_for_timesteps_match_diffusers_tables(beta):
    """diffkit's float64 schedule vs diffusers' float32 one: abar equal to float32 accuracy (sigma
    itself can differ by 3e-4 relative at t = 0, where 1 - abar ~ 4e-5 loses digits in float32)."""
    den = DiscreteTimeDenoiser(MODELS[beta], make_schedule(KIND[beta]).alphas_cumprod)
    for spacing in ("leading", "trailing"):
        sched = make(EulerDiscreteScheduler, beta, timestep_spacing=spacing)
        sched.set_timesteps(25)
        ours = den.sigmas_for_timesteps(sched.timesteps)
        abar_ours, abar_theirs = (1 / (1 + s.double() ** 2) for s in (ours, sched.sigmas))
        assert torch.allclose(abar_ours, abar_theirs, atol=1e-6, rtol=0)
        assert ours[-1] == 0 and len(ours) == 26


def test_eps_denoiser_tables_and_interpolation():
    abar = make_schedule("scaled_linear").alphas_cumprod
    den = DiscreteTimeDenoiser(MODELS["scaled_linear"], abar)
    t = torch.arange(1000, dtype=F64)
    assert torch.equal(den.t_to_sigma(t), ((1 - abar) / abar).sqrt())       # exact at integer t
    assert torch.equal(den.sigma_to_t(den.sigmas), t)
    frac = torch.tensor([0.25, 10.5, 998.75], dtype=F64)
    assert torch.allclose(den.sigma_to_t(den.t_to_sigma(frac)), frac, atol=1e-9)
    assert torch.equal(den.sigma_to_t(torch.tensor([1e-6, 1e6], dtype=F64)),
                       torch.tensor([0.0, 999.0], dtype=F64))              # clipped to [0, T-1]
    log_sigmas = den.log_sigmas.numpy()
    s = torch.exp(torch.linspace(-4, 2.5, 37, dtype=F64))
    ref = EulerDiscreteScheduler()._sigma_to_t(s.numpy(), log_sigmas)
    assert torch.allclose(den.sigma_to_t(s), torch.as_tensor(ref), atol=1e-9)
    q = DiscreteTimeDenoiser(MODELS["linear"], abar, quantize=True).sigma_to_t(den.t_to_sigma(frac))
    assert torch.allclose(q, frac.round(), atol=0)
    assert den.sigma_min == float(den.sigmas[0]) and den.sigma_max == float(den.sigmas[-1])


def test_eps_denoiser_output_and_batching():
    model = ToyEps("linear")
    den = DiscreteTimeDenoiser(model, make_schedule("linear").alphas_cumprod)
    x, k = NOISE * 3.0, 400
    sigma = den.sigmas[k]
    x0_hat = den(x, sigma)
    eps = model(x / (sigma ** 2 + 1) ** 0.5, torch.full((4,), float(k), dtype=F64))
    assert torch.allclose(x0_hat, x - sigma * eps, atol=1e-14)
    per_sample = torch.stack([den.sigmas[k], den.sigmas[k + 1], den.sigmas[10], den.sigmas[999]])
    rows = torch.cat([den(x[i:i + 1], per_sample[i]) for i in range(4)])
    assert torch.allclose(den(x, per_sample), rows, atol=1e-14)
    with pytest.raises(ValueError, match="sigma must be 0-d or of shape"):
        den(x, torch.ones(3, dtype=F64))


def test_eps_denoiser_validation():
    with pytest.raises(ValueError, match="alphas_cumprod must be"):
        DiscreteTimeDenoiser(MODELS["linear"], torch.tensor([0.5], dtype=F64))
    with pytest.raises(ValueError, match="alphas_cumprod must be"):
        DiscreteTimeDenoiser(MODELS["linear"], torch.tensor([1.0, 0.5], dtype=F64))
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteTimeDenoiser(MODELS["linear"], torch.tensor([0.5, 0.6], dtype=F64))
    den = DiscreteTimeDenoiser(MODELS["linear"], make_schedule("linear").alphas_cumprod)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        den.t_to_sigma(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        den.sigmas_for_timesteps([10, 20])
