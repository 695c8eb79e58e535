"""VAE (Kingma & Welling 2014), annotated against the notes' VAE section; IWAE bound (Burda et al.
2016); then the command line.

    python vae.py --train          # the notes' Gaussian decoder, MNIST, runs/vae
    python vae.py --train --likelihood bernoulli --binarize --out runs/vae_bern   # the literature's
    python vae.py --sample 64 | --reconstruct | --eval --k 1000

Symbols follow the notes: the encoder gives U = u_φ(x) and σ_φ(x) of q_φ(v|x) = N(U, diag(σ_φ^2)),
the latent is v, the prior p(v) = N(0, I), and the decoder u_θ(v) is the mean of p_θ(x|v). Data live
in [0, 1]. Everything above the command-line banner needs only torch.
"""
import argparse
import contextlib
import ctypes
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

LOG_2PI = math.log(2 * math.pi)

# ==================================================================================================
# VAE: encoder q_φ(v|x), reparameterisation, KL, Gaussian decoder, ELBO, notes' loss, generation


class VAE(nn.Module):
    """arch="mlp": x -> hidden -> (U, log σ^2) and v -> hidden -> u_θ(v), as in the VAE/IWAE papers'
    MNIST models. arch="conv": two stride-2 convolutions each way, for 28 or 32 px images with any
    channel count."""

    def __init__(self, in_ch=1, image_size=28, latent_dim=20, hidden=400, arch="mlp",
                 likelihood="gaussian"):
        super().__init__()
        if likelihood not in ("gaussian", "bernoulli"):
            raise ValueError(f"likelihood must be gaussian or bernoulli, got {likelihood!r}")
        self.likelihood = likelihood
        if arch not in ("mlp", "conv"):
            raise ValueError(f"arch must be mlp or conv, got {arch!r}")
        if arch == "conv" and image_size % 4:
            raise ValueError(f"the conv VAE halves the image twice: {image_size}px is not "
                             "divisible by 4")
        self.in_ch, self.image_size, self.latent_dim = in_ch, image_size, latent_dim
        self.arch = arch
        D = in_ch * image_size * image_size
        if arch == "mlp":
            self.enc = nn.Sequential(nn.Flatten(), nn.Linear(D, hidden), nn.ReLU())
            self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, D),
                                     nn.Unflatten(1, (in_ch, image_size, image_size)))
        else:
            side = image_size // 4
            self.enc = nn.Sequential(nn.Conv2d(in_ch, 32, 4, 2, 1), nn.ReLU(),
                                     nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(64 * side * side, hidden), nn.ReLU())
            self.dec = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 64 * side * side), nn.ReLU(),
                                     nn.Unflatten(1, (64, side, side)),
                                     nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(32, in_ch, 4, 2, 1))
        # the encoder outputs log σ^2 rather than σ: any real number is valid, exp(log σ^2) > 0
        self.to_mu, self.to_log_var = nn.Linear(hidden, latent_dim), nn.Linear(hidden, latent_dim)

    def encode(self, x):
        h = self.enc(x)
        return self.to_mu(h), self.to_log_var(h)

    def decode(self, v):
        """What log_px_given_v takes: the mean u_θ(v) in [0, 1] (gaussian) or the logits
        (bernoulli)."""
        out = self.dec(v)
        return torch.sigmoid(out) if self.likelihood == "gaussian" else out

    def decoder_mean(self, v):
        """u_θ(v), the mean of p_θ(x|v), for pictures."""
        out = self.decode(v)
        return out if self.likelihood == "gaussian" else torch.sigmoid(out)

    def forward(self, x, generator=None):
        """Encode, draw one v ~ q_φ(v|x) by reparameterisation, decode: (decoder output, U, log
        σ^2)."""
        mu, log_var = self.encode(x)
        return self.decode(reparameterize(mu, log_var, generator=generator)), mu, log_var


