"""The closed forms of the notes checked against independent oracles: Monte Carlo, Bayes' rule, autograd,
torch.distributions. Statistical checks use fixed seeds and tolerances of 5 standard errors.

Where the notes write a formula that is wrong, a test here shows that the notes' version fails the same check.
"""
import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ddpm
import ncsn
import vae

FEW = settings(max_examples=6, derandomize=True, deadline=None)
D64 = torch.float64


def grid(lo, hi, step, avoid=()):
    """Values lo, lo+step, ..., hi, without `avoid`: under derandomize, st.floats draws mostly 0, the bounds and
    subnormal numbers, where a wrong formula (σ^2 for σ, a missing x_t term) often gives the right answer."""
    n = round((hi - lo) / step)
    values = [round(lo + k * step, 10) for k in range(n + 1)]
    return st.sampled_from([v for v in values if all(abs(v - a) > 1e-9 for a in avoid)])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_close_se(estimate, target, se, k=5.0, what=""):
    """|estimate - target| <= k standard errors (elementwise)."""
    estimate, target, se = (torch.as_tensor(v, dtype=D64) for v in (estimate, target, se))
    err = (estimate - target).abs()
    assert torch.all(err <= k * se), f"{what}: |{estimate} - {target}| = {err} > {k} * {se}"


# ==========================================================================================================
# DDPM: 扩散过程 / 推导 / 训练与推理


S = ddpm.schedule()  # T = 1000, β from 1e-4 to 0.02


def test_schedule_indexing_follows_the_notes():
    assert S.beta.dtype == D64 and len(S.beta) == S.T + 1 == 1001
    assert S.alpha_bar[0] == 1 and S.beta_tilde[1] == 0
    assert math.isclose(S.beta[1].item(), 1e-4) and math.isclose(S.beta[S.T].item(), 0.02)
    assert torch.allclose(S.alpha_bar[1:], torch.cumprod(1 - S.beta[1:], 0))
    t = torch.arange(2, S.T + 1)
    assert torch.allclose(S.beta_tilde[t], S.beta[t] * (1 - S.alpha_bar[t - 1]) / (1 - S.alpha_bar[t]))


