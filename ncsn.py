"""NCSN (Song & Ermon 2019), annotated against the notes' sections "Gradient model" and "条件实例归一化",
then the variance-exploding SDE view of the notes' empty SDE section (a predictor-corrector
sampler), then the command line.

    python ncsn.py --train                  # MNIST in [0, 1], runs/ncsn (15 minutes on a CPU)
    python ncsn.py --sample 64              # predictor-corrector, 400 calls -> samples.png
    python ncsn.py --sample 64 --sampler annealed --langevin-steps 100 --step-size 2e-5
                                            # the notes' Algorithm 1, 1,000 calls

A score network s_θ(x, i) ≈ ∇_x log p_{σ_i}(x) is trained by denoising score matching at L noise
levels σ_1 > ... > σ_L, then sampled by annealed Langevin dynamics. The network is the U-Net of
common.py with its time embedding off, conditioned on the level i = 1..L through conditional
instance norm++ in every norm layer. Everything above the command-line banner needs only torch, and
ScoreNet common.UNet; the samplers take any score function score_fn(x, i).
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
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

# ==================================================================================================
# Gradient model: the score, Langevin dynamics, noise levels, denoising score matching, Algorithm 1


def score(log_density, x):
    """∇_x log p(x) by autograd, for any log-density known up to a constant.

    Gradient model: p(x) = exp(-f(x)) / ∫ exp(-f(t)) dt, so the normalising integral does not depend
    on x and drops out of the score; log_density may therefore be -f(x), unnormalised.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        # Gradient model: ∇_x log p(x) = -∇_x f(x) - ∇_x log ∫ exp(-f(t)) dt = -∇_x f(x)
        return torch.autograd.grad(log_density(x).sum(), x)[0]


@torch.no_grad()
def langevin(score_fn, x, step_size, T, generator=None):
    """Plain Langevin dynamics: T steps t = 0..T-1 from the chain's start x = x_0, each
    x + ε s(x) + sqrt(2ε) z with ε = step_size (the notes' ε in Gradient model). Here T counts
    Langevin steps and x_0 is the chain's start, as in the notes' Gradient model section; in ddpm.py
    T is the diffusion's length and x_0 the data. Algorithm 1 (annealed_langevin) takes its step in
    another form: the same step_size there moves half as far at the last level.

    NOTES ERROR (Gradient model): the notes write ε s_θ(x) with no index; the score is evaluated at
    the current state x_t (evaluated at a fixed x the update would be a random walk with a constant
    drift).
    """
    for _ in range(T):
        z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        # Gradient model: x_{t+1} = x_t + ε s(x_t) + sqrt(2ε) z_t,  z_t ~ N(0, I), ε = step_size
        x = x + step_size * score_fn(x) + math.sqrt(2 * step_size) * z
    return x


def geometric_sigmas(sigma_1=1.0, sigma_L=0.01, L=10):
    """σ_1 > σ_2 > ... > σ_L, a geometric sequence: every ratio σ_i / σ_{i+1} is the same,
    (σ_1/σ_L)^{1/(L-1)}.

    Returned as a float64 tensor of length L+1 indexed by the notes' i = 1..L; index 0 holds σ_0 = 0
    (clean data). NOTES ERROR (Gradient model): the notes write σ_1/σ_2 > σ_2/σ_3 > ... >
    σ_{L-1}/σ_L > 1, strictly decreasing ratios, and call it a geometric series. A geometric
    sequence has equal ratios (NCSN, Sec. 4.2), which spaces the levels evenly in log σ so that
    consecutive perturbed distributions overlap equally.
    """
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    if not (sigma_1 > 0 and sigma_L > 0):
        raise ValueError(f"sigmas must be > 0, got sigma_1={sigma_1}, sigma_L={sigma_L}")
    if L > 1 and not sigma_1 > sigma_L:
        raise ValueError(f"sigma_1 ({sigma_1}) must exceed sigma_L ({sigma_L})")
    sig = torch.zeros(L + 1, dtype=torch.float64)
    # Gradient model (NCSN Sec. 4.2): log σ_i evenly spaced from log σ_1 to log σ_L, so σ_i/σ_{i+1}
    # is the same for every i
    sig[1:] = (torch.logspace(math.log10(sigma_1), math.log10(sigma_L), L, dtype=torch.float64)
               if L > 1 else sigma_1)
    return sig