def reparameterize(mu, log_var, eps=None, generator=None):
    """A draw of v ~ q_φ(v|x) = N(U, diag(σ^2)) as a differentiable function of (U, log σ^2); eps:
    given noise of shape (..., B, d), or None to draw it.

    NOTES ERROR (VAE, 重参数化): the notes write v = U + σ^2 ⊗ ε. The standard deviation of q_φ(v|x) is
    σ, not σ^2: with σ^2 in front, v would have variance σ^4 and the samples would not come from
    N(U, diag(σ^2)) whose KL the loss computes.
    """
    if eps is None:
        eps = torch.randn(mu.shape, device=mu.device, generator=generator)
    # VAE (重参数化): v = U + σ ⊙ ε, ε ~ N(0, I), σ = exp(log σ^2 / 2)
    return mu + torch.exp(0.5 * log_var) * eps


def kl_to_standard_normal(mu, log_var):
    """D_KL[q_φ(v|x) || N(0, I)] per example, summed over the d latent dimensions.

    NOTES ERROR (VAE, intro): the notes' first paragraph calls the loss KL(N || N_g), prior first;
    the KL the derivation (and this function) computes is KL(q_φ(v|x) || p(v)) = KL(N_g || N). The
    two differ for σ ≠ 1.
    """
    # VAE: D_KL = 1/2 Σ_i [σ_φ^2(x)_i + u_φ(x)_i^2 - log σ_φ^2(x)_i - 1]
    return 0.5 * (log_var.exp() + mu ** 2 - log_var - 1).sum(dim=1)


def log_px_given_v(out, x, likelihood, sigma_x=None):
    """log p_θ(x|v) per example (nats), from the decoder's output: the mean u_θ(v) (gaussian, the
    notes') or the logits (bernoulli, below the notes' part of this file).

    NOTES ERROR (VAE): the notes' density has the normaliser 1/(2 π^{n/2} σ^n); a Gaussian's is
    1/((2π)^{n/2} σ^n). Their log-density line, -n log(sqrt(2π) σ), is the right one and is what
    this computes.
    """
    if likelihood == "bernoulli":
        return bernoulli_log_likelihood(out, x)
    n = x[0].numel()
    # VAE: p_θ(x|v) = N(x; u_θ(v), σ^2 I),
    #      log p_θ(x|v) = -n log(sqrt(2π) σ) - ||x - u_θ(v)||^2 / (2σ^2)
    return (-n * (0.5 * LOG_2PI + math.log(sigma_x))
            - ((x - out) ** 2).flatten(1).sum(1) / (2 * sigma_x ** 2))


def elbo(model, x, likelihood=None, sigma_x=0.1, generator=None):
    """The ELBO per example in nats, with one sample of v (the notes: 抽样一次就够了).
    likelihood=None: the model's."""
    likelihood = likelihood or getattr(model, "likelihood", "gaussian")
    out, mu, log_var = model(x, generator=generator)
    # VAE: L = E_{v~q_φ(v|x)} log p_θ(x|v) - D_KL[q_φ(v|x) || p(v)], E by one draw of v
    return log_px_given_v(out, x, likelihood, sigma_x) - kl_to_standard_normal(mu, log_var)


def notes_loss(x, x_mean, mu, log_var, sigma_x):
    """The notes' final Gaussian loss, per example, which is -2σ^2 (L + n log(sqrt(2π) σ)).

    NOTES ERROR (VAE, final loss): the notes write u_φ(x)_i, not u_φ(x)_i^2, inside the sum (the KL
    line above it has the square). Without it the loss is linear in the mean and is minimised by
    pushing U to -infinity. (Dropping the constant -1, as the notes do, does not change the
    minimiser.)
    """
    # VAE: min ||x - u_θ(v)||^2 + σ^2 Σ_i [σ_φ^2(x)_i + u_φ(x)_i^2 - log σ_φ^2(x)_i - 1]
    return (((x - x_mean) ** 2).flatten(1).sum(1)
            + sigma_x ** 2 * (log_var.exp() + mu ** 2 - log_var - 1).sum(1))