def test_a_short_schedule_warns_that_x_T_is_far_from_noise_and_keeps_its_betas():
    # T = 50 with the default β's: ᾱ_T = exp(Σ log(1 - β_t)) = 0.603, so x_T keeps sqrt(0.603) = 0.78 of x_0
    with pytest.warns(UserWarning, match=r"T = 50 .* ᾱ_T = 0\.603"):
        sch = ddpm.schedule(T=50)
    assert math.isclose(sch.alpha_bar[50].item(), math.prod(1 - (1e-4 + (0.02 - 1e-4) * k / 49) for k in range(50)))
    assert torch.equal(sch.beta[1:], torch.linspace(1e-4, 0.02, 50, dtype=D64))  # not rescaled
    with pytest.warns(UserWarning, match="ᾱ_T = 0.00231"):
        ddpm.schedule(T=600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddpm.schedule(T=700)  # ᾱ_T = 8.4e-4, under ALPHA_BAR_T_MAX = 1e-3
        ddpm.schedule()  # the DDPM schedule, ᾱ_T = 4.0e-5


def test_notes_error_betas_increase_not_decrease():
    # The notes (扩散过程) say β_1 > β_2 > ... > β_T. DDPM's betas increase; the notes' order fails this.
    assert torch.all(S.beta[2:] > S.beta[1:-1])
    with pytest.raises(ValueError, match="increase"):
        ddpm.schedule(beta_1=0.02, beta_T=1e-4)
    # what the order changes: with increasing betas x_1 keeps almost all of x_0 (ᾱ_1 = 0.9999) while the
    # notes' decreasing order would already scale it by sqrt(0.98)
    assert S.alpha_bar[1] > 0.9998


@FEW
@given(t=st.integers(1, 1000), x0=grid(-1, 1, 0.1, avoid=(0,)))
def test_q_xt_given_x0_equals_running_the_chain(t, x0):
    # q(x_t|x_0) in closed form against running the chain q(x_t|x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t) (q_step)
    M = 40_000
    g = gen(t)
    x = torch.full((M, 1), x0, dtype=D64)
    for k in range(1, t + 1):
        x = ddpm.q_step(S, x, torch.full((M,), k), torch.randn((M, 1), generator=g, dtype=D64))
    ts = torch.tensor([t])
    mean = ddpm.q_sample(S, torch.tensor([[x0]], dtype=D64), ts, torch.zeros(1, 1, dtype=D64)).item()
    std = ddpm.q_sample(S, torch.zeros(1, 1, dtype=D64), ts, torch.ones(1, 1, dtype=D64)).item()
    assert_close_se(x.mean(), mean, std / math.sqrt(M), what="mean")
    assert_close_se(x.var(), std ** 2, std ** 2 * math.sqrt(2 / (M - 1)), what="variance")


def bayes_posterior(t, x0, xt):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}."""
    a, A = S.alpha_bar[t - 1].sqrt(), 1 - S.alpha_bar[t - 1]  # q(x_{t-1}|x_0) = N(a x_0, A)
    c, b = S.alpha[t].sqrt(), S.beta[t]  # q(x_t|x_{t-1}) = N(c x_{t-1}, b)
    precision = 1 / A + c ** 2 / b
    return (a * x0 / A + c * xt / b) / precision, 1 / precision


def notes_posterior_mean(t, x0, xt):
    # the notes' u_{q,t} = [(1-ᾱ_{t-1}) sqrt(ᾱ_t) x_t + β_t sqrt(ᾱ_{t-1}) x_0] / (1-ᾱ_t)
    return ((1 - S.alpha_bar[t - 1]) * S.alpha_bar[t].sqrt() * xt + S.beta[t] * S.alpha_bar[t - 1].sqrt() * x0) / (1 - S.alpha_bar[t])


@FEW
@given(t=st.integers(2, 1000), x0=grid(-1, 1, 0.1, avoid=(0,)), xt=grid(-3, 3, 0.25, avoid=(0,)))
def test_q_posterior_is_bayes_rule(t, x0, xt):
    mean, var = ddpm.q_posterior(S, torch.tensor([[x0]], dtype=D64), torch.tensor([[xt]], dtype=D64), torch.tensor([t]))
    m_ref, v_ref = bayes_posterior(t, x0, xt)
    assert torch.allclose(mean, m_ref.reshape(1, 1), rtol=1e-9, atol=1e-12)
    assert torch.allclose(var, v_ref.reshape(1, 1), rtol=1e-9)


def test_q_posterior_at_t1_is_x0():
    # ᾱ_0 = 1: given x_1 and x_0, x_0 is known, so q(x_0|x_1,x_0) is a point mass at x_0
    mean, var = ddpm.q_posterior(S, torch.tensor([[0.3]], dtype=D64), torch.tensor([[-1.2]], dtype=D64), torch.tensor([1]))
    assert torch.allclose(mean, torch.tensor([[0.3]], dtype=D64)) and var.item() == 0


def test_notes_error_posterior_mean_uses_sqrt_alpha_t_not_sqrt_alpha_bar_t():
    # The notes (推导) write sqrt(ᾱ_t) x_t in u_{q,t}; Bayes' rule gives sqrt(α_t) x_t. Same check, notes fail it.
    for t, x0, xt in [(50, 0.5, 1.0), (300, -0.3, 0.8), (900, 0.0, 1.5)]:
        m_ref, _ = bayes_posterior(t, x0, xt)
        ours = ddpm.q_posterior(S, torch.tensor([[x0]], dtype=D64), torch.tensor([[xt]], dtype=D64), torch.tensor([t]))[0]
        assert torch.allclose(ours, m_ref.reshape(1, 1), rtol=1e-9)
        assert not torch.allclose(notes_posterior_mean(t, x0, xt), m_ref, rtol=1e-2), t


@FEW
@given(t=st.integers(2, 1000), x0=grid(-1, 1, 0.1, avoid=(0,)))
def test_q_posterior_by_monte_carlo_regression(t, x0):
    # draw (x_{t-1}, x_t) jointly given x_0 by running the forward process, and regress x_{t-1} on x_t: the
    # posterior mean is linear in x_t (slope, intercept) and its variance is the residual variance
    M = 200_000
    g = gen(t)
    xprev = S.alpha_bar[t - 1].sqrt() * x0 + (1 - S.alpha_bar[t - 1]).sqrt() * torch.randn(M, generator=g, dtype=D64)
    xt = S.alpha[t].sqrt() * xprev + S.beta[t].sqrt() * torch.randn(M, generator=g, dtype=D64)
    xc = xt - xt.mean()
    slope = (xc * (xprev - xprev.mean())).sum() / (xc ** 2).sum()
    intercept = xprev.mean() - slope * xt.mean()
    resid = xprev - intercept - slope * xt
    res_var = resid.var()
    m0, var = ddpm.q_posterior(S, torch.tensor([[x0]], dtype=D64), torch.zeros(1, 1, dtype=D64), torch.tensor([t]))
    m1, _ = ddpm.q_posterior(S, torch.tensor([[x0]], dtype=D64), torch.ones(1, 1, dtype=D64), torch.tensor([t]))
    se_slope = res_var.sqrt() / (xc ** 2).sum().sqrt()
    se_int = res_var.sqrt() * (1 / M + xt.mean() ** 2 / (xc ** 2).sum()).sqrt()
    assert_close_se(slope, (m1 - m0).item(), se_slope, what="slope")
    assert_close_se(intercept, m0.item(), se_int, what="intercept")
    assert_close_se(res_var, var.item(), var.item() * math.sqrt(2 / (M - 1)), what="residual variance")


@FEW
@given(t=st.integers(1, 1000), seed=st.integers(0, 100))
def test_eps_form_mean_equals_posterior_mean_with_true_noise(t, seed):
    g = gen(seed)
    x0 = torch.rand(3, 4, generator=g, dtype=D64) * 2 - 1
    eps = torch.randn(3, 4, generator=g, dtype=D64)
    ts = torch.full((3,), t)
    xt = ddpm.q_sample(S, x0, ts, eps)
    assert torch.allclose(ddpm.p_mean(S, xt, ts, eps), ddpm.q_posterior(S, x0, xt, ts)[0], atol=1e-8)
    assert torch.allclose(ddpm.predict_x0(S, xt, ts, eps), x0, atol=1e-8)


class PointMassEps(torch.nn.Module):
    """The exact ε-prediction when the data distribution is a point mass at c: ε = (x_t - sqrt(ᾱ_t) c) / sqrt(1-ᾱ_t)."""

    def __init__(self, c, s):
        super().__init__()
        self.register_buffer("c", c)
        self.s = s

    def forward(self, x, t):
        ab = self.s.alpha_bar[t].to(x.dtype).reshape(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.c) / (1 - ab).sqrt()


@pytest.mark.parametrize("var", ["beta_tilde", "beta"])
@pytest.mark.parametrize("clip", [False, True])
def test_sampler_with_exact_eps_returns_the_point(var, clip):
    c = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    model = PointMassEps(c, S)
    x = ddpm.sample(model, S, (8, 1, 4, 4), var=var, clip_x0=clip, generator=gen(1))
    assert (x - c).abs().max() < 1e-4


def test_notes_error_no_noise_at_the_last_sampling_step():
    # The notes (训练与推理) add σ_t ε' at every step, t = 1 included. DDPM's Algorithm 2 sets z = 0 at t = 1.
    # With the exact ε of a point mass our sampler returns the point; the notes' extra σ_1 ε' (σ_1^2 = β_1 with
    # var="beta") moves each pixel by ~0.01, which fails the same 1e-4 check.
    c = torch.zeros(1, 1, 8, 8)
    x = ddpm.sample(PointMassEps(c, S), S, (16, 1, 8, 8), var="beta", generator=gen(2))
    assert (x - c).abs().max() < 1e-4
    notes_x = x + S.beta[1].sqrt().float() * torch.randn(x.shape, generator=gen(3))
    assert (notes_x - c).abs().max() > 1e-2


@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_exact_eps_returns_the_point(steps, eta):
    c = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    x = ddpm.ddim_sample(PointMassEps(c, S), S, (4, 1, 4, 4), steps=steps, eta=eta, generator=gen(4))
    assert (x - c).abs().max() < 1e-4


class TinyEps(torch.nn.Module):
    """A small fixed ε-model that is not exact: enough to tell two samplers or two bounds apart."""

    def __init__(self):
        super().__init__()
        g = gen(7)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(1, 1, 3, 3, generator=g) * 0.3)
            self.conv.bias.zero_()

    def forward(self, x, t):
        x = x.to(self.conv.weight.dtype)
        return torch.tanh(self.conv(x) + x + 0.001 * t.to(x.dtype).reshape(-1, 1, 1, 1))


def test_ddim_eta1_full_steps_is_the_ancestral_sampler():
    s = ddpm.schedule(T=50)
    m = TinyEps()
    a = ddpm.sample(m, s, (4, 1, 6, 6), var="beta_tilde", generator=gen(5))
    b = ddpm.ddim_sample(m, s, (4, 1, 6, 6), steps=50, eta=1.0, generator=gen(5))
    assert torch.allclose(a, b, atol=1e-4)


def test_ddim_eta1_few_steps_is_the_ancestral_sampler_of_the_shorter_chain():
    # the CLI's default sampler: on t_K > ... > t_1 > t_0 = 0 the chain q(x_{t_k}|x_{t_{k-1}}) has
    # β'_k = 1 - ᾱ_{t_k}/ᾱ_{t_{k-1}}; DDIM with η = 1 is the notes' ancestral sampler (σ^2 = β̃') on it
    s = ddpm.schedule(T=50)
    ts = ddpm.time_grid(s, 10, "uniform")
    m = TinyEps()
    t_of = torch.tensor(ts[::-1])  # the shorter chain's step k = 0..10 is the original t_k
    ab = s.alpha_bar
    beta = torch.zeros(11, dtype=torch.float64)
    for k in range(1, 11):
        beta[k] = 1 - ab[t_of[k]] / ab[t_of[k - 1]]
    shorter = ddpm.Schedule(beta)
    a = ddpm.sample(lambda x, k: m(x, t_of[k]), shorter, (4, 1, 6, 6), var="beta_tilde", generator=gen(5))
    b = ddpm.ddim_sample(m, s, (4, 1, 6, 6), steps=10, eta=1.0, generator=gen(5))
    assert torch.allclose(a, b, atol=1e-4)


def test_ddim_eta0_is_deterministic_and_spans_T_to_0():
    s = ddpm.schedule(T=100)
    m = TinyEps()
    a = ddpm.ddim_sample(m, s, (2, 1, 6, 6), steps=7, generator=gen(6))
    b = ddpm.ddim_sample(m, s, (2, 1, 6, 6), steps=7, generator=gen(6))
    assert torch.equal(a, b)
    seen = []
    m2 = lambda x, t: (seen.append(int(t[0])), m(x, t))[1]  # noqa: E731  (a plain function)
    ddpm.ddim_sample(m2, s, (1, 1, 6, 6), steps=7, generator=gen(6))
    assert seen[0] == 100 and len(set(seen)) == 7 and seen == sorted(seen, reverse=True)


def test_loss_simple_draws_t_uniformly_from_1_to_T():
    # 推导: t ~ U{1, ..., T}. t = 0 would be x_0 itself, with no noise to predict, and t = T must be reachable
    # (it is the step the sampler starts from). Counts per t within 5 standard errors of uniform.
    T, B, R = 4, 500, 40
    sch = ddpm.schedule(T=T)
    seen = []

    def recorder(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    for r in range(R):
        ddpm.loss_simple(recorder, sch, torch.zeros(B, 1, 2, 2), generator=gen(r))
    t = torch.cat(seen)
    assert t.min() == 1 and t.max() == T
    counts = torch.bincount(t, minlength=T + 1)[1:].double()
    n, p = B * R, 1 / T
    assert_close_se(counts, n * p, math.sqrt(n * p * (1 - p)), what="count of each t")


def test_sigma2_is_beta_tilde_or_beta():
    # 逆扩散过程 / 推导: σ_t^2 = β̃_t = β_t (1-ᾱ_{t-1})/(1-ᾱ_t) or σ_t^2 = β_t, computed here from β alone; at t = 1
    # both take β̃_2 (β̃_1 = 0 would make p_θ(x_0|x_1) a point mass)
    beta = S.beta
    alpha_bar = torch.cumprod(1 - beta, 0)
    t = torch.arange(2, S.T + 1)
    tilde = beta[t] * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])
    assert torch.allclose(S.sigma2("beta_tilde")[2:], tilde, rtol=1e-12)
    assert torch.allclose(S.sigma2("beta")[2:], beta[2:], rtol=1e-12)
    assert S.sigma2("beta")[1] == S.sigma2("beta_tilde")[1] == tilde[0]
    assert (S.sigma2("beta")[2:] > 1.5 * S.sigma2("beta_tilde")[2:]).any()  # the two choices differ


# ---- the bound (L_T + sum L_{t-1} + L_0)


@FEW
@given(m1=grid(-3, 3, 0.1), v1=grid(0.05, 4, 0.05, avoid=(1,)), m2=grid(-3, 3, 0.1), v2=grid(0.05, 4, 0.05, avoid=(1,)))
def test_gaussian_kl_matches_torch_distributions(m1, v1, m2, v2):
    N = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(N(torch.tensor(m1, dtype=D64), math.sqrt(v1)), N(torch.tensor(m2, dtype=D64), math.sqrt(v2)))
    got = ddpm.gaussian_kl(*(torch.tensor(v, dtype=D64) for v in (m1, v1, m2, v2)))
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)


@FEW
@given(mean=grid(-1.5, 1.5, 0.01), std=grid(0.001, 2.0, 0.001))
def test_discretised_decoder_bins_sum_to_one_and_match_cdf(mean, std):
    levels = torch.arange(256, dtype=D64) / 127.5 - 1  # the 256 values of 8-bit data in [-1, 1]
    m, v = torch.full_like(levels, mean), torch.full_like(levels, std ** 2)
    p = ddpm.discretized_gaussian_log_likelihood(levels, m, v).exp()
    assert abs(p.sum().item() - 1) < 1e-6
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=D64), std)
    edges = torch.cat([torch.tensor([-math.inf]), (levels[:-1] + levels[1:]) / 2, torch.tensor([math.inf])]).to(D64)
    direct = normal.cdf(edges[1:]) - normal.cdf(edges[:-1])
    assert torch.allclose(p, direct.clamp(min=1e-12), atol=1e-9)


def test_prior_term_is_the_kl_of_q_xT_given_x0_to_the_standard_normal():
    # 推导: L_T = D_KL(q(x_T|x_0) || N(0, I)) with q(x_T|x_0) = N(sqrt(ᾱ_T) x_0, (1-ᾱ_T) I), against
    # torch.distributions, on a short schedule where ᾱ_T = 0.57 makes L_T large
    sch = ddpm.schedule(T=10, beta_1=0.01, beta_T=0.1)
    x0 = torch.tensor([[-1.0, 1.0, 0.0, 0.5], [0.3, -0.7, 0.9, -0.2]], dtype=D64)
    a = sch.alpha_bar[10]
    N = torch.distributions.Normal
    ref = torch.distributions.kl_divergence(N(a.sqrt() * x0, (1 - a).sqrt()), N(torch.zeros_like(x0), 1.0)).sum(1)
    assert torch.allclose(ddpm.prior_term(sch, x0), ref, rtol=1e-12)
    assert (ref > 0.5).all()  # nats: far from negligible


def test_prior_term_is_negligible():
    x0 = torch.tensor([[-1.0, 1.0, 0.0, 0.5]], dtype=D64)
    assert ddpm.prior_term(S, x0).item() / (4 * math.log(2)) < 1e-4


def test_each_kl_term_is_the_weighted_eps_loss():
    # 推导: with σ_t^2 = β̃_t, L_{t-1} = β_t^2 / (2 σ_t^2 α_t (1-ᾱ_t)) ||ε - ε_θ(x_t, t)||^2 exactly
    s = ddpm.schedule(T=10)
    m = TinyEps().double()
    g = gen(8)
    x0 = torch.rand(3, 1, 4, 4, generator=g, dtype=D64) * 2 - 1
    for t_int in range(2, 11):
        eps = torch.randn(x0.shape, generator=g, dtype=D64)
        t = torch.full((3,), t_int)
        got = ddpm.bound_terms(m, s, x0, t, "beta_tilde", eps=eps)
        w = s.beta[t_int] ** 2 / (2 * s.beta_tilde[t_int] * s.alpha[t_int] * (1 - s.alpha_bar[t_int]))
        ref = w * ((eps - m(ddpm.q_sample(s, x0, t, eps), t)) ** 2).flatten(1).sum(1)
        assert torch.allclose(got, ref, rtol=1e-8), t_int


def test_bound_equals_monte_carlo_of_log_q_minus_log_p():
    # E_q[log q(x_{1:T}|x_0) - log p_θ(x_{0:T})] by sampling whole trajectories, against the sum of the
    # closed-form terms (which still average over x_t). Both are estimates: compare within 5 combined SEs.
    # β from 0.01 to 0.1: ᾱ_T = 0.57, so the prior term L_T is a large part of the bound
    T, s, m = 10, ddpm.schedule(T=10, beta_1=0.01, beta_T=0.1), TinyEps().double()
    sig2 = s.sigma2("beta_tilde")
    x0 = (torch.randint(0, 256, (1, 1, 2, 2), generator=gen(9)).to(D64) / 127.5 - 1)
    R = 4000
    X0 = x0.expand(R, -1, -1, -1)
    g = gen(10)
    xs = [X0]
    logq = torch.zeros(R, dtype=D64)
    N = torch.distributions.Normal
    for t in range(1, T + 1):
        mu = s.alpha[t].sqrt() * xs[-1]
        nxt = mu + s.beta[t].sqrt() * torch.randn(X0.shape, generator=g, dtype=D64)
        logq += N(mu, s.beta[t].sqrt()).log_prob(nxt).flatten(1).sum(1)
        xs.append(nxt)
    logp = N(0.0, 1.0).log_prob(xs[T]).flatten(1).sum(1)
    for t in range(T, 0, -1):
        tt = torch.full((R,), t)
        mean = ddpm.p_mean(s, xs[t], tt, m(xs[t], tt))
        if t > 1:
            logp += N(mean, sig2[t].sqrt()).log_prob(xs[t - 1]).flatten(1).sum(1)
        else:
            logp += ddpm.discretized_gaussian_log_likelihood(X0, mean, sig2[1].expand_as(mean)).flatten(1).sum(1)
    mc = logq - logp
    D = x0.numel()
    reps = torch.cat([ddpm.nll_bits_per_dim(m, s, x0, generator=gen(100 + k))[0] for k in range(400)]) * D * math.log(2)
    se = math.sqrt(mc.var().item() / R + reps.var().item() / len(reps))
    assert_close_se(reps.mean(), mc.mean(), se, what="bound vs Monte Carlo (nats)")


def test_t_sampled_bound_agrees_with_the_full_sum():
    s, m = ddpm.schedule(T=20, beta_1=0.01, beta_T=0.3), TinyEps().double()
    x0 = torch.randint(0, 256, (1, 1, 3, 3), generator=gen(11)).to(D64) / 127.5 - 1
    full = torch.cat([ddpm.nll_bits_per_dim(m, s, x0, generator=gen(200 + k))[0] for k in range(200)])
    est, se = ddpm.nll_bits_per_dim(m, s, x0.expand(300, -1, -1, -1), t_samples=5, generator=gen(12))
    # each row is an independent estimate with its own SE; pool them
    pooled_se = math.sqrt(est.var().item() / len(est) + full.var().item() / len(full))
    assert_close_se(est.mean(), full.mean(), pooled_se, what="t-sampled vs full bound")
    assert torch.isfinite(se).all() and (se > 0).all()


# ==========================================================================================================
# VAE


MU = grid(-3, 3, 0.1, avoid=(0,))
LOGVAR = grid(-4, 4, 0.1, avoid=(0,))  # σ^2 = 1 would hide σ^2 written for σ


@FEW
@given(mu=st.lists(MU, min_size=3, max_size=3), lv=st.lists(LOGVAR, min_size=3, max_size=3))
def test_kl_closed_form_matches_torch_distributions_and_monte_carlo(mu, lv):
    mu, lv = torch.tensor([mu], dtype=D64), torch.tensor([lv], dtype=D64)
    q = torch.distributions.Normal(mu, (0.5 * lv).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = vae.kl_to_standard_normal(mu, lv)
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p).sum(1), rtol=1e-10)
    M = 100_000
    v = mu + (0.5 * lv).exp() * torch.randn((M, 3), generator=gen(1), dtype=D64)
    terms = (q.log_prob(v) - p.log_prob(v)).sum(-1)
    assert_close_se(terms.mean(), kl.item(), terms.std() / math.sqrt(M), what="KL by Monte Carlo")


def test_notes_error_kl_direction():
    # The notes' intro writes KL(N || N_g) (prior first); the derivation needs KL(q_φ(v|x) || p(v)).
    mu, lv = torch.tensor([[0.5, -1.0]], dtype=D64), torch.tensor([[-2.0, 1.5]], dtype=D64)
    q = torch.distributions.Normal(mu, (0.5 * lv).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = vae.kl_to_standard_normal(mu, lv)
    assert torch.allclose(kl, torch.distributions.kl_divergence(q, p).sum(1))
    assert not torch.allclose(kl, torch.distributions.kl_divergence(p, q).sum(1), rtol=0.05)


@FEW
@given(mu=MU, lv=LOGVAR)
def test_reparameterised_samples_have_mean_U_and_std_sigma(mu, lv):
    M = 100_000
    v = vae.reparameterize(torch.full((M, 1), mu, dtype=D64), torch.full((M, 1), lv, dtype=D64),
                           eps=torch.randn((M, 1), generator=gen(2), dtype=D64))
    sigma = math.exp(0.5 * lv)
    assert_close_se(v.mean(), mu, sigma / math.sqrt(M), what="mean")
    assert_close_se(v.std(), sigma, sigma / math.sqrt(2 * (M - 1)), what="std")


def test_notes_error_reparameterisation_uses_sigma_not_sigma_squared():
    # The notes write v = U + σ^2 ⊗ ε. For σ = e^{-1} (log σ^2 = -2) the samples' std must be σ; the notes' σ^2
    # gives e^{-2}, which fails the same 5-SE check by a wide margin.
    M, lv = 100_000, -2.0
    eps = torch.randn((M, 1), generator=gen(3), dtype=D64)
    v = vae.reparameterize(torch.zeros(M, 1, dtype=D64), torch.full((M, 1), lv, dtype=D64), eps=eps)
    sigma, se = math.exp(0.5 * lv), math.exp(0.5 * lv) / math.sqrt(2 * (M - 1))
    assert abs(v.std().item() - sigma) < 5 * se
    notes_v = math.exp(lv) * eps
    assert abs(notes_v.std().item() - sigma) > 100 * se


def test_reparameterisation_gradients_flow_to_U_and_sigma():
    mu = torch.tensor([[0.3, -0.2]], dtype=D64, requires_grad=True)
    lv = torch.tensor([[0.5, -1.0]], dtype=D64, requires_grad=True)
    eps = torch.tensor([[1.5, -0.7]], dtype=D64)
    vae.reparameterize(mu, lv, eps=eps).sum().backward()
    assert torch.allclose(mu.grad, torch.ones_like(mu))
    assert torch.allclose(lv.grad, 0.5 * (0.5 * lv.detach()).exp() * eps)  # dv/dlogσ^2 = σ ε / 2


def test_notes_error_gaussian_normaliser():
    # log p_θ(x|v) = -n log(sqrt(2π) σ) - ||x - u||^2/(2σ^2), against torch.distributions. The notes' density
    # 1/(2 π^{n/2} σ^n) differs by log 2 - (n/2) log 2 nats, which fails the same check.
    g = gen(4)
    x, mean, sigma = torch.rand(2, 1, 4, 4, generator=g, dtype=D64), torch.rand(2, 1, 4, 4, generator=g, dtype=D64), 0.3
    ours = vae.log_px_given_v(mean, x, "gaussian", sigma)
    ref = torch.distributions.Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(ours, ref, rtol=1e-10)
    n = 16
    notes = -math.log(2) - n / 2 * math.log(math.pi) - n * math.log(sigma) - ((x - mean) ** 2).flatten(1).sum(1) / (2 * sigma ** 2)
    assert not torch.allclose(notes, ref, atol=1.0)


def test_notes_final_loss_is_minus_2_sigma2_elbo_and_the_notes_version_is_not():
    g = gen(5)
    x, xm = torch.rand(3, 1, 4, 4, generator=g, dtype=D64), torch.rand(3, 1, 4, 4, generator=g, dtype=D64)
    mu, lv, sx = torch.randn(3, 5, generator=g, dtype=D64), torch.randn(3, 5, generator=g, dtype=D64), 0.2
    L = vae.log_px_given_v(xm, x, "gaussian", sx) - vae.kl_to_standard_normal(mu, lv)
    n = 16
    assert torch.allclose(vae.notes_loss(x, xm, mu, lv, sx), -2 * sx ** 2 * (L + n * math.log(math.sqrt(2 * math.pi) * sx)))
    # the notes' final line has u_φ(x)_i where the KL has u_φ(x)_i^2: it is unbounded below in U
    notes_written = ((x - xm) ** 2).flatten(1).sum(1) + sx ** 2 * ((lv.exp() + mu - lv - 1).sum(1))
    assert not torch.allclose(notes_written, vae.notes_loss(x, xm, mu, lv, sx), rtol=1e-3)
    big_negative_U = torch.full_like(mu, -1e3)
    assert (((x - xm) ** 2).flatten(1).sum(1) + sx ** 2 * (lv.exp() + big_negative_U - lv - 1).sum(1) < 0).all()


def test_notes_error_generation_noise_is_sigma_not_sigma_squared():
    # A draw from p_θ(x|v) = N(u_θ(v), σ^2 I) has std σ around the mean; the notes' σ^2 ε does not.
    m = vae.VAE(latent_dim=2, hidden=8)
    M, sx = 20_000, 0.3
    a = vae.generate(m, M, generator=gen(6))
    b = vae.generate(m, M, generator=gen(6), sigma_x=sx)
    std = (b - a).std().item()
    se = sx / math.sqrt(2 * (b.numel() - 1))
    assert abs(std - sx) < 5 * se and abs(std - sx ** 2) > 100 * se


class LinearGaussian(torch.nn.Module):
    """p(v) = N(0, I), p(x|v) = N(W v + b, s^2 I) with W's columns orthogonal (probabilistic PCA): the exact
    posterior is a diagonal Gaussian and log p(x) = log N(x; b, W W^T + s^2 I) is known in closed form.
    The encoder is the exact posterior, optionally with its mean shifted and log-variance scaled."""

    def __init__(self, n=6, d=3, s=0.5, shift=0.0, lv_scale=1.0):
        super().__init__()
        g = gen(9)
        Q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=D64))
        self.W = Q * torch.tensor([2.0, 1.0, 0.5], dtype=D64)[:d]
        self.b = torch.randn(n, generator=g, dtype=D64) * 0.1
        self.s, self.shift, self.lv_scale, self.latent_dim = s, shift, lv_scale, d
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=D64))

    def encode(self, x):
        c = (self.W ** 2).sum(0) / self.s ** 2  # W^T W / s^2 is diagonal
        var = 1 / (1 + c)
        mu = var * ((x.flatten(1) - self.b) @ self.W) / self.s ** 2
        return mu + self.shift, (var.log() * self.lv_scale).expand_as(mu)

    def decode(self, v):
        return v @ self.W.T + self.b

    def forward(self, x, generator=None):
        mu, lv = self.encode(x)
        return self.decode(vae.reparameterize(mu, lv, generator=generator)), mu, lv

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s ** 2 * torch.eye(len(self.b), dtype=D64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)


def test_elbo_with_exact_posterior_is_log_px_and_other_encoders_give_less():
    x = torch.randn(5, 6, generator=gen(10), dtype=D64)
    exact = LinearGaussian()
    log_px = exact.log_px(x)
    # with q = the exact posterior, E_q[log p(x|v)] - KL(q || p) = log p(x): the ELBO is tight. (elbo() uses
    # one v and the closed-form KL, so each call is unbiased but noisy: average M calls.)
    M = 2000

    def mean_and_se(model):
        e = torch.stack([vae.elbo(model, x, "gaussian", model.s, generator=gen(12 + k)) for k in range(M)])
        return e.mean(0), e.std(0) / math.sqrt(M)

    m, se = mean_and_se(exact)
    assert ((m - log_px).abs() < 5 * se).all()
    # iwae with k = 1 is the other form of the ELBO, log p(x,v) - log q(v|x), zero-variance at the exact posterior
    assert torch.allclose(vae.iwae_bound(exact, x, 1, "gaussian", exact.s, generator=gen(11)), log_px, atol=1e-8)
    for other in (LinearGaussian(shift=0.5), LinearGaussian(lv_scale=0.5)):
        m, se = mean_and_se(other)
        assert (m + 5 * se < log_px).all()


def test_iwae_bound_rises_towards_log_px_with_k():
    x = torch.randn(4, 6, generator=gen(13), dtype=D64)
    model = LinearGaussian(shift=0.4, lv_scale=0.6)
    log_px = model.log_px(x)
    R = 300
    means, ses = [], []
    for k in (1, 10, 100, 1000):
        b = torch.stack([vae.iwae_bound(model, x, k, "gaussian", model.s, generator=gen(100 * k + r)) for r in range(R)])
        means.append(b.mean(0))
        ses.append(b.std(0) / math.sqrt(R))
    for a, b, sa, sb in zip(means, means[1:], ses, ses[1:]):
        assert (b - a > -5 * torch.sqrt(sa ** 2 + sb ** 2)).all()  # never falls, within noise
    assert (means[0] < means[-1] - 5 * torch.sqrt(ses[0] ** 2 + ses[-1] ** 2)).all()  # and does rise
    assert (means[-1] < log_px + 5 * ses[-1]).all()  # a lower bound
    assert ((log_px - means[-1]) < 0.1 * (log_px - means[0])).all()  # closes most of the gap at k=1000


# ==========================================================================================================
# NCSN: Gradient model / 条件实例归一化


@FEW
@given(sigma=grid(0.01, 2.0, 0.01, avoid=(1,)), seed=st.integers(0, 1000))
def test_dsm_target_is_the_gradient_of_the_perturbation_kernel(sigma, seed):
    g = gen(seed)
    x = torch.rand(2, 5, generator=g, dtype=D64)
    eps = torch.randn(2, 5, generator=g, dtype=D64)
    xt = x + sigma * eps
    log_kernel = lambda y: torch.distributions.Normal(x, sigma).log_prob(y).sum(-1)  # noqa: E731
    target = ncsn.dsm_target(xt, x, sigma)
    assert torch.allclose(target, ncsn.score(log_kernel, xt), rtol=1e-9, atol=1e-9)
    assert torch.allclose(target, -eps / sigma, rtol=1e-9, atol=1e-9)


@FEW
@given(seed=st.integers(0, 1000))
def test_score_of_unnormalised_density_equals_score_of_normalised(seed):
    # Gradient model: log p = -f - log Z; Z does not depend on x, so the scores agree
    w, m, s = torch.tensor([0.3, 0.7], dtype=D64), torch.tensor([-1.0, 2.0], dtype=D64), torch.tensor([0.5, 1.0], dtype=D64)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(w), torch.distributions.Normal(m, s))
    f = lambda x: -torch.logsumexp(torch.log(w) - (x[:, None] - m) ** 2 / (2 * s ** 2) - torch.log(s), -1)  # noqa: E731
    x = torch.randn(7, generator=gen(seed), dtype=D64) * 2
    assert torch.allclose(ncsn.score(lambda y: -f(y) + 123.0, x), ncsn.score(mix.log_prob, x), atol=1e-10)


def test_geometric_sigmas_have_equal_ratios():
    sig = ncsn.geometric_sigmas(1.0, 0.01, 10)
    assert len(sig) == 11 and sig[0] == 0 and math.isclose(sig[1].item(), 1.0) and math.isclose(sig[10].item(), 0.01)
    ratios = sig[1:-1] / sig[2:]
    assert torch.allclose(ratios, torch.full_like(ratios, 100 ** (1 / 9)), rtol=1e-12)


def test_notes_error_sigma_ratios_are_equal_not_decreasing():
    # The notes write σ_1/σ_2 > σ_2/σ_3 > ... > 1. A geometric sequence has equal ratios; the notes' strict
    # inequality fails for it (and a sequence that satisfied it would not be geometric).
    ratios = (lambda s: s[1:-1] / s[2:])(ncsn.geometric_sigmas(50.0, 0.01, 232))
    notes_condition = bool(torch.all(ratios[:-1] > ratios[1:]))
    assert not notes_condition
    assert torch.allclose(ratios[:-1], ratios[1:], rtol=1e-10)


class PointMassScore(torch.nn.Module):
    """The exact score of the point mass at c perturbed by N(0, σ_i^2 I): -(x̃ - c)/σ_i^2."""

    def __init__(self, c, sigmas):
        super().__init__()
        self.c, self.sigmas = c, sigmas

    def forward(self, x, i):
        return -(x - self.c) / self.sigmas[i].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) ** 2


def test_dsm_loss_is_zero_for_the_exact_score_and_positive_otherwise():
    sig = ncsn.geometric_sigmas()
    c = torch.rand(1, 1, 4, 4, generator=gen(20), dtype=D64)
    x = c.expand(32, -1, -1, -1)
    exact = PointMassScore(c, sig)
    assert ncsn.dsm_loss(exact, x, sig, generator=gen(21)).item() < 1e-12
    off = lambda y, i: exact(y, i) + 0.1  # noqa: E731
    assert ncsn.dsm_loss(off, x, sig, generator=gen(21)).item() > 0.01


def test_notes_error_dsm_evaluates_the_network_at_the_perturbed_input():
    # The notes' loss uses s_θ(x, i) at the clean x. With the exact score of a point mass, DSM at x̃ is 0;
    # at the clean x the same exact score gives E||ε||^2 = D per example, so the notes' loss would reject it.
    sig = ncsn.geometric_sigmas()
    c = torch.rand(1, 1, 4, 4, generator=gen(22), dtype=D64)
    x = c.expand(4000, -1, -1, -1)
    exact = PointMassScore(c, sig)
    i = torch.randint(1, 11, (4000,), generator=gen(23))
    eps = torch.randn(x.shape, generator=gen(24), dtype=D64)
    assert ncsn.dsm_loss(exact, x, sig, i=i, eps=eps).item() < 1e-12
    sigma = sig[i].reshape(-1, 1, 1, 1)
    notes = ((sigma * exact(x, i) + eps) ** 2).flatten(1).sum(1)  # s_θ evaluated at x, not x̃
    assert_close_se(notes.mean(), 16.0, notes.std() / math.sqrt(4000), what="notes' loss for the exact score")


def test_langevin_on_a_gaussian_follows_the_discretised_chain_exactly():
    # target N(m, s^2): x' = x + ε(-(x - m)/s^2) + sqrt(2ε) z is linear, so with a = 1 - ε/s^2
    #   mean' = a mean + ε m / s^2,  var' = a^2 var + 2ε   (the finite-step chain's own moments, bias included)
    m, s2, eps, M = 1.5, 0.25, 0.05, 200_000
    x = torch.zeros(M, dtype=D64)
    mean, var = 0.0, 0.0
    g = gen(30)
    a = 1 - eps / s2
    for t in range(12):
        x = ncsn.langevin(lambda y: -(y - m) / s2, x, eps, 1, generator=g)
        mean, var = a * mean + eps * m / s2, a * a * var + 2 * eps
        assert_close_se(x.mean(), mean, math.sqrt(var / M), what=f"mean at step {t + 1}")
        assert_close_se(x.var(), var, var * math.sqrt(2 / (M - 1)), what=f"variance at step {t + 1}")
    # the finite-step bias that more samples do not remove: stationary variance s^2 / (1 - ε/(2 s^2)), not s^2
    assert abs(s2 / (1 - eps / (2 * s2)) - s2) > 0.02
    # NOTES ERROR: the notes write s_θ(x) without the step index. Evaluated at a fixed x (the start) the drift
    # never changes: after 12 steps the mean is 12 ε m/s^2 = 3.6, far from the chain's closed form above.
    start = torch.zeros(M, dtype=D64)
    notes_x = ncsn.langevin(lambda y: -(start - m) / s2, start, eps, 12, generator=gen(31))
    assert abs(notes_x.mean().item() - mean) > 100 * math.sqrt(var / M)


def annealed_chain(m, s2, sig, eps, T):
    """Mean and variance after each level of Algorithm 1 on data N(m, s2), from U[0, 1]: at level i the update
    x' = x + α_i/2 s(x, i) + sqrt(α_i) z with s = -(x - m)/(s2 + σ_i^2) is linear in x."""
    mean, var, out = 0.5, 1 / 12, []
    L = len(sig) - 1
    for i in range(1, L + 1):
        alpha = eps * sig[i].item() ** 2 / sig[L].item() ** 2
        a = 1 - alpha / 2 / (s2 + sig[i].item() ** 2)
        for _ in range(T):
            mean, var = a * mean + alpha / 2 * m / (s2 + sig[i].item() ** 2), a * a * var + alpha
        out.append((mean, var))
    return out


