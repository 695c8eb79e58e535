"""DDPM (Ho et al. 2020), annotated against the notes' sections 扩散模型 / 扩散过程 / 逆扩散过程 / 训练与推理 /
推导, then what the notes leave out (the bound in bits/dim, DDIM, and their empty SDE section:
DPM-Solver++ and the likelihood by the probability-flow ODE), then the command line.

    python ddpm.py --train          # MNIST into ./data; checkpoint and samples in runs/ddpm
    python ddpm.py --sample 64      # 64 samples from the EMA weights (DDIM, η = 1, 50 calls)
    python ddpm.py --sample 64 --sampler ancestral --no-clip-x0   # the notes' sampler: T calls
    python ddpm.py --eval [--ode]   # the variational bound (or the ODE's) in bits/dim
    torchrun --nproc_per_node 8 ddpm.py --train --data cifar10 --ch 128 --ch-mult 1,2,2,2 --attn 1

Indexing follows the notes: t = 1..T, and index 0 of every schedule tensor stands for x_0
(alpha_bar[0] = 1). The DDPM paper's code and diffusers index 0..T-1: their step k is our t = k + 1.

Everything above the command-line banner needs only torch: copy it into another project alone. A
network is any callable eps_model(x_t, t) -> ε_θ (an nn.Module, a function, a guidance wrapper).
"""
import argparse
import contextlib
import ctypes
import gc
import shlex
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
import zlib

import torch
import torch.nn.functional as F

# ==================================================================================================
# 扩散过程 (forward process)