@torch.no_grad()
def generate(model, n, generator=None, sigma_x=None):
    """Generation: v ~ N(0, I), x = u_θ(v) (the decoder mean, what is shown), on the model's device.

    With sigma_x given (Gaussian decoder), a draw from p_θ(x|v) instead: x = u_θ(v) + σ ε. NOTES
    ERROR (VAE, generation): the notes write x = u_θ(v) + σ^2 ε; p_θ(x|v) = N(u_θ(v), σ^2 I) has
    standard deviation σ. The notes then drop the noise, as this function does by default.
    """
    device = next(model.parameters()).device
    # VAE (推理): v ~ N(0, I), the encoder discarded
    v = torch.randn((n, model.latent_dim), device=device, generator=generator)
    mean = model.decoder_mean(v)
    if sigma_x is None:
        return mean
    # VAE: x = u_θ(v) + σ ε, ε ~ N(0, I), a draw from p_θ(x|v) = N(u_θ(v), σ^2 I)
    return mean + sigma_x * torch.randn(mean.shape, device=device, generator=generator)


# ==================================================================================================
# Beyond the notes: the Bernoulli decoder, discrete likelihoods, the IWAE bound


def bernoulli_log_likelihood(logits, x):
    """log p_θ(x|v) of a Bernoulli decoder for binary x, from the logits of u_θ(v) =
    sigmoid(logits)."""
    # log p = Σ x log u + (1-x) log(1-u), u = sigmoid(logits)
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)


def prepare(x01, likelihood, generator):
    """Training/eval targets from images in [0, 1].

    bernoulli: dynamic binarisation, each pixel drawn from Bernoulli(grey level) every time an image
    is used. gaussian: uniform dequantisation of the 8-bit levels, y = (255 x + u) / 256, u ~ U[0,
    1), so that the density has a discrete likelihood behind it: log P(x) >= E_u log p(y) - D log
    256 (bits/dim as in flow papers).
    """
    u = torch.rand(x01.shape, device=x01.device, generator=generator)
    if likelihood == "bernoulli":
        # dynamic binarisation: x_b ~ Bernoulli(x), i.e. x_b = [u < x], u ~ U[0, 1)
        return (u < x01).float()
    # uniform dequantisation: y = (k + u) / 256 for the 8-bit level k = 255 x, u ~ U[0, 1)
    return (torch.round(x01 * 255) + u) / 256


def bits_per_dim(nats, D, likelihood):
    """nats per image -> bits per dimension; the Gaussian density on [0,1]^D gets the log 256 per
    dimension of the dequantisation (its value is then -log2 of a probability of 8-bit data, never
    negative)."""
    # -log P(x) <= -E_u log p(y) + D log 256 for the dequantised density
    extra = D * math.log(256) if likelihood == "gaussian" else 0.0
    # bits per dimension = nats / (D log 2)
    return (nats + extra) / (D * math.log(2))