def test_annealed_langevin_on_a_gaussian_follows_the_discretised_chain_at_every_level():
    """Algorithm 1 with the exact score of N(m, s^2) perturbed at σ_i, N(m, s^2 + σ_i^2): mean and variance after
    each level by the recursion, within 5 SEs. T = 5 steps per level keeps the chain moving at every level, so
    that a wrong step size shows; 10^6 draws. Tried: a 2% error at every step in α_i, in the drift's α_i/2 or in
    the noise's sqrt(α_i) each fails it (the first two by about 14 SEs, the recursion says). With T = 1000 the
    recursion settles at the last level's N(m, s^2 + σ_L^2), up to the finite step's own bias: the linear
    chain's fixed point is v = 1 / (k (1 - α_L k/4)), k = 1/(s^2 + σ_L^2), 0.6% wide here."""
    m, s2, M = 0.5, 0.04, 1_000_000
    sig = ncsn.geometric_sigmas(1.0, 0.05, 5)
    score = lambda y, i: -(y - m) / (s2 + sig[i].reshape(-1) ** 2)  # noqa: E731
    eps, T = 1e-3, 5
    x0 = torch.rand(M, generator=gen(31), dtype=D64)
    trace = []
    x = ncsn.annealed_langevin(score, x0, sig, step_size=eps, T=T, generator=gen(32), trace=trace)
    for i, (mean, var) in enumerate(annealed_chain(m, s2, sig, eps, T), start=1):
        check_moments(trace[i - 1], mean, var, f"after level {i}")
    assert torch.equal(x, trace[-1])
    mean, var = annealed_chain(m, s2, sig, eps, 1000)[-1]
    k = 1 / (s2 + sig[5].item() ** 2)
    assert abs(mean - m) < 1e-3 and math.isclose(var, 1 / (k * (1 - eps * k / 4)), rel_tol=1e-3)


