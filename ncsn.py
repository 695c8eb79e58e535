"""NCSN (Song & Ermon 2019), annotated against the notes' sections "Gradient model" and "条件实例归一化", then the
variance-exploding SDE view of the notes' empty SDE section (a predictor-corrector sampler), then the command line.

    python ncsn.py --train                  # MNIST in [0, 1], runs/ncsn
    python ncsn.py --sample 64 --denoise    # annealed Langevin dynamics (Algorithm 1) -> runs/ncsn/samples.png
    python ncsn.py --sample 64 --sampler pc --corrector-steps 1

A score network s_θ(x, i) ≈ ∇_x log p_{σ_i}(x) is trained by denoising score matching at L noise levels
σ_1 > ... > σ_L, then sampled by annealed Langevin dynamics. The network is the U-Net of common.py with its
time embedding off, conditioned on the level i = 1..L through conditional instance norm++ in every norm layer.
Everything above the command-line banner needs only torch and common.UNet.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn

import common

# ==========================================================================================================
# Gradient model: the score, Langevin dynamics, noise levels, denoising score matching, Algorithm 1


def score(log_density, x):
    """∇_x log p(x) by autograd, for any log-density known up to a constant.

    Gradient model: p(x) = exp(-f(x)) / ∫ exp(-f(t)) dt, so the normalising integral does not depend on x and
    drops out of the score; log_density may therefore be -f(x), unnormalised.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        # Gradient model: ∇_x log p(x) = -∇_x f(x) - ∇_x log ∫ exp(-f(t)) dt = -∇_x f(x)
        return torch.autograd.grad(log_density(x).sum(), x)[0]


@torch.no_grad()
def langevin(score_fn, x, eps, T, generator=None):
    """Plain Langevin dynamics, T steps t = 0..T-1 from x = x_0.

    NOTES ERROR (Gradient model): the notes write ε s_θ(x) with no index; the score is evaluated at the
    current state x_t (evaluated at a fixed x the update would be a random walk with a constant drift).
    """
    for _ in range(T):
        z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
        # Gradient model: x_{t+1} = x_t + ε s(x_t) + sqrt(2ε) z_t,  z_t ~ N(0, I)
        x = x + eps * score_fn(x) + math.sqrt(2 * eps) * z
    return x


def geometric_sigmas(sigma_1=1.0, sigma_L=0.01, L=10):
    """σ_1 > σ_2 > ... > σ_L, a geometric sequence: every ratio σ_i / σ_{i+1} is the same, (σ_1/σ_L)^{1/(L-1)}.

    Returned as a float64 tensor of length L+1 indexed by the notes' i = 1..L; index 0 holds σ_0 = 0 (clean data).
    NOTES ERROR (Gradient model): the notes write σ_1/σ_2 > σ_2/σ_3 > ... > σ_{L-1}/σ_L > 1, strictly
    decreasing ratios, and call it a geometric series. A geometric sequence has equal ratios (NCSN, Sec. 4.2),
    which spaces the levels evenly in log σ so that consecutive perturbed distributions overlap equally.
    """
    if L < 1:
        raise ValueError(f"L must be >= 1, got {L}")
    if not (sigma_1 > 0 and sigma_L > 0):
        raise ValueError(f"sigmas must be > 0, got sigma_1={sigma_1}, sigma_L={sigma_L}")
    if L > 1 and not sigma_1 > sigma_L:
        raise ValueError(f"sigma_1 ({sigma_1}) must exceed sigma_L ({sigma_L})")
    sig = torch.zeros(L + 1, dtype=torch.float64)
    # Gradient model (NCSN Sec. 4.2): log σ_i evenly spaced from log σ_1 to log σ_L, i.e. σ_i/σ_{i+1} constant
    sig[1:] = torch.logspace(math.log10(sigma_1), math.log10(sigma_L), L, dtype=torch.float64) if L > 1 else sigma_1
    return sig