class Schedule:
    """The per-t numbers as float64 tensors of length T+1, indexed by the notes' t (index 0: x_0).

    β, α, ᾱ are the forward process' (扩散过程). β̃ (推导: the variance of q(x_{t-1}|x_t, x_0)) and the
    reverse process' σ_t² (逆扩散过程, method sigma2) are kept here too, beside the numbers they are
    made of.
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
        moved.__dict__ = {k: (v.to(device) if torch.is_tensor(v) else v)
                          for k, v in self.__dict__.items()}
        return moved

    def sigma2(self, var):
        """The reverse process' fixed variance σ_t^2 (逆扩散过程), index t = 1..T.

        var="beta_tilde" (σ_t^2 = β̃_t = σ_{q,t}^2, the notes' choice at the end of 推导) or "beta"
        (σ_t^2 = β_t, the DDPM paper's other choice). β̃_1 = 0 would make the t = 1 decoder a point
        mass with an infinite likelihood, so t = 1 uses β̃_2 for both, as the DDPM paper's code does
        (its clipped log-variance); the sampler adds no noise at t = 1 anyway.
        """
        if var not in ("beta_tilde", "beta"):
            raise ValueError(f"var must be 'beta_tilde' or 'beta', got {var!r}")
        # 逆扩散过程: p_θ(x_{t-1}|x_t) = N(u_θ(x_t, t), σ_t^2 I) with σ_t^2 = β̃_t or β_t
        v = (self.beta_tilde if var == "beta_tilde" else self.beta).clone()
        v[1] = self.beta_tilde[2] if self.T >= 2 else self.beta[1]
        return v


# x_T keeps sqrt(ᾱ_T) of x_0: above ᾱ_T = 1e-3 (3% of x_0), x_T is visibly not the N(0, I)
# that sampling starts from
ALPHA_BAR_T_MAX = 1e-3


def schedule(T=1000, beta_1=1e-4, beta_T=0.02, warn=True):
    """The DDPM paper's linear schedule, β_1 = 1e-4 rising to β_T = 0.02, computed in float64.

    NOTES ERROR (扩散过程): the notes say the coefficients decrease, β_1 > β_2 > ... > β_T. In DDPM they
    increase: early steps add little noise so that fine detail is destroyed gently, late steps add
    much (β_T = 0.02). With the notes' order x_1 would already carry β = 0.02 of noise and the last
    steps would barely change x_t.

    Sampling starts from p(x_T) = N(0, I), which matches q(x_T|x_0) only when ᾱ_T ≈ 0 (4e-5 for the
    defaults). A short T with these β's leaves much of x_0 in x_T (T = 50: ᾱ_T = 0.60), so this
    warns when ᾱ_T > ALPHA_BAR_T_MAX (warn=False: the command line, which says so once in its own
    words). It does not rescale the β's: a checkpoint trained with --T and explicit β's gets
    back the schedule it was trained with.
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
    sch = Schedule(beta)
    alpha_bar_T = sch.alpha_bar[T].item()
    if warn and alpha_bar_T > ALPHA_BAR_T_MAX:
        warnings.warn(f"T = {T} with β from {beta_1} to {beta_T} leaves ᾱ_T = {alpha_bar_T:.3g}: "
                      f"x_T keeps sqrt(ᾱ_T) = {alpha_bar_T ** 0.5:.2g} of x_0 and is far from the "
                      "N(0, I) that sampling starts from (raise T or β_T)", stacklevel=2)
    return sch


def _per_image(c, x):
    """A coefficient per image, (B,), shaped to broadcast against x (B, C, H, W), in x's dtype."""
    return c.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def q_step(sch, x_prev, t, eps):
    """A draw of x_t from q(x_t|x_{t-1}), one step of the chain, given the noise ε_t."""
    sch = sch.to(x_prev.device)
    # 扩散过程: q(x_t|x_{t-1}) = N(x_t; sqrt(α_t) x_{t-1}, β_t I),
    #          i.e. x_t = sqrt(α_t) x_{t-1} + sqrt(β_t) ε_t
    return (_per_image(sch.alpha[t].sqrt(), x_prev) * x_prev
            + _per_image(sch.beta[t].sqrt(), x_prev) * eps)


def q_sample(sch, x0, t, eps):
    """A draw of x_t from q(x_t|x_0), the chain's t steps at once, given the noise ε."""
    sch = sch.to(x0.device)
    # 扩散过程: q(x_t|x_0) = N(x_t; sqrt(ᾱ_t) x_0, (1-ᾱ_t) I), i.e. x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε
    return (_per_image(sch.alpha_bar[t].sqrt(), x0) * x0
            + _per_image((1 - sch.alpha_bar[t]).sqrt(), x0) * eps)


# ==================================================================================================
# 逆扩散过程 (reverse process): p(x_T) = N(0, I), p_θ(x_{t-1}|x_t) = N(u_θ(x_t, t), σ_t^2 I)
#
# The network predicts ε (推导 below turns that into u_θ); σ_t^2 is fixed, Schedule.sigma2 above.


def _eps_theta(eps_model, x_t, t):
    """ε_θ(x_t, t) in x_t's dtype. An nn.Module is called in its parameters' dtype (the bound's
    float64 x_t meets a float32 network), any other callable in x_t's."""
    param = next(eps_model.parameters(), None) if isinstance(eps_model, torch.nn.Module) else None
    x_in = x_t if param is None else x_t.to(param.dtype)
    return eps_model(x_in, t).to(x_t.dtype)  # fp32 from a bf16-autocast network


def p_mean_variance(eps_model, sch, x_t, t, var="beta_tilde", clip_x0=False):
    """The mean u_θ(x_t, t) (x_t's shape and dtype) and variance σ_t^2 ((B,), float64) of
    p_θ(x_{t-1}|x_t), from one network call.

    clip_x0=False: u_θ in its ε form (推导), as the notes sample. clip_x0=True: x̂_0 predicted from
    ε_θ, clipped to [-1, 1] (the data's range), then the posterior mean u_{q,t}(x_t, x̂_0): the DDPM
    paper's code and diffusers sample this way. Without clipping the two means are the same number
    (test_math checks it).
    """
    sch = sch.to(x_t.device)
    eps_theta = _eps_theta(eps_model, x_t, t)
    if clip_x0:
        # 推导: u_{q,t} with x_0 replaced by the clipped x̂_0 = (x_t - sqrt(1-ᾱ_t) ε_θ) / sqrt(ᾱ_t)
        mean, _ = q_posterior(sch, predict_x0(sch, x_t, t, eps_theta).clamp(-1, 1), x_t, t)
    else:
        mean = p_mean(sch, x_t, t, eps_theta)
    return mean, sch.sigma2(var)[t]


# ==================================================================================================
# 推导 (derivation): the bound's terms, the posterior, the ε form, L_simple, the sampling step
#
# 推导: log p_θ(x_0) >= E_q[log p_θ(x_{0:T}) / q(x_{1:T}|x_0)] = -L_T - Σ_{t=2}^T L_{t-1} - L_0 with
#   L_T = D_KL(q(x_T|x_0) || p(x_T)),  L_{t-1} = E_q D_KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)),
#   L_0 = -E_q log p_θ(x_0|x_1).
# (The notes drop the log in E{Σ p_θ/q} of the last line of this derivation; the terms below
# have it.)


def gaussian_kl(mean1, var1, mean2, var2):
    """D_KL(N(mean1, var1) || N(mean2, var2)) per dimension, for diagonal Gaussians."""
    # 推导: D_KL = 1/2 [log σ_2^2/σ_1^2 - 1 + σ_1^2/σ_2^2 + (u_1-u_2)^2/σ_2^2]
    return 0.5 * (torch.log(var2) - torch.log(var1) - 1 + var1 / var2 + (mean1 - mean2) ** 2 / var2)


def prior_term(sch, x0):
    """L_T per image in nats: no parameters; small when ᾱ_T ≈ 0, which is why T must be large."""
    x0 = x0.double()
    alpha_bar_T = sch.alpha_bar[sch.T].to(x0.device)
    # 推导: L_T = D_KL(q(x_T|x_0) || p(x_T)) = D_KL(N(sqrt(ᾱ_T) x_0, (1-ᾱ_T) I) || N(0, I))
    kl = gaussian_kl(alpha_bar_T.sqrt() * x0, (1 - alpha_bar_T).expand_as(x0), torch.zeros_like(x0),
                     torch.ones_like(x0))
    return kl.flatten(1).sum(1)


@torch.no_grad()
def bound_terms(eps_model, sch, x0, t, var="beta_tilde", eps=None, generator=None):
    """One term of the bound per image, in nats summed over dimensions, at one draw of x_t ~
    q(x_t|x_0): L_{t-1} for t >= 2, L_0 for t = 1. Computed in float64 (an nn.Module in its own
    precision).

    L_0 uses the DDPM paper's discretised decoder (below, beyond the notes) instead of the notes'
    Gaussian density N(x_0; u_θ(x_1, 1), σ_1^2 I), so that the bound is on the probability of the
    8-bit data.
    """
    x0, sch = x0.double(), sch.to(x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
    x_t = q_sample(sch, x0, t, eps.double())
    mean_theta, var_theta = p_mean_variance(eps_model, sch, x_t, t, var)
    var_theta = _per_image(var_theta, x_t)
    mean_q, var_q = q_posterior(sch, x0, x_t, t)
    # 推导: L_{t-1} = D_KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)); with σ_t^2 = β̃_t this is
    #       β_t^2 / (2 σ_t^2 α_t (1-ᾱ_t)) ||ε - ε_θ(x_t, t)||^2, the weighted loss
    kl = gaussian_kl(mean_q, var_q.clamp(min=1e-30), mean_theta, var_theta).flatten(1).sum(1)
    # 推导: L_0 = -log p_θ(x_0|x_1), discretised to the 8-bit bins
    nll0 = -discretized_gaussian_log_likelihood(x0, mean_theta, var_theta).flatten(1).sum(1)
    return torch.where(t == 1, nll0, kl)


def q_posterior(sch, x0, x_t, t):
    """Mean and variance of q(x_{t-1} | x_t, x_0), t >= 1.

    NOTES ERROR (推导): the notes write sqrt(ᾱ_t) x_t, not sqrt(α_t) x_t, in u_{q,t}. Completing the
    square, x_t enters only through q(x_t|x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t I), whose cross term
    is 2 sqrt(α_t) x_t·x_{t-1}/β_t; multiplying by σ_{q,t}^2 gives sqrt(α_t)(1-ᾱ_{t-1})/(1-ᾱ_t).
    (The notes' own line before it has sqrt(α_t).)
    """
    sch = sch.to(x_t.device)
    alpha_bar_t, alpha_bar_prev = sch.alpha_bar[t], sch.alpha_bar[t - 1]
    # 推导: u_{q,t} = [(1-ᾱ_{t-1}) sqrt(α_t) x_t + β_t sqrt(ᾱ_{t-1}) x_0] / (1-ᾱ_t)
    c_xt = sch.alpha[t].sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    c_x0 = sch.beta[t] * alpha_bar_prev.sqrt() / (1 - alpha_bar_t)
    mean = _per_image(c_xt, x_t) * x_t + _per_image(c_x0, x0) * x0
    # 推导: σ_{q,t}^2 = β̃_t
    return mean, _per_image(sch.beta_tilde[t], x_t)


def predict_x0(sch, x_t, t, eps):
    """x̂_0 from x_t and a (predicted) noise ε."""
    sch = sch.to(x_t.device)
    # 推导: x_0 = (x_t - sqrt(1-ᾱ_t) ε_t) / sqrt(ᾱ_t)
    return ((x_t - _per_image((1 - sch.alpha_bar[t]).sqrt(), x_t) * eps)
            / _per_image(sch.alpha_bar[t].sqrt(), x_t))


def p_mean(sch, x_t, t, eps_theta):
    """u_θ(x_t, t) in its ε form: u_{q,t} with x_0 = x̂_0(x_t, ε_θ)."""
    sch = sch.to(x_t.device)
    # 推导: u_θ(x_t, t) = 1/sqrt(α_t) [x_t - (1-α_t)/sqrt(1-ᾱ_t) ε_θ(x_t, t)]
    return ((x_t - _per_image(sch.beta[t] / (1 - sch.alpha_bar[t]).sqrt(), x_t) * eps_theta)
            / _per_image(sch.alpha[t].sqrt(), x_t))


def loss_simple(eps_model, sch, x0, t=None, eps=None, generator=None):
    """L_simple, the mean over pixels and batch; t ~ U{1..T} and ε ~ N(0, I) unless given.

    The weighted loss has β_t^2 / (2 σ_t^2 α_t (1-ᾱ_t)) in front; DDPM drops it. The notes write a
    sum over t; the expectation over a uniform t is the same objective divided by T. The mean over
    pixels and batch (not the sum) is what the paper's code does; the default learning rate and clip
    assume it.
    """
    B = x0.shape[0]
    if t is None:
        # 推导: t ~ U{1, ..., T}
        t = torch.randint(1, sch.T + 1, (B,), device=x0.device, generator=generator)
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t = q_sample(sch, x0, t, eps)
    # 推导: L_simple = ||ε - ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, t)||^2
    return F.mse_loss(_eps_theta(eps_model, x_t, t).float(), eps)


def p_sample(eps_model, sch, x_t, t_int, var="beta_tilde", clip_x0=False, generator=None):
    """One step of ancestral sampling: x_{t-1} ~ p_θ(x_{t-1}|x_t).

    NOTES ERROR (推导, sampling): the notes add σ_t ε' at every step, t = 1 included. DDPM's Algorithm
    2 adds no noise at t = 1 (z = 0): x_0 is the mean of p_θ(x_0|x_1), and noise there would only
    blur the result. (Also, the notes' ε' ~ N(0, 1) is a vector: N(0, I).)
    """
    t = torch.full((x_t.shape[0],), t_int, device=x_t.device, dtype=torch.long)
    mean, sigma2 = p_mean_variance(eps_model, sch, x_t, t, var, clip_x0)
    if t_int == 1:
        return mean
    # 推导: x_{t-1} = 1/sqrt(α_t) [x_t - (1-α_t)/sqrt(1-ᾱ_t) ε_θ(x_t, t)] + σ_t ε',  ε' ~ N(0, I)
    noise = torch.randn(x_t.shape, device=x_t.device, generator=generator)
    return mean + _per_image(sigma2.sqrt(), mean) * noise


def _start(shape, device, x_T, generator):
    """x_T ~ N(0, I) on `device` (default: the CPU), unless x_T is given; it then sets the
    device."""
    if x_T is not None:
        return x_T
    return torch.randn(shape, device=device, generator=generator)


@torch.no_grad()
def sample(eps_model, sch, shape, var="beta_tilde", clip_x0=False, generator=None, callback=None,
           device=None, x_T=None):
    """Ancestral sampling (训练与推理, 推导): x_T ~ p(x_T) = N(0, I), then x_{t-1} ~ p_θ(x_{t-1}|x_t),
    t = T..1: a discretisation of the reverse-time SDE (the SDE view below). [SDE] eq. 4 is this
    step with σ_t^2 = β_t (var="beta"); the default σ_t^2 = β̃_t is the DDPM paper's other
    choice, the true posterior's variance; the two agree as the steps shrink.

    T network calls. callback(k, t, x), if given, is called after each step k = 0..T-1 with
    x = x_{t-1}.
    """
    x = _start(shape, device, x_T, generator)
    sch = sch.to(x.device)
    for k, t_int in enumerate(range(sch.T, 0, -1)):
        x = p_sample(eps_model, sch, x, t_int, var, clip_x0, generator)
        if callback is not None:
            callback(k, t_int - 1, x)
    return x


# ==================================================================================================
# Beyond the notes: the bound in bits/dim with the discretised decoder, DDIM, and the SDE view


def _std_normal_cdf(x):
    # Φ(x) = (1 + erf(x / sqrt(2))) / 2
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x, mean, var):
    """log p(x) of the DDPM paper's L_0 decoder: N(mean, var) integrated over x's 8-bit bin of width
    2/255.

    Data in [-1, 1] came from 256 levels; the bin of a level is [x - 1/255, x + 1/255], the two edge
    bins open to -inf (x = -1) and +inf (x = 1), so the 256 probabilities sum to 1. (The notes' L_0
    is the Gaussian density itself, which is not a probability of 8-bit data.)
    """
    std = var.sqrt()
    # DDPM paper, eq. 13: P(x) = Φ((x + 1/255 - u)/σ) - Φ((x - 1/255 - u)/σ), with Φ(+∞) = 1 at
    # x = 1 and Φ(-∞) = 0 at x = -1 (the edge bins open)
    upper = torch.where(x > 0.999, torch.ones_like(x),
                        _std_normal_cdf((x + 1 / 255 - mean) / std))
    lower = torch.where(x < -0.999, torch.zeros_like(x),
                        _std_normal_cdf((x - 1 / 255 - mean) / std))
    # log P(x), floored at 1e-12 where the bin's probability underflows
    return torch.log((upper - lower).clamp(min=1e-12))


@torch.no_grad()
def nll_bits_per_dim(eps_model, sch, x0, t_samples=None, var="beta_tilde", generator=None):
    """The bound -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0, per image, in bits per dimension.

    t_samples=None evaluates every t (T network calls per image) and returns (bpd, None). With an
    integer k, sum_t L_{t-1} is estimated without bias as T * mean of k uniformly drawn t's per
    image, and the call returns (bpd, standard error of bpd). bpd is a (B,) float64 tensor. Data x0
    in [-1, 1] from 8-bit pixels.
    """
    B, D = x0.shape[0], x0[0].numel()
    device = x0.device
    total = prior_term(sch, x0)
    if t_samples is None:
        for t_int in range(1, sch.T + 1):
            t = torch.full((B,), t_int, device=device)
            # 推导: L_T + Σ_{t=2}^T L_{t-1} + L_0
            total = total + bound_terms(eps_model, sch, x0, t, var, generator=generator)
        # bits per dimension = nats / (D log 2)
        return total / (D * math.log(2)), None
    per_t = []
    for _ in range(t_samples):
        t = torch.randint(1, sch.T + 1, (B,), device=device, generator=generator)
        per_t.append(bound_terms(eps_model, sch, x0, t, var, generator=generator))
    per_t = torch.stack(per_t, dim=1)
    # Σ_{t=1}^T term_t = T E_{t~U{1..T}} term_t, estimated by the mean of k draws
    est = total + sch.T * per_t.mean(1)
    # its standard error: T sd(term_t) / sqrt(k)
    se = (sch.T * per_t.std(1) / math.sqrt(t_samples) if t_samples > 1
          else torch.full_like(est, float("nan")))
    # bits per dimension = nats / (D log 2)
    return est / (D * math.log(2)), se / (D * math.log(2))


SPACINGS = ("uniform", "quadratic", "log-sigma")


def time_grid(sch, steps, spacing="uniform"):
    """The integer times a few-step sampler visits: `steps` distinct t from t = T down, strictly
    decreasing, then t = 0, where ᾱ_0 = 1 and the last step lands on x̂_0.

    spacing: "uniform", even in t (DDIM); "quadratic", t_k = T (k/steps)^2, dense near t = 0 (after
    DDIM's CIFAR-10 grid, whose code spaces sqrt(t) evenly up to 0.8 T, not up to T);
    "log-sigma", even in log σ̄_t = -λ_t from t = T to t = 1 (DPM-Solver's time-uniform-in-λ grid),
    with σ̄_t = sqrt((1-ᾱ_t)/ᾱ_t). Each is rounded to integer t (the network was trained there);
    where rounding makes two times equal near t = 0, they are moved apart by one step to stay
    distinct and >= 1.
    """
    T = sch.T
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..T={T}, got {steps}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    k = torch.arange(steps, 0, -1, dtype=torch.float64)  # k = steps..1
    if spacing == "uniform":
        # t_k = k T / steps
        t = k * T / steps
    elif spacing == "quadratic":
        # t_k = T (k / steps)^2
        t = T * (k / steps) ** 2
    else:
        # log σ̄ even from log σ̄_T (k = steps) to log σ̄_1 (k = 1); each to the nearest t in log σ̄
        log_sigma_bar = 0.5 * (torch.log1p(-sch.alpha_bar[1:]) - torch.log(sch.alpha_bar[1:]))
        top, bottom = log_sigma_bar[-1], log_sigma_bar[0]
        target = bottom + (k - 1) / max(steps - 1, 1) * (top - bottom)
        t = 1 + (log_sigma_bar[None, :] - target[:, None]).abs().argmin(1).double()
    ts = [round(v) for v in t.tolist()]
    ts[0] = T
    for i in range(1, steps):  # strictly decreasing from T ...
        ts[i] = min(ts[i], ts[i - 1] - 1)
    for i in range(steps - 1, -1, -1):  # ... and >= 1 (steps <= T leaves room for both)
        ts[i] = max(ts[i], 1 if i == steps - 1 else ts[i + 1] + 1)
    return ts + [0]


@torch.no_grad()
def ddim_sample(eps_model, sch, shape, steps=50, eta=0.0, clip_x0=False, generator=None,
                callback=None, device=None, x_T=None, spacing="uniform"):
    """DDIM (Song, Meng & Ermon 2021, eq. 12) on the integer times of time_grid(sch, steps,
    spacing): `steps` network calls.

    eta = 0 is deterministic: the Euler discretisation of the probability-flow ODE in the variables
    x̄ = x_t / sqrt(ᾱ_t), σ̄ = sqrt(1-ᾱ_t)/sqrt(ᾱ_t) (DDIM eq. 14; see the SDE view below). eta = 1
    is the ancestral sampler (σ^2 = β̃) of the shorter chain through the grid's times, whose β's are
    1 - ᾱ_t/ᾱ_prev; with steps = T, the notes' own. callback(k, t, x) after step k with x = x_t at
    the new t.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    alpha_bar = sch.alpha_bar.tolist()  # python floats: no device sync for the per-step scalars
    ts = time_grid(sch, steps, spacing)
    x = _start(shape, device, x_T, generator)
    for k in range(steps):
        t_int, prev = ts[k], ts[k + 1]
        ab_t, ab_prev = alpha_bar[t_int], alpha_bar[prev]
        t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.long)
        eps_theta = _eps_theta(eps_model, x, t)
        # 推导: x̂_0 = (x_t - sqrt(1-ᾱ_t) ε_θ) / sqrt(ᾱ_t)
        x0_hat = (x - math.sqrt(1 - ab_t) * eps_theta) / math.sqrt(ab_t)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
            # 扩散过程 solved for ε: ε = (x_t - sqrt(ᾱ_t) x̂_0) / sqrt(1-ᾱ_t), the noise that the
            # clipped x̂_0 implies. Re-deriving ε is GLIDE's choice, and diffusers' DDIMScheduler
            # with use_clipped_model_output=True; diffusers' default keeps the network's ε
            eps_theta = (x - math.sqrt(ab_t) * x0_hat) / math.sqrt(1 - ab_t)
        # DDIM eq. 16: σ = η sqrt((1-ᾱ_prev)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_prev)
        #   (η = 1, prev = t-1: σ = sqrt(β̃_t))
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        # DDIM eq. 12: x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ^2) ε_θ + σ z
        x = math.sqrt(ab_prev) * x0_hat + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps_theta
        if prev > 0 and sigma > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        if callback is not None:
            callback(k, prev, x)
    return x


# ---- the SDE view (the notes' empty SDE section; Song et al. 2021, "Score-Based Generative
# Modeling through Stochastic Differential Equations", cited as [SDE] with its equation numbers)
#
# [SDE] eq. 11: the forward chain x_t = sqrt(1-β_t) x_{t-1} + sqrt(β_t) ε_t (扩散过程, q_step) is the
#   discretisation, on the grid τ = t/T, of the variance-preserving SDE
#   dx = -1/2 β(τ) x dτ + sqrt(β(τ)) dw,  β(t/T) = T β_t.
#   Its marginal is q(x_t|x_0) (q_sample); log ᾱ(τ) = -∫_0^τ β(s) ds, here known at the integers t.
# [SDE] eq. 6: the reverse-time SDE  dx = [f(x,τ) - g(τ)^2 ∇_x log p_τ(x)] dτ + g(τ) dw̄  with
#   f = -1/2 β x, g = sqrt(β); ancestral sampling (sample) discretises its reverse, and with
#   σ_t^2 = β_t it is [SDE] eq. 4.
# [SDE] eq. 13: the probability-flow ODE  dx/dτ = f(x,τ) - 1/2 g(τ)^2 ∇_x log p_τ(x), with the same
#   marginals; DDIM with η = 0 is its Euler step in x̄ = x/sqrt(ᾱ), σ̄ = sqrt((1-ᾱ)/ᾱ):
#   dx̄/dσ̄ = ε_θ (DDIM eq. 14).
# The network was trained at integer t only: every solver below evaluates it at integer t.


def score_from_eps(sch, eps_theta, t):
    """The score of the noisy marginal from the ε-prediction: the same network up to a factor."""
    sch = sch.to(eps_theta.device)
    # [SDE] (and NCSN's DSM target): s_θ(x_t, t) = ∇ log q_t(x_t) ≈ -ε_θ(x_t, t) / sqrt(1-ᾱ_t)
    return -eps_theta / _per_image((1 - sch.alpha_bar[t]).sqrt(), eps_theta)


@torch.no_grad()
def dpm_solver_sample(eps_model, sch, shape, steps=20, clip_x0=False, generator=None, callback=None,
                      device=None, x_T=None, spacing="uniform"):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), the probability-flow ODE's
    second-order multistep exponential integrator in its data-prediction form, on the integer times
    of time_grid: `steps` network calls, x_T ~ N(0, I) drawn first as by the other samplers.

    In the notes' symbols the paper's α_t is sqrt(ᾱ_t), its σ_t is sqrt(1-ᾱ_t), and its half-log-SNR
    λ_t = log(sqrt(ᾱ_t)/sqrt(1-ᾱ_t)). With x̂_0 the network's prediction of x_0, the ODE's exact
    solution is x_t = sqrt((1-ᾱ_t)/(1-ᾱ_s)) x_s + sqrt(1-ᾱ_t) ∫_{λ_s}^{λ_t} e^λ x̂_0 dλ; the solver
    takes x̂_0 linear in λ through the last two predictions. The first step (no earlier prediction)
    and the last one (to t = 0, λ = ∞) are first order, i.e. DDIM steps. callback(k, t, x) after
    step k with x = x_t at the new t.
    """
    alpha_bar = sch.alpha_bar.tolist()
    ts = time_grid(sch, steps, spacing)
    # DPM-Solver: λ_t = log(sqrt(ᾱ_t)/sqrt(1-ᾱ_t)) = 1/2 log(ᾱ_t/(1-ᾱ_t)); λ_0 = +∞ (1-ᾱ_0 = 0)
    lam = [0.5 * math.log(alpha_bar[t] / (1 - alpha_bar[t])) if t > 0 else math.inf for t in ts]
    x = _start(shape, device, x_T, generator)
    x0_hat_prev, h_prev = None, None
    for k in range(steps):
        t_int, nxt = ts[k], ts[k + 1]
        t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.long)
        eps_theta = _eps_theta(eps_model, x, t)
        # 推导: x̂_0 = (x_t - sqrt(1-ᾱ_t) ε_θ) / sqrt(ᾱ_t)
        x0_hat = (x - math.sqrt(1 - alpha_bar[t_int]) * eps_theta) / math.sqrt(alpha_bar[t_int])
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        if nxt == 0:
            # DPM-Solver++ first order with 1-ᾱ_0 = 0, ᾱ_0 = 1: x_0 = x̂_0
            x = x0_hat
        else:
            # DPM-Solver++: h = λ_next - λ_t
            h = lam[k + 1] - lam[k]
            x0_hat_2m = x0_hat
            if x0_hat_prev is not None:
                # DPM-Solver++(2M): r = h_prev/h,
                #   x̂_0^2M = (1 + 1/(2r)) x̂_0(t) - 1/(2r) x̂_0(t_prev)
                r = h_prev / h
                x0_hat_2m = (1 + 1 / (2 * r)) * x0_hat - (1 / (2 * r)) * x0_hat_prev
            # DPM-Solver++: x_next = sqrt((1-ᾱ_next)/(1-ᾱ_t)) x_t
            #                        - sqrt(ᾱ_next) (e^{-h} - 1) x̂_0^2M
            #   (x̂_0^2M = x̂_0 at the first step: first order)
            x = (math.sqrt((1 - alpha_bar[nxt]) / (1 - alpha_bar[t_int])) * x
                 - math.sqrt(alpha_bar[nxt]) * math.expm1(-h) * x0_hat_2m)
            x0_hat_prev, h_prev = x0_hat, h
        if callback is not None:
            callback(k, nxt, x)
    return x


def hutchinson_divergence(fn, x, probes):
    """fn(x) and unbiased estimates of its divergence Σ_i ∂fn_i/∂x_i (Hutchinson 1990; Skilling
    1989): E_v[v^T (∂fn/∂x) v] = tr(∂fn/∂x) for v with E[v v^T] = I. probes: (P, *x.shape)
    Rademacher vectors, one estimate per probe and image -> (P, B), from one forward pass and P
    vector-Jacobian products."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        est = []
        for p, v in enumerate(probes):
            # Hutchinson: v^T J v, with v^T J from one reverse-mode pass
            vjp = torch.autograd.grad(out, x, v, retain_graph=p + 1 < len(probes))[0]
            est.append((vjp * v).flatten(1).sum(1))
    return out.detach(), torch.stack(est)


ODE_STEPS = 50  # the ODE likelihood's default: about 100 network calls per image (README)


def ode_grid(sch, steps=ODE_STEPS):
    """The integer times t from 1 to T at which the ODE likelihood evaluates the network: steps + 1
    nodes even in log σ̄_t (σ̄_t = sqrt((1-ᾱ_t)/ᾱ_t); -log σ̄_t is DPM-Solver's λ_t), each moved to
    the integer t nearest in log σ̄ (the network was trained there), duplicates dropped; T - 1 steps
    take every integer t. σ̄ grows
    4.7-fold from t = 1 to t = 11 and 1.01-fold from t = 990 to 1000: even in t, a grid would be
    coarsest where the flow changes fastest."""
    if not 1 <= steps <= sch.T - 1:
        raise ValueError(f"ODE steps must be in 1..T-1={sch.T - 1}, got {steps}")
    if steps == sch.T - 1:  # T - 1 steps: every integer t
        return list(range(1, sch.T + 1))
    # log σ̄_t = 1/2 [log(1-ᾱ_t) - log ᾱ_t], t = 1..T
    log_sigma_bar = 0.5 * (torch.log1p(-sch.alpha_bar[1:]) - torch.log(sch.alpha_bar[1:]))
    target = torch.linspace(log_sigma_bar[0].item(), log_sigma_bar[-1].item(), steps + 1,
                            dtype=torch.float64)
    nearest = (log_sigma_bar[None, :] - target[:, None]).abs().argmin(1) + 1
    return sorted(set(nearest.tolist()))


def ode_log_likelihood(eps_model, sch, x1, steps=ODE_STEPS, probes=1, generator=None,
                       quadrature="log-sigma", terms=False):
    """log p_ODE(x_1) per image in nats (P estimates each) of the probability-flow ODE's density at
    t = 1, with p(x_T) = N(0, I): the instantaneous change of variables ([SDE] eq. 39; Chen et al.
    2018), integrated from t = 1 to T on the nodes of ode_grid (about 2 × steps network calls), the
    divergence by Hutchinson's estimator with `probes` Rademacher vectors held fixed along the path.
    Returns ((P, B) estimates, x_T). The network is called in x1's dtype (an nn.Module in its own).
    terms=True returns (dict, x_T) instead, the four terms that add up to the estimate: "prior"
    log p(x_T) and "jacobian_T" D/2 log ᾱ_T, (B,) each; "divergence" ∫ div_x̄ ε_θ dσ̄, (P, B);
    "jacobian_1" -D/2 log ᾱ_1, a number.

    In x̄ = x_t / sqrt(ᾱ_t) and σ̄_t = sqrt((1-ᾱ_t)/ᾱ_t) the ODE is dx̄/dσ̄ = ε_θ(sqrt(ᾱ) x̄, t)
    (DDIM eq. 14), so
        d log p̄(x̄)/dσ̄ = -div_x̄ ε_θ = -sqrt(ᾱ_t) div_x ε_θ(x_t, t),
        log p̄_1(x̄_1) = log p̄_T(x̄_T) + ∫_{σ̄_1}^{σ̄_T} div_x̄ ε_θ dσ̄,
    and x = sqrt(ᾱ) x̄ changes the density by ᾱ^{-D/2}: log p_t(x_t) = log p̄_t(x̄_t) - D/2 log ᾱ_t.

    x̄ is moved by Heun's method in σ̄: exact where ε_θ is linear in σ̄ along the path, as for data
    that is a point mass (there ε_θ is constant). The divergence integral is the stiff part: a pixel
    that is a point mass at the scale σ̄ (MNIST's background, exactly -1) has div_x̄ ε_θ = 1/σ̄, and
    a trapezoid in σ̄ over a step σ̄_a -> σ̄_b = ρ σ̄_a gives sinh(log ρ) for its integral log ρ,
    always too high (0.69 nats per such pixel on a step with ρ = 4.7). So it is a trapezoid in log
    σ̄ instead, of the integrand σ̄ div_x̄ ε_θ, which is 1 there and exact: ∫ div dσ̄ = ∫ σ̄ div
    d(log σ̄). quadrature="sigma" is the trapezoid in σ̄ of earlier versions, kept to show the
    difference.
    """
    if quadrature not in ("log-sigma", "sigma"):
        raise ValueError(f"quadrature must be 'log-sigma' or 'sigma', got {quadrature!r}")
    alpha_bar = sch.alpha_bar.tolist()
    grid = ode_grid(sch, steps)
    B, D = x1.shape[0], x1[0].numel()
    # Rademacher probes: v_i = ±1 with probability 1/2 each, so E[v v^T] = I
    v = (torch.randint(0, 2, (probes, *x1.shape), device=x1.device, generator=generator) * 2 - 1
         ).to(x1.dtype)

    def sigma_bar(t_int):
        # σ̄_t = sqrt((1-ᾱ_t)/ᾱ_t)
        return math.sqrt((1 - alpha_bar[t_int]) / alpha_bar[t_int])

    def velocity(xbar, t_int):
        """dx̄/dσ̄ = ε_θ and Hutchinson's estimates of its divergence in x̄ (the chain rule gives
        sqrt(ᾱ_t))."""
        c = math.sqrt(alpha_bar[t_int])
        t = torch.full((B,), t_int, device=x1.device, dtype=torch.long)
        # x_t = sqrt(ᾱ_t) x̄,  dx̄/dσ̄ = ε_θ(x_t, t)
        eps_theta, div = hutchinson_divergence(lambda x: _eps_theta(eps_model, x, t), c * xbar, v)
        # div_x̄ ε_θ(sqrt(ᾱ_t) x̄, t) = sqrt(ᾱ_t) div_x ε_θ(x_t, t)
        return eps_theta, c * div.double()

    # x̄_1 = x_1 / sqrt(ᾱ_1)
    xbar = x1 / math.sqrt(alpha_bar[1])
    delta = torch.zeros(probes, B, dtype=torch.float64, device=x1.device)  # ∫ div dσ̄ so far
    f0, d0 = velocity(xbar, grid[0])
    for k in range(len(grid) - 1):
        ta, tb = grid[k], grid[k + 1]
        sa, sb = sigma_bar(ta), sigma_bar(tb)
        # Heun's predictor: x̄' = x̄ + (σ̄_b - σ̄_a) f(x̄, ta), and f, div there
        f1, d1 = velocity(xbar + (sb - sa) * f0, tb)
        # Heun's corrector: x̄ += (σ̄_b - σ̄_a)/2 [f(x̄, ta) + f(x̄', tb)]
        xbar = xbar + (sb - sa) / 2 * (f0 + f1)
        if quadrature == "log-sigma":
            # ∫ div dσ̄ = ∫ σ̄ div d(log σ̄): trapezoid in log σ̄
            delta = delta + (math.log(sb) - math.log(sa)) / 2 * (sa * d0 + sb * d1)
        else:
            # trapezoid in σ̄
            delta = delta + (sb - sa) / 2 * (d0 + d1)
        if k + 1 < len(grid) - 1:
            f0, d0 = velocity(xbar, tb)
    # x_T = sqrt(ᾱ_T) x̄_T
    x_T = math.sqrt(alpha_bar[sch.T]) * xbar
    # p(x_T) = N(0, I)
    log_p_T = (-0.5 * (x_T.double() ** 2 + math.log(2 * math.pi))).flatten(1).sum(1)
    # log p̄_T(x̄_T) = log p(x_T) + D/2 log ᾱ_T
    jacobian_T = torch.full_like(log_p_T, D / 2 * math.log(alpha_bar[sch.T]))
    # log p_1(x_1) = log p̄_1(x̄_1) - D/2 log ᾱ_1
    jacobian_1 = -D / 2 * math.log(alpha_bar[1])
    if terms:
        return dict(prior=log_p_T, jacobian_T=jacobian_T, divergence=delta,
                    jacobian_1=jacobian_1), x_T
    # log p_1(x_1) = log p̄_T(x̄_T) + ∫ div dσ̄ - D/2 log ᾱ_1
    return log_p_T + jacobian_T + delta + jacobian_1, x_T


def ode_calls(sch, steps=ODE_STEPS):
    """Network calls per image of ode_log_likelihood: two per step of its grid (Heun), each with its
    vector-Jacobian products."""
    return 2 * (len(ode_grid(sch, steps)) - 1)


def ode_bound(eps_model, sch, x0, steps=ODE_STEPS, probes=1, var="beta_tilde", generator=None,
              quadrature="log-sigma"):
    """An upper bound on -log P(x_0) of the 8-bit data, per image in nats, (P, B) estimates: the
    ODE's density for x_1 (the network is untrained below t = 1) and the discretised decoder
    p_θ(x_0|x_1) for the last step. Computed in float64 (an nn.Module in its own precision).

    P(x_0) = ∫ p_θ(x_0|x_1) p_ODE(x_1) dx_1
           >= exp E_{q(x_1|x_0)}[log p_θ(x_0|x_1) + log p_ODE(x_1) - log q(x_1|x_0)]
    by Jensen, so  -log P(x_0) <= E_q[log q(x_1|x_0) - log p_ODE(x_1) - log p_θ(x_0|x_1)], one x_1
    per image, with E_q log q(x_1|x_0) = -D/2 log(2πe (1-ᾱ_1)) in closed form (q(x_1|x_0)'s
    entropy).
    """
    x0 = x0.double()
    D = x0[0].numel()
    eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
    one = torch.ones(x0.shape[0], device=x0.device, dtype=torch.long)
    x1 = q_sample(sch, x0, one, eps)
    log_p1, _ = ode_log_likelihood(eps_model, sch, x1, steps, probes, generator, quadrature)
    decoder = bound_terms(eps_model, sch, x0, one, var, eps)  # L_0 at the same x_1
    # E_q log q(x_1|x_0) = -D/2 log(2πe (1-ᾱ_1)), q(x_1|x_0) = N(sqrt(ᾱ_1) x_0, (1-ᾱ_1) I)
    neg_entropy = -D / 2 * math.log(2 * math.pi * math.e * (1 - sch.alpha_bar[1].item()))
    # -log P(x_0) <= E_q log q(x_1|x_0) - log p_ODE(x_1) - log p_θ(x_0|x_1)
    return neg_entropy - log_p1 + decoder


# ==================================================================================================
# Command line: recipes and flags, the training loop, sampling, --eval
#
# Nothing above this banner needs it. It takes the U-Net, the data and the PNG writer from
# common.py, imported in the functions that use them, so that `import ddpm` itself needs only torch.

# GPU: the DDPM paper's optimisation, with a 1.1M-parameter U-Net for 28px data (the paper's
# CIFAR-10 model is --ch 128 --ch-mult 1,2,2,2 --res-blocks 2 --attn 1 --dropout 0.1)
GPU_RECIPE = dict(steps=100_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999,
                  ch=32, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0)
# CPU: chosen for digits per multiply-accumulate and per second on 2 cores (README: time to
# quality); nothing in it depends on how long it runs: constant learning rate after the warm-up,
# EMA ramped by the step count
CPU_RECIPE = dict(minutes=15, batch_size=32, lr=1.5e-3, warmup=100, ema_decay=0.999,
                  ch=16, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0)
MODEL_KEYS = ("kind", "in_ch", "image_size", "ch", "ch_mult", "num_res_blocks", "attn",
              "group_size", "T", "beta_1", "beta_T")
OLDER = dict(group_size=1)  # what checkpoints written before --group-size existed used
# the flags that define a run, and their names in a checkpoint's args: --resume takes them from the
# checkpoint and refuses a changed one (steps, minutes, logging, sampling and hardware may change)
RUN_FLAGS = dict(data="data", seed="seed", batch_size="batch_size", lr="lr", warmup="warmup",
                 grad_clip="grad_clip", ema_decay="ema_decay", dropout="dropout", ch="ch",
                 ch_mult="ch_mult", res_blocks="num_res_blocks", attn="attn",
                 group_size="group_size", T="T", beta_1="beta_1", beta_T="beta_T")
SAMPLERS = ("ancestral", "ddim", "dpm++2m")
SAMPLE_STEPS = {"ddim": 50, "dpm++2m": 20}  # default network calls of the few-step samplers
SPACING = "uniform"  # their default time grid


class FlagError(ValueError):
    """Flags that don't fit each other, the data or the checkpoint: a usage error (exit 2)."""


class CheckpointError(Exception):
    """A checkpoint that can't be used here; the message says why (exit 2)."""


def _flag(convert, ok, what):
    """An argparse type: convert(text), refused with `what` unless ok(value)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


POSITIVE_INT = _flag(int, lambda v: v >= 1, "an integer >= 1")
COUNT = _flag(int, lambda v: v >= 0, "an integer >= 0")
POSITIVE = _flag(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
# each step's generator is seeded by seed * 1_000_003 + step, which must stay inside 64 bits
SEED_MAX = 2 ** 62 // 1_000_003
SEED = _flag(int, lambda v: abs(v) <= SEED_MAX, f"an integer from -{SEED_MAX} to {SEED_MAX}")
LR = _flag(float, lambda v: 0 < v <= torch.finfo(torch.float32).max, "a number > 0 that fp32 holds")
OPEN_UNIT = _flag(float, lambda v: 0 < v < 1, "a number in (0, 1)")
UNIT = _flag(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
INT_LIST = _flag(lambda s: [int(v) for v in s.split(",") if v.strip()], lambda v: True,
                 "a comma-separated list of integers")


def build_parser():
    p = argparse.ArgumentParser(
        prog="ddpm.py", description="DDPM, annotated against the notes (python ddpm.py --train)")
    add = p.add_argument_group("what to do").add_argument
    add("--train", action="store_true",
        help="train (downloads the data set on first use)")
    add("--resume", action="store_true", help="continue training from OUT/ckpt.pt")
    add("--sample", type=POSITIVE_INT, metavar="N",
        help="write N samples from OUT/ckpt.pt to OUT/samples.png and OUT/samples.pt")
    add("--eval", action="store_true",
        help="the variational bound in bits/dim on the test split")
    add = p.add_argument_group("data and output").add_argument
    add("--data", default="mnist",
        help="mnist | fashion-mnist | cifar10 (downloaded), or a .pt/.npy tensor "
             "(N,H,W) or (N,C,H,W), uint8 in [0,255] or float in [0,1]")
    add("--data-dir", default="data",
        help="where downloaded data sets are kept (default ./data)")
    add("--out", default=os.path.join("runs", "ddpm"),
        help="the run's folder: checkpoint and samples (default runs/ddpm)")
    add("--seed", type=SEED, default=0,
        help="random seed (default 0); same seed, same samples")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu) or a torch device")
    add("--compile", action="store_true", help="torch.compile the model for training")
    add("--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32; on "
             "CUDA fp32 matmuls use TF32 (default auto)")
    add = p.add_argument_group(
        "optimisation (unset flags come from the GPU or CPU recipe)").add_argument
    add("--steps", type=COUNT,
        help="train until this many steps in all (with --minutes: whichever comes "
             "first)")
    add("--minutes", type=POSITIVE,
        help="train until this many minutes of training in all, counted across "
             "--resume (the final samples not included)")
    add("--batch-size", type=POSITIVE_INT, help="global batch size (split across ranks)")
    add("--lr", type=LR, help="Adam learning rate")
    add("--warmup", type=COUNT, help="linear learning-rate warm-up steps")
    add("--grad-clip", type=POSITIVE, default=1.0, help="gradient-norm clip (default 1)")
    add("--ema-decay", type=OPEN_UNIT,
        help="EMA decay of the weights (ramped up from 0.1 so short runs work)")
    add("--log-every", type=POSITIVE_INT, default=100,
        help="steps between progress lines (default 100)")
    add("--ckpt-every", type=POSITIVE_INT, default=1000,
        help="steps between checkpoints (default 1000)")
    add = p.add_argument_group("model size (U-Net; unset flags come from the recipe)").add_argument
    add("--ch", type=POSITIVE_INT, help="base width (the paper's CIFAR-10 model: 128)")
    add("--ch-mult", type=INT_LIST, help="width multiplier per resolution level, comma "
        "separated (CIFAR-10: 1,2,2,2; 28px takes at most 3 levels)")
    add("--res-blocks", type=POSITIVE_INT,
        help="residual blocks per level (CIFAR-10: 2)")
    add("--attn", type=INT_LIST, help="level indices with self-attention, '' for none "
        "(CIFAR-10: 1, the 16x16 level)")
    add("--dropout", type=UNIT, help="dropout in the residual blocks (CIFAR-10: 0.1)")
    add("--group-size", type=POSITIVE_INT, default=4,
        help="at least this many channels per GroupNorm group (default 4; 1 makes "
             "narrow layers instance norms, which hide the image's mean from the "
             "network)")
    add = p.add_argument_group("diffusion").add_argument
    add("--T", type=POSITIVE_INT, default=1000, help="diffusion steps T (default 1000)")
    add("--beta-1", type=OPEN_UNIT, default=1e-4, help="β_1 (default 1e-4)")
    add("--beta-T", type=OPEN_UNIT, default=0.02, help="β_T (default 0.02)")
    add = p.add_argument_group("sampling").add_argument
    add("--sampler", choices=SAMPLERS,
        help="ancestral (T network calls, the notes'), ddim or dpm++2m (--sample-steps "
             "calls) (default ddim: with η = 1, 50 calls, within 1.2x of the 1000-step "
             "samplers' quality at every training length in the README's measurements)")
    add("--sample-steps", type=POSITIVE_INT, help="network calls for ddim and dpm++2m "
        f"(default {SAMPLE_STEPS['ddim']} and {SAMPLE_STEPS['dpm++2m']})")
    add("--time-grid", choices=SPACINGS, default=SPACING,
        help="where ddim and dpm++2m evaluate the network: even in t, quadratic in t, "
             f"or even in log σ̄ (default {SPACING})")
    add("--ddim-steps", type=POSITIVE_INT,
        help="shorthand for --sampler ddim --sample-steps N")
    add("--var", choices=["beta_tilde", "beta"], default="beta_tilde",
        help="ancestral sampler variance σ_t^2 (default beta_tilde)")
    add("--clip-x0", action=argparse.BooleanOptionalAction, default=True,
        help="clip the predicted x_0 to [-1,1] while sampling (default on, as in the "
             "DDPM paper's code and diffusers; --no-clip-x0 samples as the notes do)")
    add("--eta", type=float, default=1.0,
        help="DDIM η >= 0: 1 draws fresh noise each step, as ancestral sampling does on "
             "the shorter chain; 0 is deterministic, Euler on the probability-flow ODE "
             "(default 1)")
    add("--final-samples", type=COUNT, default=64,
        help="samples written at the end of --train (default 64)")
    add = p.add_argument_group("evaluation").add_argument
    add("--eval-n", type=POSITIVE_INT, help="images to evaluate (default all)")
    add("--eval-t", type=POSITIVE_INT, help="t's drawn per image (default: every t)")
    add("--ode", action="store_true",
        help="with --eval: the bound by the probability-flow ODE")
    add("--ode-steps", type=POSITIVE_INT, default=ODE_STEPS,
        help="Heun steps from t=1 to T on a grid even in log σ̄ (default "
             f"{ODE_STEPS}: about {2 * ODE_STEPS} network calls per image)")
    add("--probes", type=POSITIVE_INT, default=1,
        help="Hutchinson probes per image (default 1)")
    return p


def parse(argv):
    p = build_parser()
    args = p.parse_args(argv)
    args.given = given_flags(argv)
    if not (args.train or args.sample or args.eval):
        p.error("nothing to do: give --train, --sample N or --eval")
    if args.beta_T < args.beta_1:
        p.error(f"--beta-T {args.beta_T} < --beta-1 {args.beta_1}: DDPM's betas increase with t")
    if args.eta < 0 or not math.isfinite(args.eta):
        p.error(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.ddim_steps is not None:
        if args.sampler not in (None, "ddim") or args.sample_steps not in (None, args.ddim_steps):
            p.error("--ddim-steps N is --sampler ddim --sample-steps N; give one or the other")
        args.sampler, args.sample_steps = "ddim", args.ddim_steps
    args.sampler = args.sampler or "ddim"
    if args.sampler == "ancestral" and args.sample_steps is not None:
        p.error("--sample-steps is for --sampler ddim or dpm++2m; the ancestral sampler takes T "
                "steps")
    if args.ode and not args.eval:
        p.error("--ode goes with --eval")
    if args.ode and args.ode_steps > args.T - 1:
        p.error(f"--ode-steps {args.ode_steps} > T - 1 = {args.T - 1}")
    return p, args


def main(argv=None):
    for stream in (sys.stdout, sys.stderr):  # σ, η, x̂ on a console that is not UTF-8: '?' instead
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    p, args = parse(argv)  # --help and the usage errors need this file alone
    try:
        import common
    except ModuleNotFoundError as e:  # the file copied without its companion
        if e.name != "common":
            raise
        p.exit(2, f"{p.prog}: error: needs common.py beside it (the U-Net and the data helpers; "
                  "README: copying into another project)\n")
    args.command = resume_command(argv)
    # SIGTERM (a cluster's preemption or time limit) and SIGHUP stop the program as Ctrl-C does:
    # training at a step boundary with a checkpoint (train), anything else at once, with no output
    # file half-written. A signal ignored at start (nohup) stays ignored.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.getsignal(s) for s in stop_signals() if s != signal.SIGINT}
        for s, handler in previous.items():
            if handler == signal.SIG_DFL:
                signal.signal(s, raise_interrupt)
    try:
        try:
            rank, world, device = setup_distributed(args.device)
        except RuntimeError as e:
            p.error(f"--device {args.device}: {e}")
        if args.train:
            train(args, rank, world, device)
        if (args.sample or args.eval) and rank == 0:
            ck = load_checkpoint(os.path.join(args.out, "ckpt.pt"))
            with fitting(os.path.join(args.out, "ckpt.pt")):
                model, sch = model_from_checkpoint(ck, device)
            if args.sample:
                write_samples(args, model, sch, device, args.sample)
            if args.eval:
                evaluate(args, model, sch, device, ck)
    except FlagError as e:
        p.error(str(e))
    except (common.DataError, CheckpointError, OSError) as e:  # the user's to fix: no usage block
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"{p.prog}: interrupted by {signal.Signals(signum).name}; no output file is left "
              "half-written", file=sys.stderr)
        raise SystemExit(128 + signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # gloo's threads must stop before the interpreter does, or a rank can abort at exit
            # ("terminate called without an active exception", pytorch#190489). The DDP wrapper
            # and its reducer sit in reference cycles: collect them first, while the interpreter
            # is whole, so no gloo work object outlives the group into interpreter shutdown
            gc.collect()
            torch.distributed.destroy_process_group()
    return 0


def stop_signals():
    """Ctrl-C, the scheduler's SIGTERM and, where there is one, SIGHUP (the terminal closed)."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def raise_interrupt(signum, frame):
    """SIGTERM or SIGHUP outside the training loop: stop as Ctrl-C does."""
    raise KeyboardInterrupt(signum)


def resume_command(argv):
    """The command that continues this run: its own command line plus --resume (torchrun's under
    torchrun; with several nodes, add your rendezvous flags)."""
    script, flags = ("ddpm.py", list(argv)) if argv is not None else (sys.argv[0], sys.argv[1:])
    flags += [] if "--resume" in flags else ["--resume"]
    launcher = ["python"]
    if "LOCAL_WORLD_SIZE" in os.environ:
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
        launcher = ["torchrun"] + (["--nnodes", str(world // local)] if world > local else [])
        launcher += ["--nproc_per_node", str(local)]
    return shlex.join(launcher + [script] + flags)


# ---- devices and precision


def pick_device(name="auto"):
    """The torch device for --device; on CUDA also lets fp32 matmuls use TF32 (what is left in fp32
    outside bf16 autocast, and everything under --precision fp32; cuDNN convolutions already do)."""
    if name == "auto":
        mps = getattr(torch.backends, "mps", None)
        name = ("cuda" if torch.cuda.is_available() else "mps" if mps and mps.is_available()
                else "cpu")
    device = torch.device(name)  # RuntimeError on a malformed string: main makes it a usage error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} asked for, but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
        torch.set_float32_matmul_precision("high")
    elif device.type != "cpu":  # mps, xpu, ...: torch.<type>.is_available() where torch has one
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        if not (hasattr(backend, "is_available") and backend.is_available()):
            raise RuntimeError(f"device {name!r} asked for, but it is not available here")
    return device


def use_bf16(device, precision="auto"):
    """bf16 autocast: on CUDA, and on CPUs with native bf16 (AVX512-BF16 or AMX), where it measured
    1.7x the fp32 training speed on 2 cores; never on other devices unless asked."""
    if precision != "auto":
        return precision == "bf16"
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return device.type == "cuda" or (device.type == "cpu" and probe is not None and bool(probe()))


def autocast(device, bf16):
    """bf16 autocast around the network (weights, optimiser and the samplers' arithmetic stay
    fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def setup_distributed(device_name="auto"):
    """(rank, world size, device). Under torchrun: the process group (NCCL on CUDA, else gloo), each
    rank on its LOCAL_RANK GPU. Otherwise rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def agree(flag, device):
    """Rank 0's flag, on every rank of a torchrun run (one broadcast)."""
    value = torch.tensor(float(flag), device=device)
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())


# ---- the recipe, the optimiser, the EMA


def fill_recipe(args, device):
    """Fill the flags left unset from the GPU or CPU recipe and say which one was used. The recipe's
    length (steps and/or minutes) applies only when neither --steps nor --minutes was given."""
    recipe = dict(GPU_RECIPE if device.type == "cuda" else CPU_RECIPE)
    length = {k: recipe.pop(k, None) for k in ("steps", "minutes")}
    if args.steps is None and args.minutes is None:
        args.steps, args.minutes = length["steps"], length["minutes"]
    for k, v in recipe.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    used = ", ".join(f"{k}={getattr(args, k)}" for k in ("steps", "minutes", *recipe)
                     if getattr(args, k) is not None)
    precision = "bf16 autocast" if use_bf16(device, args.precision) else "fp32"
    return f"{'GPU' if device.type == 'cuda' else 'CPU'} recipe: {used}, {precision}"


def unet_config(args, in_ch, image_size):
    return dict(in_ch=in_ch, ch=args.ch, ch_mult=list(args.ch_mult), num_res_blocks=args.res_blocks,
                attn=list(args.attn), dropout=args.dropout, image_size=image_size,
                group_size=args.group_size)


def make_optimizer(model, lr, warmup):
    """Adam with a linear warm-up of the learning rate over `warmup` steps (0: none); the recipes
    above give lr and warmup."""
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    opt = torch.optim.Adam(model.parameters(), lr=lr, **fused)
    # lr_k = lr min(1, (k+1)/warmup)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup) if warmup
                                             else 1.0)
    return opt, warm


def make_ema(model, decay):
    """EMA of the weights (torch.optim.swa_utils.AveragedModel), the decay ramped as min(decay,
    (1+n)/(10+n)) over the n updates so far, so that after a short CPU run the average is not
    dominated by the random initialisation (0.9999 needs ~10^4 steps to forget it)."""

    def ema_update(avg, cur, n):
        d = torch.clamp((1 + n) / (10 + n), max=decay)  # n is a device tensor: no host sync
        for a, c in zip(avg, cur):
            a.lerp_(c, (1 - d).to(a.dtype))

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update)


def clock(seconds):
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- the training loop (训练与推理)


def train(args, rank, world, device):
    import common
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ck = continue_run(args, ckpt_path, rank)
    if ck is None and args.steps == 0:
        if rank == 0:
            print("nothing to train: --steps 0 on a new run", flush=True)
        return
    # ---- data and model: every bad input is found here, before anything is written. Under torchrun
    # rank 0 alone downloads (and reports progress); the others then read its checked file.
    data, error = None, None
    if rank == 0:
        try:
            data = common.load_images(args.data, args.data_dir, "train")
        except common.DataError as e:
            error = e
    if world > 1 and not agree(error is None, device) and rank > 0:
        raise common.DataError(f"rank 0 could not load {args.data} (its message says why)")
    if error is not None:
        raise error
    if rank > 0:
        data = common.load_images(args.data, args.data_dir, "train")
    N, C, H, W = data.shape
    if H != W:
        raise common.DataError(f"{args.data}: images are {H}x{W}; the U-Net takes square images")
    if C not in (1, 3):
        raise common.DataError(f"{args.data}: {C} channels; the samples' PNG takes 1 (grey) or 3 "
                               "(RGB)")
    torch.manual_seed(args.seed)  # the initial weights, and dropout, follow --seed
    recipe = fill_recipe(args, device)
    if args.batch_size % world:
        raise FlagError(f"--batch-size {args.batch_size} does not split evenly over {world} ranks")
    cfg = unet_config(args, C, H)
    try:
        model = common.UNet(**cfg).to(device)
    except ValueError as e:  # a U-Net the flags describe can't be built for these images
        raise FlagError(str(e))
    sch = schedule(args.T, args.beta_1, args.beta_T, warn=False).to(device)
    ck_args = dict(kind="ddpm", **{k: v for k, v in cfg.items() if k != "dropout"}, T=args.T,
                   beta_1=args.beta_1, beta_T=args.beta_T, dropout=args.dropout, seed=args.seed,
                   data=args.data, data_id=data_id(args.data), steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                   grad_clip=args.grad_clip, ema_decay=args.ema_decay)
    lock = None  # rank 0 holds OUT/.lock while the run lasts (closed at the end, or by the OS)
    if rank == 0:
        check_writable(args.out)
        lock = lock_folder(args.out)
        print(f"{recipe}; {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters, "
              f"{N} images {C}x{H}x{W}; device {device}; "
              f"{world} process(es)", flush=True)
        if sch.alpha_bar[args.T] > ALPHA_BAR_T_MAX:  # schedule()'s warning, said once
            print(f"note: --T {args.T} with β from {args.beta_1} to {args.beta_T} leaves "
                  f"ᾱ_T = {sch.alpha_bar[args.T].item():.3g}: x_T is far from the N(0, I) that "
                  "sampling starts from", flush=True)
    data = data.to(device)  # the whole data set lives on the device: no DataLoader between steps
    opt, warm = make_optimizer(model, args.lr, args.warmup)
    ema = make_ema(model, args.ema_decay)
    step, seconds_before = 0, 0.0
    if ck is not None:  # everything as it was at the checkpoint: weights, Adam, warm-up, EMA, RNG
        check_same(ck["args"], ck_args, ckpt_path)
        with fitting(ckpt_path):
            model.load_state_dict(ck["model"])
            ema.module.load_state_dict(ck["ema"])
            ema.n_averaged.fill_(ck["ema_n"])
            opt.load_state_dict(ck["opt"])
            warm.load_state_dict(ck["sched"])
            set_rng_state(ck["rng"])
        step, seconds_before = ck["step"], ck.get("train_seconds", 0.0)
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {step}", flush=True)
    net = model
    if world > 1:  # DistributedDataParallel: backward() averages the gradients over the ranks
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    bf16 = use_bf16(device, args.precision)
    start, first_step = time.monotonic(), step

    def seconds():
        """Training seconds in all, this run and the runs before --resume."""
        return seconds_before + time.monotonic() - start

    def over(step):
        """Stop after this step? The --steps and --minutes budgets, or a signal. Under torchrun the
        ranks' clocks differ and a signal may reach one rank first: every 20 steps one all-reduce
        shares rank 0's clock and every rank's signal, so all ranks stop after the same step."""
        if args.steps is not None and step >= args.steps:
            return True
        time_up = args.minutes is not None and seconds() >= 60 * args.minutes
        if world == 1:
            return time_up or bool(signals)
        if step % 20:
            return False
        flags = torch.tensor([float(time_up and rank == 0), max(signals, default=0)], device=device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[1] > 0 and not signals:
            signals.append(int(flags[1]))
        return bool(flags.max() > 0)

    def save(step):
        """Rank 0 writes the checkpoint, unless a loss or gradient was non-finite (the last good
        file stays). Under torchrun every rank learns whether the write worked, so a full disk stops
        them all instead of leaving the others waiting in the next all-reduce."""
        error = None
        if rank == 0 and first_bad.item() < 0:
            try:
                save_checkpoint(ckpt_path, dict(
                    kind="ddpm", args=ck_args, step=step, train_seconds=seconds(),
                    model=model.state_dict(), opt=opt.state_dict(), sched=warm.state_dict(),
                    rng=rng_state(), ema=ema.module.state_dict(), ema_n=int(ema.n_averaged.item())))
            except OSError as e:
                error = e
        if world > 1 and not agree(error is None, device) and rank > 0:
            raise CheckpointError(f"rank 0 could not write {ckpt_path} (its message says why)")
        if error is not None:
            raise error

    # Ctrl-C (SIGINT), SIGTERM (a cluster's preemption or time limit) and SIGHUP set a flag read at
    # the step boundary, so a checkpoint never holds a half-applied step. The previous handler is
    # then back and a second signal acts at once; not under torchrun, whose agent passes the
    # terminal's signal on to every worker again. A signal ignored at start (nohup, `&`) stays
    # ignored.
    signals = []

    def on_signal(signum, frame):
        if not signals and world == 1:
            signal.signal(signum, previous[signum])
        signals.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.getsignal(s) for s in stop_signals()}
        for s, handler in previous.items():
            if handler != signal.SIG_IGN:
                signal.signal(s, on_signal)
    # the first step whose loss or gradient norm was NaN/inf, kept on the device (no host sync per
    # step); read with each progress line and before every checkpoint
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    lo, hi = rank * args.batch_size // world, (rank + 1) * args.batch_size // world
    model.train()
    done = over(step)
    try:
        # 训练与推理: x_0 ~ data, t ~ U{1..T}, ε ~ N(0, I), a gradient step on L_simple
        while not done:
            # the whole global batch is drawn from (seed, step), each rank takes its slice: after
            # --resume, or on every torchrun rank, step k sees what an uninterrupted process would
            gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
            idx = torch.randint(0, N, (args.batch_size,), device=device, generator=gen)[lo:hi]
            t = torch.randint(1, args.T + 1, (args.batch_size,), device=device,
                              generator=gen)[lo:hi]
            eps = torch.randn((args.batch_size, C, H, W), device=device, generator=gen)[lo:hi]
            x0 = common.to_range(data[idx], -1)
            with autocast(device, bf16):
                loss = loss_simple(net, sch, x0, t, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            warm.step()
            ema.update_parameters(model)
            step += 1
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            done = over(step)
            if step % args.log_every == 0 or done:
                if first_bad.item() >= 0:
                    break
                if rank == 0:
                    rate = (step - first_step) / max(time.monotonic() - start, 1e-9)
                    total = f"/{args.steps}" if args.steps is not None else ""
                    if args.minutes is not None:
                        budget = f"{clock(seconds())}/{clock(60 * args.minutes)}"
                    else:
                        budget = f"{clock(seconds())} ETA {clock((args.steps - step) / rate)}"
                    print(f"step {step}{total} loss {loss.item():.4g} "
                          f"lr {warm.get_last_lr()[0]:.4g} {rate:.2f} it/s {budget}", flush=True)
            if step % args.ckpt_every == 0 or done:
                save(step)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if first_bad.item() >= 0:
        raise SystemExit(f"error: non-finite loss or gradient at step {first_bad.item()}; training "
                         f"stopped. The last good checkpoint is {ckpt_path} (try a lower --lr, "
                         "check the data).")
    if signals:
        if rank == 0:
            print(f"interrupted by {signal.Signals(signals[0]).name} at step {step}; checkpoint "
                  f"written to {ckpt_path}. Resume with:\n  {args.command}", file=sys.stderr)
        raise SystemExit(128 + signals[0])
    if rank == 0:
        print(f"trained {step} steps, {seconds() / 60:.1f} minutes in all; checkpoint {ckpt_path}",
              flush=True)
    if rank == 0 and args.final_samples:
        ema.module.eval()
        write_samples(args, ema.module, sch, device, args.final_samples)
    if lock is not None:
        lock.close()


# ---- checkpoints: written whole or not at all, loaded without running code


def lock_folder(folder):
    """Hold an OS lock on folder/.lock for as long as the returned file stays open (fcntl.flock on
    POSIX, msvcrt.locking on Windows), with this process's pid and host in it for the message of the
    next one. The OS releases it when the process dies, however it dies: one run per folder."""
    import socket
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        if os.name == "nt":
            import msvcrt
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            f.seek(0)
            holder = f.read().strip()
        except OSError:
            holder = ""
        f.close()
        raise CheckpointError(f"{folder} is in use: {holder or 'another process'} is training into "
                              "it (one run per folder; give another --out, or wait for it to end)")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


def check_writable(folder):
    """Create the output folder and prove it can be written, before any training starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(f"output folder {folder} can't be written: {e.strerror or e}")


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, obj):
    """torch.save to a temporary file in the same folder, flush, fsync, then os.replace: a kill at
    any moment leaves the old file or the new one, never part of one. A full disk or an I/O
    error, at whichever layer, is one OSError naming `path`, the old file intact, no temporary file
    left."""
    import common
    if isinstance(obj, dict) and "kind" in obj:  # a checkpoint: its tensors' checksum goes along
        obj = {**obj, "checksum": tensor_checksum(obj)}
    tmp = common.temporary_name(path)
    try:
        with common.open_new(tmp) as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        common.fsync_folder(path)
    except (OSError, RuntimeError) as e:
        cause = e.__context__ if isinstance(e, RuntimeError) else e  # torch's zip writer wraps it
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, f"could not write {path}: {cause.strerror or cause}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tensor_checksum(obj):
    """CRC-32 of every tensor in a checkpoint, in a fixed order. torch's zip reader checks no CRCs,
    so without it a block zeroed or flipped inside a tensor would load without a word."""
    crc = 0

    def walk(x):
        nonlocal crc
        if isinstance(x, torch.Tensor):
            flat = x.detach().cpu().contiguous()
            if flat.numel():  # its bytes in one read (bytes(storage) would go byte by byte)
                raw = ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())
                crc = zlib.crc32(raw, crc)
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if k != "checksum":
                    walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(obj)
    return crc


def load_checkpoint(path):
    """A ddpm.py checkpoint as a dict: 'args' (plain values), 'model' and 'ema' state_dicts, 'step',
    'train_seconds', ... Loaded with weights_only=True: loading can't run code."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path} (train first with --train, or point --out "
                              "at the run's folder)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupt and can't be loaded "
                              f"({type(e).__name__}: {e})")
    if not isinstance(ck, dict) or "kind" not in ck or "model" not in ck:
        raise CheckpointError(f"{path} is not a checkpoint written by these scripts")
    if ck["kind"] != "ddpm":
        raise CheckpointError(f"{path} is a {ck['kind']}.py checkpoint, not a ddpm.py one")
    if "checksum" in ck and tensor_checksum(ck) != ck["checksum"]:  # (written before: not checked)
        raise CheckpointError(f"{path} is corrupt: its tensors do not match the checksum written "
                              "with them")
    return ck


def given_flags(argv):
    """The flags on the command line, by their dest, as opposed to those left at their defaults."""
    bare = build_parser()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def data_id(data):
    """--data as the run knows it: a file's resolved path, or a data set's name."""
    return os.path.realpath(data) if os.path.exists(data) else data


def continue_run(args, ckpt_path, rank=0):
    """The checkpoint that --train continues, or None for a new run. A trained run is never started
    again over itself: without --resume its folder is refused. With --resume the flags that define
    the run (RUN_FLAGS) come from the checkpoint unless given, and a given one that differs is
    refused: the run would no longer be the one the checkpoint holds."""
    if not os.path.isfile(ckpt_path):  # (a folder in its place fails at the first write)
        if args.resume and rank == 0:
            print(f"--resume: no checkpoint at {ckpt_path}; starting a new run", flush=True)
        return None
    ck = load_checkpoint(ckpt_path)
    if not args.resume:
        raise CheckpointError(
            f"{ckpt_path} holds a run trained to step {ck.get('step', '?')}; --train would start "
            "it again from scratch and write over it. Continue it with --resume, start another run "
            f"with another --out, or delete {ckpt_path} to start this one again")
    saved = {**OLDER, **ck["args"]}
    given = getattr(args, "given", None)
    diff = []
    for flag, key in RUN_FLAGS.items():
        if key not in saved:  # a checkpoint from before the flag was stored: today's default
            continue
        was = saved.get("data_id", saved[key]) if flag == "data" else saved[key]
        if given is not None and flag not in given:
            setattr(args, flag, was)
            continue
        now = getattr(args, flag)
        if (data_id(now) != data_id(was)) if flag == "data" else (now != was):
            diff.append(f"--{flag.replace('_', '-')}: checkpoint {was!r}, now {now!r}")
    if diff:
        raise CheckpointError(
            f"--resume continues the run in {ckpt_path}, and these flags would change it:\n  "
            + "\n  ".join(diff) + "\nleave them out to continue the run as it was, or give another "
            "--out for a new run")
    return ck


def check_same(saved, now, path):
    """Refuse to resume when the model or data shape differs from the checkpoint's, naming each
    difference (OLDER: what checkpoints written before a key existed used)."""
    saved = {**OLDER, **saved}
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in MODEL_KEYS
            if saved.get(k) != now[k]]
    if diff:
        raise CheckpointError(f"{path} was trained with a different model or data shape:\n  "
                              + "\n  ".join(diff))


@contextlib.contextmanager
def fitting(path):
    """Loading a checkpoint that another version of the script wrote: a key it lacks, or a tensor of
    another shape, is one message naming it (exit 2)."""
    try:
        yield
    except KeyError as e:
        raise CheckpointError(f"{path} does not fit this version of the script: it has no {e}")
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this version of the script: {e}")


def model_from_checkpoint(ck, device):
    """The EMA network and the schedule of a checkpoint, ready to sample."""
    import common
    saved = {**OLDER, **ck["args"]}
    model = common.UNet(in_ch=saved["in_ch"], ch=saved["ch"], ch_mult=saved["ch_mult"],
                        num_res_blocks=saved["num_res_blocks"], attn=saved["attn"], dropout=0.0,
                        image_size=saved["image_size"], group_size=saved["group_size"])
    model.load_state_dict(ck["ema"])
    return model.to(device).eval(), schedule(saved["T"], saved["beta_1"], saved["beta_T"],
                                             warn=False)


# ---- sampling, --eval


def network_calls(args, sch):
    """The sampler's number of network calls: T for ancestral sampling, else --sample-steps (default
    50 for DDIM, 20 for DPM-Solver++, at most the checkpoint's T)."""
    if args.sampler == "ancestral":
        return sch.T
    if args.sample_steps is None:
        return min(SAMPLE_STEPS[args.sampler], sch.T)
    if args.sample_steps > sch.T:
        raise FlagError(f"--sample-steps {args.sample_steps} > T = {sch.T} of the model")
    return args.sample_steps


def draw(args, model, sch, device, n, generator, callback=None):
    """n samples in [-1, 1] with the sampler the flags choose; every sampler draws x_T first from
    `generator`."""
    shape = (n, model.in_ch, model.image_size, model.image_size)
    steps = network_calls(args, sch)
    # the network in bf16 where enabled; the samplers' updates stay fp32
    with autocast(device, use_bf16(device, args.precision)):
        if args.sampler == "ddim":
            return ddim_sample(model, sch, shape, steps, args.eta, args.clip_x0, generator,
                               callback, device=device, spacing=args.time_grid)
        if args.sampler == "dpm++2m":
            return dpm_solver_sample(model, sch, shape, steps, args.clip_x0, generator, callback,
                                     device=device, spacing=args.time_grid)
        return sample(model, sch, shape, args.var, args.clip_x0, generator, callback, device=device)


def write_samples(args, model, sch, device, n):
    import common
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.time()
    steps = network_calls(args, sch)
    every = max(1, steps // 10)

    def report(k, t, x):
        if (k + 1) % every == 0:
            print(f"{args.sampler} step {k + 1}/{steps} (t = {t})", file=sys.stderr, flush=True)

    x = draw(args, model, sch, device, n, gen, report)
    png, pt = os.path.join(args.out, "samples.png"), os.path.join(args.out, "samples.pt")
    x01 = (x.clamp(-1, 1) + 1) / 2
    common.write_png(png, x01)
    save_checkpoint(pt, x01.detach().float().cpu())
    how = f", η = {args.eta:g}" if args.sampler == "ddim" else ""
    how += f", {args.time_grid} time grid" if args.sampler != "ancestral" else ""
    print(f"wrote {png} and {pt} ({n} samples, {args.sampler} with {steps} network calls{how}"
          f"{', x̂_0 clipped' if args.clip_x0 else ''}, {time.time() - start:.1f}s)")


def evaluate(args, model, sch, device, ck):
    import common
    x = common.load_images(args.data, args.data_dir, split="test")
    if x.shape[1:] != (model.in_ch, model.image_size, model.image_size):
        raise common.DataError(f"{args.data}: images {tuple(x.shape[1:])} but the model takes "
                               f"{(model.in_ch, model.image_size, model.image_size)}")
    x = x[:args.eval_n] if args.eval_n else x
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start, bpds, ses = time.time(), [], []
    chunk = 100 if not args.ode else 25
    D = x[0].numel()
    for k in range(0, len(x), chunk):
        x0 = common.to_range(x[k:k + chunk], -1).to(device)
        if args.ode:
            est = ode_bound(model, sch, x0, args.ode_steps, args.probes, args.var, gen)
            est = est / (D * math.log(2))  # bits/dim
            bpd = est.mean(0)  # est: (probes, B)
            se = (est.std(0) / math.sqrt(args.probes) if args.probes > 1
                  else torch.full_like(bpd, float("nan")))
        else:
            bpd, se = nll_bits_per_dim(model, sch, x0, args.eval_t, args.var, generator=gen)
        bpds.append(bpd.cpu())
        ses.append(se.cpu() if se is not None else torch.zeros_like(bpd.cpu()))
        print(f"eval {min(k + chunk, len(x))}/{len(x)} images, running bits/dim "
              f"{torch.cat(bpds).mean():.4f}", file=sys.stderr)
    bpd = torch.cat(bpds)
    # the spread over images already holds the noise of each image's estimate (x_t draws, the drawn
    # t's with --eval-t, the probes with --ode); for a single image only its own standard error
    # is left
    se = (bpd.std() / math.sqrt(len(bpd))).item() if len(bpd) > 1 else torch.cat(ses)[0].item()
    if args.ode:
        nodes, calls = len(ode_grid(sch, args.ode_steps)), ode_calls(sch, args.ode_steps)
        where = "every integer t" if nodes == sch.T else f"{nodes} nodes even in log σ̄"
        how = (f"probability-flow ODE, {where}, {calls} network calls and {args.probes} probe(s) "
               "per image")
    else:
        how = "every t" if args.eval_t is None else f"{args.eval_t} t per image"
    secs = time.time() - start
    # per image, for paired comparisons between runs on the same images (the same seed draws the
    #   same x_t,
    # t's and probes)
    save_checkpoint(os.path.join(args.out, "eval.pt"),
                    dict(bits_per_dim=bpd, how=how, step=ck["step"]))
    print(f"{'ODE bound' if args.ode else 'bound'}: {bpd.mean():.4f} ± {se:.4f} bits/dim on "
          f"{len(bpd)} images of {args.data} (test), {how}, var={args.var}, step {ck['step']}, "
          f"{secs:.1f}s "
          f"({secs / len(bpd):.2f}s per image); per image in {os.path.join(args.out, 'eval.pt')}")


if __name__ == "__main__":
    sys.exit(main())
