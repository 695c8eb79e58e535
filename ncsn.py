"""NCSN (Song & Ermon 2019), annotated against the notes' sections "Gradient model" and "条件实例归一化".

    python ncsn.py --train                  # MNIST in [0, 1], runs/ncsn
    python ncsn.py --sample 64 --denoise    # annealed Langevin dynamics (Algorithm 1) -> runs/ncsn/samples.png

A score network s_θ(x, i) ≈ ∇_x log p_{σ_i}(x) is trained by denoising score matching at L noise levels
σ_1 > ... > σ_L, then sampled by annealed Langevin dynamics. The network is the U-Net of common.py with its
time embedding off, conditioned on the level i = 1..L through conditional instance norm++ in every norm layer.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn

import common

# ----------------------------------------------------------------------------------------------------------
# Gradient model: the score does not need the normalising constant


def score(log_density, x):
    """∇_x log p(x) by autograd, for any log-density known up to a constant.

    Gradient model: p(x) = exp(-f(x)) / ∫ exp(-f(t)) dt, so
        ∇_x log p(x) = -∇_x f(x) - ∇_x log ∫ exp(-f(t)) dt = -∇_x f(x)
    because the integral does not depend on x. log_density may therefore be -f(x), unnormalised.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        return torch.autograd.grad(log_density(x).sum(), x)[0]


@torch.no_grad()
def langevin(score_fn, x, eps, T, generator=None):
    """Plain Langevin dynamics: x_{t+1} = x_t + ε s(x_t) + sqrt(2ε) z_t, z_t ~ N(0, I), t = 0..T-1.

    NOTES ERROR (Gradient model): the notes write ε s_θ(x) with no index; the score is evaluated at the
    current state x_t (evaluated at a fixed x the update would be a random walk with a constant drift).
    """
    for _ in range(T):
        x = x + eps * score_fn(x) + math.sqrt(2 * eps) * torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    return x


# ----------------------------------------------------------------------------------------------------------
# noise levels and denoising score matching


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
    sig[1:] = torch.logspace(math.log10(sigma_1), math.log10(sigma_L), L, dtype=torch.float64) if L > 1 else sigma_1
    return sig


def dsm_target(x_tilde, x, sigma):
    # Gradient model: ∇_x̃ log p_σ(x̃|x) = ∇_x̃ [-||x̃ - x||^2 / (2σ^2)] = -(x̃ - x)/σ^2  (= -ε/σ for x̃ = x + σε)
    return -(x_tilde - x) / sigma ** 2


def dsm_loss(model, x, sigmas, generator=None, i=None, eps=None):
    """Σ_i λ(σ_i) E ||s_θ(x̃, i) + ε/σ_i||^2 with λ(σ) = σ^2, i.e. E ||σ_i s_θ(x̃, i) + ε||^2, one level per example.

    Gradient model: x̃ = x + σ_i ε, and the target -(x̃ - x)/σ_i^2 = -ε/σ_i. The sum over dimensions, mean over
    examples (drawing i uniformly is the notes' sum over i divided by L).
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
    x_tilde = x + sigma * eps
    s = model(x_tilde, i).float()
    return ((sigma * s + eps) ** 2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------------------
# 条件实例归一化 (conditional instance norm++) and the score network


class CondInstanceNorm2dPlus(nn.Module):
    """y[c,h,w] = γ[i,c] (x[c,h,w] - u_c)/Φ_c + β[i,c] + α[i,c] (u_c - m)/v, called as norm(x, i), i in 1..L.

    条件实例归一化: u_c, Φ_c are the spatial mean and standard deviation of channel c; m, v the mean and standard
    deviation of u over channels. γ, β, α are learnt per level i; initialised as in NCSN's code
    (γ, α ~ N(1, 0.02), β = 0). With α = 0 and the same γ, β for every level this is plain instance norm.
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
        u = x.mean(dim=(2, 3), keepdim=True)
        phi = (x.var(dim=(2, 3), keepdim=True, unbiased=False) + self.eps).sqrt()
        m = u.mean(dim=1, keepdim=True)
        v = (u.var(dim=1, keepdim=True, unbiased=False) + self.eps).sqrt()
        g, b, a = (p[i - 1][:, :, None, None] for p in (self.gamma, self.beta, self.alpha))
        return g * (x - u) / phi + b + a * (u - m) / v


