"""The sample-quality judge: a small digit classifier, its Fréchet distance and its confident share.

    python measure/judge.py --train data/mnist5k/judge_train.pt      # remake measure/judge.pt
    python measure/judge.py runs/ddpm/samples.pt                     # score samples
    python measure/judge.py data/mnist5k/test.pt --n 400             # the real-digit row

The classifier (two 5x5 convolutions, 128 features, 10 classes; about 80k parameters) is trained
for 60 epochs on 1,000 labelled digits that neither the generators nor the references contain,
from a fixed seed and a fixed data order, with random shifts of up to 2 pixels. Its weights are
committed as measure/judge.pt, and scoring refuses weights whose sha256 (over the tensors) is not
JUDGE_SHA256, so every figure in the READMEs comes from the same judge.

For a set of images (a samples.pt of the scripts, floats in [0, 1], or a uint8 tensor; the first
--n of them, default all):
- the Fréchet distance between the Gaussian fitted to the classifier's 128 features of the images
  and the one fitted to those of the 500 reference digits (as FID does with Inception features),
  with a bootstrap standard error over the images. It is biased upwards for small sets: compare
  rows of equal n, and the real-digit row at the same n;
- the share of images classified with a maximum softmax of at least 0.9 ("confident"), with its
  binomial standard error.
One JSON line. Needs torch alone.
"""
import argparse
import hashlib
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "judge.pt")
JUDGE_SHA256 = "2d8f967eab980b5842ea16f5fdbdee10a33c8b7c1596036f457271353ada3fd0"
REFERENCE = os.path.join("data", "mnist5k", "reference.pt")
CONFIDENT = 0.9
EPOCHS, BATCH, LR, SHIFT, SEED = 60, 50, 1e-3, 2, 0


class Judge(nn.Module):
    """28x28 grey digits in [0, 1] -> 10 logits; `features` are the 128 before the last layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc = nn.Linear(32 * 4 * 4, 128)
        self.out = nn.Linear(128, 10)

    def features(self, x):
        h = F.max_pool2d(F.relu(self.conv1(x * 2 - 1)), 2)                  # 28x28 -> 14x14
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)                          # 14x14 -> 7x7
        h = F.max_pool2d(h, 2, ceil_mode=True)                              # 7x7 -> 4x4
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.out(self.features(x))


class JudgeError(Exception):
    """A file or weights the judge can't use; the message says why (exit 2)."""


def build_parser():
    p = argparse.ArgumentParser(prog="measure/judge.py", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="?", help="a .pt of images to score: samples.pt, or uint8 digits")
    p.add_argument("--n", type=int, help="score the first N images (default all)")
    p.add_argument("--reference", default=REFERENCE,
                   help=f"the reference digits (default {REFERENCE})")
    p.add_argument("--weights", default=WEIGHTS, help="the judge's weights (default measure/judge.pt)")
    p.add_argument("--train", metavar="DIGITS",
                   help="train the judge on a .pt {'images', 'labels'} and write --weights")
    p.add_argument("--bootstrap", type=int, default=200,
                   help="bootstrap resamples for the distance's standard error (default 200)")
    return p


def inputs(args):
    """The files a command reads (the README command test reads this)."""
    if args.train:
        return [args.train]
    return [args.images, args.reference]


def outputs(args):
    return [args.weights] if args.train else []