def dsm_target(x_tilde, x, sigma):
    """The score of the perturbation kernel p_σ(x̃|x) = N(x, σ^2 I) at x̃."""
    # Gradient model: ∇_x̃ log p_σ(x̃|x) = ∇_x̃ [-||x̃ - x||^2 / (2σ^2)] = -(x̃ - x)/σ^2
    #   (= -ε/σ for x̃ = x + σε)
    return -(x_tilde - x) / sigma ** 2


def dsm_loss(score_model, x, sigmas, generator=None, i=None, eps=None):
    """The conditional score network's loss, one level i ~ U{1..L} per example: the sum over
    dimensions, the mean over examples (drawing i uniformly is the notes' sum over i divided by L).

    NOTES ERROR (Gradient model): the notes evaluate the network at the clean x, s_θ(x, i), in every
    loss from E||s_θ(x) - ∇_x̃ log p_σ(x̃|x)||^2 on. Denoising score matching evaluates it at the
    perturbed x̃: the target depends on x̃, and s_θ(·, i) must estimate the score of the perturbed
    density p_{σ_i}(x̃) where the sampler uses it. At the clean x the network never sees the inputs
    it gets while sampling.
    """
    B = x.shape[0]
    L = len(sigmas) - 1
    if i is None:
        i = torch.randint(1, L + 1, (B,), device=x.device, generator=generator)
    if eps is None:
        eps = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    sigma = sigmas.to(x.device)[i].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    # Gradient model: x̃ = x + σ_i ε,  ε ~ N(0, I)
    x_tilde = x + sigma * eps
    s_theta = score_model(x_tilde, i).float()
    # Gradient model: λ(σ_i) ||s_θ(x̃, i) + ε/σ_i||^2 with λ(σ_i) = σ_i^2,
    #   i.e. ||σ_i s_θ(x̃, i) + ε||^2
    return ((sigma * s_theta + eps) ** 2).flatten(1).sum(1).mean()


@torch.no_grad()
def annealed_langevin(score_fn, x, sigmas, step_size=2e-5, T=100, denoise=False, generator=None,
                      trace=None):
    """Algorithm 1 of the notes (NCSN): for each level i = 1..L, T Langevin steps of size α_i.

    step_size is Algorithm 1's ε: each step is x + α_i/2 s + sqrt(α_i) z with α_i = ε σ_i^2/σ_L^2,
    which is langevin()'s step with its step_size = α_i/2, so at the last level (α_L = ε) the same
    number moves half as far as in langevin(). T is Algorithm 1's number of steps per level. `x` is
    the start (the CLI and the notes draw it from the uniform distribution on [0, 1]); score_fn(x,
    i) is a network or an exact score. The default 2e-5 is the NCSN paper's ε in this form; NCSN's
    released code applies its step_lr = 2e-5 as x + step_lr σ_i^2/σ_L^2 s + sqrt(2 step_lr
    σ_i^2/σ_L^2) z, which is step_size = 4e-5 here (α_i = 2 step_lr σ_i^2/σ_L^2). denoise=True
    ends with x + σ_L^2 s(x, L) (Tweedie's formula; the improved NCSN paper's final step). trace:
    an optional list that receives x after each level. L·T network calls (+1 with denoise).
    """
    L = len(sigmas) - 1
    sig = sigmas.tolist()
    B = x.shape[0]
    for i in range(1, L + 1):
        # Algorithm 1, line 3: α_i = ε σ_i^2 / σ_L^2
        level_step = step_size * sig[i] ** 2 / sig[L] ** 2
        level = torch.full((B,), i, device=x.device, dtype=torch.long)
        for _ in range(T):
            z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            # Algorithm 1, line 6: x̃_t = x̃_{t-1} + α_i/2 s_θ(x̃_{t-1}, σ_i) + sqrt(α_i) z_t
            x = x + level_step / 2 * score_fn(x, level).to(x.dtype) + math.sqrt(level_step) * z
        if trace is not None:
            trace.append(x.clone())
    return _denoise(score_fn, x, sig, L) if denoise else x


def _denoise(score_fn, x, sig, L):
    level = torch.full((x.shape[0],), L, device=x.device, dtype=torch.long)
    # Tweedie: E[x | x̃] = x̃ + σ_L^2 ∇ log p_{σ_L}(x̃)
    return x + sig[L] ** 2 * score_fn(x, level).to(x.dtype)