def test_annealed_langevin_recovers_a_gaussian_mixture():
    # 0.2 N(-1.5, 0.1^2) + 0.8 N(1.5, 0.1^2); the scores of its σ_i-perturbed versions are known exactly.
    # σ_1 = 3 is wider than the gap between the modes, σ_L = 0.1.
    w, mu, s = torch.tensor([0.2, 0.8], dtype=D64), torch.tensor([-1.5, 1.5], dtype=D64), 0.1
    sig = ncsn.geometric_sigmas(3.0, 0.1, 10)

    def mixture_score(y, i):
        var = s ** 2 + sig[i].reshape(-1, 1) ** 2
        logits = torch.log(w) - (y[:, None] - mu) ** 2 / (2 * var) - 0.5 * torch.log(var)
        r = torch.softmax(logits, -1)
        return (r * (-(y[:, None] - mu) / var)).sum(-1)

    M, eps = 10_000, 1e-3
    x = ncsn.annealed_langevin(mixture_score, torch.rand(M, generator=gen(34), dtype=D64) * 4 - 2, sig,
                               step_size=eps, T=100, generator=gen(35))
    right = x > 0
    p = right.double().mean().item()
    target_var = s ** 2 + sig[10].item() ** 2  # each mode of the σ_L-perturbed mixture
    # What more samples do not remove:
    # (1) mode weights: once σ_i falls below the gap, mass stops crossing between modes, so the split is set
    #     at intermediate levels. Measured (M = 10^4, seed 34/35): weight 0.775 with these settings and 0.783
    #     with a 10x smaller ε and 10x more steps per level, i.e. a bias of about -0.02 that a smaller step does
    #     not remove. Allowance 0.03 on top of 5 standard errors.
    # (2) variances: at the last level the discretised chain's stationary variance is var / (1 - α_L/(4 var))
    #     for a Gaussian mode (α_L = ε), about 1.3% above var: test against that closed form.
    assert abs(p - 0.8) < 5 * math.sqrt(0.16 / M) + 0.03
    chain_var = target_var / (1 - eps / (4 * target_var))
    for side, m_k in ((right, 1.5), (~right, -1.5)):
        xs, n_k = x[side], side.sum().item()
        assert_close_se(xs.mean(), m_k, math.sqrt(chain_var / n_k), what="mode mean")
        assert_close_se(xs.var(), chain_var, chain_var * math.sqrt(2 / (n_k - 1)), what="mode variance")


def test_cond_instance_norm_plus_has_the_mean_and_spread_of_its_formula():
    torch.manual_seed(0)
    norm = ncsn.CondInstanceNorm2dPlus(6, num_levels=3)
    # NOTES ERROR: the notes call γ and Φ the learnable pair; Φ is the measured spread, β is the learnt shift
    assert sorted(n for n, _ in norm.named_parameters()) == ["alpha", "beta", "gamma"]
    with torch.no_grad():
        norm.gamma.normal_(1, 0.5)
        norm.beta.normal_(0, 1)
        norm.alpha.normal_(0, 1)
    x = torch.randn(4, 6, 9, 9) * 3 + torch.randn(4, 6, 1, 1) * 2
    i = torch.tensor([1, 2, 3, 1])
    y = norm(x, i)
    u = x.mean((2, 3))
    m, v = u.mean(1, keepdim=True), u.std(1, unbiased=False, keepdim=True)
    g, b, a = norm.gamma[i - 1], norm.beta[i - 1], norm.alpha[i - 1]
    assert torch.allclose(y.mean((2, 3)), b + a * (u - m) / v, atol=1e-4)
    assert torch.allclose(y.std((2, 3), unbiased=False), g.abs(), atol=1e-4)
    # α = 0 and one (γ, β) for every level: plain instance norm with an affine map
    with torch.no_grad():
        norm.alpha.zero_()
        norm.gamma.copy_(norm.gamma[:1].expand(3, -1))
        norm.beta.copy_(norm.beta[:1].expand(3, -1))
    ref = torch.nn.functional.instance_norm(x, eps=1e-5) * norm.gamma[0][:, None, None] + norm.beta[0][:, None, None]
    assert torch.allclose(norm(x, i), ref, atol=1e-4)


