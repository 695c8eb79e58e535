"""DDPM (Ho et al. 2020), annotated against the notes' sections 扩散模型 / 扩散过程 / 逆扩散过程 / 训练与推理 / 推导.

    python ddpm.py --train                 # MNIST, downloaded into ./data; checkpoint and samples in runs/ddpm
    python ddpm.py --sample 64             # 64 samples from the EMA weights -> runs/ddpm/samples.png
    python ddpm.py --sample 64 --ddim-steps 50
    python ddpm.py --eval                  # variational bound in bits/dim on the test split
    torchrun --nproc_per_node 8 ddpm.py --train --data cifar10 --ch 128 --ch-mult 1,2,2,2 --attn 1 --dropout 0.1

Indexing follows the notes: t = 1..T, and index 0 of every schedule tensor stands for x_0 (alpha_bar[0] = 1).
The DDPM paper's code and diffusers index 0..T-1: their step k is our t = k + 1.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------------------
# 扩散过程 (forward process)


class Schedule:
    """beta, alpha, alpha_bar, beta_tilde as float64 tensors of length T+1, indexed by the notes' t."""

    def __init__(self, beta):
        self.T = len(beta) - 1
        self.beta = beta
        # 扩散过程: α_t = 1 - β_t,  ᾱ_t = ∏_{i=1}^t α_i   (β_0 = 0, so α_0 = ᾱ_0 = 1: "x_0 is noiseless")
        self.alpha = 1 - beta
        self.alpha_bar = torch.cumprod(self.alpha, dim=0)
        # 推导: σ_{q,t}^2 = β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)   (t >= 1; β̃_1 = 0 because ᾱ_0 = 1)
        prev = torch.cat([self.alpha_bar[:1], self.alpha_bar[:-1]])
        self.beta_tilde = torch.zeros_like(beta)
        self.beta_tilde[1:] = beta[1:] * (1 - prev[1:]) / (1 - self.alpha_bar[1:])

    def to(self, device):
        s = Schedule.__new__(Schedule)
        s.__dict__ = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}
        return s

    def sigma2(self, var):
        """The reverse process' fixed variance σ_t^2 (逆扩散过程), index t = 1..T.

        var="beta_tilde" (σ_t^2 = β̃_t, the notes' choice) or "beta" (σ_t^2 = β_t). β̃_1 = 0 would make the
        t = 1 decoder a point mass with an infinite likelihood, so t = 1 uses β̃_2 as the DDPM paper's code does
        (its clipped log-variance); the sampler adds no noise at t = 1 anyway.
        """
        if var not in ("beta_tilde", "beta"):
            raise ValueError(f"var must be 'beta_tilde' or 'beta', got {var!r}")
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
    beta[1:] = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)
    return Schedule(beta)