def dsm_target(x_tilde, x, sigma):
    """The score of the perturbation kernel p_σ(x̃|x) = N(x, σ^2 I) at x̃."""
    # Gradient model: ∇_x̃ log p_σ(x̃|x) = ∇_x̃ [-||x̃ - x||^2 / (2σ^2)] = -(x̃ - x)/σ^2  (= -ε/σ for x̃ = x + σε)
    return -(x_tilde - x) / sigma ** 2


def dsm_loss(model, x, sigmas, generator=None, i=None, eps=None):
    """The conditional score network's loss, one level i ~ U{1..L} per example: the sum over dimensions, the
    mean over examples (drawing i uniformly is the notes' sum over i divided by L).

    NOTES ERROR (Gradient model): the notes evaluate the network at the clean x, s_θ(x, i), in every loss from
    E||s_θ(x) - ∇_x̃ log p_σ(x̃|x)||^2 on. Denoising score matching evaluates it at the perturbed x̃: the target
    depends on x̃, and s_θ(·, i) must estimate the score of the perturbed density p_{σ_i}(x̃) where the sampler
    uses it. At the clean x the network never sees the inputs it gets while sampling.
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
    out = model(x_tilde, i).float()
    # Gradient model: λ(σ_i) ||s_θ(x̃, i) + ε/σ_i||^2 with λ(σ_i) = σ_i^2, i.e. ||σ_i s_θ(x̃, i) + ε||^2
    return ((sigma * out + eps) ** 2).flatten(1).sum(1).mean()


@torch.no_grad()
def annealed_langevin(score_fn, x, sigmas, eps=2e-5, T=100, denoise=False, generator=None, trace=None):
    """Algorithm 1 of the notes (NCSN): for each level i = 1..L, T Langevin steps with the step size α_i.

    This is the Langevin step above with step ε' = α_i / 2 (ε' s + sqrt(2ε') z). `x` is the start (the CLI and the
    notes draw it from the uniform distribution on [0, 1]); score_fn(x, i) is a network or an exact score.
    denoise=True ends with x + σ_L^2 s(x, L) (Tweedie's formula; the improved NCSN paper's final step).
    trace: an optional list that receives x after each level. L·T network calls (+1 with denoise).
    """
    L = len(sigmas) - 1
    sig = sigmas.tolist()
    B = x.shape[0]
    for i in range(1, L + 1):
        # Algorithm 1, line 3: α_i = ε σ_i^2 / σ_L^2
        alpha = eps * sig[i] ** 2 / sig[L] ** 2
        level = torch.full((B,), i, device=x.device, dtype=torch.long)
        for _ in range(T):
            z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            # Algorithm 1, line 6: x̃_t = x̃_{t-1} + α_i/2 s_θ(x̃_{t-1}, σ_i) + sqrt(α_i) z_t
            x = x + alpha / 2 * score_fn(x, level).to(x.dtype) + math.sqrt(alpha) * z
        if trace is not None:
            trace.append(x.clone())
    return _denoise(score_fn, x, sig, L) if denoise else x


def _denoise(score_fn, x, sig, L):
    level = torch.full((x.shape[0],), L, device=x.device, dtype=torch.long)
    # Tweedie: E[x | x̃] = x̃ + σ_L^2 ∇ log p_{σ_L}(x̃)
    return x + sig[L] ** 2 * score_fn(x, level).to(x.dtype)


# ==========================================================================================================
# 条件实例归一化 (conditional instance norm++) and the score network


class CondInstanceNorm2dPlus(nn.Module):
    """Conditional instance norm++, called as norm(x, i) with i in 1..L.

    u_c, Φ_c are the spatial mean and standard deviation of channel c; m, v the mean and standard deviation of u
    over channels. γ, β, α are learnt per level i; initialised as in NCSN's code (γ, α ~ N(1, 0.02), β = 0).
    With α = 0 and the same γ, β for every level this is plain instance norm.
    NOTES ERROR (条件实例归一化): the notes call "γ, Φ ∈ R^C" the learnable parameters. Φ is the measured standard
    deviation, not a parameter; the learnable pair is γ (scale) and β (shift).
    """

    def __init__(self, num_features, num_levels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(1 + 0.02 * torch.randn(num_levels, num_features))
        self.alpha = nn.Parameter(1 + 0.02 * torch.randn(num_levels, num_features))
        self.beta = nn.Parameter(torch.zeros(num_levels, num_features))

    def forward(self, x, i):
        # 条件实例归一化: u_c = 1/HW Σ_{h,w} x[c,h,w]
        u = x.mean(dim=(2, 3), keepdim=True)
        # 条件实例归一化: Φ_c = sqrt(1/HW Σ_{h,w} (x[c,h,w] - u_c)^2)   (+ eps inside the root, for Φ_c = 0)
        phi = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + self.eps).sqrt()
        # 条件实例归一化: m, v = the mean and standard deviation of u_1..u_C
        m = u.mean(dim=1, keepdim=True)
        v = (u.var(dim=1, keepdim=True, unbiased=False) + self.eps).sqrt()
        g, b, a = (p[i - 1][:, :, None, None] for p in (self.gamma, self.beta, self.alpha))
        # 条件实例归一化: y[c,h,w] = γ[i,c] (x[c,h,w] - u_c)/Φ_c + β[i,c] + α[i,c] (u_c - m)/v
        return g * (x - u) / phi + b + a * (u - m) / v


class ScoreNet(nn.Module):
    """s_θ(x, i) = U-Net(x, i) / σ_i, every norm layer of the U-Net a CondInstanceNorm2dPlus keyed by i.

    Dividing by σ_i (improved NCSN, Song & Ermon 2020) lets the network output O(1) values at every level:
    the target -ε/σ_i has norm ~ sqrt(D)/σ_i, a 100-fold spread between σ_1 = 1 and σ_L = 0.01.
    """

    def __init__(self, sigmas, **unet):
        super().__init__()
        L = len(sigmas) - 1
        self.unet = common.UNet(**unet, time_embed=False, norm=lambda ch: CondInstanceNorm2dPlus(ch, L))
        self.register_buffer("sigmas", sigmas.float())
        self.in_ch, self.image_size = self.unet.in_ch, self.unet.image_size

    def forward(self, x, i):
        # improved NCSN: s_θ(x, i) = U-Net(x, i) / σ_i
        return self.unet(x, i) / self.sigmas[i].reshape(-1, 1, 1, 1).to(x.dtype)


# ==========================================================================================================
# Beyond the notes: the variance-exploding SDE view (the notes' empty SDE section; Song et al. 2021,
# "Score-Based Generative Modeling through Stochastic Differential Equations", cited as [SDE])
#
# [SDE] eq. 9 and 30: NCSN's levels are samples of σ(τ) = σ_min (σ_max/σ_min)^τ, τ ∈ [0, 1] (ve_sigma), and
#   perturbing data with N(0, σ_i^2 I) is the variance-exploding SDE  dx = sqrt(d[σ^2(τ)]/dτ) dw  run to τ_i.
# Annealed Langevin dynamics (Algorithm 1) is a corrector alone: at each level it moves towards p_{σ_i} by
# Langevin steps, and lets the next level start where this one ends. [SDE] Algorithm 2/5 add a predictor: a
# step of the reverse-time SDE from σ_{i-1} down to σ_i before the corrector steps (pc_sample).
# Conditional instance norm++ is a table over i = 1..L, so the network only exists at the trained levels:
# the sampler below stays on them.


def ve_sigma(tau, sigma_min=0.01, sigma_max=1.0):
    """The variance-exploding SDE's noise scale at τ ∈ [0, 1]; σ_i = ve_sigma((L - i)/(L - 1))."""
    # [SDE] eq. 30: σ(τ) = σ_min (σ_max/σ_min)^τ
    return sigma_min * (sigma_max / sigma_min) ** tau