class ScoreNet(nn.Module):
    """s_θ(x, i) = U-Net(x, i) / σ_i.

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
        return self.unet(x, i) / self.sigmas[i].reshape(-1, 1, 1, 1).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Algorithm 1: annealed Langevin dynamics


@torch.no_grad()
def annealed_langevin(score_fn, x, sigmas, eps=2e-5, T=100, denoise=False, generator=None, trace=None):
    """Algorithm 1 of the notes (NCSN): for i = 1..L, α_i = ε σ_i^2 / σ_L^2, then T steps of
        x_t = x_{t-1} + (α_i/2) s(x_{t-1}, i) + sqrt(α_i) z_t,   z_t ~ N(0, I).
    This is the Langevin step above with step ε' = α_i / 2 (ε' s + sqrt(2ε') z). `x` is the start (the CLI and the
    notes draw it from the uniform distribution on [0, 1]); score_fn(x, i) is a network or an exact score.
    denoise=True ends with x + σ_L^2 s(x, L) (Tweedie's formula; the improved NCSN paper's final step).
    trace: an optional list that receives x after each level.
    """
    L = len(sigmas) - 1
    sig = sigmas.tolist()
    B = x.shape[0]
    for i in range(1, L + 1):
        alpha = eps * sig[i] ** 2 / sig[L] ** 2
        level = torch.full((B,), i, device=x.device, dtype=torch.long)
        for _ in range(T):
            z = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
            x = x + alpha / 2 * score_fn(x, level).to(x.dtype) + math.sqrt(alpha) * z
        if trace is not None:
            trace.append(x.clone())
    if denoise:
        x = x + sig[L] ** 2 * score_fn(x, torch.full((B,), L, device=x.device, dtype=torch.long)).to(x.dtype)
    return x


# ----------------------------------------------------------------------------------------------------------
# CLI

GPU_RECIPE = dict(steps=100_000, batch_size=128, lr=1e-3, warmup=0, ema_decay=0.999)  # NCSN: Adam 1e-3, batch 128
CPU_RECIPE = dict(steps=4000, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.999)  # ~38 min on 2 cores
MODEL_KEYS = ("kind", "in_ch", "image_size", "ch", "ch_mult", "num_res_blocks", "attn", "sigma_1", "sigma_L", "levels")


def build_parser():
    p = argparse.ArgumentParser(description="NCSN score model, annotated against the notes (python ncsn.py --train)")
    common.add_common_args(p)
    g = p.add_argument_group("noise levels and Langevin sampling (NCSN's MNIST settings)")
    g.add_argument("--sigma-1", type=common.positive_float, default=1.0, help="largest noise level σ_1 (default 1.0)")
    g.add_argument("--sigma-L", type=common.positive_float, default=0.01, help="smallest noise level σ_L (default 0.01)")
    g.add_argument("--levels", type=common.positive_int, default=10, help="L, the number of levels (default 10)")
    g.add_argument("--langevin-steps", type=common.positive_int, default=100, help="T, steps per level (default 100)")
    g.add_argument("--langevin-eps", type=common.positive_float, default=2e-5, help="ε of Algorithm 1 (default 2e-5)")
    g.add_argument("--denoise", action="store_true", help="end sampling with x + σ_L^2 s_θ(x, L)")
    g.add_argument("--strip", action="store_true", help="with --sample: also write the chain after each level (chain.png)")
    g.add_argument("--final-samples", type=common.nonneg_int, default=64, help="samples written at the end of --train (default 64)")
    common.add_unet_args(p, ch=32, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0)
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
            ck = common.load_checkpoint(os.path.join(args.out, "ckpt.pt"), kind="ncsn")
            a = ck["args"]
            sigmas = geometric_sigmas(a["sigma_1"], a["sigma_L"], a["levels"])
            model = ScoreNet(sigmas, in_ch=a["in_ch"], ch=a["ch"], ch_mult=a["ch_mult"], num_res_blocks=a["num_res_blocks"],
                             attn=a["attn"], dropout=0.0, image_size=a["image_size"])
            model.load_state_dict(ck["ema"])
            write_samples(args, model.to(device).eval(), sigmas, device, args.sample, args.strip)
    except (common.DataError, common.CheckpointError, ValueError, OSError) as e:
        p.error(str(e))
    return 0


def bench(args, device):
    """--bench: the training step of train() and one Langevin network call, timed on random data."""
    C, H = common.data_shape(args.data, args.data_dir)
    common.fill_recipe(args, device, GPU_RECIPE, CPU_RECIPE)
    torch.manual_seed(args.seed)
    sigmas = geometric_sigmas(args.sigma_1, args.sigma_L, args.levels)
    model = ScoreNet(sigmas, **common.unet_config(args, C, H)).to(device)
    opt, sched = common.make_optimizer(model, args.lr, args.warmup)
    ema = common.make_ema(model, args.ema_decay)
    net = torch.compile(model) if args.compile else model
    B = args.batch_size
    x = torch.rand(B, C, H, H, device=device)
    i = torch.full((B,), args.levels, device=device)

    def train_step():
        with common.autocast(device, args.precision):
            loss = dsm_loss(net, x, sigmas)
        common.optimizer_step(loss, model, opt, sched, args.grad_clip, ema)

    def sample_call():
        with common.autocast(device, args.precision):
            net(x, i)

    print(common.benchmark(model, train_step, sample_call, B, device, common.macs_per_image(model, x[:1], i[:1]), args.precision))
    return 0


def write_samples(args, model, sigmas, device, n, strip=False):
    g = torch.Generator(device=device).manual_seed(args.seed)
    x0 = torch.rand((n, model.in_ch, model.image_size, model.image_size), device=device, generator=g)  # uniform on [0,1]
    trace = [] if strip else None
    t0 = time.time()
    with common.autocast(device, args.precision):
        x = annealed_langevin(model, x0, sigmas, args.langevin_eps, args.langevin_steps, args.denoise, g, trace)
    png, pt = common.save_samples(args.out, "samples", x.float().clamp(0, 1))
    print(f"wrote {png} and {pt} ({n} samples, {len(sigmas) - 1}x{args.langevin_steps} steps, {time.time() - t0:.1f}s)")
    if strip:
        k = min(n, 8)  # rows: samples; columns: start, then the chain after each level
        frames = torch.stack([x0[:k]] + [f[:k] for f in trace], dim=1).flatten(0, 1)
        png, _ = common.save_samples(args.out, "chain", frames.float().clamp(0, 1), nrow=len(trace) + 1)
        print(f"wrote {png} (each row: uniform start, then after each of the {len(trace)} levels)")


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
    if rank == 0:
        common.check_writable(args.out)
        print(f"{recipe}; {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters; L={args.levels} levels "
              f"σ {args.sigma_1}..{args.sigma_L}; {N} images {C}x{H}x{W}; device {device}", flush=True)
    data = data.to(device)
    opt, sched = common.make_optimizer(model, args.lr, args.warmup)
    ema = common.make_ema(model, args.ema_decay)
    step = 0
    if args.resume:
        step = common.resume(ckpt_path, "ncsn", ck_args, MODEL_KEYS, model, opt, sched, ema, rank=rank)
    net = common.wrap(model, world, device, args.compile)
    bad = common.NonFiniteWatch(device)

    def save(step):
        if rank == 0 and not bad.found():
            common.save_checkpoint(ckpt_path, common.training_state("ncsn", ck_args, step, model, opt, sched, ema))
            common.pause_if_asked(step)

    # ---- training: x ~ data in [0, 1], i ~ U{1..L}, ε ~ N(0, I), gradient step on the DSM loss
    bar = common.Progress(args.steps, start=step)
    lo, hi = rank * args.batch_size // world, (rank + 1) * args.batch_size // world
    model.train()
    with common.StopOnInterrupt() as stop:
        while step < args.steps and not stop.requested:
            g = common.step_generator(args.seed, step, device)
            idx = torch.randint(0, N, (args.batch_size,), device=device, generator=g)[lo:hi]
            i = torch.randint(1, args.levels + 1, (args.batch_size,), device=device, generator=g)[lo:hi]
            eps = torch.randn((args.batch_size, C, H, W), device=device, generator=g)[lo:hi]
            with common.autocast(device, args.precision):
                loss = dsm_loss(net, common.to_range(data[idx], 0), sigmas, i=i, eps=eps)
            gnorm = common.optimizer_step(loss, model, opt, sched, args.grad_clip, ema)
            step += 1
            bad.update(step, loss, gnorm)
            if step % args.log_every == 0 or step == args.steps:
                if bad.found():
                    break
                if rank == 0:
                    print(bar.line(step, loss=loss.item()), flush=True)
            if step % args.ckpt_every == 0 or step == args.steps:
                save(step)
    common.stop_if_interrupted_or_bad(stop, bad, save, step, rank, "ncsn.py", args.out)
    if rank == 0 and args.final_samples:
        write_samples(args, ema.module.eval(), sigmas, device, args.final_samples)


if __name__ == "__main__":
    sys.exit(main())
