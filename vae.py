"""VAE (Kingma & Welling 2014), annotated against the notes' VAE section; IWAE bound (Burda et al. 2016).

    python vae.py --train                               # the notes' Gaussian decoder, MNIST, runs/vae
    python vae.py --train --likelihood bernoulli --binarize --out runs/vae_bern   # the literature's setting
    python vae.py --sample 64 | --reconstruct | --eval --k 1000

Symbols follow the notes: the encoder gives U = u_φ(x) and σ_φ(x) of q_φ(v|x) = N(U, diag(σ_φ^2)), the latent
is v, the prior p(v) = N(0, I), and the decoder u_θ(v) is the mean of p_θ(x|v). Data live in [0, 1].
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

LOG_2PI = math.log(2 * math.pi)

# ==========================================================================================================
# VAE: encoder q_φ(v|x), reparameterisation, KL, the Gaussian decoder, ELBO, the notes' loss, generation


class VAE(nn.Module):
    """arch="mlp": x -> hidden -> (U, log σ^2) and v -> hidden -> u_θ(v), as in the VAE/IWAE papers' MNIST models.
    arch="conv": two stride-2 convolutions each way, for 28 or 32 px images with any channel count."""

    def __init__(self, in_ch=1, image_size=28, latent_dim=20, hidden=400, arch="mlp", likelihood="gaussian"):
        super().__init__()
        if likelihood not in ("gaussian", "bernoulli"):
            raise ValueError(f"likelihood must be gaussian or bernoulli, got {likelihood!r}")
        self.likelihood = likelihood
        if arch not in ("mlp", "conv"):
            raise ValueError(f"arch must be mlp or conv, got {arch!r}")
        if arch == "conv" and image_size % 4:
            raise ValueError(f"the conv VAE halves the image twice: {image_size}px is not divisible by 4")
        self.in_ch, self.image_size, self.latent_dim, self.arch = in_ch, image_size, latent_dim, arch
        D = in_ch * image_size * image_size
        if arch == "mlp":
            self.enc = nn.Sequential(nn.Flatten(), nn.Linear(D, hidden), nn.ReLU())
            self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, D),
                                     nn.Unflatten(1, (in_ch, image_size, image_size)))
            feat = hidden
        else:
            side = image_size // 4
            self.enc = nn.Sequential(nn.Conv2d(in_ch, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(64 * side * side, hidden), nn.ReLU())
            self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 64 * side * side), nn.ReLU(),
                                     nn.Unflatten(1, (64, side, side)), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(32, in_ch, 4, 2, 1))
            feat = hidden
        # the encoder outputs log σ^2 rather than σ: any real number is valid, σ^2 = exp(log σ^2) > 0 always
        self.to_mu, self.to_log_var = nn.Linear(feat, latent_dim), nn.Linear(feat, latent_dim)

    def encode(self, x):
        h = self.enc(x)
        return self.to_mu(h), self.to_log_var(h)

    def decode(self, v):
        """What log_px_given_v takes: the mean u_θ(v) in [0, 1] (gaussian) or the logits (bernoulli)."""
        out = self.dec(v)
        return torch.sigmoid(out) if self.likelihood == "gaussian" else out

    def decoder_mean(self, v):
        """u_θ(v), the mean of p_θ(x|v), for pictures."""
        out = self.decode(v)
        return out if self.likelihood == "gaussian" else torch.sigmoid(out)

    def forward(self, x, generator=None):
        """Encode, draw one v ~ q_φ(v|x) by reparameterisation, decode: (decoder output, U, log σ^2)."""
        mu, log_var = self.encode(x)
        return self.decode(reparameterize(mu, log_var, generator=generator)), mu, log_var


def reparameterize(mu, log_var, eps=None, generator=None):
    """A draw of v ~ q_φ(v|x) = N(U, diag(σ^2)) as a differentiable function of (U, log σ^2); eps: given noise
    of shape (..., B, d), or None to draw it.

    NOTES ERROR (VAE, 重参数化): the notes write v = U + σ^2 ⊗ ε. The standard deviation of q_φ(v|x) is σ, not σ^2:
    with σ^2 in front, v would have variance σ^4 and the samples would not come from N(U, diag(σ^2)) whose KL
    the loss computes.
    """
    if eps is None:
        eps = torch.randn(mu.shape, device=mu.device, generator=generator)
    # VAE (重参数化): v = U + σ ⊙ ε, ε ~ N(0, I), σ = exp(log σ^2 / 2)
    return mu + torch.exp(0.5 * log_var) * eps


def kl_to_standard_normal(mu, log_var):
    """D_KL[q_φ(v|x) || N(0, I)] per example, summed over the d latent dimensions.

    NOTES ERROR (VAE, intro): the notes' first paragraph calls the loss KL(N || N_g), prior first; the KL the
    derivation (and this function) computes is KL(q_φ(v|x) || p(v)) = KL(N_g || N). The two differ for σ ≠ 1.
    """
    # VAE: D_KL = 1/2 Σ_i [σ_φ^2(x)_i + u_φ(x)_i^2 - log σ_φ^2(x)_i - 1]
    return 0.5 * (log_var.exp() + mu ** 2 - log_var - 1).sum(dim=1)


def log_px_given_v(out, x, likelihood, sigma_x=None):
    """log p_θ(x|v) per example (nats), from the decoder's output: the mean u_θ(v) (gaussian, the notes') or the
    logits (bernoulli, below the notes' part of this file).

    NOTES ERROR (VAE): the notes' density has the normaliser 1/(2 π^{n/2} σ^n); a Gaussian's is 1/((2π)^{n/2} σ^n).
    Their log-density line, -n log(sqrt(2π) σ), is the right one and is what this computes.
    """
    if likelihood == "bernoulli":
        return bernoulli_log_likelihood(out, x)
    n = x[0].numel()
    # VAE: log p_θ(x|v) = -n log(sqrt(2π) σ) - ||x - u_θ(v)||^2 / (2σ^2),  p_θ(x|v) = N(x; u_θ(v), σ^2 I)
    return -n * (0.5 * LOG_2PI + math.log(sigma_x)) - ((x - out) ** 2).flatten(1).sum(1) / (2 * sigma_x ** 2)


def elbo(model, x, likelihood=None, sigma_x=0.1, generator=None):
    """The ELBO per example in nats, with one sample of v (the notes: 抽样一次就够了). likelihood=None: the model's."""
    likelihood = likelihood or getattr(model, "likelihood", "gaussian")
    out, mu, log_var = model(x, generator=generator)
    # VAE: L = E_{v~q_φ(v|x)} log p_θ(x|v) - D_KL[q_φ(v|x) || p(v)], the expectation by one draw of v
    return log_px_given_v(out, x, likelihood, sigma_x) - kl_to_standard_normal(mu, log_var)


def notes_loss(x, x_mean, mu, log_var, sigma_x):
    """The notes' final Gaussian loss, per example, which is -2σ^2 (L + n log(sqrt(2π) σ)).

    NOTES ERROR (VAE, final loss): the notes write u_φ(x)_i, not u_φ(x)_i^2, inside the sum (the KL line above it
    has the square). Without it the loss is linear in the mean and is minimised by pushing U to -infinity.
    (Dropping the constant -1, as the notes do, does not change the minimiser.)
    """
    # VAE: min ||x - u_θ(v)||^2 + σ^2 Σ_i [σ_φ^2(x)_i + u_φ(x)_i^2 - log σ_φ^2(x)_i - 1]
    return ((x - x_mean) ** 2).flatten(1).sum(1) + sigma_x ** 2 * (log_var.exp() + mu ** 2 - log_var - 1).sum(1)


@torch.no_grad()
def generate(model, n, generator=None, sigma_x=None):
    """Generation: v ~ N(0, I), x = u_θ(v) (the decoder mean, what is shown).

    With sigma_x given (Gaussian decoder), a draw from p_θ(x|v) instead: x = u_θ(v) + σ ε.
    NOTES ERROR (VAE, generation): the notes write x = u_θ(v) + σ^2 ε; p_θ(x|v) = N(u_θ(v), σ^2 I) has standard
    deviation σ. The notes then drop the noise, as this function does by default.
    """
    device = next(model.parameters()).device
    # VAE (推理): v ~ N(0, I), the encoder discarded
    v = torch.randn((n, model.latent_dim), device=device, generator=generator)
    mean = model.decoder_mean(v)
    if sigma_x is None:
        return mean
    # VAE: x = u_θ(v) + σ ε, ε ~ N(0, I), a draw from p_θ(x|v) = N(u_θ(v), σ^2 I)
    return mean + sigma_x * torch.randn(mean.shape, device=device, generator=generator)


# ==========================================================================================================
# Beyond the notes: the Bernoulli decoder, discrete likelihoods, the IWAE bound


def bernoulli_log_likelihood(logits, x):
    """log p_θ(x|v) of a Bernoulli decoder for binary x, from the logits of u_θ(v) = sigmoid(logits)."""
    # log p = Σ x log u + (1-x) log(1-u), u = sigmoid(logits)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def prepare(x01, likelihood, generator):
    """Training/eval targets from images in [0, 1].

    bernoulli: dynamic binarisation, each pixel drawn from Bernoulli(grey level) every time an image is used.
    gaussian: uniform dequantisation of the 8-bit levels, y = (255 x + u) / 256, u ~ U[0, 1), so that the density
    has a discrete likelihood behind it: log P(x) >= E_u log p(y) - D log 256 (bits/dim as in flow papers).
    """
    u = torch.rand(x01.shape, device=x01.device, generator=generator)
    if likelihood == "bernoulli":
        # dynamic binarisation: x_b ~ Bernoulli(x), i.e. x_b = [u < x], u ~ U[0, 1)
        return (u < x01).float()
    # uniform dequantisation: y = (k + u) / 256 for the 8-bit level k = 255 x, u ~ U[0, 1)
    return (torch.round(x01 * 255) + u) / 256


def bits_per_dim(nats, D, likelihood):
    """nats per image -> bits per dimension; the Gaussian density on [0,1]^D gets the log 256 per dimension of
    the dequantisation (its value is then -log2 of a probability of 8-bit data, never negative)."""
    # -log P(x) <= -E_u log p(y) + D log 256 for the dequantised density
    extra = D * math.log(256) if likelihood == "gaussian" else 0.0
    # bits per dimension = nats / (D log 2)
    return (nats + extra) / (D * math.log(2))


@torch.no_grad()
def iwae_bound(model, x, k, likelihood=None, sigma_x=0.1, generator=None, chunk=50_000):
    """The IWAE bound (Burda et al. 2016) per example in nats, k draws v_j ~ q_φ(v|x); k = 1 is the ELBO.

    The bound rises towards log p_θ(x) as k grows; logsumexp keeps the sum of k tiny ratios finite.
    """
    likelihood = likelihood or getattr(model, "likelihood", "gaussian")
    out = []
    per = max(1, chunk // k)
    for xb in x.split(per):
        B = xb.shape[0]
        mu, log_var = model.encode(xb)
        eps = torch.randn((k, *mu.shape), device=mu.device, generator=generator)
        v = reparameterize(mu, log_var, eps)  # (k, B, d)
        xr = xb.expand(k, *xb.shape).reshape(k * B, *xb.shape[1:])
        log_px = log_px_given_v(model.decode(v.reshape(k * B, -1)), xr, likelihood, sigma_x).reshape(k, B)
        # log p(v) = log N(v; 0, I) = Σ_i -1/2 (v_i^2 + log 2π)
        log_pv = (-0.5 * (v ** 2 + LOG_2PI)).sum(-1)
        # log q_φ(v|x) = log N(v; U, diag(σ^2)) = Σ_i -1/2 (ε_i^2 + log 2π + log σ_i^2), since (v - U)/σ = ε
        log_qv = (-0.5 * (eps ** 2 + LOG_2PI) - 0.5 * log_var).sum(-1)
        # IWAE: log (1/k) Σ_j p_θ(x, v_j) / q_φ(v_j|x),  p_θ(x, v) = p_θ(x|v) p(v)
        out.append(torch.logsumexp(log_px + log_pv - log_qv, dim=0) - math.log(k))
    return torch.cat(out)


# ==========================================================================================================
# Command line: recipe, training loop, sampling, --eval, --bench

RECIPE = dict(steps=10_000, batch_size=128, lr=1e-3, warmup=0)  # CPU and GPU alike: the MLP is tiny
MODEL_KEYS = ("kind", "in_ch", "image_size", "latent_dim", "hidden", "arch", "likelihood", "sigma_x")


def build_parser():
    p = argparse.ArgumentParser(description="VAE, annotated against the notes (python vae.py --train)")
    # the clip is only a guard (the loss is in nats per image); fp32 by default: the MLP is cheap, and the
    # likelihood sums 784 terms whose bf16 rounding would show in the reported nats
    common.add_common_args(p, ema=False, clip=1000.0, precision="fp32")
    g = p.add_argument_group("VAE")
    g.add_argument("--reconstruct", action="store_true", help="grid of test images (odd rows) above their reconstructions")
    g.add_argument("--eval", action="store_true", help="test-set negative ELBO and IWAE-k NLL, nats/image and bits/dim")
    g.add_argument("--k", type=common.positive_int, default=100, help="importance samples for --eval (default 100)")
    g.add_argument("--eval-n", type=common.positive_int, help="test images for --eval (default all)")
    g.add_argument("--latent-dim", type=common.positive_int, default=20, help="d, the latent size (default 20)")
    g.add_argument("--hidden", type=common.positive_int, default=400, help="hidden units (default 400)")
    g.add_argument("--arch", choices=["mlp", "conv"], default="mlp", help="encoder/decoder (default mlp)")
    g.add_argument("--likelihood", choices=["gaussian", "bernoulli"], default="gaussian",
                   help="p_θ(x|v): gaussian with fixed σ (the notes) or bernoulli (needs --binarize)")
    g.add_argument("--sigma-x", type=common.positive_float, default=0.1, help="σ of the Gaussian decoder (default 0.1)")
    g.add_argument("--binarize", action="store_true", help="dynamic binarisation of the data (for --likelihood bernoulli)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.train or args.sample or args.reconstruct or args.eval or args.bench):
        p.error("nothing to do: give --train, --sample N, --reconstruct, --eval or --bench")
    if args.likelihood == "bernoulli" and not args.binarize:
        p.error("--likelihood bernoulli needs binary targets: add --binarize (dynamic binarisation)")
    if args.binarize and args.likelihood != "bernoulli":
        p.error("--binarize goes with --likelihood bernoulli")
    args.out = args.out or os.path.join("runs", "vae")
    try:
        rank, world, device = common.setup_distributed(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device}: {e}")
    try:
        if args.bench:
            return bench(args, device)
        if args.train:
            train(args, rank, world, device)
        if rank == 0 and (args.sample or args.reconstruct or args.eval):
            ck = common.load_checkpoint(os.path.join(args.out, "ckpt.pt"), kind="vae")
            model = model_from_checkpoint(ck, device)
            g = torch.Generator(device=device).manual_seed(args.seed)
            if args.sample:
                png, _ = common.save_samples(args.out, "samples", generate(model, args.sample, g))
                print(f"wrote {png}")
            if args.reconstruct or args.eval:
                x = test_images(args, model, device)
            if args.reconstruct:
                reconstruct(args, model, x[:32], g)
            if args.eval:
                evaluate(args, ck["args"], model, x, g, ck["step"])
    except (common.DataError, common.CheckpointError, ValueError, OSError) as e:
        p.error(str(e))
    return 0


def train(args, rank, world, device):
    data = common.load_images(args.data, args.data_dir, "train")
    N, C, H, W = data.shape
    if H != W:
        raise common.DataError(f"{args.data}: images are {H}x{W}; use square images")
    torch.manual_seed(args.seed)  # the initial weights, and dropout, follow --seed
    recipe = common.fill_recipe(args, device, RECIPE, RECIPE)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split evenly over {world} ranks")
    model = VAE(C, H, args.latent_dim, args.hidden, args.arch, args.likelihood).to(device)
    ck_args = dict(kind="vae", in_ch=C, image_size=H, latent_dim=args.latent_dim, hidden=args.hidden, arch=args.arch,
                   likelihood=args.likelihood, sigma_x=args.sigma_x, seed=args.seed, data=args.data,
                   steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    macs = common.macs_per_image(model, torch.zeros(1, C, H, W, device=device))
    if rank == 0:
        common.check_writable(args.out)
        print(f"{recipe}; {args.arch} VAE, d={args.latent_dim}, {args.likelihood} decoder, {macs / 1e6:.2f}M MACs per "
              f"image; {N} images {C}x{H}x{W}; device {device}", flush=True)
    data = data.to(device)
    opt, lr_sched = common.make_optimizer(model, args.lr, args.warmup)
    step, seconds = 0, 0.0
    if args.resume:
        step, seconds = common.resume(ckpt_path, "vae", ck_args, MODEL_KEYS, model, opt, lr_sched, rank=rank)
    net = common.wrap(model, world, device, args.compile)
    budget = common.Budget(args.steps, args.minutes, seconds, world, device=device)
    bad = common.NonFiniteWatch(device)

    def save(step):
        if rank == 0 and not bad.found():
            common.save_checkpoint(ckpt_path, common.training_state("vae", ck_args, step, budget.seconds(), model, opt, lr_sched))

    # ---- training: maximise the ELBO, i.e. minimise -L averaged over the batch (nats per image)
    bar = common.Progress(budget, start=step, macs_per_step=3 * macs * args.batch_size)
    lo, hi = rank * args.batch_size // world, (rank + 1) * args.batch_size // world
    done = budget.over(step)
    with common.StopOnInterrupt() as stop:
        while not done and not stop.requested:
            g = common.step_generator(args.seed, step, device)
            idx = torch.randint(0, N, (args.batch_size,), device=device, generator=g)[lo:hi]
            x = prepare(common.to_range(data[idx], 0), args.likelihood, g)
            with common.autocast(device, args.precision):
                loss = -elbo(net, x, args.likelihood, args.sigma_x, g).mean()
            gnorm = common.optimizer_step(loss, model, opt, lr_sched, args.grad_clip)
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
    common.stop_if_interrupted_or_bad(stop, bad, save, step, rank, "vae.py", args.out)
    if rank == 0:
        model.eval()
        png, _ = common.save_samples(args.out, "samples", generate(model, 64, torch.Generator(device).manual_seed(args.seed)))
        print(f"wrote {png}")


def model_from_checkpoint(ck, device):
    """The VAE of a checkpoint, ready to sample, reconstruct and evaluate."""
    saved = ck["args"]
    model = VAE(saved["in_ch"], saved["image_size"], saved["latent_dim"], saved["hidden"], saved["arch"], saved["likelihood"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


def test_images(args, model, device):
    x = common.load_images(args.data, args.data_dir, "test")
    if x.shape[1:] != (model.in_ch, model.image_size, model.image_size):
        raise common.DataError(f"{args.data}: images {tuple(x.shape[1:])}, the model takes "
                               f"{(model.in_ch, model.image_size, model.image_size)}")
    return common.to_range(x, 0).to(device)


@torch.no_grad()
def reconstruct(args, model, x, g):
    mu, _ = model.encode(x)
    rec = model.decoder_mean(mu)
    n = min(8, len(x))
    rows = [t for k in range(0, len(x) - len(x) % n, n) for t in (x[k:k + n], rec[k:k + n])]
    png, _ = common.save_samples(args.out, "reconstructions", torch.cat(rows), nrow=n)
    print(f"wrote {png} (odd rows: test images; even rows: decoder mean of the encoder mean)")


@torch.no_grad()
def evaluate(args, saved, model, x, g, step):
    x = x[:args.eval_n] if args.eval_n else x
    t0 = time.time()
    y = prepare(x, saved["likelihood"], g)  # one fixed binarisation / dequantisation of the test set
    neg_elbo = torch.cat([-elbo(model, yb, saved["likelihood"], saved["sigma_x"], g) for yb in y.split(1000)])
    nll = -iwae_bound(model, y, args.k, saved["likelihood"], saved["sigma_x"], g)
    D = x[0].numel()
    for name, v in (("negative ELBO", neg_elbo), (f"IWAE NLL (k={args.k})", nll)):
        se = v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
        print(f"{name}: {v.mean():.2f} ± {se:.2f} nats/image, {bits_per_dim(v.mean().item(), D, saved['likelihood']):.4f} bits/dim")
    print(f"({len(x)} test images of {args.data}, {saved['likelihood']} decoder"
          f"{', dynamically binarised' if saved['likelihood'] == 'bernoulli' else ', dequantised 8-bit'}, "
          f"step {step}, {time.time() - t0:.1f}s)")


def bench(args, device):
    """--bench: one training step and one decoder call (what generation costs), timed on random data."""
    C, H = common.data_shape(args.data, args.data_dir)
    common.fill_recipe(args, device, RECIPE, RECIPE)
    torch.manual_seed(args.seed)
    model = VAE(C, H, args.latent_dim, args.hidden, args.arch, args.likelihood).to(device)
    x = prepare(torch.rand(args.batch_size, C, H, H, device=device), args.likelihood, None)
    v = torch.randn(args.batch_size, args.latent_dim, device=device)
    print(common.bench(model, args, device, loss=lambda net: -elbo(net, x, args.likelihood, args.sigma_x).mean(),
                       sample_call=lambda net: model.decode(v), example=(x[:1],), ema=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