def ve_diffusion_squared(tau, sigma_min=0.01, sigma_max=1.0):
    """g(τ)^2 of the VE SDE dx = g(τ) dw."""
    # [SDE] eq. 30: g(τ)^2 = d[σ^2(τ)]/dτ = 2 σ(τ)^2 log(σ_max/σ_min)
    return 2 * ve_sigma(tau, sigma_min, sigma_max) ** 2 * math.log(sigma_max / sigma_min)


@torch.no_grad()
def pc_sample(score_fn, x, sigmas, corrector_steps=1, snr=0.16, denoise=False, generator=None, trace=None):
    """Predictor-corrector sampling on the trained levels ([SDE] Algorithm 2 with the VE SDE, Algorithm 5 step size).

    From the start x (Algorithm 1's uniform draw), level by level: for i >= 2 a reverse-diffusion predictor step
    from σ_{i-1} to σ_i, then `corrector_steps` Langevin corrector steps at σ_i. The corrector's step size
    ε = 2 (r ||z|| / ||s||)^2 fixes the ratio of the step's drift to its noise, ||ε s|| / ||sqrt(2ε) z|| = r = snr
    (norms averaged over the batch, as [SDE]'s code does). Level 1 has no level above it: the corrector alone.
    Network calls: (L - 1) + L·corrector_steps (+1 with denoise), against L·T for Algorithm 1.
    trace receives x after each level.
    """
    L = len(sigmas) - 1
    sig = sigmas.tolist()
    B = x.shape[0]
    for i in range(1, L + 1):
        if i > 1:
            prev = torch.full((B,), i - 1, device=x.device, dtype=torch.long)
            z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            # [SDE] eq. 47 for the VE SDE: x_i = x_{i-1} + (σ_{i-1}^2 - σ_i^2) s_θ(x_{i-1}, σ_{i-1}) + sqrt(σ_{i-1}^2 - σ_i^2) z
            x = x + (sig[i - 1] ** 2 - sig[i] ** 2) * score_fn(x, prev).to(x.dtype) + math.sqrt(sig[i - 1] ** 2 - sig[i] ** 2) * z
        level = torch.full((B,), i, device=x.device, dtype=torch.long)
        for _ in range(corrector_steps):
            s = score_fn(x, level).to(x.dtype)
            z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            # [SDE] Algorithm 5: ε = 2 (r ||z||_2 / ||s_θ||_2)^2, each norm averaged over the batch
            eps = 2 * (snr * z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()) ** 2
            # [SDE] Algorithm 5: x ← x + ε s_θ(x, σ_i) + sqrt(2ε) z
            x = x + eps * s + (2 * eps).sqrt() * z
        if trace is not None:
            trace.append(x.clone())
    return _denoise(score_fn, x, sig, L) if denoise else x


