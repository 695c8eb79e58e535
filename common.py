"""What vae.py, ddpm.py and ncsn.py share: the U-Net, the data, and a PNG writer.

1. U-Net: the DDPM paper's network (residual blocks, GroupNorm, SiLU, self-attention), called as
   model(x, index) with an integer index per image (the DDPM time step t, or the NCSN noise level
   i).
2. Data: MNIST / Fashion-MNIST / CIFAR-10 downloaded with urllib and checked against their md5, or a
   local .pt / .npy tensor, validated with messages that name the file and the problem.
3. A PNG grid writer (zlib only: torch has none).

There is no training code here on purpose: each script keeps its own training loop, so the whole
algorithm and its command line read in one file. The math of ddpm.py and vae.py needs nothing from
here.
"""
import ast
import ctypes
import errno
import gzip
import hashlib
import math
import os
import struct
import sys
import tarfile
import time
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

# ==================================================================================================
# 1. U-Net


def timestep_embedding(t, dim):
    """Sinusoidal embedding of an integer index (Transformer / DDPM):
    [sin(t w_k), cos(t w_k)], w_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class GroupNorm(nn.GroupNorm):
    """GroupNorm that accepts (and ignores) the index, so that a conditional norm can take its
    place."""

    def forward(self, x, i=None):
        return super().forward(x)


def group_norm(channels, group_size=4):
    """GroupNorm with at most 32 groups (the DDPM paper's count) of at least `group_size` channels.

    A group of one channel is instance norm: it removes each channel's spatial mean, so the network
    can no longer see the image's mean brightness, which ε_θ at large t must reproduce (ε ≈ x_t
    there, and x̂_0 amplifies an error in ε's mean by sqrt((1-ᾱ_t)/ᾱ_t), 150x at t = T). Narrow CPU
    models with 32 one-channel groups miss 83% of it and sample saturated blobs; 4 channels per
    group (the paper's 128 channels in 32 groups) fix it. group_size=1 gives the groups of
    checkpoints written before this rule (gcd(32, channels) of them).
    """
    fits = [g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= group_size]
    return GroupNorm(max(fits, default=1), channels)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, dropout, norm):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout) if emb_dim else None
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
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
    """Single-head self-attention over the H*W positions (DDPM paper),
    F.scaled_dot_product_attention."""

    def __init__(self, ch, norm):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, i):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x, i)).reshape(B, 3, 1, C, H * W).transpose(-1, -2)
        h = F.scaled_dot_product_attention(*qkv.unbind(1))  # (B, 1, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """eps_theta(x_t, t) for DDPM, or s_theta(x, i) for NCSN, called as model(x, index), index (B,)
    long.

    ch_mult gives the width of each resolution level (level 0 is full size), attn the level indices
    that get self-attention. time_embed=True adds the sinusoidal embedding of the index in every
    residual block (DDPM); NCSN turns it off and passes norm=a conditional norm factory, whose
    layers are called as norm(h, index). Otherwise the norms are GroupNorm with at least group_size
    channels per group.
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
            example = ",".join(["1", "2", "2", "2"][:valid])
            raise ValueError(f"{levels} resolution levels halve a {image_size}px image "
                             f"{levels - 1} times, which does not divide evenly; at {image_size}px "
                             f"use at most {valid} levels (e.g. --ch-mult {example})")
        bad = [a for a in attn if not 0 <= a < levels]
        if bad:
            raise ValueError(f"attention level(s) {bad} out of range: levels are 0..{levels - 1} "
                             f"(sizes {[image_size // 2 ** k for k in range(levels)]} px)")
        self.image_size, self.in_ch = image_size, in_ch
        if norm is None:
            norm = lambda channels: group_norm(channels, group_size)  # noqa: E731
        emb_dim = 4 * ch if time_embed else 0
        self.ch = ch
        self.time_mlp = None
        if time_embed:
            self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                          nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down = nn.ModuleList()
        widths, cur = [ch], ch
        for lvl, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                block = [ResBlock(cur, ch * m, emb_dim, dropout, norm)]
                block += [Attention(ch * m, norm)] if lvl in attn else []
                self.down.append(nn.ModuleList(block))
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
                block = [ResBlock(cur + widths.pop(), ch * m, emb_dim, dropout, norm)]
                block += [Attention(ch * m, norm)] if lvl in attn else []
                self.up.append(nn.ModuleList(block))
                cur = ch * m
            if lvl != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(cur, cur, 3, padding=1)))
        self.norm_out, self.conv_out = norm(cur), nn.Conv2d(cur, in_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, index):
        emb = None
        if self.time_mlp is not None:
            emb = self.time_mlp(timestep_embedding(index, self.ch))
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


# ==================================================================================================
# 2. Data


class DataError(Exception):
    """A data problem the user can fix; the message names the file and what is wrong."""