def _col(v, x):
    """A per-example coefficient (B,) shaped to broadcast against x (B, C, H, W), in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _at(v, t, x):
    return _col(v[t], x)


def q_sample(s, x0, t, eps):
    # 扩散过程: q(x_t|x_0) = N(x_t; sqrt(ᾱ_t) x_0, (1-ᾱ_t) I), i.e. x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε
    return _at(s.alpha_bar.sqrt(), t, x0) * x0 + _at((1 - s.alpha_bar).sqrt(), t, x0) * eps


def q_posterior(s, x0, xt, t):
    """Mean and variance of q(x_{t-1} | x_t, x_0), t >= 1.

    推导: q(x_{t-1}|x_t,x_0) = N(u_{q,t}, σ_{q,t}^2 I) with
        u_{q,t} = [ (1-ᾱ_{t-1}) sqrt(α_t) x_t + β_t sqrt(ᾱ_{t-1}) x_0 ] / (1-ᾱ_t),  σ_{q,t}^2 = β̃_t.
    NOTES ERROR (推导): the notes write sqrt(ᾱ_t) x_t, not sqrt(α_t) x_t. Completing the square, x_t enters only
    through q(x_t|x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t I), whose cross term is 2 sqrt(α_t) x_t·x_{t-1}/β_t;
    multiplying by σ_{q,t}^2 gives sqrt(α_t)(1-ᾱ_{t-1})/(1-ᾱ_t). (The notes' own line before it has sqrt(α_t).)
    """
    ab_t, ab_prev = s.alpha_bar[t], s.alpha_bar[t - 1]
    c_xt = s.alpha[t].sqrt() * (1 - ab_prev) / (1 - ab_t)
    c_x0 = s.beta[t] * ab_prev.sqrt() / (1 - ab_t)
    mean = _col(c_xt, xt) * xt + _col(c_x0, x0) * x0
    return mean, _at(s.beta_tilde, t, xt)


def predict_x0(s, xt, t, eps):
    # 推导: x_0 = (x_t - sqrt(1-ᾱ_t) ε) / sqrt(ᾱ_t)
    return (xt - _at((1 - s.alpha_bar).sqrt(), t, xt) * eps) / _at(s.alpha_bar.sqrt(), t, xt)


def p_mean(s, xt, t, eps_theta):
    # 推导: u_θ(x_t, t) = 1/sqrt(α_t) [x_t - (1-α_t)/sqrt(1-ᾱ_t) ε_θ(x_t, t)]
    return (xt - _col(s.beta[t] / (1 - s.alpha_bar[t]).sqrt(), xt) * eps_theta) / _at(s.alpha.sqrt(), t, xt)


# ----------------------------------------------------------------------------------------------------------
# 训练与推理: L_simple and ancestral sampling


def loss_simple(model, s, x0, t=None, eps=None, generator=None):
    """L_simple = E_{t, x_0, ε} ||ε - ε_θ(sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε, t)||^2, t ~ U{1..T}.

    推导: the weighted loss has β_t^2 / (2 σ_t^2 α_t (1-ᾱ_t)) in front; DDPM drops it. The notes write a sum
    over t; the expectation over a uniform t is the same objective divided by T. The mean over pixels and batch
    (not the sum) is what the paper's code does; the default learning rate and clip assume it.
    """
    B = x0.shape[0]
    if t is None:
        t = torch.randint(1, s.T + 1, (B,), device=x0.device, generator=generator)
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    xt = q_sample(s, x0, t, eps)
    return F.mse_loss(model(xt, t).float(), eps)


@torch.no_grad()
def sample(model, s, shape, var="beta_tilde", clip_x0=False, generator=None, progress=False):
    """Ancestral sampling (训练与推理): x_T ~ N(0, I), then x_{t-1} ~ p_θ(x_{t-1}|x_t) for t = T..1.

    NOTES ERROR (训练与推理): the notes add σ_t ε' at every step, t = 1 included. DDPM's Algorithm 2 adds no noise
    at t = 1 (z = 0): x_0 is the mean of p_θ(x_0|x_1), and noise there would only blur the result. (Also, the
    notes' ε' ~ N(0, 1) is a vector: N(0, I).)
    clip_x0=True predicts x_0 from ε_θ, clips it to [-1, 1] and takes the posterior mean u_{q,t} (the paper's code
    and diffusers' default); False uses the eps-form mean u_θ directly, as in the notes.
    """
    device = next(model.parameters()).device
    sigma2 = s.sigma2(var).to(device)
    s = s.to(device)
    x = torch.randn(shape, device=device, generator=generator)
    bar = common.Progress(s.T, what="sampling t")
    for k, t_int in enumerate(range(s.T, 0, -1)):
        t = torch.full((shape[0],), t_int, device=device, dtype=torch.long)
        eps = model(x, t).float()
        if clip_x0:
            mean, _ = q_posterior(s, predict_x0(s, x, t, eps).clamp(-1, 1), x, t)
        else:
            mean = p_mean(s, x, t, eps)
        if t_int > 1:
            # 训练与推理: x_{t-1} = u_θ(x_t, t) + σ_t ε',  ε' ~ N(0, I)
            x = mean + sigma2[t_int].sqrt().float() * torch.randn(shape, device=device, generator=generator)
        else:
            x = mean
        if progress and (k + 1) % 100 == 0:
            print(bar.line(k + 1), file=sys.stderr, flush=True)
    return x


@torch.no_grad()
def ddim_sample(model, s, shape, steps=50, eta=0.0, clip_x0=False, generator=None, progress=False):
    """DDIM (Song, Meng & Ermon 2021, eq. 12) on an evenly spaced sub-sequence of 1..T.

    The sequence starts at t = T and its last step goes to t = 0, i.e. ᾱ_0 = 1 exactly: the final output is the
    predicted x_0, with no "leading/trailing" spacing or "final alpha" choice to get wrong.
    eta = 0 is deterministic: it is the Euler discretisation of the probability-flow ODE of the SDE view where
    the notes stop (SDE heading; Song et al. 2021). eta = 1 with steps = T is the ancestral sampler with β̃_t.
    """
    if not 1 <= steps <= s.T:
        raise ValueError(f"steps must be in 1..T={s.T}, got {steps}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device = next(model.parameters()).device
    alpha_bar = s.alpha_bar.tolist()  # python floats: no device sync for the per-step scalars
    # t_k = round(k T / steps), k = steps..1 (evenly spaced, distinct, ending with t = T), then t = 0
    ts = [round(k * s.T / steps) for k in range(steps, 0, -1)] + [0]
    x = torch.randn(shape, device=device, generator=generator)
    for k in range(steps):
        t_int, prev = ts[k], ts[k + 1]
        a_t, a_prev = alpha_bar[t_int], alpha_bar[prev]
        t = torch.full((shape[0],), t_int, device=device, dtype=torch.long)
        eps = model(x, t).float()
        # 推导: x̂_0 = (x_t - sqrt(1-ᾱ_t) ε_θ) / sqrt(ᾱ_t)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        # DDIM: σ = η sqrt((1-ᾱ_prev)/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_prev); with η = 1 and prev = t-1 this is sqrt(β̃_t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        # DDIM: x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ^2) ε_θ + σ z
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
        if prev > 0 and sigma > 0:
            x = x + sigma * torch.randn(shape, device=device, generator=generator)
        if progress and (k + 1) % 10 == 0:
            print(f"ddim step {k + 1}/{steps}", file=sys.stderr, flush=True)
    return x


# ----------------------------------------------------------------------------------------------------------
# 推导: the variational bound in bits/dim (L_T + sum_{t>=2} L_{t-1} + L_0)


def gaussian_kl(mean1, var1, mean2, var2):
    # 推导: D_KL(N(u_1, σ_1^2 I) || N(u_2, σ_2^2 I)) per dimension = 1/2 [log σ_2^2/σ_1^2 - 1 + σ_1^2/σ_2^2 + (u_1-u_2)^2/σ_2^2]
    return 0.5 * (torch.log(var2) - torch.log(var1) - 1 + var1 / var2 + (mean1 - mean2) ** 2 / var2)


def _std_normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def discretized_gaussian_log_likelihood(x, mean, var):
    """log p(x) of the DDPM paper's L_0 decoder: N(mean, var) integrated over x's 8-bit bin of width 2/255.

    Data in [-1, 1] came from 256 levels; the bin of a level is [x - 1/255, x + 1/255], the two edge bins
    open to -inf (x = -1) and +inf (x = 1), so the 256 probabilities sum to 1.
    """
    std = var.sqrt()
    upper = torch.where(x > 0.999, torch.ones_like(x), _std_normal_cdf((x + 1 / 255 - mean) / std))
    lower = torch.where(x < -0.999, torch.zeros_like(x), _std_normal_cdf((x - 1 / 255 - mean) / std))
    return torch.log((upper - lower).clamp(min=1e-12))


@torch.no_grad()
def bound_terms(model, s, x0, t, var="beta_tilde", eps=None, generator=None):
    """One term of the bound per image, in nats summed over dimensions: L_{t-1} for t >= 2, L_0 for t = 1."""
    x0 = x0.double()
    s = s.to(x0.device)
    sigma2 = s.sigma2(var)
    if eps is None:
        eps = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=torch.float64)
    xt = q_sample(s, x0, t, eps.double())
    eps_theta = model(xt.to(next(model.parameters()).dtype), t).double()  # the network in its own precision
    mean_theta, var_theta = p_mean(s, xt, t, eps_theta), _at(sigma2, t, xt)
    # 推导: L_{t-1} = D_KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t))
    mean_q, var_q = q_posterior(s, x0, xt, t)
    kl = gaussian_kl(mean_q, var_q.clamp(min=1e-30), mean_theta, var_theta).flatten(1).sum(1)
    # 推导: L_0 = -log p_θ(x_0|x_1), discretised to the 8-bit bins
    nll0 = -discretized_gaussian_log_likelihood(x0, mean_theta, var_theta).flatten(1).sum(1)
    return torch.where(t == 1, nll0, kl)


def prior_term(s, x0):
    # 推导: L_T = D_KL(q(x_T|x_0) || N(0, I)), no parameters; small when ᾱ_T ≈ 0
    x0 = x0.double()
    a = s.alpha_bar[s.T].to(x0.device)
    return gaussian_kl(a.sqrt() * x0, (1 - a).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0)).flatten(1).sum(1)


@torch.no_grad()
def nll_bits_per_dim(model, s, x0, t_samples=None, var="beta_tilde", generator=None):
    """The bound -log p(x_0) <= L_T + sum_{t=2}^T L_{t-1} + L_0, per image, in bits per dimension.

    t_samples=None evaluates every t (T network calls per image) and returns (bpd, None). With an integer k,
    sum_t L_{t-1} is estimated without bias as T * mean of k uniformly drawn t's per image, and the call returns
    (bpd, standard error of bpd). bpd is a (B,) float64 tensor. Data x0 in [-1, 1] from 8-bit pixels.
    """
    B, D = x0.shape[0], x0[0].numel()
    device = x0.device
    total = prior_term(s, x0)
    if t_samples is None:
        for t_int in range(1, s.T + 1):
            total = total + bound_terms(model, s, x0, torch.full((B,), t_int, device=device), var, generator=generator)
        return total / (D * math.log(2)), None
    per_t = torch.stack([bound_terms(model, s, x0, torch.randint(1, s.T + 1, (B,), device=device, generator=generator),
                                     var, generator=generator) for _ in range(t_samples)], dim=1)
    est = total + s.T * per_t.mean(1)
    se = s.T * per_t.std(1) / math.sqrt(t_samples) if t_samples > 1 else torch.full_like(est, float("nan"))
    return est / (D * math.log(2)), se / (D * math.log(2))


# ----------------------------------------------------------------------------------------------------------
# CLI

GPU_RECIPE = dict(steps=100_000, batch_size=128, lr=2e-4, warmup=5000, ema_decay=0.9999)  # the DDPM paper's
# CPU: 21.5 min of training on 2 cores (step ~2,700 at 15 min), 23 min in all with the 64 samples
CPU_RECIPE = dict(steps=4000, batch_size=64, lr=1e-3, warmup=100, ema_decay=0.999)
MODEL_KEYS = ("kind", "in_ch", "image_size", "ch", "ch_mult", "num_res_blocks", "attn", "T", "beta_1", "beta_T")


def build_parser():
    p = argparse.ArgumentParser(description="DDPM, annotated against the notes (python ddpm.py --train)")
    common.add_common_args(p)
    g = p.add_argument_group("diffusion")
    g.add_argument("--T", type=common.positive_int, default=1000, help="diffusion steps T (default 1000)")
    g.add_argument("--beta-1", type=common.open_unit, default=1e-4, help="β_1 (default 1e-4)")
    g.add_argument("--beta-T", type=common.open_unit, default=0.02, help="β_T (default 0.02)")
    g.add_argument("--var", choices=["beta_tilde", "beta"], default="beta_tilde", help="sampler variance σ_t^2 (default beta_tilde)")
    g.add_argument("--clip-x0", action="store_true", help="clip the predicted x_0 to [-1,1] while sampling")
    g.add_argument("--ddim-steps", type=common.positive_int, help="with --sample: DDIM with this many steps instead of ancestral sampling")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM η >= 0 (default 0: deterministic)")
    g.add_argument("--final-samples", type=common.nonneg_int, default=64, help="samples written at the end of --train (default 64)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="the bound in bits/dim on the test split")
    g.add_argument("--eval-n", type=common.positive_int, help="images to evaluate (default all)")
    g.add_argument("--eval-t", type=common.positive_int, help="t's drawn per image (default: every t)")
    common.add_unet_args(p, ch=32, ch_mult=[1, 2, 2], res_blocks=1, attn=[2], dropout=0.0)
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
    if args.ddim_steps and args.ddim_steps > args.T:
        p.error(f"--ddim-steps {args.ddim_steps} > --T {args.T}")
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
            model, s = model_from_checkpoint(ck, device)
            if args.sample:
                write_samples(args, model, s, device, args.sample)
            if args.eval:
                evaluate(args, model, s, device, ck)
    except (common.DataError, common.CheckpointError, ValueError, OSError) as e:
        p.error(str(e))
    return 0


def bench(args, device):
    """--bench: the training step of train() and one sampling network call, timed on random data."""
    C, H = common.data_shape(args.data, args.data_dir)
    common.fill_recipe(args, device, GPU_RECIPE, CPU_RECIPE)
    torch.manual_seed(args.seed)
    model = common.UNet(**common.unet_config(args, C, H)).to(device)
    s = schedule(args.T, args.beta_1, args.beta_T).to(device)
    opt, sched = common.make_optimizer(model, args.lr, args.warmup)
    ema = common.make_ema(model, args.ema_decay)
    net = torch.compile(model) if args.compile else model
    B = args.batch_size
    x0 = torch.rand(B, C, H, H, device=device) * 2 - 1
    t = torch.full((B,), s.T, device=device)

    def train_step():
        with common.autocast(device, args.precision):
            loss = loss_simple(net, s, x0)
        common.optimizer_step(loss, model, opt, sched, args.grad_clip, ema)

    def sample_call():
        with common.autocast(device, args.precision):
            net(x0, t)

    print(common.benchmark(model, train_step, sample_call, B, device, common.macs_per_image(model, x0[:1], t[:1]), args.precision))
    return 0


def model_from_checkpoint(ck, device):
    a = ck["args"]
    model = common.UNet(in_ch=a["in_ch"], ch=a["ch"], ch_mult=a["ch_mult"], num_res_blocks=a["num_res_blocks"],
                        attn=a["attn"], dropout=0.0, image_size=a["image_size"])
    model.load_state_dict(ck["ema"])
    return model.to(device).eval(), schedule(a["T"], a["beta_1"], a["beta_T"])


def write_samples(args, model, s, device, n):
    g = torch.Generator(device=device).manual_seed(args.seed)
    shape = (n, model.in_ch, model.image_size, model.image_size)
    t0 = time.time()
    with common.autocast(device, args.precision):  # the network in bf16 where enabled; the updates stay fp32
        if args.ddim_steps:
            x = ddim_sample(model, s, shape, args.ddim_steps, args.eta, args.clip_x0, generator=g, progress=True)
        else:
            x = sample(model, s, shape, args.var, args.clip_x0, generator=g, progress=True)
    png, pt = common.save_samples(args.out, "samples", (x.clamp(-1, 1) + 1) / 2)
    print(f"wrote {png} and {pt} ({n} samples in {time.time() - t0:.1f}s)")


def evaluate(args, model, s, device, ck):
    x = common.load_images(args.data, args.data_dir, split="test")
    if x.shape[1:] != (model.in_ch, model.image_size, model.image_size):
        raise common.DataError(f"{args.data}: images {tuple(x.shape[1:])} but the model takes "
                               f"{(model.in_ch, model.image_size, model.image_size)}")
    x = x[:args.eval_n] if args.eval_n else x
    g = torch.Generator(device=device).manual_seed(args.seed)
    t0, bpds, ses = time.time(), [], []
    for k in range(0, len(x), 100):
        x0 = common.to_range(x[k:k + 100], -1).to(device)
        bpd, se = nll_bits_per_dim(model, s, x0, args.eval_t, args.var, generator=g)
        bpds.append(bpd.cpu())
        ses.append(se.cpu() if se is not None else torch.zeros_like(bpd.cpu()))
        print(f"eval {min(k + 100, len(x))}/{len(x)} images, running bits/dim {torch.cat(bpds).mean():.4f}", file=sys.stderr)
    bpd = torch.cat(bpds)
    # the spread over images already holds the noise of each image's estimate (x_t draws, and with --eval-t the
    # drawn t's); for a single image only that estimate's own standard error is left
    se = (bpd.std() / math.sqrt(len(bpd))).item() if len(bpd) > 1 else torch.cat(ses)[0].item()
    print(f"bound: {bpd.mean():.4f} ± {se:.4f} bits/dim on {len(bpd)} images of {args.data} (test), "
          f"{'every t' if args.eval_t is None else f'{args.eval_t} t per image'}, var={args.var}, "
          f"step {ck['step']}, {time.time() - t0:.1f}s")


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
    s = schedule(args.T, args.beta_1, args.beta_T).to(device)
    ck_args = dict(kind="ddpm", **{k: v for k, v in cfg.items() if k != "dropout"}, T=args.T, beta_1=args.beta_1,
                   beta_T=args.beta_T, dropout=args.dropout, seed=args.seed, data=args.data,
                   steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if rank == 0:
        common.check_writable(args.out)
        print(f"{recipe}; {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters; "
              f"{N} images {C}x{H}x{W}; device {device}; {world} process(es)", flush=True)
    data = data.to(device)  # the whole data set lives on the device: no DataLoader between steps
    opt, sched = common.make_optimizer(model, args.lr, args.warmup)
    ema = common.make_ema(model, args.ema_decay)
    step = 0
    if args.resume:
        step = common.resume(ckpt_path, "ddpm", ck_args, MODEL_KEYS, model, opt, sched, ema, rank=rank)
    net = common.wrap(model, world, device, args.compile)

    def save(step):
        if bad.found():  # never let a non-finite weight reach the disk: the last good file stays
            return
        if rank == 0:
            common.save_checkpoint(ckpt_path, common.training_state("ddpm", ck_args, step, model, opt, sched, ema))
            common.pause_if_asked(step)

    # ---- the training loop (训练与推理): x_0 ~ data, t ~ U{1..T}, ε ~ N(0, I), gradient step on L_simple
    bad = common.NonFiniteWatch(device)
    bar = common.Progress(args.steps, start=step)
    lo, hi = rank * args.batch_size // world, (rank + 1) * args.batch_size // world
    model.train()
    with common.StopOnInterrupt() as stop:
        while step < args.steps and not stop.requested:
            # the whole global batch is drawn from (seed, step); each rank takes its slice
            g = common.step_generator(args.seed, step, device)
            idx = torch.randint(0, N, (args.batch_size,), device=device, generator=g)[lo:hi]
            t = torch.randint(1, args.T + 1, (args.batch_size,), device=device, generator=g)[lo:hi]
            eps = torch.randn((args.batch_size, C, H, W), device=device, generator=g)[lo:hi]
            x0 = common.to_range(data[idx], -1)
            with common.autocast(device, args.precision):
                loss = loss_simple(net, s, x0, t, eps)
            gnorm = common.optimizer_step(loss, model, opt, sched, args.grad_clip, ema)
            step += 1
            bad.update(step, loss, gnorm)
            if step % args.log_every == 0 or step == args.steps:
                if bad.found():
                    break
                if rank == 0:
                    print(bar.line(step, loss=loss.item(), lr=sched.get_last_lr()[0]), flush=True)
            if step % args.ckpt_every == 0 or step == args.steps:
                save(step)
    common.stop_if_interrupted_or_bad(stop, bad, save, step, rank, "ddpm.py", args.out)
    if rank == 0 and args.final_samples:
        ema.module.eval()
        write_samples(args, ema.module, s, device, args.final_samples)


if __name__ == "__main__":
    sys.exit(main())