def test_ddpm_and_score_views_agree_on_a_gaussian_mixture():
    # data: 1-D mixture of N(μ_k, s_k^2). q_t = law of x_t = sqrt(ᾱ) x_0 + sqrt(1-ᾱ) ε is a mixture too.
    w, mu, s = torch.tensor([0.3, 0.7], dtype=D64), torch.tensor([-1.0, 0.8], dtype=D64), torch.tensor([0.2, 0.5], dtype=D64)

    def log_q(ab):
        return lambda x: torch.logsumexp(torch.log(w) + torch.distributions.Normal(ab.sqrt() * mu, (ab * s ** 2 + 1 - ab).sqrt()).log_prob(x[:, None]), -1)

    x = torch.linspace(-3, 3, 41, dtype=D64)
    for t in (1, 10, 200, 900):
        ab = S.alpha_bar[t]
        # optimal ε-prediction E[ε | x_t] from the conditional Gaussians: (x_t, ε) are jointly Gaussian given k
        var_k = ab * s ** 2 + 1 - ab
        resp = torch.softmax(torch.log(w) + torch.distributions.Normal(ab.sqrt() * mu, var_k.sqrt()).log_prob(x[:, None]), -1)
        e_eps = (resp * (1 - ab).sqrt() * (x[:, None] - ab.sqrt() * mu) / var_k).sum(-1)
        score_t = ncsn.score(log_q(ab), x)
        assert torch.allclose(e_eps, -(1 - ab).sqrt() * score_t, atol=1e-9)
        # score view: y = x_t / sqrt(ᾱ) = x_0 + σ ε with σ = sqrt(1-ᾱ)/sqrt(ᾱ); ∇_y log p_σ(y) = sqrt(ᾱ) ∇ log q_t(x_t)
        sigma = ((1 - ab) / ab).sqrt()
        log_p_sigma = lambda y: torch.logsumexp(torch.log(w) + torch.distributions.Normal(mu, (s ** 2 + sigma ** 2).sqrt()).log_prob(y[:, None]), -1)  # noqa: E731
        assert torch.allclose(ncsn.score(log_p_sigma, x / ab.sqrt()), ab.sqrt() * score_t, atol=1e-8)


# ==========================================================================================================
# The SDE view: every sampler on Gaussian data, the ODE solvers' order, the ODE likelihood


class GaussianEps(torch.nn.Module):
    """The exact ε-prediction for data N(m, s2 I): x_t ~ N(sqrt(ᾱ_t) m, v_t I) with v_t = ᾱ_t s2 + 1 - ᾱ_t, and
    E[ε | x_t] = sqrt(1-ᾱ_t) (x_t - sqrt(ᾱ_t) m) / v_t (x_t and ε are jointly Gaussian)."""

    def __init__(self, m, s2, sch):
        super().__init__()
        self.m, self.s2, self.ab = m, s2, sch.alpha_bar

    def forward(self, x, t):
        ab = self.ab[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.m) / (ab * self.s2 + 1 - ab)


M_DATA, S2_DATA = 0.3, 0.25  # data N(0.3, 0.5^2): the exact samplers must end near it
CHAIN = (4000, 1, 8, 8)  # 256,000 scalar draws: the mean's SE is ~0.2% of the sd, the variance's ~0.3%


def even_grid(T, steps):
    # the few-step samplers' times, written out here: round(k T / steps) for k = steps..1, then 0
    return [round(k * T / steps) for k in range(steps, 0, -1)] + [0]


def eps_coefficients(t):
    """ε̂ = k (x - sqrt(ᾱ_t) m) for the Gaussian data: k = sqrt(1-ᾱ_t) / v_t."""
    ab = S.alpha_bar[t].item()
    return math.sqrt(1 - ab) / (ab * S2_DATA + 1 - ab), math.sqrt(ab) * M_DATA


def check_moments(x, mean, var, what):
    n = x.numel()
    assert_close_se(x.mean(), mean, math.sqrt(var / n), what=f"{what}: mean")
    assert_close_se(x.var(), var, var * math.sqrt(2 / (n - 1)), what=f"{what}: variance")


def ancestral_chain(var):
    """Mean and variance of the ancestral sampler's x_0 for the Gaussian data, step by step from x_T ~ N(0, 1)."""
    mean, v = 0.0, 1.0
    for t in range(S.T, 0, -1):
        beta, alpha, ab = S.beta[t].item(), S.alpha[t].item(), S.alpha_bar[t].item()
        k, shift = eps_coefficients(t)
        # u = (x - β/sqrt(1-ᾱ) ε̂)/sqrt(α), ε̂ = k (x - shift)
        a = (1 - beta / math.sqrt(1 - ab) * k) / math.sqrt(alpha)
        c = beta / math.sqrt(1 - ab) * k * shift / math.sqrt(alpha)
        mean, v = a * mean + c, a * a * v
        if t > 1:
            ab_prev = S.alpha_bar[t - 1].item()
            v += beta * (1 - ab_prev) / (1 - ab) if var == "beta_tilde" else beta
    return mean, v


@pytest.mark.parametrize("var", ["beta_tilde", "beta"])
def test_ancestral_sampler_on_gaussian_data_follows_its_chain(var):
    """With the exact ε of N(m, s^2), x_{t-1} = u_θ(x_t, t) + σ_t z is affine in x_t: its mean and variance follow
    mean' = a_t mean + c_t, var' = a_t^2 var + σ_t^2 (no noise at t = 1), with u_θ from the notes' ε form and σ_t^2
    computed here from β. The samples must match the recursion within 5 SEs, and the recursion must end near the
    data's N(m, s^2): within 2% of s^2 (σ_t^2 = β̃_t is the reverse kernel's lower bound and ends 1.5% narrow,
    β_t its upper bound). Tried: a 2% error at every t >= 2 in p_mean's x_t or ε coefficient, in σ_t, or σ_t^2 = β̃_t
    where β_t is asked for, each fails this test."""
    x = ddpm.sample(GaussianEps(M_DATA, S2_DATA, S), S, CHAIN, var=var, generator=gen(40))
    mean, v = ancestral_chain(var)
    check_moments(x, mean, v, f"ancestral, var={var}")
    assert abs(mean - M_DATA) < 0.01 * math.sqrt(S2_DATA) and abs(v - S2_DATA) < 0.02 * S2_DATA


def affine_chain(steps, solver):
    """The deterministic samplers' output as a map x_T -> A x_T + b, computed step by step on the grid of even_grid.
    solver: 'ddim' (x' = sqrt(ᾱ') x̂_0 + sqrt(1-ᾱ') ε̂) or 'dpm++2m' (DPM-Solver++(2M), written out here)."""
    ts = even_grid(S.T, steps)
    A, b = 1.0, 0.0  # x = A x_T + b
    prev = None  # (A, b) of the previous x̂_0, and the previous h
    states = {}
    for j in range(steps):
        t, nxt = ts[j], ts[j + 1]
        ab, ab_n = S.alpha_bar[t].item(), S.alpha_bar[nxt].item()
        k, shift = eps_coefficients(t)
        eA, eb = k * A, k * (b - shift)  # ε̂ = k (x - shift)
        x0A, x0b = (A - math.sqrt(1 - ab) * eA) / math.sqrt(ab), (b - math.sqrt(1 - ab) * eb) / math.sqrt(ab)
        if solver == "ddim" or nxt == 0:
            if solver == "ddim":
                A, b = math.sqrt(ab_n) * x0A + math.sqrt(1 - ab_n) * eA, math.sqrt(ab_n) * x0b + math.sqrt(1 - ab_n) * eb
            else:
                A, b = x0A, x0b
        else:
            lam = lambda u: 0.5 * math.log(S.alpha_bar[u].item() / (1 - S.alpha_bar[u].item()))  # noqa: E731
            h = lam(nxt) - lam(t)
            DA, Db = x0A, x0b
            if prev is not None:
                r = prev[2] / h
                DA, Db = (1 + 1 / (2 * r)) * x0A - prev[0] / (2 * r), (1 + 1 / (2 * r)) * x0b - prev[1] / (2 * r)
            ratio, coef = math.sqrt((1 - ab_n) / (1 - ab)), -math.sqrt(ab_n) * math.expm1(-h)
            A, b = ratio * A + coef * DA, ratio * b + coef * Db
            prev = (x0A, x0b, h)
        states[nxt] = (A, b)
    return states


@pytest.mark.parametrize("solver,steps", [("ddim", 50), ("ddim", 10), ("dpm++2m", 20), ("dpm++2m", 10)])
def test_deterministic_samplers_on_gaussian_data_are_their_affine_map(solver, steps):
    """DDIM (η = 0) and DPM-Solver++(2M) with the exact ε of N(m, s^2) map x_T to A x_T + b; A and b computed here
    step by step. Every sample must equal its image under the map (float32 rounding allowance 1e-4), so the
    samples' mean and variance are b and A^2 exactly. Tried: a 2% error at every step in the x̂_0 or ε
    coefficient, in the step's x or D coefficient, or in DPM-Solver's r, each moves some sample by > 1e-3.
    The map approaches the data's law as the steps grow: at 1000 steps it ends within 1% of N(m, s^2). (At
    few steps the last step, to x̂_0 = E[x_0 | x_{t_1}], narrows the law by the posterior variance at t_1.)"""
    model = GaussianEps(M_DATA, S2_DATA, S)
    fn = ddpm.ddim_sample if solver == "ddim" else ddpm.dpm_solver_sample
    x = fn(model, S, CHAIN, steps=steps, generator=gen(41))
    xT = torch.randn(CHAIN, generator=gen(41))  # every sampler draws x_T first
    A, b = affine_chain(steps, solver)[0]
    assert (x - (A * xT + b)).abs().max() < 1e-4
    check_moments(x, b, A * A, solver)
    A, b = affine_chain(S.T, solver)[0]
    assert abs(b - M_DATA) < 0.01 * math.sqrt(S2_DATA) and abs(A * A - S2_DATA) < 0.01 * S2_DATA


def ddim_chain(steps, eta):
    ts = even_grid(S.T, steps)
    mean, v = 0.0, 1.0
    for t, nxt in zip(ts, ts[1:]):
        ab, ab_n = S.alpha_bar[t].item(), S.alpha_bar[nxt].item()
        k, shift = eps_coefficients(t)
        sigma = eta * math.sqrt((1 - ab_n) / (1 - ab) * (1 - ab / ab_n))
        c_eps = math.sqrt(max(1 - ab_n - sigma ** 2, 0.0))
        # x' = sqrt(ᾱ')(x - sqrt(1-ᾱ) ε̂)/sqrt(ᾱ) + c_eps ε̂ (+ σ z), ε̂ = k (x - shift)
        a = math.sqrt(ab_n / ab) * (1 - math.sqrt(1 - ab) * k) + c_eps * k
        c = (math.sqrt(ab_n / ab) * math.sqrt(1 - ab) - c_eps) * k * shift
        mean, v = a * mean + c, a * a * v + (sigma ** 2 if nxt > 0 else 0.0)
    return mean, v


def test_ddim_with_noise_on_gaussian_data_follows_its_chain():
    """DDIM with η = 0.5: x' = sqrt(ᾱ') x̂_0 + sqrt(1-ᾱ'-σ^2) ε̂ + σ z, σ = η sqrt((1-ᾱ')/(1-ᾱ)) sqrt(1-ᾱ/ᾱ'), affine in x
    plus noise: mean and variance by recursion, within 5 SEs; at 1000 steps the recursion ends within 2% of the
    data's law. Tried: a 2% error in σ at every step fails it."""
    x = ddpm.ddim_sample(GaussianEps(M_DATA, S2_DATA, S), S, CHAIN, steps=20, eta=0.5, generator=gen(42))
    mean, v = ddim_chain(20, 0.5)
    check_moments(x, mean, v, "DDIM eta=0.5")
    mean, v = ddim_chain(S.T, 0.5)
    assert abs(mean - M_DATA) < 0.01 * math.sqrt(S2_DATA) and abs(v - S2_DATA) < 0.02 * S2_DATA


def test_dpm_solver_with_exact_eps_returns_the_point():
    c = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    for steps in (1, 2, 7, 20):
        x = ddpm.dpm_solver_sample(PointMassEps(c, S), S, (4, 1, 4, 4), steps=steps, generator=gen(43))
        assert (x - c).abs().max() < 1e-4, steps