def load_images(path, labelled=False):
    """Images as float (N, 1, 28, 28) in [0, 1] (and int64 labels when `labelled`)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise JudgeError(f"no such file: {path}")
    except Exception as e:
        raise JudgeError(f"{path} can't be read ({type(e).__name__}: {e})")
    labels = None
    if isinstance(obj, dict):
        obj, labels = obj.get("images"), obj.get("labels")
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (3, 4) or obj.shape[-2:] != (28, 28):
        raise JudgeError(f"{path}: expected images (N, 1, 28, 28) or (N, 28, 28)")
    x = obj.reshape(-1, 1, 28, 28)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
    if labelled and (labels is None or len(labels) != len(x)):
        raise JudgeError(f"{path}: expected a dict with 'images' and as many 'labels'")
    return (x, labels.long()) if labelled else x


def shift(x, generator):
    """Each image moved by up to SHIFT pixels in each direction (zero-padded), drawn from
    `generator`."""
    n = len(x)
    padded = F.pad(x, (SHIFT,) * 4)
    dx = torch.randint(0, 2 * SHIFT + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * SHIFT + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]
    cols = (dx[:, None] + torch.arange(28))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


def train(x, labels, epochs=EPOCHS, seed=SEED):
    """The judge, trained deterministically: initial weights, batch order and shifts from `seed`, on
    one thread (several threads sum the convolutions' gradients in an order that varies)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, labels, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(x, labels, epochs, seed):
    torch.manual_seed(seed)
    model = Judge()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for k in range(0, len(x), BATCH):
            idx = order[k:k + BATCH]
            loss = F.cross_entropy(model(shift(x[idx], g)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def sha256(state):
    """sha256 of a state_dict's tensors: each name, dtype, shape and the bytes, in name order. (The
    file's own bytes change with every torch.save: it records a random serialization id.)"""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_judge(path=WEIGHTS, expected=None):
    """The committed judge. Refuses weights whose sha256 is not `expected` (default JUDGE_SHA256)."""
    expected = JUDGE_SHA256 if expected is None else expected
    if not os.path.isfile(path):
        raise JudgeError(f"no judge weights at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        digest = sha256(state)
    except Exception as e:
        raise JudgeError(f"{path} can't be read as judge weights ({type(e).__name__}: {e})")
    if digest != expected:
        raise JudgeError(f"{path} has sha256 {digest}, not the committed judge's {expected}: "
                         "scores from other weights do not compare with the READMEs' figures")
    model = Judge()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def features_and_probs(model, x, chunk=500):
    feats, probs = [], []
    for k in range(0, len(x), chunk):
        h = model.features(x[k:k + chunk])
        feats.append(h.double())
        probs.append(F.softmax(model.out(h), dim=1).double())
    return torch.cat(feats), torch.cat(probs)


def gaussian(f):
    """Mean and covariance (unbiased) of features (N, D), float64."""
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)


def frechet_distance(mu1, cov1, mu2, cov2):
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}). tr (Σ1 Σ2)^{1/2} is the sum of the square roots
    of the eigenvalues of Σ1^{1/2} Σ2 Σ1^{1/2}, which is symmetric positive semi-definite."""
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    middle = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * middle)


def score(model, x, reference, bootstrap=200, seed=0):
    """The figures of one row: Fréchet distance to the reference digits with its bootstrap standard
    error, and the confident share with its binomial standard error."""
    f, p = features_and_probs(model, x)
    mu_r, cov_r = gaussian(features_and_probs(model, reference)[0])
    fd = frechet_distance(*gaussian(f), mu_r, cov_r)
    g = torch.Generator().manual_seed(seed)
    boot = [frechet_distance(*gaussian(f[torch.randint(0, len(f), (len(f),), generator=g)]),
                             mu_r, cov_r) for _ in range(bootstrap)]
    se = float(torch.tensor(boot).std()) if bootstrap > 1 else float("nan")
    confident = float((p.max(1).values >= CONFIDENT).double().mean())
    return dict(n=len(x), frechet=fd, frechet_se=se, confident=confident,
                confident_se=math.sqrt(confident * (1 - confident) / len(x)))


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if bool(args.train) == bool(args.images):
        p.error("give a .pt of images to score, or --train DIGITS")
    if args.n is not None and args.n < 2:
        p.error("--n must be at least 2")
    try:
        if args.train:
            x, labels = load_images(args.train, labelled=True)
            model = train(x, labels)
            torch.save(model.state_dict(), args.weights)
            print(f"wrote {args.weights}: sha256 {sha256(model.state_dict())} ({len(x)} digits, "
                  f"{EPOCHS} epochs)")
            return 0
        model = load_judge(args.weights)
        x = load_images(args.images)
        x = x[:args.n] if args.n else x
        if args.n and len(x) < args.n:
            raise JudgeError(f"{args.images} holds {len(x)} images, fewer than --n {args.n}")
        reference, labels = load_images(args.reference, labelled=True)
        row = score(model, x, reference, args.bootstrap)
        with torch.no_grad():
            row["reference_correct"] = float((model(reference).argmax(1) == labels).double().mean())
        row = {k: round(v, 2 if k.startswith("frechet") else 4) if isinstance(v, float) else v
               for k, v in row.items()}
        print(json.dumps(dict(images=args.images, **row)))
        return 0
    except JudgeError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