MNIST_MIRRORS = ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/"]
DATASETS = {  # name -> mirrors and, per split, (file name, md5)
    "mnist": dict(mirrors=MNIST_MIRRORS, kind="idx",
                  train=("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                  test=("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3")),
    "fashion-mnist": dict(mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
                          kind="idx",
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


def download(name, split, data_dir, timeout=10):
    """Path of the data set's file for this split, downloaded (checked, atomically written) on first
    use. Each mirror in turn; one that does not answer within `timeout` seconds fails. A full disk
    or another write error stops at once (another mirror would not help)."""
    import http.client
    import urllib.request  # here, not at the top: it loads ssl, which nothing else needs
    info = DATASETS[name]
    fname, md5 = info[split]
    folder = os.path.join(data_dir, name)
    path = os.path.join(folder, fname)
    if os.path.exists(path) and _md5(path) == md5:
        return path
    failures = []
    for mirror in info["mirrors"]:
        url = mirror + fname
        print(f"downloading {url}", file=sys.stderr, flush=True)
        tmp = temporary_name(path)
        try:
            try:
                os.makedirs(folder, exist_ok=True)
                f = open_new(tmp)
            except OSError as e:
                raise DataError(f"cannot write the data folder {folder}: {e.strerror or e}")
            with f, urllib.request.urlopen(url, timeout=timeout) as r:
                _copy(r, f, int(r.headers.get("Content-Length") or 0), path)
            got = _md5(tmp)
            if got != md5:
                failures.append(f"{url}: checksum {got} is not the expected {md5} "
                                "(corrupt or changed file)")
                continue
            os.replace(tmp, path)  # readers never see a half-written file
            fsync_folder(path)
            return path
        except (OSError, ValueError, http.client.HTTPException) as e:
            # the network's: URLError, HTTP errors, timeouts, a reply cut off or not HTTP at all
            failures.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataError(f"could not download {name} ({fname}):\n  " + "\n  ".join(failures)
                    + f"\nDownload {fname} (md5 {md5}) from any of the addresses above by hand and "
                    f"put it at {os.path.abspath(path)}, or pass --data PATH with a .pt/.npy "
                    "tensor.")


def _copy(response, f, total, path, every=5.0):
    """Copy a download to the open file f, reporting the bytes so far (of `total`, when the server
    says) and the rate on stderr: one updating line on a terminal, else a line every `every`
    seconds."""
    tty = sys.stderr.isatty()
    start = last = time.monotonic()
    done = 0
    for block in iter(lambda: response.read(1 << 16), b""):
        try:
            f.write(block)
        except OSError as e:  # a full disk, an I/O error: the file's, not the mirror's
            raise DataError(f"could not write {path}: {e.strerror or e}") from None
        done += len(block)
        now = time.monotonic()
        if now - last >= (0.5 if tty else every) or done == total:
            last = now
            of = f" of {total / 1e6:.1f}" if total else ""
            line = f"  {done / 1e6:.1f}{of} MB, {done / 1e6 / max(now - start, 1e-9):.2f} MB/s"
            print("\r" + line if tty else line, end="" if tty else "\n", file=sys.stderr,
                  flush=True)
    try:
        f.flush()
        os.fsync(f.fileno())  # on disk before download() renames it into place
    except OSError as e:
        raise DataError(f"could not write {path}: {e.strerror or e}") from None
    if tty:
        print(file=sys.stderr)


def _read_idx(path):
    """MNIST's idx3 format: big-endian magic 2051, count, rows, cols, then uint8 pixels."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        magic, n, h, w = struct.unpack(">IIII", raw[:16])
    except (OSError, EOFError, struct.error, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip'd idx file ({e}); delete it to download it "
                        "again")
    if magic != 2051 or len(raw) != 16 + n * h * w:
        raise DataError(f"{path}: not an idx3 image file (magic {magic}, {len(raw)} bytes); delete "
                        "it to download it again")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(n, 1, h, w)


def _read_cifar(path, split):
    """CIFAR-10 binary version: records of 1 label byte + 3072 pixel bytes (R, G, B planes of
    32x32)."""
    names = [f"data_batch_{k}.bin" for k in range(1, 6)] if split == "train" else ["test_batch.bin"]
    parts = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for n in names:
                raw = tar.extractfile(f"cifar-10-batches-bin/{n}").read()
                rec = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 3073)
                parts.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    except (OSError, EOFError, KeyError, RuntimeError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{path}: not a readable CIFAR-10 binary archive ({e}); delete it to "
                        "download it again")
    return torch.cat(parts)


def _read_npy(path):
    """A minimal .npy reader (format versions 1-3) for uint8 or float32 C-ordered arrays."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:6] != b"\x93NUMPY":
        raise DataError(f"{path}: not a .npy file (bad magic)")
    if len(raw) < 12:
        raise DataError(f"{path}: truncated .npy file ({len(raw)} bytes, shorter than its header)")
    if raw[6] == 1:
        n, start = struct.unpack("<H", raw[8:10])[0], 10
    else:
        n, start = struct.unpack("<I", raw[8:12])[0], 12
    try:
        header = ast.literal_eval(raw[start:start + n].decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError):
        raise DataError(f"{path}: unreadable .npy header")
    dtypes = {"|u1": torch.uint8, "<u1": torch.uint8, "<f4": torch.float32}
    if descr not in dtypes or fortran:
        order = " in Fortran order" if fortran else ""
        raise DataError(f"{path}: .npy dtype {descr}{order} is not supported; save uint8 or "
                        "float32 in C order")
    body = raw[start + n:]
    count = math.prod(shape)
    itemsize = 1 if dtypes[descr] == torch.uint8 else 4
    if len(body) != count * itemsize:
        raise DataError(f"{path}: truncated .npy file ({len(body)} data bytes for shape {shape})")
    if count == 0:  # torch.frombuffer refuses an empty buffer; check_images names the problem
        return torch.zeros(shape, dtype=dtypes[descr])
    return torch.frombuffer(bytearray(body), dtype=dtypes[descr]).reshape(shape)


def _read_tensor(path):
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder; --data takes one .pt or .npy file (README: your own "
                        "data)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (give mnist, fashion-mnist, cifar10 or a .pt/.npy "
                        "file)")
    if path.endswith(".npy"):
        return _read_npy(path)
    if not path.endswith(".pt"):
        raise DataError(f"{path}: unknown extension; --data takes a .pt or .npy file")
    try:
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and unpickling errors all mean: not a tensor file to read
        raise DataError(f"{path}: cannot be read as a tensor with torch.load(weights_only=True): "
                        f"{e}")
    if not isinstance(x, torch.Tensor):
        raise DataError(f"{path}: holds a {type(x).__name__}, not a tensor")
    return x


def check_images(x, source):
    """Validate an image tensor and return it as (N, C, H, W), uint8 in [0,255] or float32 in
    [0,1]."""
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
    """Images (N, C, H, W) as uint8 in [0,255] or float32 in [0,1]; see to_range() for the model's.

    `data` is a data set name (downloaded on first use) or a .pt/.npy file. A file has no train/test
    split: the same tensor serves both.
    """
    if data in DATASETS:
        path = download(data, split, data_dir)
        x = _read_idx(path) if DATASETS[data]["kind"] == "idx" else _read_cifar(path, split)
        return check_images(x, path)
    return check_images(_read_tensor(data), data)


def to_range(x, lo):
    """uint8 [0,255] or float [0,1] images -> float32 in [lo, 1] (lo = -1 for DDPM as in the paper,
    0 for VAE/NCSN)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return x * 2 - 1 if lo == -1 else x


def data_shape(data, data_dir="data"):
    """(C, H) of a data set without downloading it (for measure/bench.py), or of a .pt/.npy file."""
    known = {"mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32)}
    if data in known:
        return known[data]
    x = load_images(data, data_dir)
    return x.shape[1], x.shape[2]


# ==================================================================================================
# 3. PNG grid (zlib only: no Pillow, no torchvision), and writing files whole


def temporary_name(path):
    """Where a file is written before os.replace moves it to `path`: the same folder (so the replace
    is atomic), a name that says which process writes it."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def fsync_folder(path):
    """fsync the folder that holds `path`, so that a rename into it survives a power cut (POSIX; a
    folder that can't be opened, as on Windows, is skipped)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # file systems that can't fsync a folder
            raise
    finally:
        os.close(fd)


def open_new(path):
    """Open for writing with the permissions of any new file, 0666 & ~umask (the kernel applies the
    umask of the moment); tempfile.mkstemp would give 0600."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), "wb")


def write_png(path, images, nrow=None, pad=2):
    """Write images (N, C, H, W) with values in [0, 1] as one 8-bit PNG grid (C = 1 grey, C = 3
    RGB), whole or not at all (a temporary file, then os.replace)."""
    x = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"PNG grid takes 1 or 3 channels, got {c}")
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for k in range(n):
        r, q = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, top:top + h, left:left + w] = x[k]
    pix = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()  # H, W, C
    H, W = pix.shape[:2]
    # each scan line is prefixed by filter type 0 (none)
    rows = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), pix.reshape(H, -1)], dim=1).contiguous()
    raw = ctypes.string_at(rows.data_ptr(), rows.numel())  # in one read, not byte by byte

    def chunk(tag, data):
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", W, H, 8, 0 if c == 1 else 2, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
           + chunk(b"IEND", b""))
    tmp = temporary_name(path)
    try:
        with open_new(tmp) as f:
            f.write(png)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path)
    except OSError as e:  # a full disk, an I/O error: one message naming the file, no temporary
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
