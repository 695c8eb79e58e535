"""DDPM (Ho et al. 2020), annotated against the notes' sections 扩散模型 / 扩散过程 / 逆扩散过程 / 训练与推理 / 推导,
then what the notes leave out (the bound in bits/dim, DDIM, and their empty SDE section: DPM-Solver++ and the
likelihood by the probability-flow ODE), then the command line.

    python ddpm.py --train                 # MNIST, downloaded into ./data; checkpoint and samples in runs/ddpm
    python ddpm.py --sample 64             # 64 samples from the EMA weights -> runs/ddpm/samples.png (DPM-Solver++, 20 calls)
    python ddpm.py --sample 64 --sampler ancestral --no-clip-x0   # the notes' sampler: T network calls
    python ddpm.py --eval [--ode]          # the variational bound (or the ODE's) in bits/dim on the test split
    torchrun --nproc_per_node 8 ddpm.py --train --data cifar10 --ch 128 --ch-mult 1,2,2,2 --attn 1 --dropout 0.1

Indexing follows the notes: t = 1..T, and index 0 of every schedule tensor stands for x_0 (alpha_bar[0] = 1).
The DDPM paper's code and diffusers index 0..T-1: their step k is our t = k + 1.
Everything above the command-line banner needs only torch (and a network called as model(x_t, t)).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import common

# ==========================================================================================================
# 扩散过程 (forward process)


class Schedule:
    """The per-t numbers as float64 tensors of length T+1, indexed by the notes' t (index 0: x_0).

    β, α, ᾱ are the forward process' (扩散过程). β̃ (推导: the variance of q(x_{t-1}|x_t, x_0)) and the reverse
    process' σ_t² (逆扩散过程, method sigma2) are kept here too, beside the numbers they are made of.
    """

    def __init__(self, beta):
        self.T = len(beta) - 1
        self.beta = beta
        # 扩散过程: α_t = 1 - β_t   (β_0 = 0, so α_0 = 1)
        self.alpha = 1 - beta
        # 扩散过程: ᾱ_t = ∏_{i=1}^t α_i   (ᾱ_0 = 1: x_0 is noiseless)
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)
        self.beta_tilde = torch.zeros_like(beta)
        # 推导: σ_{q,t}^2 = β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)   (t >= 1; β̃_1 = 0 because ᾱ_0 = 1)
        self.beta_tilde[1:] = beta[1:] * (1 - self.alpha_bar[:-1]) / (1 - self.alpha_bar[1:])

    def to(self, device):
        moved = Schedule.__new__(Schedule)
        moved.__dict__ = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return moved

    def sigma2(self, var):
        """The reverse process' fixed variance σ_t^2 (逆扩散过程), index t = 1..T.

        var="beta_tilde" (σ_t^2 = β̃_t = σ_{q,t}^2, the notes' choice at the end of 推导) or "beta" (σ_t^2 = β_t,
        the DDPM paper's other choice). β̃_1 = 0 would make the t = 1 decoder a point mass with an infinite
        likelihood, so t = 1 uses β̃_2 for both, as the DDPM paper's code does (its clipped log-variance);
        the sampler adds no noise at t = 1 anyway.
        """
        if var not in ("beta_tilde", "beta"):
            raise ValueError(f"var must be 'beta_tilde' or 'beta', got {var!r}")
        # 逆扩散过程: p_θ(x_{t-1}|x_t) = N(u_θ(x_t, t), σ_t^2 I) with σ_t^2 = β̃_t or β_t
        v = (self.beta_tilde if var == "beta_tilde" else self.beta).clone()
        v[1] = self.beta_tilde[2] if self.T >= 2 else self.beta[1]
        return v


def schedule(T=1000, beta_1=1e-4, beta_T=0.02):
    """The DDPM paper's linear schedule, β_1 = 1e-4 rising to β_T = 0.02, computed in float64.

    NOTES ERROR (扩散过程): the notes say the coefficients decrease, β_1 > β_2 > ... > β_T. In DDPM they increase:
    early steps add little noise so that fine detail is destroyed gently, late steps add much (β_T = 0.02).
    With the notes' order x_1 would already carry β = 0.02 of noise and the last steps would barely change x_t.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not (0 < beta_1 < 1 and 0 < beta_T < 1):
        raise ValueError(f"betas must lie in (0, 1), got beta_1={beta_1}, beta_T={beta_T}")
    if beta_T < beta_1:
        raise ValueError(f"beta_T ({beta_T}) < beta_1 ({beta_1}): DDPM's betas increase with t")
    beta = torch.zeros(T + 1, dtype=torch.float64)
    # 扩散过程: β_1 < β_2 < ... < β_T, evenly spaced
    beta[1:] = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    return Schedule(beta)


def _col(v, x):
    """A per-example coefficient (B,) shaped to broadcast against x (B, C, H, W), in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _at(v, t, x):
    """v[t] for a (B,) tensor of time steps, shaped to broadcast against x."""
    return _col(v[t], x)


def q_sample(sch, x0, t, eps):
    """A draw of x_t from q(x_t|x_0), given the noise ε."""
    # 扩散过程: q(x_t|x_0) = N(x_t; sqrt(ᾱ_t) x_0, (1-ᾱ_t) I), i.e. x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε
    return _at(sch.alpha_bar.sqrt(), t, x0) * x0 + _at((1 - sch.alpha_bar).sqrt(), t, x0) * eps


# ==========================================================================================================
# 逆扩散过程 (reverse process): p(x_T) = N(0, I), p_θ(x_{t-1}|x_t) = N(u_θ(x_t, t), σ_t^2 I)
#
# The network predicts ε (推导 below turns that into u_θ); σ_t^2 is fixed, Schedule.sigma2 above.


def p_mean_variance(model, sch, xt, t, var="beta_tilde", clip_x0=False):
    """The mean u_θ(x_t, t) (x_t's shape and dtype) and variance σ_t^2 ((B,), float64) of p_θ(x_{t-1}|x_t), from
    one network call.

    clip_x0=False: u_θ in its ε form (推导), as the notes sample. clip_x0=True: x̂_0 predicted from ε_θ, clipped to
    [-1, 1] (the data's range), then the posterior mean u_{q,t}(x_t, x̂_0): the DDPM paper's code and diffusers
    sample this way. Without clipping the two means are the same number (test_math checks it).
    """
    eps = model(xt, t).to(xt.dtype)  # fp32 from a bf16-autocast network, float64 in the bound
    if clip_x0:
        # 推导: u_{q,t} with x_0 replaced by the clipped x̂_0 = (x_t - sqrt(1-ᾱ_t) ε_θ) / sqrt(ᾱ_t)
        mean, _ = q_posterior(sch, predict_x0(sch, xt, t, eps).clamp(-1, 1), xt, t)
    else:
        mean = p_mean(sch, xt, t, eps)
    return mean, sch.sigma2(var)[t]


# ==========================================================================================================
# 推导 (derivation): the bound's terms, the posterior, the ε form, L_simple, the sampling step
#
# 推导: log p_θ(x_0) >= E_q[log p_θ(x_{0:T}) / q(x_{1:T}|x_0)] = -L_T - Σ_{t=2}^T L_{t-1} - L_0 with
#   L_T = D_KL(q(x_T|x_0) || p(x_T)),  L_{t-1} = E_q D_KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)),
#   L_0 = -E_q log p_θ(x_0|x_1).
# (The notes drop the log in E{Σ p_θ/q} of the last line of this derivation; the terms below have it.)


def gaussian_kl(mean1, var1, mean2, var2):
    """D_KL(N(mean1, var1) || N(mean2, var2)) per dimension, for diagonal Gaussians."""
    # 推导: D_KL = 1/2 [log σ_2^2/σ_1^2 - 1 + σ_1^2/σ_2^2 + (u_1-u_2)^2/σ_2^2]
    return 0.5 * (torch.log(var2) - torch.log(var1) - 1 + var1 / var2 + (mean1 - mean2) ** 2 / var2)


def prior_term(sch, x0):
    """L_T per image in nats: no parameters; small when ᾱ_T ≈ 0, which is why T must be large."""
    x0 = x0.double()
    a = sch.alpha_bar[sch.T].to(x0.device)
    # 推导: L_T = D_KL(q(x_T|x_0) || p(x_T)) = D_KL(N(sqrt(ᾱ_T) x_0, (1-ᾱ_T) I) || N(0, I))
    kl = gaussian_kl(a.sqrt() * x0, (1 - a).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0))
    return kl.flatten(1).sum(1)


def _in_own_dtype(model):
    """The network called in its own precision on float64 inputs, its output returned as float64."""
    dtype = next(model.parameters()).dtype
    return lambda x, t: model(x.to(dtype), t).double()


@torch.no_grad()
def bound_terms(model, sch, x0, t, var="beta_tilde", eps=None, generator=None):
    """One term of the bound per image, in nats summed over dimensions, at one draw of x_t ~ q(x_t|x_0):
    L_{t-1} for t >= 2, L_0 for t = 1. Computed in float64; the network in its own precision.

    L_0 uses the DDPM paper's discretised decoder (below, beyond the notes) instead of the notes' Gaussian
    density N(x_0; u_θ(x_1, 1), σ_1^2 I), so that the bound is on the probability of the 8-bit data.
    """
    x0, sch = x0.double(), sch.to(x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
    xt = q_sample(sch, x0, t, eps.double())
    mean_theta, var_theta = p_mean_variance(_in_own_dtype(model), sch, xt, t, var)
    var_theta = _col(var_theta, xt)
    mean_q, var_q = q_posterior(sch, x0, xt, t)
    # 推导: L_{t-1} = D_KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)); with σ_t^2 = β̃_t this is
    #       β_t^2 / (2 σ_t^2 α_t (1-ᾱ_t)) ||ε - ε_θ(x_t, t)||^2, the weighted loss
    kl = gaussian_kl(mean_q, var_q.clamp(min=1e-30), mean_theta, var_theta).flatten(1).sum(1)
    # 推导: L_0 = -log p_θ(x_0|x_1), discretised to the 8-bit bins
    nll0 = -discretized_gaussian_log_likelihood(x0, mean_theta, var_theta).flatten(1).sum(1)
    return torch.where(t == 1, nll0, kl)


def q_posterior(sch, x0, xt, t):
    """Mean and variance of q(x_{t-1} | x_t, x_0), t >= 1.

    NOTES ERROR (推导): the notes write sqrt(ᾱ_t) x_t, not sqrt(α_t) x_t, in u_{q,t}. Completing the square, x_t
    enters only through q(x_t|x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t I), whose cross term is
    2 sqrt(α_t) x_t·x_{t-1}/β_t; multiplying by σ_{q,t}^2 gives sqrt(α_t)(1-ᾱ_{t-1})/(1-ᾱ_t). (The notes' own
    line before it has sqrt(α_t).)
    """
    ab_t, ab_prev = sch.alpha_bar[t], sch.alpha_bar[t - 1]
    # 推导: u_{q,t} = [(1-ᾱ_{t-1}) sqrt(α_t) x_t + β_t sqrt(ᾱ_{t-1}) x_0] / (1-ᾱ_t)
    c_xt = sch.alpha[t].sqrt() * (1 - ab_prev) / (1 - ab_t)
    c_x0 = sch.beta[t] * ab_prev.sqrt() / (1 - ab_t)
    mean = _col(c_xt, xt) * xt + _col(c_x0, x0) * x0
    # 推导: σ_{q,t}^2 = β̃_t
    return mean, _at(sch.beta_tilde, t, xt)


def predict_x0(sch, xt, t, eps):
    """x̂_0 from x_t and a (predicted) noise ε."""
    # 推导: x_0 = (x_t - sqrt(1-ᾱ_t) ε_t) / sqrt(ᾱ_t)
    return (xt - _at((1 - sch.alpha_bar).sqrt(), t, xt) * eps) / _at(sch.alpha_bar.sqrt(), t, xt)


def p_mean(sch, xt, t, eps_theta):
    """u_θ(x_t, t) in its ε form: u_{q,t} with x_0 = x̂_0(x_t, ε_θ)."""
    # 推导: u_θ(x_t, t) = 1/sqrt(α_t) [x_t - (1-α_t)/sqrt(1-ᾱ_t) ε_θ(x_t, t)]
    return (xt - _col(sch.beta[t] / (1 - sch.alpha_bar[t]).sqrt(), xt) * eps_theta) / _at(sch.alpha.sqrt(), t, xt)


def loss_simple(model, sch, x0, t=None, eps=None, generator=None):
    """L_simple, the mean over pixels and batch; t ~ U{1..T} and ε ~ N(0, I) unless given.

    The weighted loss has β_t^2 / (2 σ_t^2 α_t (1-ᾱ_t)) in front; DDPM drops it. The notes write a sum over t;
    the expectation over a uniform t is the same objective divided by T. The mean over pixels and batch (not
    the sum) is what the paper's code does; the default learning rate and clip assume it.
    """
    B = x0.shape[0]
    if t is None:
        # 推导: t ~ U{1, ..., T}
        t = torch.randint(1, sch.T + 1, (B,), device=x0.device, generator=generator)
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    xt = q_sample(sch, x0, t, eps)
    # 推导: L_simple = ||ε - ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, t)||^2
    return F.mse_loss(model(xt, t).float(), eps)


def p_sample(model, sch, xt, t_int, var="beta_tilde", clip_x0=False, generator=None):
    """One step of ancestral sampling: x_{t-1} ~ p_θ(x_{t-1}|x_t).

    NOTES ERROR (推导, sampling): the notes add σ_t ε' at every step, t = 1 included. DDPM's Algorithm 2 adds no
    noise at t = 1 (z = 0): x_0 is the mean of p_θ(x_0|x_1), and noise there would only blur the result.
    (Also, the notes' ε' ~ N(0, 1) is a vector: N(0, I).)
    """
    t = torch.full((xt.shape[0],), t_int, device=xt.device, dtype=torch.long)
    mean, sigma2 = p_mean_variance(model, sch, xt, t, var, clip_x0)
    if t_int == 1:
        return mean
    # 推导: x_{t-1} = 1/sqrt(α_t) [x_t - (1-α_t)/sqrt(1-ᾱ_t) ε_θ(x_t, t)] + σ_t ε',  ε' ~ N(0, I)
    return mean + _col(sigma2.sqrt(), mean) * torch.randn(xt.shape, device=xt.device, generator=generator)


@torch.no_grad()
def sample(model, sch, shape, var="beta_tilde", clip_x0=False, generator=None, callback=None):
    """Ancestral sampling (训练与推理, 推导): x_T ~ p(x_T) = N(0, I), then x_{t-1} ~ p_θ(x_{t-1}|x_t), t = T..1.

    T network calls. callback(k, t, x), if given, is called after each step k = 0..T-1 with x = x_{t-1}.
    """
    device = next(model.parameters()).device
    sch = sch.to(device)
    x = torch.randn(shape, device=device, generator=generator)
    for k, t_int in enumerate(range(sch.T, 0, -1)):
        x = p_sample(model, sch, x, t_int, var, clip_x0, generator)
        if callback is not None:
            callback(k, t_int - 1, x)
    return x


# ==========================================================================================================
# Beyond the notes: the bound in bits/dim with the discretised decoder, DDIM, and the SDE view


def _std_normal_cdf(x):
    # Φ(x) = (1 + erf(x / sqrt(2))) / 2
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x, mean, var):
    """log p(x) of the DDPM paper's L_0 decoder: N(mean, var) integrated over x's 8-bit bin of width 2/255.

    Data in [-1, 1] came from 256 levels; the bin of a level is [x - 1/255, x + 1/255], the two edge bins
    open to -inf (x = -1) and +inf (x = 1), so the 256 probabilities sum to 1. (The notes' L_0 is the Gaussian
    density itself, which is not a probability of 8-bit data.)
    """
    std = var.sqrt()
    # DDPM paper, eq. 13: P(x) = Φ((x + 1/255 - u)/σ) - Φ((x - 1/255 - u)/σ), with Φ(+∞) = 1 at x = 1 and
    # Φ(-∞) = 0 at x = -1 (the edge bins open)
    upper = torch.where(x > 0.999, torch.ones_like(x), _std_normal_cdf((x + 1 / 255 - mean) / std))
    lower = torch.where(x < -0.999, torch.zeros_like(x), _std_normal_cdf((x - 1 / 255 - mean) / std))
    # log P(x), floored at 1e-12 where the bin's probability underflows
    return torch.log((upper - lower).clamp(min=1e-12))


@torch.no_grad()
def nll_bits_per_dim(model, sch, x0, t_samples=None, var="beta_tilde", generator=None):
    """The bound -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0, per image, in bits per dimension.

    t_samples=None evaluates every t (T network calls per image) and returns (bpd, None). With an integer k,
    sum_t L_{t-1} is estimated without bias as T * mean of k uniformly drawn t's per image, and the call returns
    (bpd, standard error of bpd). bpd is a (B,) float64 tensor. Data x0 in [-1, 1] from 8-bit pixels.
    """
    B, D = x0.shape[0], x0[0].numel()
    device = x0.device
    total = prior_term(sch, x0)
    if t_samples is None:
        for t_int in range(1, sch.T + 1):
            # 推导: L_T + Σ_{t=2}^T L_{t-1} + L_0
            total = total + bound_terms(model, sch, x0, torch.full((B,), t_int, device=device), var, generator=generator)
        # bits per dimension = nats / (D log 2)
        return total / (D * math.log(2)), None
    per_t = torch.stack([bound_terms(model, sch, x0, torch.randint(1, sch.T + 1, (B,), device=device, generator=generator),
                                     var, generator=generator) for _ in range(t_samples)], dim=1)
    # Σ_{t=1}^T term_t = T E_{t~U{1..T}} term_t, estimated by the mean of k draws
    est = total + sch.T * per_t.mean(1)
    # its standard error: T sd(term_t) / sqrt(k)
    se = sch.T * per_t.std(1) / math.sqrt(t_samples) if t_samples > 1 else torch.full_like(est, float("nan"))
    # bits per dimension = nats / (D log 2)
    return est / (D * math.log(2)), se / (D * math.log(2))


def time_grid(T, steps):
    """The integer times a few-step sampler visits: t_k = round(k T / steps) for k = steps..1 (evenly spaced,
    distinct, starting at t = T), then t = 0, where ᾱ_0 = 1: the last step lands on x̂_0 exactly."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..T={T}, got {steps}")
    # t_k = round(k T / steps), k = steps..1, then t_0 = 0
    return [round(k * T / steps) for k in range(steps, 0, -1)] + [0]


@torch.no_grad()
def ddim_sample(model, sch, shape, steps=50, eta=0.0, clip_x0=False, generator=None, callback=None):
    """DDIM (Song, Meng & Ermon 2021, eq. 12) on the evenly spaced integer times of time_grid: `steps` calls.

    eta = 0 is deterministic: the Euler discretisation of the probability-flow ODE in the variables
    x̄ = x_t / sqrt(ᾱ_t), σ̄ = sqrt(1-ᾱ_t)/sqrt(ᾱ_t) (DDIM eq. 14; see the SDE view below). eta = 1 with steps = T
    is the ancestral sampler with σ_t^2 = β̃_t. callback(k, t, x) after step k with x = x_t at the new t.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device = next(model.parameters()).device
    alpha_bar = sch.alpha_bar.tolist()  # python floats: no device sync for the per-step scalars
    ts = time_grid(sch.T, steps)
    x = torch.randn(shape, device=device, generator=generator)
    for k in range(steps):
        t_int, prev = ts[k], ts[k + 1]
        a_t, a_prev = alpha_bar[t_int], alpha_bar[prev]
        eps = model(x, torch.full((shape[0],), t_int, device=device, dtype=torch.long)).float()
        # 推导: x̂_0 = (x_t - sqrt(1-ᾱ_t) ε_θ) / sqrt(ᾱ_t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            # 扩散过程 solved for ε: ε = (x_t - sqrt(ᾱ_t) x̂_0) / sqrt(1-ᾱ_t), the noise the clipped x̂_0 implies
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        # DDIM eq. 16: σ = η sqrt((1-ᾱ_prev)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_prev); η = 1, prev = t-1 gives sqrt(β̃_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # DDIM eq. 12: x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ^2) ε_θ + σ z
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        if prev > 0 and sigma > 0:
            x = x + sigma * torch.randn(shape, device=device, generator=generator)
        if callback is not None:
            callback(k, prev, x)
    return x


# ---- the SDE view (the notes' empty SDE section; Song et al. 2021, "Score-Based Generative Modeling through
# Stochastic Differential Equations", cited as [SDE] with its equation numbers)
#
# [SDE] eq. 11: the forward chain x_t = sqrt(1-β_t) x_{t-1} + sqrt(β_t) ε_t (扩散过程) is the discretisation, on
#   the grid τ = t/T, of the variance-preserving SDE  dx = -1/2 β(τ) x dτ + sqrt(β(τ)) dw,  β(t/T) = T β_t.
#   Its marginal is q(x_t|x_0) (q_sample); log ᾱ(τ) = -∫_0^τ β(s) ds, here known at the integers t only.
# [SDE] eq. 6: the reverse-time SDE  dx = [f(x,τ) - g(τ)^2 ∇_x log p_τ(x)] dτ + g(τ) dw̄  with f = -1/2 β x,
#   g = sqrt(β); ancestral sampling (sample) is a discretisation of it ([SDE] appendix E, eq. 47).
# [SDE] eq. 13: the probability-flow ODE  dx/dτ = f(x,τ) - 1/2 g(τ)^2 ∇_x log p_τ(x), with the same marginals;
#   DDIM with η = 0 is its Euler step in x̄ = x/sqrt(ᾱ), σ̄ = sqrt((1-ᾱ)/ᾱ): dx̄/dσ̄ = ε_θ (DDIM eq. 14).
# The network was trained at integer t only: every solver below evaluates it at integer t.


def score_from_eps(sch, eps, t):
    """The score of the noisy marginal from the ε-prediction: ε and the score are the same network up to a factor."""
    # [SDE] (and NCSN's DSM target): s_θ(x_t, t) = ∇ log q_t(x_t) ≈ -ε_θ(x_t, t) / sqrt(1-ᾱ_t)
    return -eps / _at((1 - sch.alpha_bar).sqrt(), t, eps)


@torch.no_grad()
def dpm_solver_sample(model, sch, shape, steps=20, clip_x0=False, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), the probability-flow ODE's second-order
    multistep exponential integrator in its data-prediction form, on the integer times of time_grid: `steps`
    network calls, x_T ~ N(0, I) drawn first as by the other samplers.

    With α_t = sqrt(ᾱ_t), σ_t = sqrt(1-ᾱ_t), λ_t = log(α_t/σ_t) and x_θ = x̂_0, the ODE's exact solution is
    x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^λ x_θ dλ; the solver takes x_θ linear in λ through the last two
    predictions. The first step (no earlier prediction) and the last one (to t = 0, λ = ∞) are first order,
    i.e. DDIM steps. callback(k, t, x) after step k with x = x_t at the new t.
    """
    device = next(model.parameters()).device
    ab = sch.alpha_bar.tolist()
    ts = time_grid(sch.T, steps)
    # DPM-Solver: λ_t = log(α_t/σ_t) = 1/2 log(ᾱ_t/(1-ᾱ_t)); λ_0 = +∞ (σ_0 = 0)
    lam = [0.5 * math.log(ab[t] / (1 - ab[t])) if t > 0 else math.inf for t in ts]
    x = torch.randn(shape, device=device, generator=generator)
    x0_prev, h_prev = None, None
    for k in range(steps):
        t_int, nxt = ts[k], ts[k + 1]
        eps = model(x, torch.full((shape[0],), t_int, device=device, dtype=torch.long)).float()
        # 推导: x̂_0 = (x_t - σ_t ε_θ) / α_t
        x0 = (x - math.sqrt(1 - ab[t_int]) * eps) / math.sqrt(ab[t_int])
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if nxt == 0:
            # DPM-Solver++ first order with σ_0 = 0, α_0 = 1: x_0 = x̂_0
            x = x0
        else:
            # DPM-Solver++: h = λ_next - λ_t
            h = lam[k + 1] - lam[k]
            D = x0
            if x0_prev is not None:
                # DPM-Solver++(2M): r = h_prev/h, D = (1 + 1/(2r)) x̂_0(t) - 1/(2r) x̂_0(t_prev)
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            # DPM-Solver++: x_next = (σ_next/σ_t) x_t - α_next (e^{-h} - 1) D
            x = math.sqrt((1 - ab[nxt]) / (1 - ab[t_int])) * x - math.sqrt(ab[nxt]) * math.expm1(-h) * D
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(k, nxt, x)
    return x


def hutchinson_divergence(fn, x, probes):
    """fn(x) and unbiased estimates of its divergence Σ_i ∂fn_i/∂x_i (Hutchinson 1990; Skilling 1989):
    E_v[v^T (∂fn/∂x) v] = tr(∂fn/∂x) for v with E[v v^T] = I. probes: (P, *x.shape) Rademacher vectors, one
    estimate per probe and image -> (P, B), from one forward pass and P vector-Jacobian products."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        est = []
        for p, v in enumerate(probes):
            # Hutchinson: v^T J v, with v^T J from one reverse-mode pass
            vjp = torch.autograd.grad(out, x, v, retain_graph=p + 1 < len(probes))[0]
            est.append((vjp * v).flatten(1).sum(1))
    return out.detach(), torch.stack(est)


def ode_log_likelihood(model, sch, x1, steps=100, probes=1, generator=None):
    """log p_ODE(x_1) per image in nats (P estimates each) of the probability-flow ODE's density at t = 1, with
    p(x_T) = N(0, I): the instantaneous change of variables ([SDE] eq. 39; Chen et al. 2018), integrated from
    t = 1 to T by Heun's method in σ̄ on `steps` intervals of integer t, the divergence by Hutchinson's estimator
    with `probes` Rademacher vectors held fixed along the path. Returns ((P, B) estimates, x_T).

    In x̄ = x_t / sqrt(ᾱ_t) and σ̄_t = sqrt((1-ᾱ_t)/ᾱ_t) the ODE is dx̄/dσ̄ = ε_θ(sqrt(ᾱ) x̄, t) (DDIM eq. 14), so
        d log p̄(x̄)/dσ̄ = -div_x̄ ε_θ = -sqrt(ᾱ_t) div_x ε_θ(x_t, t),
        log p̄_1(x̄_1) = log p̄_T(x̄_T) + ∫_{σ̄_1}^{σ̄_T} sqrt(ᾱ) div_x ε_θ dσ̄,
    and x = sqrt(ᾱ) x̄ changes the density by ᾱ^{-D/2}: log p_t(x_t) = log p̄_t(x̄_t) - D/2 log ᾱ_t.
    """
    if steps < 1 or steps > sch.T - 1:
        raise ValueError(f"ODE steps must be in 1..T-1={sch.T - 1}, got {steps}")
    ab = sch.alpha_bar.tolist()
    grid = [1 + round(k * (sch.T - 1) / steps) for k in range(steps + 1)]  # integer t from 1 to T
    B, D = x1.shape[0], x1[0].numel()
    # Rademacher probes: v_i = ±1 with probability 1/2 each, so E[v v^T] = I
    v = (torch.randint(0, 2, (probes, *x1.shape), device=x1.device, generator=generator) * 2 - 1).to(x1.dtype)

    def velocity(xbar, t_int):
        """dx̄/dσ̄ = ε_θ and the Hutchinson estimates of its divergence in x̄ (the chain rule gives sqrt(ᾱ_t))."""
        c = math.sqrt(ab[t_int])
        t = torch.full((B,), t_int, device=x1.device, dtype=torch.long)
        # x_t = sqrt(ᾱ_t) x̄,  dx̄/dσ̄ = ε_θ(x_t, t)
        eps, div = hutchinson_divergence(lambda x: model(x, t).to(x1.dtype), c * xbar, v)
        # div_x̄ ε_θ(sqrt(ᾱ_t) x̄, t) = sqrt(ᾱ_t) div_x ε_θ(x_t, t)
        return eps, c * div

    # x̄_1 = x_1 / sqrt(ᾱ_1)
    xbar = x1 / math.sqrt(ab[1])
    delta = torch.zeros(probes, B, dtype=torch.float64, device=x1.device)  # ∫ div dσ̄ so far
    f0, d0 = velocity(xbar, grid[0])
    for k in range(steps):
        t0, t1 = grid[k], grid[k + 1]
        # h = σ̄_{t1} - σ̄_{t0},  σ̄_t = sqrt((1-ᾱ_t)/ᾱ_t)
        h = math.sqrt((1 - ab[t1]) / ab[t1]) - math.sqrt((1 - ab[t0]) / ab[t0])
        # Heun's predictor: x̄' = x̄ + h f(x̄, t0), and f, div there
        f1, d1 = velocity(xbar + h * f0, t1)
        # Heun's corrector: x̄ += h/2 [f(x̄, t0) + f(x̄', t1)]
        xbar = xbar + h / 2 * (f0 + f1)
        # the same trapezoid for ∫ div_x̄ ε_θ dσ̄
        delta = delta + h / 2 * (d0 + d1).double()
        if k + 1 < steps:
            f0, d0 = velocity(xbar, t1)
    # x_T = sqrt(ᾱ_T) x̄_T
    xT = math.sqrt(ab[sch.T]) * xbar
    # p(x_T) = N(0, I), then log p̄_T(x̄_T) = log p(x_T) + D/2 log ᾱ_T
    log_pbar_T = (-0.5 * (xT.double() ** 2 + math.log(2 * math.pi))).flatten(1).sum(1) + D / 2 * math.log(ab[sch.T])
    # log p_1(x_1) = log p̄_T(x̄_T) + ∫ div dσ̄ - D/2 log ᾱ_1
    return log_pbar_T + delta - D / 2 * math.log(ab[1]), xT


def ode_bound(model, sch, x0, steps=100, probes=1, var="beta_tilde", generator=None):
    """An upper bound on -log P(x_0) of the 8-bit data, per image in nats, (P, B) estimates: the ODE's density
    for x_1 (the network is untrained below t = 1) and the discretised decoder p_θ(x_0|x_1) for the last step.

    P(x_0) = ∫ p_θ(x_0|x_1) p_ODE(x_1) dx_1 >= exp E_{q(x_1|x_0)}[log p_θ(x_0|x_1) + log p_ODE(x_1) - log q(x_1|x_0)]
    by Jensen, so  -log P(x_0) <= E_q[log q(x_1|x_0) - log p_ODE(x_1) - log p_θ(x_0|x_1)], one x_1 per image,
    with E_q log q(x_1|x_0) = -D/2 log(2πe (1-ᾱ_1)) in closed form (the entropy of q(x_1|x_0)).
    """
    x0 = x0.double()
    D = x0[0].numel()
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
    one = torch.ones(x0.shape[0], device=x0.device, dtype=torch.long)
    x1 = q_sample(sch.to(x0.device), x0, one, eps)
    log_p1, _ = ode_log_likelihood(_in_own_dtype(model), sch, x1, steps, probes, generator)
    decoder = bound_terms(model, sch, x0, one, var, eps)  # L_0 at the same x_1
    # E_q log q(x_1|x_0) = -D/2 log(2πe (1-ᾱ_1)), q(x_1|x_0) = N(sqrt(ᾱ_1) x_0, (1-ᾱ_1) I)
    neg_entropy = -D / 2 * math.log(2 * math.pi * math.e * (1 - sch.alpha_bar[1].item()))
    # -log P(x_0) <= E_q log q(x_1|x_0) - log p_ODE(x_1) - log p_θ(x_0|x_1)
    return neg_entropy - log_p1 + decoder


# ==========================================================================================================
# Command line: recipes, training loop, sampling, --eval, --bench

# GPU: the DDPM paper's optimisation, with a 1.1M-parameter U-Net for 28px data (the paper's CIFAR-10 model is
# --ch 128 --ch-mult 1,2,2,2 --res-blocks 2 --attn 1 --dropout 0.1)
GPU_RECIPE = dict(steps=100_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999,
                  ch=32, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0)
# CPU: chosen for digits per multiply-accumulate and per second on 2 cores (README: time to quality); nothing in
# it depends on how long it runs: constant learning rate after the warm-up, EMA ramped by the step count
CPU_RECIPE = dict(minutes=15, batch_size=32, lr=1.5e-3, warmup=100, ema_decay=0.999,
                  ch=16, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0)
MODEL_KEYS = ("kind", "in_ch", "image_size", "ch", "ch_mult", "num_res_blocks", "attn", "group_size", "T", "beta_1", "beta_T")
OLDER = dict(group_size=1)  # what checkpoints written before --group-size existed used
SAMPLERS = ("ancestral", "ddim", "dpm++2m")
SAMPLE_STEPS = {"ddim": 50, "dpm++2m": 20}  # default network calls of the few-step samplers


def build_parser():
    p = argparse.ArgumentParser(description="DDPM, annotated against the notes (python ddpm.py --train)")
    common.add_common_args(p)
    g = p.add_argument_group("diffusion")
    g.add_argument("--T", type=common.positive_int, default=1000, help="diffusion steps T (default 1000)")
    g.add_argument("--beta-1", type=common.open_unit, default=1e-4, help="β_1 (default 1e-4)")
    g.add_argument("--beta-T", type=common.open_unit, default=0.02, help="β_T (default 0.02)")
    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=SAMPLERS, help="ancestral (T network calls, the notes'), ddim or dpm++2m "
                   "(--sample-steps calls) (default dpm++2m: 20 calls, the 1000-step quality in the README's "
                   "measurements)")
    g.add_argument("--sample-steps", type=common.positive_int, help="network calls for ddim and dpm++2m "
                   f"(default {SAMPLE_STEPS['ddim']} and {SAMPLE_STEPS['dpm++2m']})")
    g.add_argument("--ddim-steps", type=common.positive_int, help="shorthand for --sampler ddim --sample-steps N")
    g.add_argument("--var", choices=["beta_tilde", "beta"], default="beta_tilde", help="ancestral sampler variance σ_t^2 (default beta_tilde)")
    g.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True,
                   help="clip the predicted x_0 to [-1,1] while sampling (default on, as in the DDPM paper's code and "
                        "diffusers; --no-clip-x0 samples as the notes do)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM η >= 0 (default 0: deterministic)")
    g.add_argument("--final-samples", type=common.nonneg_int, default=64, help="samples written at the end of --train (default 64)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="the variational bound in bits/dim on the test split")
    g.add_argument("--eval-n", type=common.positive_int, help="images to evaluate (default all)")
    g.add_argument("--eval-t", type=common.positive_int, help="t's drawn per image (default: every t)")
    g.add_argument("--ode", action="store_true", help="with --eval: the bound by the probability-flow ODE instead")
    g.add_argument("--ode-steps", type=common.positive_int, default=100, help="Heun steps from t=1 to T (default 100)")
    g.add_argument("--probes", type=common.positive_int, default=1, help="Hutchinson probes per image (default 1)")
    common.add_unet_args(p, ch=None, ch_mult=None, res_blocks=None, attn=None, dropout=None)
    return p


def parse(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.train or args.sample or args.eval or args.bench):
        p.error("nothing to do: give --train, --sample N, --eval or --bench")
    if args.beta_T < args.beta_1:
        p.error(f"--beta-T {args.beta_T} < --beta-1 {args.beta_1}: DDPM's betas increase with t")
    if args.eta < 0 or not math.isfinite(args.eta):
        p.error(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.ddim_steps is not None:
        if args.sampler not in (None, "ddim") or args.sample_steps not in (None, args.ddim_steps):
            p.error("--ddim-steps N is --sampler ddim --sample-steps N; give one or the other")
        args.sampler, args.sample_steps = "ddim", args.ddim_steps
    args.sampler = args.sampler or "dpm++2m"
    if args.sampler == "ancestral" and args.sample_steps is not None:
        p.error("--sample-steps is for --sampler ddim or dpm++2m; the ancestral sampler takes T steps")
    if args.ode and not args.eval:
        p.error("--ode goes with --eval")
    if args.ode and args.ode_steps > args.T - 1:
        p.error(f"--ode-steps {args.ode_steps} > T - 1 = {args.T - 1}")
    args.out = args.out or os.path.join("runs", "ddpm")
    return p, args


def main(argv=None):
    p, args = parse(argv)
    try:
        rank, world, device = common.setup_distributed(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    try:
        if args.bench:
            return bench(args, device)
        if args.train:
            train(args, rank, world, device)
        if (args.sample or args.eval) and rank == 0:
            ck = common.load_checkpoint(os.path.join(args.out, "ckpt.pt"), kind="ddpm")
            model, sch = model_from_checkpoint(ck, device)
            if args.sample:
                write_samples(args, model, sch, device, args.sample)
            if args.eval:
                evaluate(args, model, sch, device, ck)
    except (common.DataError, common.CheckpointError, ValueError, OSError) as e:
        p.error(str(e))
    return 0


def train(args, rank, world, device):
    # ---- data and model (every bad input is found here, before anything is written)
    data = common.load_images(args.data, args.data_dir, "train")
    N, C, H, W = data.shape
    if H != W:
        raise common.DataError(f"{args.data}: images are {H}x{W}; the U-Net takes square images")
    torch.manual_seed(args.seed)  # the initial weights, and dropout, follow --seed
    recipe = common.fill_recipe(args, device, GPU_RECIPE, CPU_RECIPE)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split evenly over {world} ranks")
    cfg = common.unet_config(args, C, H)
    model = common.UNet(**cfg).to(device)
    sch = schedule(args.T, args.beta_1, args.beta_T).to(device)
    ck_args = dict(kind="ddpm", **{k: v for k, v in cfg.items() if k != "dropout"}, T=args.T, beta_1=args.beta_1,
                   beta_T=args.beta_T, dropout=args.dropout, seed=args.seed, data=args.data,
                   steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    macs = common.macs_per_image(model, torch.zeros(1, C, H, W, device=device), torch.ones(1, dtype=torch.long, device=device))
    if rank == 0:
        common.check_writable(args.out)
        print(f"{recipe}; {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters, {macs / 1e6:.1f}M MACs "
              f"per image; {N} images {C}x{H}x{W}; device {device}; {world} process(es)", flush=True)
    data = data.to(device)  # the whole data set lives on the device: no DataLoader between steps
    opt, lr_sched = common.make_optimizer(model, args.lr, args.warmup)
    ema = common.make_ema(model, args.ema_decay)
    step, seconds = 0, 0.0
    if args.resume:
        step, seconds = common.resume(ckpt_path, "ddpm", ck_args, MODEL_KEYS, model, opt, lr_sched, ema, rank, OLDER)
    net = common.wrap(model, world, device, args.compile)
    budget = common.Budget(args.steps, args.minutes, seconds, world, device=device)

    def save(step):
        if bad.found():  # never let a non-finite weight reach the disk: the last good file stays
            return
        if rank == 0:
            common.save_checkpoint(ckpt_path, common.training_state("ddpm", ck_args, step, budget.seconds(), model,
                                                                    opt, lr_sched, ema))

    # ---- the training loop (训练与推理): x_0 ~ data, t ~ U{1..T}, ε ~ N(0, I), gradient step on L_simple
    bad = common.NonFiniteWatch(device)
    # counted MACs: forward and backward, 3x the forward's, per image of the global batch
    bar = common.Progress(budget, start=step, macs_per_step=3 * macs * args.batch_size)
    lo, hi = rank * args.batch_size // world, (rank + 1) * args.batch_size // world
    model.train()
    done = budget.over(step)
    with common.StopOnInterrupt() as stop:
        while not done and not stop.requested:
            # the whole global batch is drawn from (seed, step); each rank takes its slice
            g = common.step_generator(args.seed, step, device)
            idx = torch.randint(0, N, (args.batch_size,), device=device, generator=g)[lo:hi]
            t = torch.randint(1, args.T + 1, (args.batch_size,), device=device, generator=g)[lo:hi]
            eps = torch.randn((args.batch_size, C, H, W), device=device, generator=g)[lo:hi]
            x0 = common.to_range(data[idx], -1)
            with common.autocast(device, args.precision):
                loss = loss_simple(net, sch, x0, t, eps)
            gnorm = common.optimizer_step(loss, model, opt, lr_sched, args.grad_clip, ema)
            step += 1
            bad.update(step, loss, gnorm)
            done = budget.over(step)
            if step % args.log_every == 0 or done:
                if bad.found():
                    break
                if rank == 0:
                    print(bar.line(step, loss=loss.item(), lr=lr_sched.get_last_lr()[0]), flush=True)
            if step % args.ckpt_every == 0 or done:
                save(step)
    common.stop_if_interrupted_or_bad(stop, bad, save, step, rank, "ddpm.py", args.out)
    if rank == 0:
        print(f"trained {step} steps, {budget.seconds() / 60:.1f} minutes in all; checkpoint {ckpt_path}", flush=True)
    if rank == 0 and args.final_samples:
        ema.module.eval()
        write_samples(args, ema.module, sch, device, args.final_samples)


def model_from_checkpoint(ck, device):
    """The EMA network and the schedule of a checkpoint, ready to sample."""
    saved = {**OLDER, **ck["args"]}
    model = common.UNet(in_ch=saved["in_ch"], ch=saved["ch"], ch_mult=saved["ch_mult"], num_res_blocks=saved["num_res_blocks"],
                        attn=saved["attn"], dropout=0.0, image_size=saved["image_size"], group_size=saved["group_size"])
    model.load_state_dict(ck["ema"])
    return model.to(device).eval(), schedule(saved["T"], saved["beta_1"], saved["beta_T"])


def network_calls(args, sch):
    """The sampler's number of network calls: T for ancestral sampling, else --sample-steps (default 50 for DDIM,
    20 for DPM-Solver++, at most the checkpoint's T)."""
    if args.sampler == "ancestral":
        return sch.T
    if args.sample_steps is None:
        return min(SAMPLE_STEPS[args.sampler], sch.T)
    if args.sample_steps > sch.T:
        raise ValueError(f"--sample-steps {args.sample_steps} > T = {sch.T} of the model")
    return args.sample_steps


def draw(args, model, sch, device, n, generator, callback=None):
    """n samples in [-1, 1] with the sampler the flags choose; every sampler draws x_T first from `generator`."""
    shape = (n, model.in_ch, model.image_size, model.image_size)
    steps = network_calls(args, sch)
    with common.autocast(device, args.precision):  # the network in bf16 where enabled; the updates stay fp32
        if args.sampler == "ddim":
            return ddim_sample(model, sch, shape, steps, args.eta, args.clip_x0, generator, callback)
        if args.sampler == "dpm++2m":
            return dpm_solver_sample(model, sch, shape, steps, args.clip_x0, generator, callback)
        return sample(model, sch, shape, args.var, args.clip_x0, generator, callback)


def write_samples(args, model, sch, device, n):
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.time()
    steps = network_calls(args, sch)
    x = draw(args, model, sch, device, n, g, common.every(max(1, steps // 10), f"{args.sampler} step", steps))
    png, pt = common.save_samples(args.out, "samples", (x.clamp(-1, 1) + 1) / 2)
    print(f"wrote {png} and {pt} ({n} samples, {args.sampler} with {steps} network calls"
          f"{', x̂_0 clipped' if args.clip_x0 else ''}, {time.time() - t0:.1f}s)")


def evaluate(args, model, sch, device, ck):
    x = common.load_images(args.data, args.data_dir, split="test")
    if x.shape[1:] != (model.in_ch, model.image_size, model.image_size):
        raise common.DataError(f"{args.data}: images {tuple(x.shape[1:])} but the model takes "
                               f"{(model.in_ch, model.image_size, model.image_size)}")
    x = x[:args.eval_n] if args.eval_n else x
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0, bpds, ses = time.time(), [], []
    chunk = 100 if not args.ode else 25
    D = x[0].numel()
    for k in range(0, len(x), chunk):
        x0 = common.to_range(x[k:k + chunk], -1).to(device)
        if args.ode:
            est = ode_bound(model, sch, x0, args.ode_steps, args.probes, args.var, g) / (D * math.log(2))  # (P, B)
            bpd = est.mean(0)
            se = est.std(0) / math.sqrt(args.probes) if args.probes > 1 else torch.full_like(bpd, float("nan"))
        else:
            bpd, se = nll_bits_per_dim(model, sch, x0, args.eval_t, args.var, generator=g)
        bpds.append(bpd.cpu())
        ses.append(se.cpu() if se is not None else torch.zeros_like(bpd.cpu()))
        print(f"eval {min(k + chunk, len(x))}/{len(x)} images, running bits/dim {torch.cat(bpds).mean():.4f}", file=sys.stderr)
    bpd = torch.cat(bpds)
    # the spread over images already holds the noise of each image's estimate (x_t draws, the drawn t's with
    # --eval-t, the probes with --ode); for a single image only that estimate's own standard error is left
    se = (bpd.std() / math.sqrt(len(bpd))).item() if len(bpd) > 1 else torch.cat(ses)[0].item()
    how = (f"probability-flow ODE, {args.ode_steps} Heun steps, {args.probes} probe(s) per image" if args.ode else
           f"{'every t' if args.eval_t is None else f'{args.eval_t} t per image'}")
    secs = time.time() - t0
    print(f"{'ODE bound' if args.ode else 'bound'}: {bpd.mean():.4f} ± {se:.4f} bits/dim on {len(bpd)} images of "
          f"{args.data} (test), {how}, var={args.var}, step {ck['step']}, {secs:.1f}s ({secs / len(bpd):.2f}s per image)")


def bench(args, device):
    """--bench: the training step of train() and one sampling network call, timed on random data."""
    C, H = common.data_shape(args.data, args.data_dir)
    common.fill_recipe(args, device, GPU_RECIPE, CPU_RECIPE)
    torch.manual_seed(args.seed)
    model = common.UNet(**common.unet_config(args, C, H)).to(device)
    sch = schedule(args.T, args.beta_1, args.beta_T).to(device)
    x0 = torch.rand(args.batch_size, C, H, H, device=device) * 2 - 1
    t = torch.full((args.batch_size,), sch.T, device=device)
    print(common.bench(model, args, device, loss=lambda net: loss_simple(net, sch, x0),
                       sample_call=lambda net: net(x0, t), example=(x0[:1], t[:1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