# ==========================================================================================================
# Command line: recipes, training loop, sampling, --bench

GPU_RECIPE = dict(steps=100_000, batch_size=128, lr=1e-3, warmup=0, ema_decay=0.999)  # NCSN: Adam 1e-3, batch 128
CPU_RECIPE = dict(steps=4000, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.999)
MODEL_KEYS = ("kind", "in_ch", "image_size", "ch", "ch_mult", "num_res_blocks", "attn", "sigma_1", "sigma_L", "levels")


def build_parser():
    p = argparse.ArgumentParser(description="NCSN score model, annotated against the notes (python ncsn.py --train)")
    common.add_common_args(p)
    g = p.add_argument_group("noise levels and sampling (NCSN's MNIST settings)")
    g.add_argument("--sigma-1", type=common.positive_float, default=1.0, help="largest noise level σ_1 (default 1.0)")
    g.add_argument("--sigma-L", type=common.positive_float, default=0.01, help="smallest noise level σ_L (default 0.01)")
    g.add_argument("--levels", type=common.positive_int, default=10, help="L, the number of levels (default 10)")
    g.add_argument("--sampler", choices=["annealed", "pc"], default="annealed",
                   help="annealed: Algorithm 1 (L·T network calls); pc: predictor-corrector (default annealed)")
    g.add_argument("--langevin-steps", type=common.positive_int, default=100, help="T of Algorithm 1, steps per level (default 100)")
    g.add_argument("--langevin-eps", type=common.positive_float, default=2e-5, help="ε of Algorithm 1 (default 2e-5)")
    g.add_argument("--corrector-steps", type=common.positive_int, default=1, help="pc: Langevin corrector steps per level (default 1)")
    g.add_argument("--snr", type=common.positive_float, default=0.16, help="pc: the corrector's signal-to-noise ratio r (default 0.16)")
    g.add_argument("--denoise", action="store_true", help="end sampling with x + σ_L^2 s_θ(x, L)")
    g.add_argument("--strip", action="store_true", help="with --sample: also write the chain after each level (chain.png)")
    g.add_argument("--final-samples", type=common.nonneg_int, default=64, help="samples written at the end of --train (default 64)")
    common.add_unet_args(p, ch=32, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0, group_norm=False)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.train or args.sample or args.bench):
        p.error("nothing to do: give --train, --sample N or --bench")
    if args.levels > 1 and args.sigma_1 <= args.sigma_L:
        p.error(f"--sigma-1 {args.sigma_1} must exceed --sigma-L {args.sigma_L}")
    args.out = args.out or os.path.join("runs", "ncsn")
    try:
        rank, world, device = common.setup_distributed(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    try:
        if args.bench:
            return bench(args, device)
        if args.train:
            train(args, rank, world, device)
        if args.sample and rank == 0:
            model, sigmas = model_from_checkpoint(common.load_checkpoint(os.path.join(args.out, "ckpt.pt"), kind="ncsn"), device)
            write_samples(args, model, sigmas, device, args.sample, args.strip)
    except (common.DataError, common.CheckpointError, ValueError, OSError) as e:
        p.error(str(e))
    return 0


def train(args, rank, world, device):
    data = common.load_images(args.data, args.data_dir, "train")
    N, C, H, W = data.shape
    if H != W:
        raise common.DataError(f"{args.data}: images are {H}x{W}; the U-Net takes square images")
    torch.manual_seed(args.seed)  # the initial weights, and dropout, follow --seed
    recipe = common.fill_recipe(args, device, GPU_RECIPE, CPU_RECIPE)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split evenly over {world} ranks")
    sigmas = geometric_sigmas(args.sigma_1, args.sigma_L, args.levels)
    cfg = common.unet_config(args, C, H)
    model = ScoreNet(sigmas, **cfg).to(device)
    ck_args = dict(kind="ncsn", **{k: v for k, v in cfg.items() if k != "dropout"}, sigma_1=args.sigma_1,
                   sigma_L=args.sigma_L, levels=args.levels, dropout=args.dropout, seed=args.seed, data=args.data,
                   steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    macs = common.macs_per_image(model, torch.zeros(1, C, H, W, device=device), torch.ones(1, dtype=torch.long, device=device))
    if rank == 0:
        common.check_writable(args.out)
        print(f"{recipe}; {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters, {macs / 1e6:.1f}M MACs "
              f"per image; L={args.levels} levels σ {args.sigma_1}..{args.sigma_L}; {N} images {C}x{H}x{W}; "
              f"device {device}", flush=True)
    data = data.to(device)
    opt, lr_sched = common.make_optimizer(model, args.lr, args.warmup)
    ema = common.make_ema(model, args.ema_decay)
    step, seconds = 0, 0.0
    if args.resume:
        step, seconds = common.resume(ckpt_path, "ncsn", ck_args, MODEL_KEYS, model, opt, lr_sched, ema, rank=rank)
    net = common.wrap(model, world, device, args.compile)
    budget = common.Budget(args.steps, args.minutes, seconds, world, device=device)
    bad = common.NonFiniteWatch(device)

    def save(step):
        if rank == 0 and not bad.found():
            common.save_checkpoint(ckpt_path, common.training_state("ncsn", ck_args, step, budget.seconds(), model,
                                                                    opt, lr_sched, ema))

    # ---- training: x ~ data in [0, 1], i ~ U{1..L}, ε ~ N(0, I), gradient step on the DSM loss
    bar = common.Progress(budget, start=step, macs_per_step=3 * macs * args.batch_size)
    lo, hi = rank * args.batch_size // world, (rank + 1) * args.batch_size // world
    model.train()
    done = budget.over(step)
    with common.StopOnInterrupt() as stop:
        while not done and not stop.requested:
            g = common.step_generator(args.seed, step, device)
            idx = torch.randint(0, N, (args.batch_size,), device=device, generator=g)[lo:hi]
            i = torch.randint(1, args.levels + 1, (args.batch_size,), device=device, generator=g)[lo:hi]
            eps = torch.randn((args.batch_size, C, H, W), device=device, generator=g)[lo:hi]
            with common.autocast(device, args.precision):
                loss = dsm_loss(net, common.to_range(data[idx], 0), sigmas, i=i, eps=eps)
            gnorm = common.optimizer_step(loss, model, opt, lr_sched, args.grad_clip, ema)
            step += 1
            bad.update(step, loss, gnorm)
            done = budget.over(step)
            if step % args.log_every == 0 or done:
                if bad.found():
                    break
                if rank == 0:
                    print(bar.line(step, loss=loss.item()), flush=True)
            if step % args.ckpt_every == 0 or done:
                save(step)
    common.stop_if_interrupted_or_bad(stop, bad, save, step, rank, "ncsn.py", args.out)
    if rank == 0 and args.final_samples:
        write_samples(args, ema.module.eval(), sigmas, device, args.final_samples)


def model_from_checkpoint(ck, device):
    """The EMA score network and the noise levels of a checkpoint, ready to sample."""
    saved = ck["args"]
    sigmas = geometric_sigmas(saved["sigma_1"], saved["sigma_L"], saved["levels"])
    model = ScoreNet(sigmas, in_ch=saved["in_ch"], ch=saved["ch"], ch_mult=saved["ch_mult"],
                     num_res_blocks=saved["num_res_blocks"], attn=saved["attn"], dropout=0.0, image_size=saved["image_size"])
    model.load_state_dict(ck["ema"])
    return model.to(device).eval(), sigmas


def write_samples(args, model, sigmas, device, n, strip=False):
    g = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.rand((n, model.in_ch, model.image_size, model.image_size), device=device, generator=g)  # uniform on [0,1]
    trace = [] if strip else None
    L = len(sigmas) - 1
    t0 = time.time()
    with common.autocast(device, args.precision):
        if args.sampler == "pc":
            x = pc_sample(model, x0, sigmas, args.corrector_steps, args.snr, args.denoise, g, trace)
            how = f"predictor-corrector, {L - 1 + L * args.corrector_steps + args.denoise} network calls"
        else:
            x = annealed_langevin(model, x0, sigmas, args.langevin_eps, args.langevin_steps, args.denoise, g, trace)
            how = f"annealed Langevin {L}x{args.langevin_steps} steps, {L * args.langevin_steps + args.denoise} network calls"
    png, pt = common.save_samples(args.out, "samples", x.float().clamp(0, 1))
    print(f"wrote {png} and {pt} ({n} samples, {how}, {time.time() - t0:.1f}s)")
    if strip:
        k = min(n, 8)  # rows: samples; columns: start, then the chain after each level
        frames = torch.stack([x0[:k]] + [f[:k] for f in trace], dim=1).flatten(0, 1)
        png, _ = common.save_samples(args.out, "chain", frames.float().clamp(0, 1), nrow=len(trace) + 1)
        print(f"wrote {png} (each row: uniform start, then after each of the {len(trace)} levels)")


def bench(args, device):
    """--bench: the training step of train() and one Langevin network call, timed on random data."""
    C, H = common.data_shape(args.data, args.data_dir)
    common.fill_recipe(args, device, GPU_RECIPE, CPU_RECIPE)
    torch.manual_seed(args.seed)
    sigmas = geometric_sigmas(args.sigma_1, args.sigma_L, args.levels)
    model = ScoreNet(sigmas, **common.unet_config(args, C, H)).to(device)
    x = torch.rand(args.batch_size, C, H, H, device=device)
    i = torch.full((args.batch_size,), args.levels, device=device)
    print(common.bench(model, args, device, loss=lambda net: dsm_loss(net, x, sigmas),
                       sample_call=lambda net: net(x, i), example=(x[:1], i[:1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