# ==================================================================================================
# 条件实例归一化 (conditional instance norm++) and the score network


class CondInstanceNorm2dPlus(nn.Module):
    """Conditional instance norm++, called as norm(x, i) with i in 1..L.

    u_c, Φ_c are the spatial mean and standard deviation of channel c; m, v the mean and standard
    deviation of u over channels. γ, β, α are learnt per level i; initialised as in NCSN's code
    (γ, α ~ N(1, 0.02), β = 0). With α = 0 and the same γ, β for every level this is instance norm.
    `stabilizer` is added to each variance before the square root (torch's norms call it eps).
    NOTES ERROR (条件实例归一化): the notes call "γ, Φ ∈ R^C" the learnable parameters. Φ is the measured
    standard deviation, not a parameter; the learnable pair is γ (scale) and β (shift).
    """

    def __init__(self, num_features, num_levels, stabilizer=1e-5):
        super().__init__()
        self.stabilizer = stabilizer
        self.gamma = nn.Parameter(1 + 0.02 * torch.randn(num_levels, num_features))
        self.alpha = nn.Parameter(1 + 0.02 * torch.randn(num_levels, num_features))
        self.beta = nn.Parameter(torch.zeros(num_levels, num_features))

    def forward(self, x, i):
        # 条件实例归一化: u_c = 1/HW Σ_{h,w} x[c,h,w]
        u = x.mean(dim=(2, 3), keepdim=True)
        # 条件实例归一化: m, v = the mean and standard deviation of u_1..u_C
        v2, m = torch.var_mean(u, dim=1, keepdim=True, unbiased=False)
        v = (v2 + self.stabilizer).sqrt()
        # level i's rows of γ, β, α (the parameters keep the norm's names, so checkpoints load)
        scale, shift, mean_gain = (p[i - 1][:, :, None, None]
                                   for p in (self.gamma, self.beta, self.alpha))
        # 条件实例归一化: (x[c,h,w] - u_c)/Φ_c, Φ_c = sqrt(1/HW Σ_{h,w} (x[c,h,w] - u_c)^2): group
        # norm with one channel per group is instance norm, and torch's fused kernel (forward and
        # backward) is 2.6x faster on a CPU than writing it term by term (README: score model)
        x_hat = F.group_norm(x, x.shape[1], eps=self.stabilizer)
        # 条件实例归一化: y[c,h,w] = γ[i,c] (x[c,h,w] - u_c)/Φ_c + β[i,c] + α[i,c] (u_c - m)/v
        return torch.addcmul(shift + mean_gain * (u - m) / v, x_hat, scale)


class ScoreNet(nn.Module):
    """s_θ(x, i) = U-Net(x, i) / σ_i, every norm layer of the U-Net a CondInstanceNorm2dPlus keyed
    by i.

    Dividing by σ_i (improved NCSN, Song & Ermon 2020) lets the network output O(1) values at every
    level: the target -ε/σ_i has norm ~ sqrt(D)/σ_i, a 100-fold spread between σ_1 = 1 and σ_L =
    0.01.
    """

    def __init__(self, sigmas, **unet):
        import common  # the U-Net: the one thing above the command line that common.py provides
        super().__init__()
        L = len(sigmas) - 1
        self.unet = common.UNet(**unet, time_embed=False,
                                norm=lambda ch: CondInstanceNorm2dPlus(ch, L))
        self.register_buffer("sigmas", sigmas.float())
        self.in_ch, self.image_size = self.unet.in_ch, self.unet.image_size

    def forward(self, x, i):
        # improved NCSN: s_θ(x, i) = U-Net(x, i) / σ_i
        return self.unet(x, i) / self.sigmas[i].reshape(-1, 1, 1, 1).to(x.dtype)