@torch.no_grad()
def iwae_bound(model, x, k, likelihood=None, sigma_x=0.1, generator=None, chunk=50_000):
    """The IWAE bound (Burda et al. 2016) per example in nats, k draws v_j ~ q_φ(v|x); k = 1 is the
    ELBO.

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
        log_px = log_px_given_v(model.decode(v.reshape(k * B, -1)), xr, likelihood, sigma_x)
        log_px = log_px.reshape(k, B)
        # log p(v) = log N(v; 0, I) = Σ_i -1/2 (v_i^2 + log 2π)
        log_pv = (-0.5 * (v ** 2 + LOG_2PI)).sum(-1)
        # log q_φ(v|x) = log N(v; U, diag(σ^2)) = Σ_i -1/2 (ε_i^2 + log 2π + log σ_i^2),
        #   since (v - U)/σ = ε
        log_qv = (-0.5 * (eps ** 2 + LOG_2PI) - 0.5 * log_var).sum(-1)
        # IWAE: log (1/k) Σ_j p_θ(x, v_j) / q_φ(v_j|x),  p_θ(x, v) = p_θ(x|v) p(v)
        out.append(torch.logsumexp(log_px + log_pv - log_qv, dim=0) - math.log(k))
    return torch.cat(out)


# ==================================================================================================
# Command line: recipe and flags, the training loop, sampling, --eval
#
# Nothing above this banner needs it. It takes the data and the PNG writer from common.py, imported
# in the functions that use them, so that `import vae` itself needs only torch. One process: the MLP
# is tiny, and torchrun is refused.

RECIPE = dict(steps=10_000, batch_size=128, lr=1e-3, warmup=0)  # CPU and GPU alike: the MLP is tiny
MODEL_KEYS = ("kind", "in_ch", "image_size", "latent_dim", "hidden", "arch", "likelihood",
              "sigma_x")
OLDER = {}  # what checkpoints written before a key existed used (none so far)
# the flags that define a run, and their names in a checkpoint's args: --resume takes them from the
# checkpoint and refuses a changed one (steps, minutes, logging, sampling and hardware may change)
RUN_FLAGS = dict(data="data", seed="seed", batch_size="batch_size", lr="lr", warmup="warmup",
                 grad_clip="grad_clip", binarize="binarize", likelihood="likelihood",
                 latent_dim="latent_dim", hidden="hidden", arch="arch", sigma_x="sigma_x")


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


def build_parser():
    p = argparse.ArgumentParser(
        prog="vae.py", description="VAE, annotated against the notes (python vae.py --train)")
    add = p.add_argument_group("what to do").add_argument
    add("--train", action="store_true",
        help="train (downloads the data set on first use)")
    add("--resume", action="store_true", help="continue training from OUT/ckpt.pt")
    add("--sample", type=POSITIVE_INT, metavar="N",
        help="write N samples from OUT/ckpt.pt to OUT/samples.png and OUT/samples.pt")
    add("--reconstruct", action="store_true",
        help="grid of test images (odd rows) above their reconstructions")
    add("--eval", action="store_true",
        help="test-set negative ELBO and IWAE-k NLL, nats/image and bits/dim")
    add = p.add_argument_group("data and output").add_argument
    add("--data", default="mnist",
        help="mnist | fashion-mnist | cifar10 (downloaded), or a .pt/.npy tensor "
             "(N,H,W) or (N,C,H,W), uint8 in [0,255] or float in [0,1]")
    add("--data-dir", default="data",
        help="where downloaded data sets are kept (default ./data)")
    add("--out", default=os.path.join("runs", "vae"),
        help="the run's folder: checkpoint and samples (default runs/vae)")
    add("--seed", type=SEED, default=0,
        help="random seed (default 0); same seed, same samples")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu) or a torch device")
    add("--compile", action="store_true", help="torch.compile the model for training")
    # fp32 by default: the MLP is cheap, and the likelihood sums 784 terms whose bf16 rounding would
    # show in the reported nats
    add("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
        help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32; on "
             "CUDA fp32 matmuls use TF32 (default fp32)")
    add = p.add_argument_group("optimisation (unset flags come from the recipe)").add_argument
    add("--steps", type=COUNT,
        help="train until this many steps in all (with --minutes: whichever comes "
             "first)")
    add("--minutes", type=POSITIVE,
        help="train until this many minutes of training in all, counted across --resume")
    add("--batch-size", type=POSITIVE_INT, help="batch size")
    add("--lr", type=LR, help="Adam learning rate")
    add("--warmup", type=COUNT, help="linear learning-rate warm-up steps")
    # the clip is only a guard: the loss is in nats per image
    add("--grad-clip", type=POSITIVE, default=1000.0,
        help="gradient-norm clip (default 1000)")
    add("--log-every", type=POSITIVE_INT, default=100,
        help="steps between progress lines (default 100)")
    add("--ckpt-every", type=POSITIVE_INT, default=1000,
        help="steps between checkpoints (default 1000)")
    add = p.add_argument_group("VAE").add_argument
    add("--k", type=POSITIVE_INT, default=100,
        help="importance samples for --eval (default 100)")
    add("--eval-n", type=POSITIVE_INT, help="test images for --eval (default all)")
    add("--latent-dim", type=POSITIVE_INT, default=20,
        help="d, the latent size (default 20)")
    add("--hidden", type=POSITIVE_INT, default=400, help="hidden units (default 400)")
    add("--arch", choices=["mlp", "conv"], default="mlp",
        help="encoder/decoder (default mlp)")
    add("--likelihood", choices=["gaussian", "bernoulli"], default="gaussian",
        help="p_θ(x|v): gaussian with fixed σ (the notes) or bernoulli (needs "
             "--binarize)")
    add("--sigma-x", type=POSITIVE, default=0.1,
        help="σ of the Gaussian decoder (default 0.1)")
    add("--binarize", action="store_true",
        help="dynamic binarisation of the data (for --likelihood bernoulli)")
    return p


def parse(argv):
    p = build_parser()
    args = p.parse_args(argv)
    args.given = given_flags(argv)
    if not (args.train or args.sample or args.reconstruct or args.eval):
        p.error("nothing to do: give --train, --sample N, --reconstruct or --eval")
    if args.likelihood == "bernoulli" and not args.binarize:
        p.error("--likelihood bernoulli needs binary targets: add --binarize (dynamic "
                "binarisation)")
    if args.binarize and args.likelihood != "bernoulli":
        p.error("--binarize goes with --likelihood bernoulli")
    if "RANK" in os.environ:
        p.error("vae.py runs in one process (its MLP is tiny): launch it with python, not torchrun")
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
            device = pick_device(args.device)
        except RuntimeError as e:
            p.error(f"--device {args.device}: {e}")
        if args.train:
            train(args, device)
        if args.sample or args.reconstruct or args.eval:
            ck = load_checkpoint(os.path.join(args.out, "ckpt.pt"))
            with fitting(os.path.join(args.out, "ckpt.pt")):
                model = model_from_checkpoint(ck, device)
            gen = torch.Generator(device=device).manual_seed(args.seed)
            if args.sample:
                write_samples(args, model, device, args.sample, gen)
            if args.reconstruct or args.eval:
                x = test_images(args, model, device)
            if args.reconstruct:
                reconstruct(args, model, x[:32])
            if args.eval:
                evaluate(args, ck["args"], model, x, gen, ck["step"])
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
    return 0


def stop_signals():
    """Ctrl-C, the scheduler's SIGTERM and, where there is one, SIGHUP (the terminal closed)."""
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def raise_interrupt(signum, frame):
    """SIGTERM or SIGHUP outside the training loop: stop as Ctrl-C does."""
    raise KeyboardInterrupt(signum)


