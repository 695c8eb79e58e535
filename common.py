"""What vae.py, ddpm.py and ncsn.py share, in three parts:

1. U-Net: the DDPM paper's network (residual blocks, GroupNorm, SiLU, self-attention), called as model(x, index)
   with an integer index per image (the DDPM time step t, or the NCSN noise level i). This is all that the
   algorithm parts of ddpm.py and ncsn.py use from here.
2. Data: MNIST / Fashion-MNIST / CIFAR-10 downloaded with urllib and checked against their md5, or a local
   .pt / .npy tensor, validated with messages that name the file and the problem.
3. Plumbing for the scripts' command lines: flags, recipes, devices and bf16 autocast, seeding, Adam with warm-up,
   EMA, the --steps/--minutes budget, progress lines, Ctrl-C and NaN handling, atomic checkpoints, --bench,
   PNG grids, torchrun set-up.

There is no Trainer here on purpose: each script keeps its own short training loop, so the whole algorithm
can be read in one file. Copy this file together with the script you need.
"""
import argparse
import ast
import contextlib
import gzip
import hashlib
import json
import math
import os
import platform
import signal
import struct
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

# ==========================================================================================================
# 1. U-Net


def timestep_embedding(t, dim):
    """Sinusoidal embedding of an integer index (Transformer / DDPM): [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class GroupNorm(nn.GroupNorm):
    """GroupNorm that accepts (and ignores) the index, so that a conditional norm can take its place."""

    def forward(self, x, i=None):
        return super().forward(x)


def group_norm(channels, group_size=4):
    """GroupNorm with at most 32 groups (the DDPM paper's count) of at least `group_size` channels each.

    A group of one channel is instance norm: it removes each channel's spatial mean, so the network can no longer
    see the image's mean brightness, which ε_θ at large t must reproduce (ε ≈ x_t there, and x̂_0 amplifies an
    error in ε's mean by sqrt((1-ᾱ_t)/ᾱ_t), 150x at t = T). Narrow CPU models with 32 one-channel groups miss
    83% of it and sample saturated blobs; 4 channels per group (the paper's 128 channels in 32 groups) fix it.
    group_size=1 gives the groups of checkpoints written before this rule (gcd(32, channels) of them).
    """
    groups = max((g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= group_size), default=1)
    return GroupNorm(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, dropout, norm):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout) if emb_dim else None
        self.norm2, self.drop, self.conv2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity, as in the DDPM code
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb, i):
        h = self.conv1(F.silu(self.norm1(x, i)))
        if self.emb is not None:
            h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h, i))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions (DDPM paper), via F.scaled_dot_product_attention."""

    def __init__(self, ch, norm):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, i):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x, i)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps_theta(x_t, t) for DDPM, or s_theta(x, i) for NCSN, called as model(x, index) with index a long (B,).

    ch_mult gives the width of each resolution level (level 0 is full size), attn the level indices that get
    self-attention. time_embed=True adds the sinusoidal embedding of the index in every residual block (DDPM);
    NCSN turns it off and passes norm=a conditional norm factory, whose layers are called as norm(h, index).
    Otherwise the norms are GroupNorm with at least group_size channels per group (group_norm).
    """

    def __init__(self, in_ch=1, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn=(1,), dropout=0.1,
                 image_size=28, time_embed=True, norm=None, group_size=4):
        super().__init__()
        ch_mult, attn = tuple(ch_mult), tuple(attn)
        levels = len(ch_mult)
        if in_ch < 1 or ch < 1 or num_res_blocks < 1 or levels < 1 or min(ch_mult) < 1:
            raise ValueError("channels, channel multipliers and residual blocks must all be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if image_size % 2 ** (levels - 1) != 0:
            valid = max(k for k in range(1, levels + 1) if image_size % 2 ** (k - 1) == 0)
            raise ValueError(f"{levels} resolution levels halve a {image_size}px image {levels - 1} times, "
                             f"which does not divide evenly; at {image_size}px use at most {valid} levels "
                             f"(e.g. --ch-mult {','.join(['1', '2', '2', '2'][:valid])})")
        bad = [a for a in attn if not 0 <= a < levels]
        if bad:
            raise ValueError(f"attention level(s) {bad} out of range: levels are 0..{levels - 1} "
                             f"(sizes {[image_size // 2 ** k for k in range(levels)]} px)")
        self.image_size, self.in_ch = image_size, in_ch
        if norm is None:
            norm = lambda channels: group_norm(channels, group_size)  # noqa: E731
        emb_dim = 4 * ch if time_embed else 0
        self.ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) if time_embed else None
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        widths, cur = [ch], ch
        for lvl, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(cur, ch * m, emb_dim, dropout, norm)]
                                               + ([Attention(ch * m, norm)] if lvl in attn else [])))
                cur = ch * m
                widths.append(cur)
            if lvl != levels - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                widths.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, dropout, norm), Attention(cur, norm),
                                  ResBlock(cur, cur, emb_dim, dropout, norm)])
        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(cur + widths.pop(), ch * m, emb_dim, dropout, norm)]
                                             + ([Attention(ch * m, norm)] if lvl in attn else [])))
                cur = ch * m
            if lvl != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(cur, cur, 3, padding=1)))
        self.norm_out, self.conv_out = norm(cur), nn.Conv2d(cur, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, index):
        emb = self.time_mlp(timestep_embedding(index, self.ch)) if self.time_mlp is not None else None
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](h, emb, index)
                for a in layer[1:]:
                    h = a(h, index)
            else:
                h = layer(h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb, index), index), emb, index)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[0](torch.cat([h, skips.pop()], dim=1), emb, index)
                for a in layer[1:]:
                    h = a(h, index)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h, index)))


# ==========================================================================================================
# 2. Data


class DataError(Exception):
    """A data problem the user can fix; the message names the file and what is wrong."""


MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"]
DATASETS = {  # name -> mirrors and, per split, (file name, md5)
    "mnist": dict(mirrors=MNIST_MIRRORS, kind="idx",
                  train=("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                  test=("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3")),
    "fashion-mnist": dict(mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"], kind="idx",
                          train=("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                          test=("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79")),
    "cifar10": dict(mirrors=["https://www.cs.toronto.edu/~kriz/"], kind="cifar",
                    train=("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),
                    test=("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")),
}


def _md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(name, split, data_dir, timeout=30):
    """Path of the data set's file for this split, downloaded (checked, atomically written) on first use."""
    info = DATASETS[name]
    fname, md5 = info[split]
    folder = os.path.join(data_dir, name)
    path = os.path.join(folder, fname)
    if os.path.exists(path) and _md5(path) == md5:
        return path
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data folder {folder}: {e.strerror}")
    failures = []
    for mirror in info["mirrors"]:
        url = mirror + fname
        print(f"downloading {url}", file=sys.stderr)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=fname + ".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
            got = _md5(tmp)
            if got != md5:
                failures.append(f"{url}: checksum {got} is not the expected {md5} (corrupt or changed file)")
                continue
            os.replace(tmp, path)  # readers never see a half-written file
            return path
        except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
            failures.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataError(f"could not download {name} ({fname}):\n  " + "\n  ".join(failures)
                    + f"\nDownload {fname} (md5 {md5}) from any of the addresses above by hand and put it at "
                    f"{os.path.abspath(path)}, or pass --data PATH with a .pt/.npy tensor.")


