"""diffkit.diffusion.ddpm: forward marginal, posterior, targets, loss, the ancestral step and sampler."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffkit.diffusion import ddpm
from diffkit.diffusion.schedules import make_schedule

F64 = torch.float64
DIFFUSERS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}




def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _full(t, n):
    return torch.full((n,), t, dtype=torch.long)


def test_q_sample_formula_and_statistics():
    s = make_schedule("linear")
    n, x0_value = 20000, torch.tensor([1.5, -0.7], dtype=F64)
    x0 = x0_value.expand(n, 2).clone()
    betas = s.betas.numpy()
    for t in (0, 50, 400, 999):
        noise = torch.randn(n, 2, generator=_gen(t), dtype=F64)
        x_t = ddpm.q_sample(s, x0, _full(t, n), noise)
        abar = float(np.prod(1 - betas[: t + 1]))
        torch.testing.assert_close(x_t, abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise)
        se = ((1 - abar) / n) ** 0.5
        torch.testing.assert_close(x_t.mean(0), abar ** 0.5 * x0_value, rtol=0, atol=5 * se)
        torch.testing.assert_close(x_t.var(0), torch.full((2,), 1 - abar, dtype=F64),
                                   rtol=0.05, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_one_step_chain_matches_q_sample_marginal(kind):
    """x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) eps, iterated, has q(x_t | x_0)'s moments."""
    s = make_schedule(kind)
    n, g = 20000, _gen(1)
    x0 = torch.tensor([2.0, -1.0], dtype=F64).expand(n, 2)
    checkpoints = {0, 7, 60, 250}
    x = x0.clone()
    for t in range(max(checkpoints) + 1):
        eps = torch.randn(n, 2, generator=g, dtype=F64)
        x = s.alphas[t].sqrt() * x + s.betas[t].sqrt() * eps
        if t in checkpoints:
            ref = ddpm.q_sample(s, x0, _full(t, n), torch.randn(n, 2, generator=g, dtype=F64))
            abar = float(s.alphas_cumprod[t])
            se = ((1 - abar) / n) ** 0.5
            for sample in (x, ref):
                torch.testing.assert_close(sample.mean(0), abar ** 0.5 * x0[0], rtol=0,
                                           atol=5 * se)
                torch.testing.assert_close(sample.var(0), torch.full((2,), 1 - abar, dtype=F64),
                                           rtol=0.06, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_posterior_equals_gaussian_conditioning(kind):
    """Condition the jointly Gaussian (x_{t-1}, x_t) | x_0 with the textbook formula."""
    s = make_schedule(kind)
    betas = s.betas.numpy()
    abar = np.cumprod(1 - betas)
    ts = [1, 2, 5, 100, 500, 998, 999]
    n = len(ts)
    x0 = torch.linspace(-1.5, 2.0, n, dtype=F64)[:, None]
    x_t = torch.linspace(0.7, -3.0, n, dtype=F64)[:, None]
    mean, var = ddpm.posterior_mean_variance(s, x0, x_t, torch.tensor(ts))
    assert mean.shape == (n, 1) and var.shape == (n, 1)
    for i, t in enumerate(ts):
        a_prev, a_t, alpha, beta = abar[t - 1], abar[t], 1 - betas[t], betas[t]
        m1, m2 = np.sqrt(a_prev) * x0[i, 0].item(), np.sqrt(a_t) * x0[i, 0].item()
        v11 = 1 - a_prev
        c12 = np.sqrt(alpha) * v11            # Cov(x_{t-1}, sqrt(alpha) x_{t-1} + sqrt(beta) e)
        v22 = alpha * v11 + beta
        cond_mean = m1 + c12 / v22 * (x_t[i, 0].item() - m2)
        cond_var = v11 - c12 ** 2 / v22
        assert mean[i, 0].item() == pytest.approx(cond_mean, rel=1e-9, abs=1e-12)
        assert var[i, 0].item() == pytest.approx(cond_var, rel=1e-9, abs=1e-15)


def test_posterior_at_t0_is_x0_with_zero_variance():
    s = make_schedule("linear", 50)
    x0 = torch.randn(3, 4, generator=_gen(0), dtype=F64)
    x_t = torch.randn(3, 4, generator=_gen(1), dtype=F64)
    mean, var = ddpm.posterior_mean_variance(s, x0, x_t, torch.tensor([0, 0, 1]))
    torch.testing.assert_close(mean[:2], x0[:2])
    assert var[0].item() == 0 and var[1].item() == 0 and var[2].item() > 0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_predict_x0_eps_round_trip(kind):
    s = make_schedule(kind)
    t = torch.tensor([0, 1, 300, 700, 999])
    x0 = torch.randn(5, 2, 3, generator=_gen(0), dtype=F64)
    eps = torch.randn(5, 2, 3, generator=_gen(1), dtype=F64)
    x_t = ddpm.q_sample(s, x0, t, eps)
    outputs = {"eps": eps, "x0": x0, "v": ddpm.v_target(s, x0, t, eps)}
    for target, output in outputs.items():
        x0_hat, eps_hat = ddpm.predict_x0_eps(s, output, x_t, t, target)
        # x0 from eps divides by sqrt(abar), which is ~5e-5 at the cosine's last step
        torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-7, atol=1e-9)