def test_ode_solvers_have_their_order():
    """On the probability-flow ODE of Gaussian data the exact flow keeps the standardised value:
    x_t = sqrt(ᾱ_t) m + (std_t/std_T)(x_T - sqrt(ᾱ_T) m), std_t^2 = ᾱ_t s^2 + 1 - ᾱ_t. Each solver's state at t = 200,
    a time on the grids of 10, 20 and 40 steps, against it: doubling the steps divides DDIM's (Euler's) error by
    1.6 to 2.4 and DPM-Solver++(2M)'s by 3 to 5, first and second order. (Not at each grid's last nonzero time,
    100, 50 and 25: there the error is set by the last, longest step in λ = log(sqrt(ᾱ)/sqrt(1-ᾱ)), which these
    t-uniform grids do not shorten in proportion: measured ratios 1.3 to 1.8 and 0.8 to 2.)"""
    model = GaussianEps(M_DATA, S2_DATA, S).double()
    shape = (64, 1, 2, 2)
    t_cmp = 200
    errors = {}
    for name, fn in (("ddim", ddpm.ddim_sample), ("dpm++2m", ddpm.dpm_solver_sample)):
        for steps in (10, 20, 40):
            seen = {}
            fn(model, S, shape, steps=steps, generator=gen(44), callback=lambda k, t, x: seen.__setitem__(t, x.double()))
            xT = torch.randn(shape, generator=gen(44)).double()
            ab, abT = S.alpha_bar[t_cmp], S.alpha_bar[S.T]
            std, stdT = (ab * S2_DATA + 1 - ab).sqrt(), (abT * S2_DATA + 1 - abT).sqrt()
            exact = ab.sqrt() * M_DATA + std / stdT * (xT - abT.sqrt() * M_DATA)
            errors[name, steps] = (seen[t_cmp] - exact).abs().max().item()
    for name, lo, hi in (("ddim", 1.6, 2.4), ("dpm++2m", 3.0, 5.0)):
        for steps in (10, 20):
            ratio = errors[name, steps] / errors[name, 2 * steps]
            assert lo <= ratio <= hi, (name, steps, ratio, errors)


def test_hutchinson_divergence_is_the_trace_of_the_jacobian():
    # a function with a full (non-diagonal) Jacobian; the exact divergence by autograd, the estimate's mean over
    # many Rademacher probes within 5 SE of it
    g = gen(45)
    W1, W2 = torch.randn(5, 5, generator=g, dtype=D64), torch.randn(5, 5, generator=g, dtype=D64)
    fn = lambda x: torch.tanh(x @ W1) @ W2 + 0.5 * x  # noqa: E731
    x = torch.randn(3, 5, generator=g, dtype=D64)
    exact = torch.stack([torch.autograd.functional.jacobian(fn, x[i:i + 1]).reshape(5, 5).trace() for i in range(3)])
    P = 20_000
    v = (torch.randint(0, 2, (P, 3, 5), generator=g) * 2 - 1).to(D64)
    out, est = ddpm.hutchinson_divergence(fn, x, v)
    assert torch.allclose(out, fn(x))
    assert_close_se(est.mean(0), exact, est.std(0) / math.sqrt(P), what="Hutchinson divergence")
    assert (est.std(0) > 0.1).all()  # the Jacobian is not diagonal: single probes do vary


class FullCovEps(torch.nn.Module):
    """The exact ε of data N(μ, Σ) with a full covariance: ε̂ = sqrt(1-ᾱ_t) (ᾱ_t Σ + (1-ᾱ_t) I)^{-1} (x - sqrt(ᾱ_t) μ)."""

    def __init__(self, mu, cov, sch):
        super().__init__()
        self.mu, self.cov, self.ab = mu, cov, sch.alpha_bar

    def marginal(self, t):
        ab = self.ab[t]
        return torch.distributions.MultivariateNormal(ab.sqrt() * self.mu, ab * self.cov + (1 - ab) * torch.eye(len(self.mu), dtype=D64))

    def forward(self, x, t):
        ab = self.ab[int(t[0])]
        prec = torch.linalg.inv(ab * self.cov + (1 - ab) * torch.eye(len(self.mu), dtype=D64))
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) @ prec


def test_ode_likelihood_of_a_gaussian_is_its_log_density():
    """[SDE] eq. 39 with the exact score of N(μ, Σ), a full covariance (so that single probes vary): log p_ODE(x_1)
    = log N(x_1; marginal at t = 1) + the prior's mismatch at T, log N(x_T; 0, I) - log N(x_T; marginal at T),
    computed at the solver's x_T. At the defaults, within 5 SE of the Hutchinson noise (200 probes); the stiff
    data below test the solver's accuracy."""
    g = gen(46)
    Lc = torch.randn(3, 3, generator=g, dtype=D64) * 0.4
    cov = Lc @ Lc.T + 0.05 * torch.eye(3, dtype=D64)
    mu = torch.tensor([0.3, -0.5, 0.1], dtype=D64)
    model = FullCovEps(mu, cov, S)
    marginal = model.marginal(1)
    x1 = marginal.loc + torch.randn(8, 3, generator=gen(45), dtype=D64) @ marginal.scale_tril.T
    est, xT = ddpm.ode_log_likelihood(model, S, x1, probes=200, generator=gen(47))
    prior = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=D64), torch.eye(3, dtype=D64))
    exact = model.marginal(1).log_prob(x1) + prior.log_prob(xT) - model.marginal(S.T).log_prob(xT)
    se = est.std(0) / math.sqrt(est.shape[0])
    assert ((est.mean(0) - exact).abs() <= 5 * se).all(), (est.mean(0), exact, se)
    assert (se > 0).all()


class LatticeEps(torch.nn.Module):
    """Stiff data with an exact ε: independent pixels, each a mixture of a point mass at -1 (weight 0.8, as
    MNIST's background) and atoms of the 8-bit lattice, some adjacent (255/255, 254/255, ...), so that at
    t = 1 (σ̄_1 = 0.01) every pixel is still a point mass. For atoms a_k with weights w_k,
    q_t(x) = Σ_k w_k N(x; sqrt(ᾱ_t) a_k, 1-ᾱ_t) per pixel, and ε(x_t, t) = (x_t - sqrt(ᾱ_t) E[x_0|x_t]) / sqrt(1-ᾱ_t)
    with E[x_0|x_t] = Σ_k r_k a_k, r_k the posterior weights. Its Jacobian is diagonal: one Rademacher probe
    gives the divergence exactly."""

    levels = (0, 64, 128, 192, 224, 240, 252, 253, 254, 255)
    weights = (0.8, 0.02, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01, 0.02, 0.06)

    def __init__(self, sch):
        super().__init__()
        self.ab = sch.alpha_bar
        self.a = torch.tensor([k / 127.5 - 1 for k in self.levels], dtype=D64)
        self.logw = torch.tensor(self.weights, dtype=D64).log()

    def _terms(self, x, t):
        ab = self.ab[t].reshape(-1, *([1] * (x.dim() - 1)), 1)
        # log w_k + log N(x; sqrt(ᾱ_t) a_k, 1-ᾱ_t), per pixel and atom
        return ab, self.logw - (x[..., None] - ab.sqrt() * self.a) ** 2 / (2 * (1 - ab)) - 0.5 * torch.log(2 * math.pi * (1 - ab))

    def log_q(self, x, t):
        """log q_t(x) per image."""
        return torch.logsumexp(self._terms(x, t)[1], -1).flatten(1).sum(1)

    def forward(self, x, t):
        ab, terms = self._terms(x, t)
        posterior_mean = (terms.softmax(-1) * self.a).sum(-1)
        return (x - ab[..., 0].sqrt() * posterior_mean) / (1 - ab[..., 0]).sqrt()

    def draw_x0(self, n, shape, g):
        k = torch.multinomial(self.logw.exp(), n * math.prod(shape), replacement=True, generator=g)
        return self.a[k].reshape(n, *shape)


def bits(nats, D):
    return nats / (D * math.log(2))


def test_ode_likelihood_on_stiff_data_is_the_exact_density_at_its_defaults():
    """[SDE] eq. 39 with the exact ε of the lattice data: log p_ODE(x_1) = log q_1(x_1) + log N(x_T; 0, I)
    - log q_T(x_T) at the solver's x_T (the prior's mismatch at T). At the defaults (ode_grid's nodes, about
    100 network calls), within 0.012 bits/dim for every image (the worst of these 8 is 0.0104 off). One probe is exact here (diagonal Jacobian), so the
    check is deterministic. The trapezoid in σ̄ of earlier versions, on the same nodes, is 0.1 bits/dim off, and
    the earlier default (100 steps even in t) 1 bit/dim: both fail it."""
    model = LatticeEps(S)
    D, B = 64, 8
    x0 = model.draw_x0(B, (1, 8, 8), gen(60))
    x1 = ddpm.q_sample(S, x0, torch.ones(B, dtype=torch.long), torch.randn(x0.shape, generator=gen(61), dtype=D64))
    one, T = torch.ones(B, dtype=torch.long), torch.full((B,), S.T)
    prior = lambda xT: (-0.5 * (xT ** 2 + math.log(2 * math.pi))).flatten(1).sum(1)  # noqa: E731
    est, xT = ddpm.ode_log_likelihood(model, S, x1, generator=gen(62))
    exact = model.log_q(x1, one) + prior(xT) - model.log_q(xT, T)
    assert bits((est[0] - exact).abs().max(), D) <= 0.012, bits(est[0] - exact, D)
    assert ddpm.ode_calls(S) <= 100
    old, xT = ddpm.ode_log_likelihood(model, S, x1, generator=gen(62), quadrature="sigma")
    assert bits((old[0] - model.log_q(x1, one) - prior(xT) + model.log_q(xT, T)).abs().max(), D) > 0.05


def decoder_log_prob(x0_pixel, x1):
    """log p_θ(x_0|x_1) per pixel for the lattice data's exact ε: the discretised Gaussian around
    u_θ(x_1, 1) with σ_1^2 = β̃_2 (ddpm's choice at t = 1)."""
    model = LatticeEps(S)
    one = torch.ones(1, dtype=torch.long)
    u = ddpm.p_mean(S, x1.reshape(1, -1), one, model(x1.reshape(1, -1), one)).reshape(x1.shape)
    return ddpm.discretized_gaussian_log_likelihood(torch.full_like(x1, x0_pixel), u, S.sigma2("beta_tilde")[1])


def per_pixel_bound_and_nll(a):
    """For a pixel at x_0 = a, by 1-D quadrature over x_1 (a trapezoid on ±9 standard deviations):
    E_{q(x_1|x_0)}[log q(x_1|x_0) - log q_1(x_1) - log p_θ(x_0|x_1)], and -log P(x_0) with
    P(x_0) = ∫ p_θ(x_0|x_1) q_1(x_1) dx_1."""
    model = LatticeEps(S)
    one = torch.ones(1, dtype=torch.long)
    s1, c1 = (1 - S.alpha_bar[1]).sqrt(), S.alpha_bar[1].sqrt()
    x1 = torch.linspace(-1 - 9 * s1.item(), 1 + 9 * s1.item(), 200_001, dtype=D64)
    log_q1 = torch.logsumexp(model._terms(x1.reshape(1, -1), one)[1], -1).reshape(-1)
    log_dec = decoder_log_prob(a, x1)
    log_kernel = -(x1 - c1 * a) ** 2 / (2 * s1 ** 2) - 0.5 * torch.log(2 * math.pi * s1 ** 2)
    dx = x1[1] - x1[0]
    expectation = (log_kernel.exp() * (log_kernel - log_q1 - log_dec)).sum() * dx
    nll = -torch.logsumexp(log_dec + log_q1 + dx.log(), 0)
    return expectation.item(), nll.item()