def resume_command(argv):
    """The command that continues this run: its own command line plus --resume."""
    script, flags = ("vae.py", list(argv)) if argv is not None else (sys.argv[0], sys.argv[1:])
    flags += [] if "--resume" in flags else ["--resume"]
    return shlex.join(["python", script] + flags)


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


# ---- the recipe, the optimiser


def fill_recipe(args, device):
    """Fill the flags left unset from the GPU or CPU recipe and say which one was used. The recipe's
    length (steps and/or minutes) applies only when neither --steps nor --minutes was given."""
    recipe = dict(RECIPE)
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


def make_optimizer(model, lr, warmup):
    """Adam with a linear warm-up of the learning rate over `warmup` steps (0: none); the recipes
    above give lr and warmup."""
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    opt = torch.optim.Adam(model.parameters(), lr=lr, **fused)
    # lr_k = lr min(1, (k+1)/warmup)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup) if warmup
                                             else 1.0)
    return opt, warm


def clock(seconds):
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- the training loop


def train(args, device):
    import common
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    ck = continue_run(args, ckpt_path)
    if ck is None and args.steps == 0:
        print("nothing to train: --steps 0 on a new run", flush=True)
        return
    # ---- data and model: every bad input is found here, before anything is written
    data = common.load_images(args.data, args.data_dir, "train")
    N, C, H, W = data.shape
    if H != W:
        raise common.DataError(f"{args.data}: images are {H}x{W}; use square images")
    if C not in (1, 3):
        raise common.DataError(f"{args.data}: {C} channels; the samples' PNG takes 1 (grey) or 3 "
                               "(RGB)")
    torch.manual_seed(args.seed)  # the initial weights follow --seed
    recipe = fill_recipe(args, device)
    try:
        model = VAE(C, H, args.latent_dim, args.hidden, args.arch, args.likelihood).to(device)
    except ValueError as e:  # a VAE the flags describe can't be built for these images
        raise FlagError(str(e))
    ck_args = dict(kind="vae", in_ch=C, image_size=H, latent_dim=args.latent_dim,
                   hidden=args.hidden, arch=args.arch, likelihood=args.likelihood,
                   sigma_x=args.sigma_x, seed=args.seed, data=args.data,
                   data_id=data_id(args.data), steps=args.steps, batch_size=args.batch_size,
                   lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip,
                   binarize=args.binarize)
    check_writable(args.out)
    lock = lock_folder(args.out)  # held for the whole run (closed at the end, or by the OS)
    print(f"{recipe}; {args.arch} VAE, d={args.latent_dim}, {args.likelihood} decoder, "
          f"{N} images {C}x{H}x{W}; device {device}", flush=True)
    data = data.to(device)  # the whole data set lives on the device: no DataLoader between steps
    opt, warm = make_optimizer(model, args.lr, args.warmup)
    step, seconds_before = 0, 0.0
    if ck is not None:  # everything as it was at the checkpoint: weights, Adam, warm-up, RNG
        check_same(ck["args"], ck_args, ckpt_path)
        with fitting(ckpt_path):
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["opt"])
            warm.load_state_dict(ck["sched"])
            set_rng_state(ck["rng"])
        step, seconds_before = ck["step"], ck.get("train_seconds", 0.0)
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    net = torch.compile(model) if args.compile else model
    bf16 = use_bf16(device, args.precision)
    start, first_step = time.monotonic(), step

    def seconds():
        """Training seconds in all, this run and the runs before --resume."""
        return seconds_before + time.monotonic() - start

    def over(step):
        """Stop after this step? The --steps and --minutes budgets, or a signal."""
        if args.steps is not None and step >= args.steps:
            return True
        return bool(signals) or (args.minutes is not None and seconds() >= 60 * args.minutes)

    def save(step):
        """The checkpoint, unless a loss or gradient was non-finite (the last good file stays)."""
        if first_bad.item() < 0:
            save_checkpoint(ckpt_path, dict(
                kind="vae", args=ck_args, step=step, train_seconds=seconds(),
                model=model.state_dict(), opt=opt.state_dict(), sched=warm.state_dict(),
                rng=rng_state()))

    # Ctrl-C (SIGINT), SIGTERM (a cluster's preemption or time limit) and SIGHUP set a flag read at
    # the step boundary, so a checkpoint never holds a half-applied step. The previous handler is
    # then back and a second signal acts at once. A signal ignored at start (nohup, `&`) stays
    # ignored.
    signals = []

    def on_signal(signum, frame):
        if not signals:
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
    done = over(step)
    try:
        # VAE: maximise the ELBO, i.e. minimise -L averaged over the batch (nats per image)
        while not done:
            # the batch is drawn from (seed, step): after --resume, step k sees what an
            # uninterrupted run would
            gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
            idx = torch.randint(0, N, (args.batch_size,), device=device, generator=gen)
            x = prepare(common.to_range(data[idx], 0), args.likelihood, gen)
            with autocast(device, bf16):
                loss = -elbo(net, x, args.likelihood, args.sigma_x, gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            warm.step()
            step += 1
            finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
            first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
            done = over(step)
            if step % args.log_every == 0 or done:
                if first_bad.item() >= 0:
                    break
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
        print(f"interrupted by {signal.Signals(signals[0]).name} at step {step}; checkpoint "
              f"written to {ckpt_path}. Resume with:\n  {args.command}", file=sys.stderr)
        raise SystemExit(128 + signals[0])
    print(f"trained {step} steps, {seconds() / 60:.1f} minutes in all; checkpoint {ckpt_path}",
          flush=True)
    model.eval()
    write_samples(args, model, device, 64)
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
    """A vae.py checkpoint as a dict: 'args' (plain values), the 'model' state_dict, 'step',
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
    if ck["kind"] != "vae":
        raise CheckpointError(f"{path} is a {ck['kind']}.py checkpoint, not a vae.py one")
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
    """The VAE of a checkpoint, ready to sample, reconstruct and evaluate."""
    saved = ck["args"]
    model = VAE(saved["in_ch"], saved["image_size"], saved["latent_dim"], saved["hidden"],
                saved["arch"], saved["likelihood"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


# ---- sampling, reconstructions, --eval


def write_samples(args, model, device, n, generator=None):
    import common
    gen = generator or torch.Generator(device).manual_seed(args.seed)
    png, pt = os.path.join(args.out, "samples.png"), os.path.join(args.out, "samples.pt")
    x = generate(model, n, gen)
    common.write_png(png, x)
    save_checkpoint(pt, x.detach().float().cpu())
    print(f"wrote {png}")


def test_images(args, model, device):
    import common
    x = common.load_images(args.data, args.data_dir, "test")
    if x.shape[1:] != (model.in_ch, model.image_size, model.image_size):
        raise common.DataError(f"{args.data}: images {tuple(x.shape[1:])}, the model takes "
                               f"{(model.in_ch, model.image_size, model.image_size)}")
    return common.to_range(x, 0).to(device)


@torch.no_grad()
def reconstruct(args, model, x):
    import common
    mu, _ = model.encode(x)
    rec = model.decoder_mean(mu)
    n = min(8, len(x))
    rows = [r for k in range(0, len(x) - len(x) % n, n) for r in (x[k:k + n], rec[k:k + n])]
    png = os.path.join(args.out, "reconstructions.png")
    pt = os.path.join(args.out, "reconstructions.pt")
    grid = torch.cat(rows)
    common.write_png(png, grid, nrow=n)
    save_checkpoint(pt, grid.detach().float().cpu())
    print(f"wrote {png} (odd rows: test images; even rows: decoder mean of the encoder mean)")


@torch.no_grad()
def evaluate(args, saved, model, x, gen, step):
    x = x[:args.eval_n] if args.eval_n else x
    start = time.time()
    y = prepare(x, saved["likelihood"], gen)  # one fixed binarisation / dequantisation of the data
    neg_elbo = torch.cat([-elbo(model, yb, saved["likelihood"], saved["sigma_x"], gen)
                          for yb in y.split(1000)])
    nll = -iwae_bound(model, y, args.k, saved["likelihood"], saved["sigma_x"], gen)
    D = x[0].numel()
    for name, v in (("negative ELBO", neg_elbo), (f"IWAE NLL (k={args.k})", nll)):
        se = v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")
        bpd = bits_per_dim(v.mean().item(), D, saved["likelihood"])
        print(f"{name}: {v.mean():.2f} ± {se:.2f} nats/image, {bpd:.4f} bits/dim")
    how = ", dynamically binarised" if saved["likelihood"] == "bernoulli" else ", dequantised 8-bit"
    print(f"({len(x)} test images of {args.data}, {saved['likelihood']} decoder{how}, step {step}, "
          f"{time.time() - start:.1f}s)")


if __name__ == "__main__":
    sys.exit(main())