def _read_idx(path):
    """MNIST's idx3 format: big-endian magic 2051, count, rows, cols, then uint8 pixels."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        magic, n, h, w = struct.unpack(">IIII", raw[:16])
    except (OSError, EOFError, struct.error, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip'd idx file ({e}); delete it to download it again")
    if magic != 2051 or len(raw) != 16 + n * h * w:
        raise DataError(f"{path}: not an idx3 image file (magic {magic}, {len(raw)} bytes); delete it to download it again")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(n, 1, h, w)


def _read_cifar(path, split):
    """CIFAR-10 binary version: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32)."""
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] if split == "train" else ["test_batch.bin"]
    parts = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for n in names:
                raw = tar.extractfile(f"cifar-10-batches-bin/{n}").read()
                rec = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 3073)
                parts.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    except (OSError, EOFError, KeyError, RuntimeError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 binary archive ({e}); delete it to download it again")
    return torch.cat(parts)


def _read_npy(path):
    """A minimal .npy reader (format versions 1-3) for uint8 or float32 C-ordered arrays."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:6] != b"\x93NUMPY":
        raise DataError(f"{path}: not a .npy file (bad magic)")
    major = raw[6]
    n, start = (struct.unpack("<H", raw[8:10])[0], 10) if major == 1 else (struct.unpack("<I", raw[8:12])[0], 12)
    try:
        header = ast.literal_eval(raw[start:start + n].decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise DataError(f"{path}: unreadable .npy header")
    dtypes = {"|u1": torch.uint8, "<u1": torch.uint8, "<f4": torch.float32}
    if descr not in dtypes or fortran:
        raise DataError(f"{path}: .npy dtype {descr}{' in Fortran order' if fortran else ''} is not supported; "
                        "save uint8 or float32 in C order")
    body = raw[start + n:]
    count = math.prod(shape)
    itemsize = 1 if dtypes[descr] == torch.uint8 else 4
    if len(body) != count * itemsize:
        raise DataError(f"{path}: truncated .npy file ({len(body)} data bytes for shape {shape})")
    return torch.frombuffer(bytearray(body), dtype=dtypes[descr]).reshape(shape)


def _read_tensor(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (give mnist, fashion-mnist, cifar10 or a .pt/.npy file)")
    if path.endswith(".npy"):
        return _read_npy(path)
    if not path.endswith(".pt"):
        raise DataError(f"{path}: unknown extension; --data takes a .pt or .npy file")
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling errors all mean: not a tensor file we can read
        raise DataError(f"{path}: cannot be read as a tensor with torch.load(weights_only=True): {e}")
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{path}: holds a {type(x).__name__}, not a tensor")
    return x


def check_images(x, source):
    """Validate an image tensor and return it as (N, C, H, W), uint8 in [0,255] or float32 in [0,1]."""
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise DataError(f"{source}: shape {tuple(x.shape)} is not (N,H,W) or (N,C,H,W)")
    if x.numel() == 0:
        raise DataError(f"{source}: empty tensor, shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.contiguous()
    if not x.is_floating_point():
        raise DataError(f"{source}: dtype {x.dtype}; use uint8 in [0,255] or float in [0,1]")
    x = x.float()
    if not torch.isfinite(x).all():
        raise DataError(f"{source}: contains NaN or inf")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise DataError(f"{source}: float values in [{lo:g}, {hi:g}], outside [0, 1]; "
                        "scale float images to [0, 1] or save them as uint8")
    return x.contiguous()


def load_images(data, data_dir="data", split="train"):
    """Images (N, C, H, W) as uint8 in [0,255] or float32 in [0,1]; see to_range() for the model's range.

    `data` is a data set name (downloaded on first use) or a .pt/.npy file. A file has no train/test split:
    the same tensor serves both.
    """
    if data in DATASETS:
        path = download(data, split, data_dir)
        x = _read_idx(path) if DATASETS[data]["kind"] == "idx" else _read_cifar(path, split)
        return check_images(x, path)
    return check_images(_read_tensor(data), data)


def to_range(x, lo):
    """uint8 [0,255] or float [0,1] images -> float32 in [lo, 1] (lo = -1 for DDPM as in the paper, 0 for VAE/NCSN)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x * 2 - 1 if lo == -1 else x


def data_shape(data, data_dir="data"):
    """(C, H) of a data set without downloading it (for --bench), or of a .pt/.npy file."""
    known = {"mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32)}
    if data in known:
        return known[data]
    x = load_images(data, data_dir)
    return x.shape[1], x.shape[2]


# ==========================================================================================================
# 3. Plumbing for the command lines (nothing above this line needs it)

# ---- flags: bad values are refused by argparse with a message and exit code 2


def _typed(check, what):
    def parse(text):
        try:
            value = check(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


positive_int = _typed(lambda s: int(s) if int(s) >= 1 else None, "an integer >= 1")
nonneg_int = _typed(lambda s: int(s) if int(s) >= 0 else None, "an integer >= 0")
positive_float = _typed(lambda s: float(s) if math.isfinite(float(s)) and float(s) > 0 else None, "a finite number > 0")
open_unit = _typed(lambda s: float(s) if 0 < float(s) < 1 else None, "a number in (0, 1)")
unit_interval = _typed(lambda s: float(s) if 0 <= float(s) < 1 else None, "a number in [0, 1)")
int_list = _typed(lambda s: [int(v) for v in s.split(",") if v.strip()], "a comma-separated list of integers")


def add_common_args(p, ema=True, clip=1.0, precision="auto"):
    """The flags every script shares: what to do, where, on which data and device, and the optimiser."""
    g = p.add_argument_group("what to do")
    g.add_argument("--train", action="store_true", help="train (downloads the data set on first use)")
    g.add_argument("--resume", action="store_true", help="continue training from OUT/ckpt.pt")
    g.add_argument("--sample", type=positive_int, metavar="N", help="write N samples from OUT/ckpt.pt to OUT/samples.png and OUT/samples.pt")
    g.add_argument("--bench", action="store_true", help="time training steps and sampling network calls for these flags; print one JSON line")
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default="mnist", help="mnist | fashion-mnist | cifar10 (downloaded), or a .pt/.npy tensor (N,H,W) or (N,C,H,W), uint8 in [0,255] or float in [0,1]")
    g.add_argument("--data-dir", default="data", help="where downloaded data sets are kept (default ./data)")
    g.add_argument("--out", default=None, help="the run's folder: checkpoint and samples (default runs/<script>)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same samples on the CPU")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device string")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=precision,
                   help=f"auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32; on CUDA fp32 matmuls use "
                        f"TF32 (default {precision})")
    g = p.add_argument_group("optimisation (GPU default / CPU default printed at start)")
    g.add_argument("--steps", type=nonneg_int, help="train until this many steps in all (with --minutes: whichever comes first)")
    g.add_argument("--minutes", type=positive_float, help="train until this many minutes of training in all, counted "
                   "across --resume (the final samples not included); with --steps: whichever comes first")
    g.add_argument("--batch-size", type=positive_int, help="global batch size (split across torchrun ranks)")
    g.add_argument("--lr", type=positive_float, help="Adam learning rate")
    g.add_argument("--warmup", type=nonneg_int, help="linear learning-rate warm-up steps")
    g.add_argument("--grad-clip", type=positive_float, default=clip, help=f"gradient-norm clip (default {clip})")
    if ema:
        g.add_argument("--ema-decay", type=open_unit, help="EMA decay of the weights (ramped up from 0.1 so short runs work)")
    g.add_argument("--log-every", type=positive_int, default=100, help="steps between progress lines (default 100)")
    g.add_argument("--ckpt-every", type=positive_int, default=1000, help="steps between checkpoints (default 1000)")


def add_unet_args(p, ch, ch_mult, res_blocks, attn, dropout, group_norm=True):
    """Model-size flags shared by ddpm.py and ncsn.py, with the script's defaults; None: the recipe fills it in.
    group_norm=False (NCSN, whose norms are conditional instance norms) leaves out --group-size."""
    def default(v):
        return "the recipe's" if v is None else ",".join(map(str, v)) if isinstance(v, list) else v
    g = p.add_argument_group("model size (U-Net)")
    g.add_argument("--ch", type=positive_int, default=ch, help=f"base width (default {default(ch)}; the paper's CIFAR-10 model: 128)")
    g.add_argument("--ch-mult", type=int_list, default=ch_mult, help=f"width multiplier per resolution level, comma separated (default {default(ch_mult)}; CIFAR-10: 1,2,2,2; 28px takes at most 3 levels)")
    g.add_argument("--res-blocks", type=positive_int, default=res_blocks, help=f"residual blocks per level (default {default(res_blocks)}; CIFAR-10: 2)")
    g.add_argument("--attn", type=int_list, default=attn, help=f"level indices with self-attention, '' for none (default {default(attn)}; CIFAR-10: 1, the 16x16 level)")
    g.add_argument("--dropout", type=unit_interval, default=dropout, help=f"dropout in the residual blocks (default {default(dropout)}; CIFAR-10: 0.1)")
    if group_norm:
        g.add_argument("--group-size", type=positive_int, default=4, help="at least this many channels per GroupNorm group "
                       "(default 4; 1 makes narrow layers instance norms, which hide the image's mean from the network)")


def unet_config(args, in_ch, image_size):
    cfg = dict(in_ch=in_ch, ch=args.ch, ch_mult=list(args.ch_mult), num_res_blocks=args.res_blocks,
               attn=list(args.attn), dropout=args.dropout, image_size=image_size)
    if hasattr(args, "group_size"):
        cfg["group_size"] = args.group_size
    return cfg


def fill_recipe(args, device, gpu, cpu):
    """Fill flags left unset with the GPU or CPU recipe and say which one was used. The recipe's length
    (steps and/or minutes) applies only when neither --steps nor --minutes was given."""
    recipe = dict(gpu if device.type == "cuda" else cpu)
    length = {k: recipe.pop(k, None) for k in ("steps", "minutes")}
    if getattr(args, "steps", None) is None and getattr(args, "minutes", None) is None:
        args.steps, args.minutes = length["steps"], length["minutes"]
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    used = ", ".join(f"{k}={getattr(args, k)}" for k in ("steps", "minutes", *recipe) if getattr(args, k, None) is not None)
    used += f", {'bf16 autocast' if bf16_enabled(device, args.precision) else 'fp32'}"
    return f"{'GPU' if device.type == 'cuda' else 'CPU'} recipe: {used}"


# ---- devices and precision


def pick_device(name="auto"):
    """The torch device for --device; on CUDA also lets fp32 matmuls use TF32 (what is left in fp32 outside
    bf16 autocast, and everything under --precision fp32; cuDNN convolutions already use TF32 by default)."""
    if name == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
    else:
        dev = torch.device(name)  # RuntimeError on a malformed string; the scripts turn it into a usage error
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} asked for, but CUDA is not available here")
    if dev.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return dev


def bf16_enabled(device, precision="auto"):
    """Whether to train and sample under bf16 autocast: on CUDA, and on CPUs with native bf16 (AVX512-BF16 or
    AMX), where it measured 1.7x the fp32 training speed on 2 cores; never on other devices unless asked."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(probe is not None and probe())
    return False


def autocast(device, precision="auto"):
    """bf16 autocast (weights, optimiser and the samplers' arithmetic stay fp32), or nothing."""
    if bf16_enabled(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- optimisation


def step_generator(seed, step, device):
    """A generator for one training step, derived from (seed, step): after --resume, or on every torchrun rank,
    step k draws the same batch indices and noise as an uninterrupted single-process run."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def make_optimizer(model, lr, warmup):
    """Adam with linear warm-up of the learning rate over `warmup` steps (DDPM: lr 2e-4, warm-up 5000)."""
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    opt = torch.optim.Adam(model.parameters(), lr=lr, **fused)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
    return opt, lr_sched


def optimizer_step(loss, model, opt, lr_sched, grad_clip, ema=None):
    """backward, clip the gradient norm, Adam step, learning-rate schedule step, EMA update; returns the gradient
    norm (a device tensor: reading it is the caller's choice, so there is no host sync here)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    lr_sched.step()
    if ema is not None:
        ema.update_parameters(model)
    return gnorm


def make_ema(model, decay):
    """EMA of the weights with torch.optim.swa_utils.AveragedModel.

    The decay ramps as min(decay, (1+n)/(10+n)) with n the number of updates, so that after a short CPU run the
    average is not dominated by the random initialisation (0.9999 needs ~10^4 steps to forget it).
    """

    def ema_update(avg, cur, n):
        d = torch.clamp((1 + n) / (10 + n), max=decay)  # n is a device tensor: no host sync
        for a, c in zip(avg, cur):
            a.lerp_(c, (1 - d).to(a.dtype))

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_update)


def macs_per_image(model, *example):
    """Multiply-accumulates of one forward pass on one image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example)
    return counter.get_total_flops() // 2


class Budget:
    """When training stops: after `steps` steps and/or `minutes` minutes of training in all, whichever comes first.

    Time trained before a --resume (`seconds_done`, kept in the checkpoint) counts towards `minutes`. Under
    torchrun the ranks' clocks differ slightly, so the time is read every `sync_every` steps and rank 0's
    decision is broadcast: all ranks stop at the same step.
    """

    def __init__(self, steps=None, minutes=None, seconds_done=0.0, world=1, sync_every=20, device="cpu"):
        self.steps, self.minutes, self.done_before = steps, minutes, seconds_done
        self.world, self.sync_every, self.device = world, sync_every, device
        self.t0 = time.monotonic()

    def seconds(self):
        """Training seconds in all, this run and the runs before --resume."""
        return self.done_before + time.monotonic() - self.t0

    def over(self, step):
        if self.steps is not None and step >= self.steps:
            return True
        if self.minutes is None:
            return False
        if self.world == 1:
            return self.seconds() >= 60 * self.minutes
        if step % self.sync_every:
            return False
        import torch.distributed as dist
        flag = torch.tensor(float(self.seconds() >= 60 * self.minutes), device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


class Progress:
    """One line per report: step, the values given (loss, ...), counted MACs, it/s, and time against the budget."""

    def __init__(self, budget, start=0, macs_per_step=None, what="step"):
        self.budget, self.start, self.macs_per_step, self.what, self.t0 = budget, start, macs_per_step, what, time.monotonic()

    def line(self, step, **values):
        rate = (step - self.start) / max(time.monotonic() - self.t0, 1e-9)
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        total = f"/{self.budget.steps}" if self.budget.steps is not None else ""
        macs = f" MACs {self.macs_per_step * step:.3g}" if self.macs_per_step else ""
        clock = f" {_hms(self.budget.seconds())}"
        if self.budget.minutes is not None:
            clock += f"/{_hms(60 * self.budget.minutes)}"
        elif self.budget.steps is not None and rate > 0:
            clock += f" ETA {_hms((self.budget.steps - step) / rate)}"
        return f"{self.what} {step}{total} {extra}{macs} {rate:.2f} it/s{clock}".replace("  ", " ")


def _hms(sec):
    if not math.isfinite(sec):
        return "?"
    sec = int(sec)
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


def every(n, what="sampling step", total=None):
    """A progress callback for the samplers (callback(k, t, x) after step k): a line to stderr every n steps."""

    def report(k, t, x):
        if (k + 1) % n == 0:
            print(f"{what} {k + 1}{'' if total is None else f'/{total}'} (t = {t})", file=sys.stderr, flush=True)
    return report


# ---- faults: Ctrl-C and non-finite values


class StopOnInterrupt:
    """Within `with StopOnInterrupt() as stop:`, Ctrl-C (SIGINT) sets stop.requested instead of raising, so the
    training loop ends at a step boundary and saves a consistent checkpoint. A second Ctrl-C acts at once."""

    def __enter__(self):
        self.requested, self._old = False, None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._old)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss or gradient norm was NaN/inf: no host sync per step.
    Read it (one sync) with the logged loss and always before writing a checkpoint or samples."""

    def __init__(self, device):
        self.first = torch.full((), -1, device=device, dtype=torch.long)

    def update(self, step, *values):
        ok = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all()
        self.first = torch.where((self.first < 0) & ~ok, torch.full_like(self.first, step), self.first)

    def found(self):
        return self.first.item() >= 0


def stop_if_interrupted_or_bad(stop, bad, save, step, rank, script, out):
    """After the loop: Ctrl-C -> save and exit 130 with how to resume; NaN/inf -> stop, naming the step.
    Either way no non-finite weight is written (save() checks `bad`)."""
    ckpt = os.path.join(out, "ckpt.pt")
    if stop.requested:
        save(step)
        if rank == 0 and not bad.found():
            print(f"interrupted at step {step}; checkpoint written to {ckpt}. "
                  f"Resume with: python {script} --train --resume --out {out}", file=sys.stderr)
        raise SystemExit(130)
    if bad.found():
        raise SystemExit(f"error: non-finite loss or gradient at step {bad.first.item()}; training stopped. "
                         f"The last good checkpoint is {ckpt} (try a lower --lr, check the data).")


# ---- checkpoints


class CheckpointError(Exception):
    """A checkpoint that can't be used here; the message says why."""


def unwrap(model):
    """The plain module under DistributedDataParallel and torch.compile wrappers (no `module.`/`_orig_mod.`)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once at import: mkstemp makes 0600 files, outputs should get the usual 0666 & ~umask


def save_checkpoint(path, obj):
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a kill at any moment leaves
    the old checkpoint or the new one, never part of one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, kind=None):
    """Load a checkpoint written by one of the scripts (weights_only=True: loading can't run code).

    Returns the dict: 'kind' (script), 'args' (plain values), 'model' and 'ema' state_dicts, 'step',
    'train_seconds', ...
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path} (train first with --train, or point --out at the run's folder)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is truncated or corrupt and can't be loaded ({type(e).__name__}: {e})")
    if not isinstance(ck, dict) or "kind" not in ck or "model" not in ck:
        raise CheckpointError(f"{path} is not a checkpoint written by these scripts")
    if kind is not None and ck["kind"] != kind:
        raise CheckpointError(f"{path} is a {ck['kind']}.py checkpoint, not a {kind}.py one")
    return ck


def check_same(saved, args, keys, path, older=None):
    """Refuse to resume when the model or data shape differs from the checkpoint's, naming each difference.
    older: the values of keys that checkpoints written before the key existed lack."""
    saved = {**(older or {}), **saved}
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {args[k]!r}" for k in keys if saved.get(k) != args[k]]
    if diff:
        raise CheckpointError(f"{path} was trained with a different model or data shape:\n  " + "\n  ".join(diff))


def training_state(kind, args, step, seconds, model, opt, lr_sched, ema=None):
    """Everything --resume needs, as state_dicts of the unwrapped modules and plain values (weights_only-safe)."""
    state = dict(kind=kind, args=args, step=step, train_seconds=seconds, model=unwrap(model).state_dict(),
                 opt=opt.state_dict(), sched=lr_sched.state_dict(), rng=rng_state())
    if ema is not None:
        state.update(ema=ema.module.state_dict(), ema_n=int(ema.n_averaged.item()))
    return state


def resume(ckpt_path, kind, ck_args, keys, model, opt, lr_sched, ema=None, rank=0, older=None):
    """--resume: load OUT/ckpt.pt, refuse a different model or data shape, restore everything; returns
    (step, training seconds so far)."""
    ck = load_checkpoint(ckpt_path, kind=kind)
    check_same(ck["args"], ck_args, keys, ckpt_path, older)
    model.load_state_dict(ck["model"])
    if ema is not None:
        ema.module.load_state_dict(ck["ema"])
        ema.n_averaged.fill_(ck["ema_n"])
    opt.load_state_dict(ck["opt"])
    lr_sched.load_state_dict(ck["sched"])
    set_rng_state(ck["rng"])
    if rank == 0:
        print(f"resumed from {ckpt_path} at step {ck['step']}", flush=True)
    return ck["step"], ck.get("train_seconds", 0.0)


def wrap(model, world, device, compile_model):
    """DistributedDataParallel under torchrun, then torch.compile if asked; checkpoints use the unwrapped model."""
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(net) if compile_model else net


# ---- --bench


def bench(model, args, device, loss, sample_call, example, ema=True):
    """--bench: time training steps and sampling network calls; returns one JSON line.

    loss(net) computes the training loss on a fixed batch of args.batch_size images with the network `net`
    (the model, compiled with --compile); sample_call(net) makes one sampling network call on such a batch;
    example is one image's network inputs, for the MAC count. Each is called 3 times untimed (compilation
    included), then 10 times timed.
    """
    opt, lr_sched = make_optimizer(model, args.lr, args.warmup)
    avg = make_ema(model, args.ema_decay) if ema else None
    net = torch.compile(model) if args.compile else model
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_step():
        with autocast(device, args.precision):
            value = loss(net)
        optimizer_step(value, model, opt, lr_sched, args.grad_clip, avg)

    def sample_step():
        with torch.no_grad(), autocast(device, args.precision):
            sample_call(net)

    def timed(fn, warmup=3, iters=10):
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters

    macs = macs_per_image(model, *example)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_train, t_eval = timed(train_step), timed(sample_step)
    B = args.batch_size
    return json.dumps(dict(
        params=sum(p.numel() for p in model.parameters()), macs_per_image=macs, batch_size=B,
        train_img_per_s=round(B / t_train, 2), sample_evals_per_s=round(1 / t_eval, 3),
        sample_img_evals_per_s=round(B / t_eval, 2), peak_mem_mib=_peak_mib(device), device=str(device),
        dtype="bf16 autocast" if bf16_enabled(device, args.precision) else "fp32", torch=torch.__version__,
        threads=torch.get_num_threads()))


def _peak_mib(device):
    """Peak memory of this process in MiB: the CUDA allocator's, or the resident set's (Unix only; None elsewhere)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    try:
        import resource  # Unix only
    except ImportError:
        return None
    # ru_maxrss is KiB on Linux, bytes on macOS
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if platform.system() == "Darwin" else 2 ** 10), 1)


# ---- PNG grid (zlib only: no Pillow, no torchvision)


def write_png(path, images, nrow=None, pad=2):
    """Write images (N, C, H, W) with values in [0, 1] as one 8-bit PNG grid (C = 1 grey, C = 3 RGB)."""
    x = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"PNG grid takes 1 or 3 channels, got {c}")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[k]
    pix = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()  # H, W, C
    H, W = pix.shape[:2]
    # each scan line is prefixed by filter type 0 (none)
    rows = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), pix.reshape(H, -1)], dim=1).contiguous()
    raw = bytes(rows.untyped_storage())

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", W, H, 8, 0 if c == 1 else 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    _atomic_write(path, png)


def _atomic_write(path, data):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def save_samples(out, name, x01, nrow=None):
    """Samples in [0,1] to OUT/name.png (grid) and OUT/name.pt (tensor); returns the two paths."""
    png, pt = os.path.join(out, name + ".png"), os.path.join(out, name + ".pt")
    write_png(png, x01, nrow)
    save_checkpoint(pt, x01.detach().float().cpu())
    return png, pt


def check_writable(folder):
    """Create the output folder and prove it can be written, before any training starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(f"output folder {folder} can't be written: {e.strerror or e}")


# ---- torchrun


def setup_distributed(device_name="auto"):
    """(rank, world_size, device). Under torchrun: init the process group (NCCL on CUDA, else gloo);
    each rank uses its LOCAL_RANK GPU. Otherwise rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_name)
    import torch.distributed as dist
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device