# ==================================================================================================
# Beyond the notes: the variance-exploding SDE view (the notes' empty SDE section; Song et al. 2021,
# "Score-Based Generative Modeling through Stochastic Differential Equations", cited as [SDE])
#
# [SDE] eq. 9 and 30: NCSN's levels are samples of σ(τ) = σ_min (σ_max/σ_min)^τ, τ ∈ [0, 1]
#   (ve_sigma), and perturbing data with N(0, σ_i^2 I) is the variance-exploding SDE
#   dx = sqrt(d[σ^2(τ)]/dτ) dw run to τ_i.
# Annealed Langevin dynamics (Algorithm 1) is a corrector alone: at each level it moves towards
# p_{σ_i} by Langevin steps, and lets the next level start where this one ends. [SDE] Algorithm 2
# adds a predictor: a step of the reverse-time SDE from σ_{i-1} down to σ_i before the corrector
# steps (pc_sample). Conditional instance norm++ is a table over i = 1..L, so the network only
# exists at the trained levels: the sampler below stays on them.


def ve_sigma(tau, sigma_min=0.01, sigma_max=1.0):
    """The variance-exploding SDE's noise scale at τ ∈ [0, 1]; σ_i = ve_sigma((L - i)/(L - 1))."""
    # [SDE] eq. 30: σ(τ) = σ_min (σ_max/σ_min)^τ
    return sigma_min * (sigma_max / sigma_min) ** tau


def ve_diffusion_squared(tau, sigma_min=0.01, sigma_max=1.0):
    """g(τ)^2 of the VE SDE dx = g(τ) dw."""
    # [SDE] eq. 30: g(τ)^2 = d[σ^2(τ)]/dτ = 2 σ(τ)^2 log(σ_max/σ_min)
    return 2 * ve_sigma(tau, sigma_min, sigma_max) ** 2 * math.log(sigma_max / sigma_min)


@torch.no_grad()
def pc_sample(score_fn, x, sigmas, corrector_steps=1, snr=0.16, denoise=False, generator=None,
              trace=None):
    """Predictor-corrector sampling on the trained levels ([SDE] Algorithm 2 with the VE SDE: the
    reverse-diffusion predictor of eq. 46, the VE corrector of Algorithm 4).

    From the start x (Algorithm 1's uniform draw), level by level: for i >= 2 a reverse-diffusion
    predictor step from σ_{i-1} to σ_i, then `corrector_steps` Langevin corrector steps at σ_i,
    each x + step_size s + sqrt(2 step_size) z as in langevin() ([SDE] calls it ε). Its
    step_size = 2 (r ||z|| / ||s||)^2 fixes the ratio of the step's drift to its noise,
    ||step_size s|| / ||sqrt(2 step_size) z|| = r = snr (norms averaged over the batch, as [SDE]'s
    code does).
    Level 1 has no level above it: the corrector alone. Network calls: (L - 1) + L·corrector_steps
    (+1 with denoise), against L·T for Algorithm 1. trace receives x after each level.
    """
    L = len(sigmas) - 1
    sig = sigmas.tolist()
    B = x.shape[0]
    for i in range(1, L + 1):
        if i > 1:
            prev = torch.full((B,), i - 1, device=x.device, dtype=torch.long)
            z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            drop = sig[i - 1] ** 2 - sig[i] ** 2
            # [SDE] eq. 46 for the VE SDE:
            #   x_i = x_{i-1} + (σ_{i-1}^2 - σ_i^2) s_θ(x_{i-1}, σ_{i-1})
            #         + sqrt(σ_{i-1}^2 - σ_i^2) z
            x = x + drop * score_fn(x, prev).to(x.dtype) + math.sqrt(drop) * z
        level = torch.full((B,), i, device=x.device, dtype=torch.long)
        for _ in range(corrector_steps):
            s = score_fn(x, level).to(x.dtype)
            z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            # [SDE] Algorithm 4 (its ε is step_size): ε = 2 (r ||z||_2 / ||s_θ||_2)^2, each norm
            #   averaged over the batch
            z_norm, s_norm = z.flatten(1).norm(dim=1).mean(), s.flatten(1).norm(dim=1).mean()
            step_size = 2 * (snr * z_norm / s_norm) ** 2
            # [SDE] Algorithm 4: x ← x + ε s_θ(x, σ_i) + sqrt(2ε) z,  ε = step_size
            x = x + step_size * s + (2 * step_size).sqrt() * z
        if trace is not None:
            trace.append(x.clone())
    return _denoise(score_fn, x, sig, L) if denoise else x


# ==================================================================================================
# Command line: recipes and flags, the training loop, sampling
#
# Nothing above this banner needs it but ScoreNet. It takes the U-Net, the data and the PNG writer
# from common.py, imported in the functions that use them.