def test_ode_bound_is_its_expectation_and_that_bounds_the_exact_likelihood():
    """ode_bound on the lattice data, one x_1 ~ q(x_1|x_0) per call: (a) its mean over many draws equals the
    exact E_q[log q(x_1|x_0) - log q_1(x_1) - log p_θ(x_0|x_1)] (1-D quadrature per pixel: the pixels are
    independent) within 5 SE of the draws plus the ODE's own 0.012 bits/dim; (b) that expectation is >= -log P(x_0),
    P(x_0) = ∫ p_θ(x_0|x_1) q_1(x_1) dx_1 (Jensen). Flipping or dropping the ODE, decoder or entropy term moves the
    mean by hundreds of nats: (a) fails."""
    model = LatticeEps(S)
    table = {a: per_pixel_bound_and_nll(a) for a in model.a.tolist()}
    for a, (expectation, nll) in table.items():
        assert expectation >= nll - 1e-9, (a, expectation, nll)  # (b)
    D, B, K = 16, 32, 4
    x0 = model.draw_x0(B, (1, 4, 4), gen(63))
    exact = torch.tensor([sum(table[v][0] for v in img.flatten().tolist()) for img in x0], dtype=D64)
    est = torch.cat([ddpm.ode_bound(model, S, x0, generator=gen(64 + k))[0] for k in range(K)])
    diff = est - exact.repeat(K)
    se = diff.std() / math.sqrt(len(diff))
    assert diff.mean().abs() <= 5 * se + 0.012 * D * math.log(2), (diff.mean(), se)
    assert (exact >= torch.tensor([sum(table[v][1] for v in img.flatten().tolist()) for img in x0])).all()


def test_score_from_eps_is_the_exact_score():
    model = LatticeEps(S)
    x0 = model.draw_x0(4, (1, 4, 4), gen(65))
    for t_int in (1, 10, 200, 1000):
        t = torch.full((4,), t_int)
        xt = ddpm.q_sample(S, x0, t, torch.randn(x0.shape, generator=gen(t_int), dtype=D64))
        exact = ncsn.score(lambda x: model.log_q(x, t), xt)  # autograd of the exact log-density
        assert torch.allclose(ddpm.score_from_eps(S, model(xt, t), t), exact, rtol=1e-9, atol=1e-9), t_int


def test_time_grid_starts_at_T_decreases_to_0_with_the_requested_steps():
    # every spacing and step count for small T, a spread for T = 1000; beta_T = 0.9 makes σ̄ grow so fast at the
    # end that times even in log σ̄ crowd at the top as well as at t = 1
    cases = [(T, n) for T in (1, 2, 7, 50) for n in range(1, T + 1)] + [(1000, n) for n in (1, 2, 10, 20, 50, 999, 1000)]
    for T, steps in cases:
        for beta_T in (0.02, 0.9):
            sch = ddpm.schedule(T, 1e-4, beta_T)
            for spacing in ddpm.SPACINGS:
                ts = ddpm.time_grid(sch, steps, spacing)
                assert len(ts) == steps + 1 and ts[0] == T and ts[-1] == 0, (T, steps, spacing, ts)
                assert all(isinstance(t, int) for t in ts) and all(a > b for a, b in zip(ts, ts[1:])), ts


def test_time_grids_put_their_steps_where_they_say():
    # quadratic and log-sigma grids crowd towards t = 0, uniform ones don't; log-sigma steps are even in log σ̄
    # except where the integers are too coarse (near t = 1)
    sch = ddpm.schedule()
    uniform, quadratic, log_sigma = (ddpm.time_grid(sch, 20, s)[:-1] for s in ddpm.SPACINGS)
    assert len(set(a - b for a, b in zip(uniform, uniform[1:]))) == 1
    assert sum(t < 50 for t in uniform) < sum(t < 50 for t in quadratic) < sum(t < 50 for t in log_sigma)
    lsb = [0.5 * math.log((1 - sch.alpha_bar[t].item()) / sch.alpha_bar[t].item()) for t in log_sigma if t > 20]
    gaps = [a - b for a, b in zip(lsb, lsb[1:])]
    assert max(gaps) < 1.1 * min(gaps)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm++2m"])
def test_clipping_x0_follows_the_clipped_point_step_by_step(sampler):
    """Data a point mass at 1.5, outside [-1, 1]: with x̂_0 clipped, each step is the step of the unclipped
    sampler for a point mass at 1 (exact ε for each), from the same x_T and noise, and the chain ends at 1; without
    clipping it ends at 1.5. A sampler that ignores clip_x0, or clips only at the end, fails."""
    fn = {"ancestral": lambda m, **kw: ddpm.sample(m, S, (4, 1, 2, 2), **kw),
          "ddim": lambda m, **kw: ddpm.ddim_sample(m, S, (4, 1, 2, 2), steps=20, eta=0.5, **kw),
          "dpm++2m": lambda m, **kw: ddpm.dpm_solver_sample(m, S, (4, 1, 2, 2), steps=20, **kw)}[sampler]
    xT = torch.randn(4, 1, 2, 2, generator=gen(66), dtype=D64)
    runs = {}
    for c, clip in ((1.5, True), (1.0, False), (1.5, False)):
        seen = []
        x = fn(PointMassEps(torch.tensor(c, dtype=D64), S), clip_x0=clip, x_T=xT, generator=gen(67),
               callback=lambda k, t, x: seen.append(x.clone()))
        runs[c, clip] = (x, torch.stack(seen))
    assert torch.allclose(runs[1.5, True][1], runs[1.0, False][1], atol=1e-9)
    assert (runs[1.5, True][0] - 1).abs().max() < 1e-4 and (runs[1.5, False][0] - 1.5).abs().max() < 1e-4


def test_ve_sde_levels_are_ncsns_geometric_sigmas():
    # [SDE] eq. 30: σ_i = σ((L - i)/(L - 1)) with σ(τ) = σ_min (σ_max/σ_min)^τ, and g^2 = d σ^2/dτ
    sig = ncsn.geometric_sigmas(1.0, 0.01, 10)
    for i in range(1, 11):
        assert math.isclose(sig[i].item(), ncsn.ve_sigma((10 - i) / 9, 0.01, 1.0), rel_tol=1e-12)
    tau, h = 0.37, 1e-6
    numeric = (ncsn.ve_sigma(tau + h) ** 2 - ncsn.ve_sigma(tau - h) ** 2) / (2 * h)
    assert math.isclose(ncsn.ve_diffusion_squared(tau), numeric, rel_tol=1e-6)


def pc_chain(m, s2, sig, snr, M):
    """Mean and variance after levels 1..len(sig)-1 of the PC sampler on data N(m, s2), from U[0, 1]."""
    mean, v = 0.5, 1 / 12
    for i in range(1, len(sig)):
        k = 1 / (s2 + sig[i].item() ** 2)
        if i > 1:
            d = sig[i - 1].item() ** 2 - sig[i].item() ** 2
            kp = 1 / (s2 + sig[i - 1].item() ** 2)
            mean, v = mean + d * kp * (m - mean), (1 - d * kp) ** 2 * v + d
        for _ in range(M):
            e_s2 = k * k * (v + (mean - m) ** 2)  # E[s^2] per dimension
            eps = 2 * snr ** 2 / e_s2  # 2 (r sqrt(D) / sqrt(D E[s^2]))^2
            mean, v = mean + eps * k * (m - mean), (1 - eps * k) ** 2 * v + 2 * eps
    return mean, v


def test_pc_sampler_on_gaussian_data_follows_its_chain():
    """Predictor-corrector with the exact score of N(m, s^2) perturbed at σ_i, -(x - m)/(s^2 + σ_i^2): the predictor
    x' = x + d s(x, i-1) + sqrt(d) z, d = σ_{i-1}^2 - σ_i^2, and the corrector x' = x + ε s + sqrt(2ε) z are affine in
    x; mean and variance by recursion after each level, within 5 SE. The corrector's ε = 2 (r ||z|| / ||s||)^2 uses
    the batch's mean norms; the recursion uses sqrt(D) and sqrt(D E[s^2]), whose ratio differs from the batch's by
    O(1/D) + O(1/sqrt(B D)) ~ 0.1% here (D = 1024, B = 400): a 0.2% shift of a step size, far inside 5 SE of
    the moments. The chain's target is N(m, s^2 + σ_L^2) (no denoising). Tried: a 2% error at every level in the predictor's
    score or noise coefficient, or in the corrector's ε, fails it."""
    m, s2 = 0.4, 0.01
    sig = ncsn.geometric_sigmas(1.0, 0.01, 10)
    L, snr, M = 10, 0.16, 2
    score = lambda y, i: -(y - m) / (s2 + sig[i].to(y.dtype).reshape(-1, 1, 1, 1) ** 2)  # noqa: E731
    B = 400  # images of D = 1024 pixels
    x0 = torch.rand((B, 1, 32, 32), generator=gen(50), dtype=D64)
    trace = []
    ncsn.pc_sample(score, x0, sig, corrector_steps=M, snr=snr, generator=gen(51), trace=trace)
    for i in range(1, L + 1):
        mean, v = pc_chain(m, s2, sig[:i + 1], snr, M)
        check_moments(trace[i - 1], mean, v, f"PC after level {i}")
    # with enough corrector steps the chain settles at each level's N(m, s^2 + σ_i^2), up to the finite step's
    # own bias: at the fixed point of the corrector, k v = 1 + r^2 (k = 1/(s^2 + σ^2)), i.e. 2.6% wide for
    # r = 0.16. The recursion with 200 steps per level ends within 0.5% of that (2 steps per level end 35% wide)
    mean, v = pc_chain(m, s2, sig, snr, 200)
    target = (s2 + sig[L].item() ** 2) * (1 + snr ** 2)
    assert abs(mean - m) < 0.01 * math.sqrt(s2) and abs(v - target) < 0.005 * target


def test_pc_corrector_settles_at_its_own_fixed_point():
    """Independent of the recursion above: one level, many corrector steps, the exact score of N(m, v). The
    corrector x <- x + ε s + sqrt(2ε) z with s = -(x - m)/v has the stationary variance V = v / (1 - ε/(2v)); its
    ε = 2 (r ||z|| / ||s||)^2 with ||s|| = ||x - m|| / v ~ sqrt(V/v^2) ||z|| at stationarity gives ε = 2 r^2 v^2 / V,
    hence V = v (1 + r^2): the finite step's bias, 25% wide at r = 0.5. Mean m and that V within 5 SE (the chain
    contracts by 1 - 2r^2/(1 + r^2) = 0.6 per step: 100 steps forget the uniform start); v, a width 25% off,
    fails."""
    m, v, r = 0.5, 0.09, 0.5
    sig = ncsn.geometric_sigmas(1.0, 1.0, 1)  # one level: the corrector alone
    x = torch.rand((8000, 1, 4, 4), generator=gen(70), dtype=D64)
    out = ncsn.pc_sample(lambda y, i: -(y - m) / v, x, sig, corrector_steps=100, snr=r, generator=gen(71))
    check_moments(out, m, v * (1 + r ** 2), "corrector's fixed point")


# ==========================================================================================================
# Values, not only properties: each test below compares a value with its definition or an exact oracle


def _uniform_node(k, T, steps):
    # t_k = k T / steps, to the nearest integer (exact rationals: none of these is a tie)
    return math.floor(Fraction(k * T, steps) + Fraction(1, 2))


def _quadratic_node(k, T, steps):
    # t_k = T (k / steps)^2, to the nearest integer
    return math.floor(Fraction(T * k * k, steps * steps) + Fraction(1, 2))


def _log_sigma_nodes(T, steps, beta_1=1e-4, beta_T=0.02):
    """Even in log σ̄ from log σ̄_T (k = steps) to log σ̄_1 (k = 1), each to the nearest integer t in log σ̄,
    with ᾱ_t as a product of plain floats (not the Schedule's tensors)."""
    alpha_bar, p = [], 1.0
    for t in range(1, T + 1):
        p *= 1 - (beta_1 + (beta_T - beta_1) * (t - 1) / (T - 1))
        alpha_bar.append(p)
    log_sigma_bar = [0.5 * math.log((1 - a) / a) for a in alpha_bar]  # σ̄_t = sqrt((1-ᾱ_t)/ᾱ_t)
    lo, hi = log_sigma_bar[0], log_sigma_bar[-1]
    targets = [lo + (k - 1) / (steps - 1) * (hi - lo) for k in range(steps, 0, -1)]
    return [1 + min(range(T), key=lambda j: abs(log_sigma_bar[j] - y)) for y in targets]