def test_v_target_definition():
    s = make_schedule("linear")
    t = torch.tensor([0, 10, 500, 999])
    x0 = torch.randn(4, 3, generator=_gen(0), dtype=F64)
    eps = torch.randn(4, 3, generator=_gen(1), dtype=F64)
    v = ddpm.v_target(s, x0, t, eps)
    abar = s.alphas_cumprod[t][:, None]
    torch.testing.assert_close(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0)
    # equivalent form (sqrt(abar) x_t - x_0) / sqrt(1 - abar);
    # (x_t, v) is a rotation of (x0, eps), so it keeps their norm
    x_t = ddpm.q_sample(s, x0, t, eps)
    torch.testing.assert_close(v, (abar.sqrt() * x_t - x0) / (1 - abar).sqrt())
    torch.testing.assert_close(v ** 2 + x_t ** 2, x0 ** 2 + eps ** 2)


@pytest.mark.parametrize("target", ddpm.TARGETS)
def test_training_loss_oracle_is_zero(target):
    s = make_schedule("cosine")
    x0 = torch.randn(6, 2, generator=_gen(0), dtype=F64)
    noise = torch.randn(6, 2, generator=_gen(1), dtype=F64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    wanted = {"eps": noise, "x0": x0, "v": ddpm.v_target(s, x0, t, noise)}
    seen = {}

    def oracle(x_t, t_in, scale=1.0):
        seen["x_t"], seen["t"] = x_t, t_in
        return scale * wanted[target]

    loss = ddpm.training_loss(oracle, s, x0, target=target, t=t, noise=noise)
    assert loss.item() < 1e-24
    torch.testing.assert_close(seen["x_t"], ddpm.q_sample(s, x0, t, noise))
    assert torch.equal(seen["t"], t)
    # a wrong model gives a positive loss, exactly the MSE to the target
    loss = ddpm.training_loss(oracle, s, x0, target=target, t=t, noise=noise,
                              model_kwargs={"scale": 0.0})
    assert loss.item() == pytest.approx(wanted[target].square().mean().item(), rel=1e-12)
    other = {"eps": "x0", "x0": "v", "v": "eps"}[target]
    assert ddpm.training_loss(oracle, s, x0, target=other, t=t, noise=noise).item() > 1e-3


def test_training_loss_seeded_randomness():
    s = make_schedule("linear")
    x0 = torch.randn(16, 2, generator=_gen(0))
    model = torch.nn.Linear(2, 2)

    def call(seed):
        return ddpm.training_loss(lambda x, t: model(x), s, x0, generator=_gen(seed)).item()

    assert call(3) == call(3)
    assert call(3) != call(4)


def _diffusers(kind, s):
    sched = DDPMScheduler(num_train_timesteps=s.T, clip_sample=False,
                          variance_type="fixed_small", prediction_type="epsilon",
                          **DIFFUSERS[kind])
    sched.betas, sched.alphas, sched.alphas_cumprod = s.betas, s.alphas, s.alphas_cumprod
    sched.one = torch.tensor(1.0, dtype=F64)
    sched.set_timesteps(s.T)
    return sched


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_p_step_equals_diffusers(kind):
    s = make_schedule(kind)
    sched = _diffusers(kind, s)
    shape = (3, 2, 4)
    for k, t in enumerate([0, 1, 2, 10, 500, 998, 999]):
        x_t = torch.randn(shape, generator=_gen(100 + k), dtype=F64)
        eps = torch.randn(shape, generator=_gen(200 + k), dtype=F64)
        ref = sched.step(eps, t, x_t, generator=_gen(k)).prev_sample
        noise = torch.randn(shape, generator=_gen(k), dtype=F64)
        ours = ddpm.p_step(s, eps, x_t, _full(t, 3), noise)
        assert (ours - ref).abs().max().item() <= 1e-8, (kind, t)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_p_step_per_sample_t_equals_diffusers_row_by_row(kind):
    s = make_schedule(kind)
    sched = _diffusers(kind, s)
    t = torch.tensor([0, 1, 37, 500, 999])
    x_t = torch.randn(5, 3, generator=_gen(1), dtype=F64)
    eps = torch.randn(5, 3, generator=_gen(2), dtype=F64)
    noise = torch.cat([torch.randn(1, 3, generator=_gen(10 + i), dtype=F64) for i in range(5)])
    ours = ddpm.p_step(s, eps, x_t, t, noise)
    for i in range(5):
        ref = sched.step(eps[i:i + 1], int(t[i]), x_t[i:i + 1], generator=_gen(10 + i))
        assert (ours[i:i + 1] - ref.prev_sample).abs().max().item() <= 1e-8, int(t[i])


def test_p_step_is_posterior_mean_plus_noise():
    s = make_schedule("scaled_linear")
    t = torch.tensor([0, 3, 250, 999])
    x_t = torch.randn(4, 5, generator=_gen(0), dtype=F64)
    eps = torch.randn(4, 5, generator=_gen(1), dtype=F64)
    noise = torch.randn(4, 5, generator=_gen(2), dtype=F64)
    x0_hat, _ = ddpm.predict_x0_eps(s, eps, x_t, t, "eps")
    mean, var = ddpm.posterior_mean_variance(s, x0_hat, x_t, t)
    torch.testing.assert_close(ddpm.p_step(s, eps, x_t, t, noise), mean + var.sqrt() * noise)
    # at t = 0 the noise is ignored
    out = ddpm.p_step(s, eps[:1], x_t[:1], t[:1], 1e6 * noise[:1])
    torch.testing.assert_close(out, mean[:1])


def _point_mass_model(s, c, target):
    """The exact network for data that is the single point c (x0 prediction is c everywhere)."""
    def model(x, t):
        assert torch.equal(t, t.round()), t          # the chain's integer timesteps
        abar = s.alphas_cumprod.to(x.dtype)[t.long()][:, None]
        eps = (x - abar.sqrt() * c) / (1 - abar).sqrt()
        return {"eps": eps, "x0": c.expand_as(x),
                "v": abar.sqrt() * eps - (1 - abar).sqrt() * c}[target]
    return model


@pytest.mark.parametrize("target", ddpm.TARGETS)
def test_sample_with_exact_model_hits_point_mass(target):
    s = make_schedule("linear", 100)
    c = torch.tensor([0.8, -1.3])
    out = ddpm.sample(_point_mass_model(s, c, target), s, (7, 2), target=target,
                      generator=_gen(0))
    assert out.shape == (7, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out, c.expand(7, 2), rtol=0, atol=1e-4)


def test_sample_determinism_and_callback():
    s = make_schedule("linear", 20)
    model = lambda x, t, k=0.1: k * x  # noqa: E731
    a = ddpm.sample(model, s, (5, 2), generator=_gen(0))
    b = ddpm.sample(model, s, (5, 2), generator=_gen(0))
    c = ddpm.sample(model, s, (5, 2), generator=_gen(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = ddpm.sample(model, s, (5, 2), generator=_gen(0), model_kwargs={"k": 0.5})
    assert not torch.equal(a, d)
    calls = []
    ddpm.sample(model, s, (5, 2), generator=_gen(0),
                callback=lambda t, x, x0: calls.append((t, tuple(x.shape), tuple(x0.shape))))
    assert [t for t, _, _ in calls] == list(range(19, -1, -1))
    assert all(shape == (5, 2) and shape0 == (5, 2) for _, shape, shape0 in calls)


def test_value_errors():
    s = make_schedule("linear", 10)
    x = torch.zeros(4, 2)
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="batch"):
        ddpm.q_sample(s, x, torch.zeros(3, dtype=torch.long), x)
    with pytest.raises(ValueError, match="shape"):
        ddpm.q_sample(s, x, t, torch.zeros(4, 3))
    with pytest.raises(ValueError):
        ddpm.q_sample(s, torch.tensor(1.0), torch.zeros(1, dtype=torch.long), torch.tensor(1.0))
    with pytest.raises(ValueError):
        ddpm.posterior_mean_variance(s, x, torch.zeros(4, 2, 1), t)
    with pytest.raises(ValueError):
        ddpm.p_step(s, x, x, t, torch.zeros(5, 2))
    with pytest.raises(ValueError, match="t must lie"):
        ddpm.q_sample(s, x, torch.full((4,), 10), x)
    with pytest.raises(ValueError, match="t must lie"):
        ddpm.p_step(s, x, x, torch.full((4,), -1), x)
    with pytest.raises(ValueError, match="integer"):
        ddpm.v_target(s, x, t.float(), x)
    with pytest.raises(ValueError, match="target"):
        ddpm.predict_x0_eps(s, x, x, t, "score")
    with pytest.raises(ValueError, match="target"):
        ddpm.training_loss(lambda x, t: x, s, x, target="epsilon")
    for shape in [(0, 2), (3, -1), (2.0, 2), (3, 0)]:
        with pytest.raises(ValueError, match="shape"):
            ddpm.sample(lambda x, t: x, s, shape)


@torch.no_grad()
def _old_sample(model, schedule, shape, *, target="eps", generator=None, callback=None,
                dtype=torch.float32, draw_dtype=None):
    """ddpm.sample as it was before it ran on the sampler contract: chapter 1's loop of p_step
    over x_t with integer t and tables in x's dtype, x_T first, then one draw per step but the
    last (drawn in ``draw_dtype``, by default x's)."""
    draw_dtype = draw_dtype or dtype
    x = torch.randn(shape, generator=generator, dtype=draw_dtype).to(dtype)
    table = schedule.to(dtype=x.dtype)
    for step in reversed(range(schedule.T)):
        t = torch.full((shape[0],), step, dtype=torch.long)
        x0_hat, eps = ddpm.predict_x0_eps(table, model(x, t.to(dtype)), x, t, target)
        if callback is not None:
            callback(step, x, x0_hat)
        noise = torch.randn(shape, generator=generator, dtype=draw_dtype).to(dtype) if step > 0 \
            else torch.zeros_like(x)
        x = ddpm.p_step(table, eps, x, t, noise)
    return x


class SmallNet(torch.nn.Module):
    """A small network whose outputs keep the chain contracting, as a trained one does: the exact
    eps of x_0 ~ N(0, I) data plus 0.3 tanh(MLP(x_t, t)), as an eps, x0 or v prediction."""

    def __init__(self, schedule, target):
        super().__init__()
        from diffkit.nn.mlp import MLPDenoiser
        torch.manual_seed(0)
        self.mlp, self.target = MLPDenoiser(dim=2, width=32, depth=2, emb_dim=16), target
        self.register_buffer("abar", schedule.alphas_cumprod.float())

    def forward(self, x_t, t):
        abar = self.abar[t.long()][:, None]
        eps = (1 - abar).sqrt() * x_t + 0.3 * torch.tanh(self.mlp(x_t, t))
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        return {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[self.target]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("target", ddpm.TARGETS)
def test_sample_on_the_contract_reproduces_the_p_step_loop(kind, target):
    """ddpm.sample runs sample_ddpm on the schedule's sigmas with the same draws in the same
    order. In float64 it is the p_step loop to 1e-10, every step's (t, x_t, x0_hat) included. In
    float32 both agree with the float64 loop on the same draws to float tolerance, the wrapper
    (float64 tables and step coefficients) about 100x closer than the old float32 loop."""
    s = make_schedule(kind, 200)
    net = SmallNet(s, target).eval()
    f64, f32 = torch.float64, torch.float32
    seen = {"old": [], "new": []}
    old64 = _old_sample(net.double(), s, (64, 2), target=target, generator=_gen(5), dtype=f64,
                        callback=lambda t, x, x0: seen["old"].append((t, x, x0)))
    new64 = ddpm.sample(net, s, (64, 2), target=target, generator=_gen(5), dtype=f64,
                        callback=lambda t, x, x0: seen["new"].append((t, x, x0)))
    ref = _old_sample(net, s, (64, 2), target=target, generator=_gen(5), dtype=f64,
                      draw_dtype=f32)                 # float64 arithmetic on float32 draws
    old32 = _old_sample(net.float(), s, (64, 2), target=target, generator=_gen(5))
    new32 = ddpm.sample(net, s, (64, 2), target=target, generator=_gen(5))
    assert new64.dtype == f64 and new32.dtype == f32
    scale = ref.abs().max().item()
    diff64 = (new64 - old64).abs().max().item()
    err_new, err_old = ((x.double() - ref).abs().max().item() for x in (new32, old32))
    print(f"ddpm.sample vs the p_step loop, {kind} {target}: float64 {diff64:.1e}; float32 vs "
          f"float64 on the same draws: wrapper {err_new:.1e}, old loop {err_old:.1e} "
          f"(|x| <= {scale:.1f})")
    assert diff64 <= 1e-10
    assert err_new <= 1e-5 * scale and err_old <= 1e-3 * scale
    assert (new32 - old32).abs().max().item() <= 1e-3 * scale
    assert [t for t, _, _ in seen["new"]] == [t for t, _, _ in seen["old"]] == \
        list(range(199, -1, -1))
    for (_, x_old, x0_old), (_, x_new, x0_new) in zip(seen["old"], seen["new"]):
        torch.testing.assert_close(x_new, x_old, rtol=0, atol=1e-10)
        torch.testing.assert_close(x0_new, x0_old, rtol=0, atol=1e-9)
    # the seed matters (a test that could not see a different draw order would pass anyway)
    other = ddpm.sample(net, s, (64, 2), target=target, generator=_gen(6))
    assert (other - old32).abs().max().item() > 1e-2