# GPU: NCSN's Adam 1e-3, batch 128
GPU_RECIPE = dict(steps=100_000, batch_size=128, lr=1e-3, warmup=0, ema_decay=0.999,
                  ch=32, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0)
# CPU: ddpm.py's CPU recipe, whose lessons carry over (README: score model), but batch 64: a
# 16-channel U-Net (4x fewer MACs than the GPU one, so 4x the steps in the same time), lr 1.5e-3,
# the EMA ramped by the step count; 15 minutes of training, nothing depending on how long it runs.
# Batch 64 sees 1.2x (AVX2) to 1.3x (AVX512) the images per second of batch 32 on 2 EPYC cores and
# gave the better digits in the same minutes (README: a second judge on the AVX2 path)
CPU_RECIPE = dict(minutes=15, batch_size=64, lr=1.5e-3, warmup=100, ema_decay=0.999,
                  ch=16, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0)
MODEL_KEYS = ("kind", "in_ch", "image_size", "ch", "ch_mult", "num_res_blocks", "attn", "sigma_1",
              "sigma_L", "levels")
OLDER = {}  # what checkpoints written before a key existed used (none so far)
# the flags that define a run, and their names in a checkpoint's args: --resume takes them from the
# checkpoint and refuses a changed one (steps, minutes, logging, sampling and hardware may change)
RUN_FLAGS = dict(data="data", seed="seed", batch_size="batch_size", lr="lr", warmup="warmup",
                 grad_clip="grad_clip", ema_decay="ema_decay", dropout="dropout", ch="ch",
                 ch_mult="ch_mult", res_blocks="num_res_blocks", attn="attn", sigma_1="sigma_1",
                 sigma_L="sigma_L", levels="levels")


class FlagError(ValueError):
    """Flags that don't fit each other, the data or the checkpoint: a usage error (exit 2)."""


class Renamed(argparse.Action):
    """The old spelling of a renamed flag: a usage error that names the new one."""

    def __init__(self, option_strings, dest, new, **kw):
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.new} (same meaning, same numbers)")


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
        prog="ncsn.py",
        description="NCSN score model, annotated against the notes (python ncsn.py --train)")
    add = p.add_argument_group("what to do").add_argument
    add("--train", action="store_true",
        help="train (downloads the data set on first use)")
    add("--resume", action="store_true", help="continue training from OUT/ckpt.pt")
    add("--sample", type=POSITIVE_INT, metavar="N",
        help="write N samples from OUT/ckpt.pt to OUT/samples.png and OUT/samples.pt")
    add = p.add_argument_group("data and output").add_argument
    add("--data", default="mnist",
        help="mnist | fashion-mnist | cifar10 (downloaded), or a .pt/.npy tensor "
             "(N,H,W) or (N,C,H,W), uint8 in [0,255] or float in [0,1]")
    add("--data-dir", default="data",
        help="where downloaded data sets are kept (default ./data)")
    add("--out", default=os.path.join("runs", "ncsn"),
        help="the run's folder: checkpoint and samples (default runs/ncsn)")
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
    add("--ch", type=POSITIVE_INT, help="base width")
    add("--ch-mult", type=INT_LIST, help="width multiplier per resolution level, comma "
        "separated (28px takes at most 3 levels)")
    add("--res-blocks", type=POSITIVE_INT, help="residual blocks per level")
    add("--attn", type=INT_LIST, help="level indices with self-attention, '' for none")
    add("--dropout", type=UNIT, help="dropout in the residual blocks")
    add = p.add_argument_group("noise levels and sampling (NCSN's MNIST settings)").add_argument
    add("--sigma-1", type=POSITIVE, default=1.0,
        help="largest noise level σ_1 (default 1.0)")
    add("--sigma-L", type=POSITIVE, default=0.01,
        help="smallest noise level σ_L (default 0.01)")
    add("--levels", type=POSITIVE_INT, default=10,
        help="L, the number of levels (default 10)")
    # The CLI's sampling defaults were chosen by measurement on a 15-minute CPU checkpoint (README:
    # score model): among Algorithm 1 at T = 20/40/80 steps per level and predictor-corrector at
    # M = 19/39/79 corrector steps, each at several step sizes, with and without the final
    # denoising step, from either start, the lowest Fréchet distance was predictor-corrector with
    # M = 39, r = 0.35, denoised, from the uniform start: 400 network calls. Algorithm 1's own
    # defaults are its best setting at the same calls (T = 40, step size ε = 5e-5); the notes'
    # T = 100, ε = 2e-5 (the NCSN paper's; its released code's step is ε = 4e-5 in this form) stay
    # the defaults of annealed_langevin().
    add("--sampler", choices=["annealed", "pc"], default="pc",
        help="annealed: Algorithm 1 (L·T network calls); pc: predictor-corrector "
             "(L-1 + L·M calls) (default pc)")
    add("--langevin-steps", type=POSITIVE_INT, default=40,
        help="T of Algorithm 1, steps per level (default 40; the notes' is 100)")
    add("--step-size", type=POSITIVE, default=5e-5,
        help="annealed: Algorithm 1's ε, each step α_i/2 s + sqrt(α_i) z with α_i = ε σ_i^2/σ_L^2 "
             "(default 5e-5; the notes' is 2e-5)")
    add("--langevin-eps", action=Renamed, nargs="?", help=argparse.SUPPRESS, new="--step-size")
    add("--corrector-steps", type=POSITIVE_INT, default=39,
        help="pc: M, Langevin corrector steps per level (default 39)")
    add("--snr", type=POSITIVE, default=0.35,
        help="pc: the corrector's signal-to-noise ratio r (default 0.35; [SDE]'s is "
             "0.16)")
    add("--start", choices=["uniform", "gaussian"], default="uniform",
        help="where sampling starts: uniform on [0, 1] (the notes' Algorithm 1) or "
             "N(0, σ_1^2 I) (the VE SDE's prior) (default uniform)")
    add("--denoise", action=argparse.BooleanOptionalAction, default=True,
        help="end sampling with x + σ_L^2 s_θ(x, L) (default on)")
    add("--strip", action="store_true",
        help="with --sample: also write the chain after each level (chain.png)")
    add("--final-samples", type=COUNT, default=64,
        help="samples written at the end of --train (default 64)")
    return p