@pytest.mark.parametrize("steps", [7, 13, 30])
def test_time_grid_nodes_are_their_definitions_at_step_counts_that_do_not_divide_T(steps):
    """Node by node, both ends included, against the docstring's definitions computed here independently. At
    T = 1000 no two of these nodes round to the same t, so no node is moved."""
    T, ks = 1000, range(steps, 0, -1)
    want = {"uniform": [_uniform_node(k, T, steps) for k in ks] + [0],
            "quadratic": [_quadratic_node(k, T, steps) for k in ks] + [0],
            "log-sigma": _log_sigma_nodes(T, steps) + [0]}
    for spacing in ddpm.SPACINGS:
        ts = ddpm.time_grid(S, steps, spacing)
        assert ts == want[spacing], (spacing, ts, want[spacing])
        assert all(1 <= t <= T for t in ts[:-1]) and ts[0] == T and ts[-1] == 0


def test_time_grid_at_a_small_T_moves_nodes_that_round_together_apart():
    """T = 10, 7 steps. Rounded, the definitions give uniform 10, 9, 7, 6, 4, 3, 1 (distinct: kept);
    quadratic 10, 7, 5, 3, 2, 1, 0 and log-sigma 10, 6, 4, 2, 2, 1, 1, where nodes meet or reach 0: from the last
    node up, each is lifted to at least 1, and at least one above the node after it. steps = T takes every t."""
    sch = ddpm.schedule(T=10, beta_1=1e-4, beta_T=0.9)  # ᾱ_T ≈ 0 at this T (the default β's would warn)
    assert [_quadratic_node(k, 10, 7) for k in range(7, 0, -1)] == [10, 7, 5, 3, 2, 1, 0]
    assert ddpm.time_grid(sch, 7, "uniform") == [10, 9, 7, 6, 4, 3, 1, 0]
    assert ddpm.time_grid(sch, 7, "quadratic") == [10, 7, 5, 4, 3, 2, 1, 0]
    raw = _log_sigma_nodes(10, 7, 1e-4, 0.9)
    lifted = list(raw)
    for i in range(len(lifted) - 1, -1, -1):
        lifted[i] = max(lifted[i], 1 if i == len(lifted) - 1 else lifted[i + 1] + 1)
    assert len(set(raw)) < len(raw)  # the case this test is about: some nodes meet
    assert ddpm.time_grid(sch, 7, "log-sigma") == lifted + [0]
    for spacing in ddpm.SPACINGS:
        assert ddpm.time_grid(sch, 10, spacing) == list(range(10, -1, -1))
        assert ddpm.time_grid(sch, 1, spacing) == [10, 0]


class GaussianScore:
    """The exact score of data N(μ, s^2 I) perturbed at level i: N(μ, (s^2 + σ_i^2) I)."""

    def __init__(self, mu, s2, sigmas):
        self.mu, self.s2, self.sigmas = mu, s2, sigmas

    def __call__(self, x, i):
        var = self.s2 + self.sigmas[i].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) ** 2
        return -(x - self.mu) / var


@pytest.mark.parametrize("sampler", ["annealed", "pc"])
def test_final_denoising_step_is_the_posterior_mean(sampler):
    """On Gaussian data with the exact score, x + σ_L^2 s(x, L) is E[x | x̃] = μ + s^2/(s^2 + σ_L^2) (x̃ - μ)
    (Tweedie), applied to where the last level ends (the trace's last entry). σ_L = 0.5 makes a wrong power of σ_L,
    a wrong level or a wrong sign visible."""
    sig = ncsn.geometric_sigmas(2.0, 0.5, 4)
    mu, s2 = 0.3, 0.4
    score = GaussianScore(mu, s2, sig)
    x = torch.rand(64, 3, generator=gen(70), dtype=D64)
    trace = []
    if sampler == "annealed":
        out = ncsn.annealed_langevin(score, x, sig, step_size=1e-3, T=5, denoise=True, generator=gen(71), trace=trace)
    else:
        out = ncsn.pc_sample(score, x, sig, corrector_steps=2, denoise=True, generator=gen(71), trace=trace)
    last, sL2 = trace[-1], sig[4].item() ** 2
    assert torch.allclose(out, mu + s2 / (s2 + sL2) * (last - mu), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm++2m"])
def test_clipping_x0_holds_on_both_sides(sampler):
    """A point mass with pixels at 1.5, -1.5 and -2 (MNIST's background is on the -1 side) and one inside, 0.25: with
    x̂_0 clipped, every step is the unclipped sampler's for the point mass clipped to [-1, 1] (1, -1, -1, 0.25), and
    the chain ends there. Clipping one side only, or clipping the end alone, fails."""
    fn = {"ancestral": lambda m, **kw: ddpm.sample(m, S, (3, 1, 2, 2), **kw),
          "ddim": lambda m, **kw: ddpm.ddim_sample(m, S, (3, 1, 2, 2), steps=20, eta=0.5, **kw),
          "dpm++2m": lambda m, **kw: ddpm.dpm_solver_sample(m, S, (3, 1, 2, 2), steps=20, **kw)}[sampler]
    c = torch.tensor([[1.5, -1.5], [-2.0, 0.25]], dtype=D64).reshape(1, 1, 2, 2)
    xT = torch.randn(3, 1, 2, 2, generator=gen(72), dtype=D64)
    runs = {}
    for point, clip in ((c, True), (c.clamp(-1, 1), False)):
        seen = []
        x = fn(PointMassEps(point, S), clip_x0=clip, x_T=xT, generator=gen(73),
               callback=lambda k, t, x: seen.append(x.clone()))
        runs[clip] = (x, torch.stack(seen))
    assert torch.allclose(runs[True][1], runs[False][1], rtol=0, atol=1e-9)
    assert (runs[True][0] - c.clamp(-1, 1)).abs().max() < 1e-4


class DiagonalGaussianEps(torch.nn.Module):
    """The exact ε of data N(μ, s^2 I): q_t = N(sqrt(ᾱ_t) μ, (ᾱ_t s^2 + 1 - ᾱ_t) I), ε = -sqrt(1-ᾱ_t) ∇ log q_t."""

    def __init__(self, mu, s2, sch):
        super().__init__()
        self.mu, self.s2, self.ab = mu, s2, sch.alpha_bar

    def forward(self, x, t):
        ab = self.ab[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s2 + 1 - ab)


def test_ode_likelihood_term_by_term_on_gaussian_data():
    """Data N(μ, s^2 I). In x̄ = x/sqrt(ᾱ) the flow is dx̄/dσ̄ = a(σ̄) (x̄ - μ), a = σ̄/(s^2 + σ̄^2), with divergence
    D a(σ̄) (diagonal: one Rademacher probe is exact). Each term against the closed form of what the discretisation
    on ode_grid's nodes must give, at its own scale (on MNIST the t = 1 Jacobian is 1e-4 bits/dim, below any
    tolerance on the total):
      jacobian_1 = -D/2 log ᾱ_1 and jacobian_T = D/2 log ᾱ_T;
      divergence = the trapezoid in log σ̄ of σ̄ · D a(σ̄), and within its error of D/2 log((s^2+σ̄_T^2)/(s^2+σ̄_1^2));
      prior = log N(x_T; 0, I) at x_T = sqrt(ᾱ_T) x̄_T, with Heun's step on the linear flow,
        x̄ - μ <- (x̄ - μ) (1 + h/2 (a_a + a_b (1 + h a_a))), from x̄_1 = x_1/sqrt(ᾱ_1);
    and the default return is their sum."""
    mu, s2, D, B = 0.3, 0.01, 12, 5
    model = DiagonalGaussianEps(mu, s2, S)
    x1 = S.alpha_bar[1].sqrt() * mu + (S.alpha_bar[1] * s2 + 1 - S.alpha_bar[1]).sqrt() * torch.randn(
        B, 1, 3, 4, generator=gen(74), dtype=D64)
    terms, xT = ddpm.ode_log_likelihood(model, S, x1, generator=gen(75), terms=True)
    total, xT2 = ddpm.ode_log_likelihood(model, S, x1, generator=gen(75))
    assert torch.equal(total, terms["prior"] + terms["jacobian_T"] + terms["divergence"] + terms["jacobian_1"])
    assert torch.equal(xT, xT2)
    ab = [S.alpha_bar[t].item() for t in range(S.T + 1)]
    assert terms["jacobian_1"] == pytest.approx(-D / 2 * math.log(ab[1]), rel=1e-12)
    assert torch.allclose(terms["jacobian_T"], torch.full((B,), D / 2 * math.log(ab[S.T]), dtype=D64), rtol=1e-12)
    sb = {t: math.sqrt((1 - ab[t]) / ab[t]) for t in ddpm.ode_grid(S)}
    a = {t: s / (s2 + s * s) for t, s in sb.items()}
    nodes = ddpm.ode_grid(S)
    trapezoid = sum((math.log(sb[v]) - math.log(sb[u])) / 2 * (sb[u] * D * a[u] + sb[v] * D * a[v])
                    for u, v in zip(nodes, nodes[1:]))
    assert torch.allclose(terms["divergence"], torch.full((1, B), trapezoid, dtype=D64), rtol=1e-12, atol=0)
    exact = D / 2 * math.log((s2 + sb[S.T] ** 2) / (s2 + sb[1] ** 2))
    assert abs(trapezoid - exact) < 1e-3 * abs(exact)  # the quadrature is close to the integral it stands for
    factor = 1.0
    for u, v in zip(nodes, nodes[1:]):
        h = sb[v] - sb[u]
        factor *= 1 + h / 2 * (a[u] + a[v] * (1 + h * a[u]))
    xT_heun = math.sqrt(ab[S.T]) * (mu + (x1 / math.sqrt(ab[1]) - mu) * factor)
    assert torch.allclose(xT, xT_heun, rtol=1e-10, atol=1e-12)
    prior = (-0.5 * (xT_heun ** 2 + math.log(2 * math.pi))).flatten(1).sum(1)
    assert torch.allclose(terms["prior"], prior, rtol=1e-12, atol=1e-9)


def test_ode_bound_per_image_shares_x1_between_the_ode_and_the_decoder():
    """Per image, not only on average: ode_bound = -D/2 log(2πe (1-ᾱ_1)) - log p_ODE(x_1) - log p_θ(x_0|x_1) with
    the one x_1 = sqrt(ᾱ_1) x_0 + sqrt(1-ᾱ_1) ε drawn first from the generator, the ODE's probes drawn after it. A
    decoder at a fresh x_1 has the same mean and fails here."""
    model = LatticeEps(S)
    D, B = 16, 6
    x0 = model.draw_x0(B, (1, 4, 4), gen(76))
    est = ddpm.ode_bound(model, S, x0, generator=gen(77))
    g = gen(77)
    eps = torch.randn(x0.shape, generator=g, dtype=D64)
    x1 = S.alpha_bar[1].sqrt() * x0 + (1 - S.alpha_bar[1]).sqrt() * eps
    log_p1, _ = ddpm.ode_log_likelihood(model, S, x1, generator=g)
    decoder = torch.stack([sum(decoder_log_prob(a, x1[b].reshape(-1)[j:j + 1]).sum()
                               for j, a in enumerate(x0[b].reshape(-1).tolist())) for b in range(B)])
    entropy = D / 2 * math.log(2 * math.pi * math.e * (1 - S.alpha_bar[1].item()))
    assert torch.allclose(est, -entropy - log_p1 - decoder, rtol=1e-10, atol=1e-8)


def test_score_net_output_is_the_unet_output_divided_by_sigma_i():
    """With the U-Net's last convolution zeroed and its bias set to b, U-Net(x, i) = b everywhere, so
    s_θ(x, i) = b / σ_i: at level 1 (σ = 1) and at level L (σ = 0.01), 100 times larger. Without the division,
    or dividing by σ_i^2, one of the two levels fails."""
    sig = ncsn.geometric_sigmas(1.0, 0.01, 3)
    net = ncsn.ScoreNet(sig, in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), dropout=0.0, image_size=8)
    with torch.no_grad():
        net.unet.conv_out.weight.zero_()
        net.unet.conv_out.bias.fill_(0.7)
    x = torch.rand(2, 1, 8, 8, generator=gen(78))
    for i, sigma in ((1, 1.0), (3, 0.01)):
        out = net(x, torch.full((2,), i))
        assert torch.allclose(out, torch.full_like(out, 0.7 / sigma), rtol=1e-6), (i, out.flatten()[:3])