def parse(argv):
    p = build_parser()
    args = p.parse_args(argv)
    args.given = given_flags(argv)
    if not (args.train or args.sample):
        p.error("nothing to do: give --train or --sample N")
    if args.levels > 1 and args.sigma_1 <= args.sigma_L:
        p.error(f"--sigma-1 {args.sigma_1} must exceed --sigma-L {args.sigma_L}")
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
        if args.sample and rank == 0:
            ck = load_checkpoint(os.path.join(args.out, "ckpt.pt"))
            with fitting(os.path.join(args.out, "ckpt.pt")):
                model, sigmas = model_from_checkpoint(ck, device)
            write_samples(args, model, sigmas, device, args.sample, args.strip)
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
    script, flags = ("ncsn.py", list(argv)) if argv is not None else (sys.argv[0], sys.argv[1:])
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
                attn=list(args.attn), dropout=args.dropout, image_size=image_size)


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


# ---- the training loop (Gradient model: denoising score matching)


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
    sigmas = geometric_sigmas(args.sigma_1, args.sigma_L, args.levels)
    cfg = unet_config(args, C, H)
    try:
        model = ScoreNet(sigmas, **cfg).to(device)
    except ValueError as e:  # a U-Net the flags describe can't be built for these images
        raise FlagError(str(e))
    ck_args = dict(kind="ncsn", **{k: v for k, v in cfg.items() if k != "dropout"},
                   sigma_1=args.sigma_1, sigma_L=args.sigma_L, levels=args.levels,
                   dropout=args.dropout, seed=args.seed, data=args.data,
                   data_id=data_id(args.data), steps=args.steps, batch_size=args.batch_size,
                   lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
                   ema_decay=args.ema_decay)
    lock = None  # rank 0 holds OUT/.lock while the run lasts (closed at the end, or by the OS)
    if rank == 0:
        check_writable(args.out)
        lock = lock_folder(args.out)
        print(f"{recipe}; {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters, "
              f"L={args.levels} levels σ {args.sigma_1}.."
              f"{args.sigma_L}; {N} images {C}x{H}x{W}; device {device}; {world} process(es)",
              flush=True)
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
                    kind="ncsn", args=ck_args, step=step, train_seconds=seconds(),
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
        # Gradient model: x ~ data in [0, 1], i ~ U{1..L}, ε ~ N(0, I), a gradient step on the DSM
        # loss
        while not done:
            # the whole global batch is drawn from (seed, step), each rank takes its slice: after
            # --resume, or on every torchrun rank, step k sees what an uninterrupted process would
            gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
            idx = torch.randint(0, N, (args.batch_size,), device=device, generator=gen)[lo:hi]
            i = torch.randint(1, args.levels + 1, (args.batch_size,), device=device,
                              generator=gen)[lo:hi]
            eps = torch.randn((args.batch_size, C, H, W), device=device, generator=gen)[lo:hi]
            with autocast(device, bf16):
                loss = dsm_loss(net, common.to_range(data[idx], 0), sigmas, i=i, eps=eps)
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
        write_samples(args, ema.module.eval(), sigmas, device, args.final_samples)
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
    """An ncsn.py checkpoint as a dict: 'args' (plain values), 'model' and 'ema' state_dicts,
    'step', 'train_seconds', ... Loaded with weights_only=True: loading can't run code."""
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
    if ck["kind"] != "ncsn":
        raise CheckpointError(f"{path} is a {ck['kind']}.py checkpoint, not an ncsn.py one")
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
    difference."""
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
    """The EMA score network and the noise levels of a checkpoint, ready to sample."""
    saved = ck["args"]
    sigmas = geometric_sigmas(saved["sigma_1"], saved["sigma_L"], saved["levels"])
    model = ScoreNet(sigmas, in_ch=saved["in_ch"], ch=saved["ch"], ch_mult=saved["ch_mult"],
                     num_res_blocks=saved["num_res_blocks"], attn=saved["attn"], dropout=0.0,
                     image_size=saved["image_size"])
    model.load_state_dict(ck["ema"])
    return model.to(device).eval(), sigmas


# ---- sampling


def network_calls(args, L):
    """Score-network calls per sample of the sampler the flags choose, with L levels."""
    if args.sampler == "pc":  # a predictor step into each level but the first, M corrector steps
        return L - 1 + L * args.corrector_steps + args.denoise
    return L * args.langevin_steps + args.denoise  # Algorithm 1: T steps per level


def write_samples(args, model, sigmas, device, n, strip=False):
    import common
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (n, model.in_ch, model.image_size, model.image_size)
    if args.start == "uniform":  # Algorithm 1's start: uniform on [0, 1]
        x_start = torch.rand(shape, device=device, generator=gen)
    else:  # the VE SDE's prior, N(0, σ_1^2 I)
        x_start = sigmas[1].item() * torch.randn(shape, device=device, generator=gen)
    trace = [] if strip else None
    L = len(sigmas) - 1
    start = time.time()
    calls = network_calls(args, L)
    with autocast(device, use_bf16(device, args.precision)):
        if args.sampler == "pc":
            x = pc_sample(model, x_start, sigmas, args.corrector_steps, args.snr, args.denoise, gen,
                          trace)
            how = f"predictor-corrector, {calls} network calls"
        else:
            x = annealed_langevin(model, x_start, sigmas, args.step_size, args.langevin_steps,
                                  args.denoise, gen, trace)
            how = f"annealed Langevin {L}x{args.langevin_steps} steps, {calls} network calls"
    png, pt = os.path.join(args.out, "samples.png"), os.path.join(args.out, "samples.pt")
    x01 = x.float().clamp(0, 1)
    common.write_png(png, x01)
    save_checkpoint(pt, x01.cpu())
    print(f"wrote {png} and {pt} ({n} samples, {how}, {time.time() - start:.1f}s)")
    if strip:
        k = min(n, 8)  # rows: samples; columns: the start, then the chain after each level
        frames = torch.stack([x_start[:k]] + [f[:k] for f in trace], dim=1).flatten(0, 1)
        png, pt = os.path.join(args.out, "chain.png"), os.path.join(args.out, "chain.pt")
        common.write_png(png, frames.float().clamp(0, 1), nrow=len(trace) + 1)
        save_checkpoint(pt, frames.float().cpu())  # as they are, not clamped to [0, 1]
        print(f"wrote {png} and {pt} (each row: the start, then after each of the {len(trace)} "
              "levels)")


if __name__ == "__main__":
    sys.exit(main())
