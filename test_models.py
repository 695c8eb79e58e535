"""Models, CLIs and I/O: shapes, training steps, checkpoints, resume, PNG output, downloads, bad input.

CLI tests call each script's main(argv) in-process with a tiny T and tiny models; only the tests that need a
separate process (SIGKILL, torchrun) start one.
"""
import contextlib
import ctypes
import errno
import re
import shlex
import socket
import time
import signal
import warnings
import stat
import subprocess
import sys
import functools
import gzip
import hashlib
import http.server
import io
import tarfile
import json
import math
import os
import struct
import threading
import zlib

import pytest
import torch

import common
import ddpm
import ncsn
import vae

TINY_UNET = ["--ch", "8", "--ch-mult", "1,2", "--attn", "", "--res-blocks", "1"]


@pytest.fixture
def tiny_pt(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(torch.randint(0, 256, (12, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8), path)
    return str(path)


def read_png(path):
    """Parse a PNG written by common.write_png: signature, IHDR, zlib-decoded IDAT -> (W, H, channels, rows)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, tag = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    W, H, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and ctype in (0, 2)
    ch = 1 if ctype == 0 else 3
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == H * (1 + W * ch)
    assert all(raw[y * (1 + W * ch)] == 0 for y in range(H))  # filter byte "none" on every row
    return W, H, ch, raw


# ---------------------------------------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("size,ch_mult", [(28, (1, 2, 2)), (32, (1, 2, 2, 2))])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_shapes(size, ch_mult, channels):
    m = common.UNet(in_ch=channels, ch=8, ch_mult=ch_mult, num_res_blocks=1, attn=(1,), dropout=0.1, image_size=size)
    x = torch.randn(2, channels, size, size)
    assert m(x, torch.tensor([1, 1000])).shape == x.shape


def test_paper_cifar10_model_has_35_7M_parameters():
    m = common.UNet(in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn=(1,), dropout=0.1, image_size=32)
    assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == 35.7


@pytest.mark.parametrize("kw,msg", [
    (dict(image_size=28, ch_mult=(1, 2, 2, 2)), "at most 3 levels"),
    (dict(image_size=28, ch_mult=(1, 2), attn=(2,)), "out of range"),
    (dict(dropout=1.0), "dropout"),
    (dict(ch=0), ">= 1"),
])
def test_unet_refuses_invalid_configurations(kw, msg):
    with pytest.raises(ValueError, match=msg):
        common.UNet(**{**dict(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=()), **kw})


def test_group_norm_groups_divide_the_width_and_hold_several_channels():
    for ch in (4, 8, 16, 18, 24, 32, 48, 96, 128, 256):
        g = common.group_norm(ch).num_groups
        assert ch % g == 0 and ch // g >= 4 and g <= 32
    assert common.group_norm(128).num_groups == 32  # the DDPM paper's 32 groups at its widths
    assert [common.group_norm(c, 1).num_groups for c in (8, 24, 32, 48, 128)] == [8, 8, 32, 16, 32]  # gcd(32, c)
    unet = common.UNet(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), image_size=28)
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 4 for m in norms)


def test_checkpoints_from_before_group_size_load_with_their_own_groups(tmp_path, tiny_pt):
    out = tmp_path / "run"
    ddpm.main(["--train", "--steps", "1", "--group-size", "1", *ddpm_cli(out, tiny_pt)])
    ck = ddpm.load_checkpoint(str(out / "ckpt.pt"))
    del ck["args"]["group_size"]  # as written before the flag existed
    model, _ = ddpm.model_from_checkpoint(ck, torch.device("cpu"))
    assert all(m.num_groups == math.gcd(32, m.num_channels) for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    ddpm.save_checkpoint(str(out / "ckpt.pt"), ck)
    ddpm.main(["--train", "--resume", "--steps", "2", "--group-size", "1", *ddpm_cli(out, tiny_pt)])  # resumes


# ---------------------------------------------------------------------------------------------------------- DDPM


def test_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    s = ddpm.schedule(T=100)
    m = common.UNet(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), dropout=0.0, image_size=28)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    t = torch.randint(1, 101, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    opt, sched = ddpm.make_optimizer(m, 2e-3, 0)
    first = ddpm.loss_simple(m, s, x0, t, eps).item()
    for _ in range(30):
        loss = ddpm.loss_simple(m, s, x0, t, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ddpm.loss_simple(m, s, x0, t, eps).item() < 0.8 * first


def test_sampler_shape_and_range():
    s = ddpm.schedule(T=10)
    m = common.UNet(in_ch=3, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(1,), dropout=0.0, image_size=32).eval()
    x = ddpm.sample(m, s, (2, 3, 32, 32), clip_x0=True, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    y = ddpm.ddim_sample(m, s, (2, 3, 32, 32), steps=3, generator=torch.Generator().manual_seed(0))
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y).all()


def ddpm_cli(out, data, *extra):
    return ["--data", data, "--out", str(out), "--T", "10", "--batch-size", "4", "--log-every", "1",
            "--final-samples", "0", *TINY_UNET, *extra]


def test_cli_trains_resumes_and_samples(tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    assert ddpm.main(["--train", "--steps", "3", "--ckpt-every", "2", *ddpm_cli(out, tiny_pt)]) == 0
    ck = ddpm.load_checkpoint(str(out / "ckpt.pt"))
    assert ck["step"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    ddpm.main(["--train", "--resume", "--steps", "5", *ddpm_cli(out, tiny_pt)])
    assert "resumed from" in capsys.readouterr().out
    assert ddpm.load_checkpoint(str(out / "ckpt.pt"))["step"] == 5
    ddpm.main(["--sample", "5", "--out", str(out), "--T", "10"])
    W, H, ch, _ = read_png(out / "samples.png")
    assert ch == 1 and (W, H) == (3 * 30 + 2, 2 * 30 + 2)  # 5 images: 3 columns, 2 rows, 2px padding
    x = torch.load(out / "samples.pt", weights_only=True)
    assert x.shape == (5, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    ddpm.main(["--sample", "2", "--ddim-steps", "5", "--out", str(out), "--T", "10"])
    assert torch.load(out / "samples.pt", weights_only=True).shape == (2, 1, 28, 28)
    ddpm.main(["--eval", "--eval-n", "2", "--eval-t", "2", "--data", tiny_pt, "--out", str(out)])
    assert "bits/dim" in capsys.readouterr().out


def test_png_writer_rgb(tmp_path):
    x = torch.rand(4, 3, 5, 5)
    common.write_png(str(tmp_path / "a.png"), x, nrow=2, pad=0)
    W, H, ch, raw = read_png(tmp_path / "a.png")
    assert (W, H, ch) == (10, 10, 3)
    # top-left pixel of the first image, red channel
    assert raw[1] == round(x[0, 0, 0, 0].item() * 255)


# ---------------------------------------------------------------------------------------------------------- data


def usage_error(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("tensor,problem", [
    (torch.zeros(5, dtype=torch.uint8), "is not (N,H,W) or (N,C,H,W)"),
    (torch.zeros(0, 28, 28, dtype=torch.uint8), "empty"),
    (torch.full((2, 28, 28), float("nan")), "NaN"),
    (torch.full((2, 28, 28), 2.0), "outside [0, 1]"),
    (torch.zeros(2, 28, 28, dtype=torch.int64), "dtype"),
    (torch.zeros(2, 30, 30, dtype=torch.uint8), "30px"),
    (torch.zeros(2, 28, 32, dtype=torch.uint8), "square"),
])
def test_bad_data_gives_a_clear_error_and_writes_nothing(tmp_path, capsys, tensor, problem):
    path = str(tmp_path / "bad.pt")
    torch.save(tensor, path)
    out = tmp_path / "run"
    err = usage_error(ddpm.main, ["--train", "--steps", "1", "--data", path, "--out", str(out),
                                  "--ch", "8", "--ch-mult", "1,2,2", "--attn", ""], capsys)
    assert problem in err and ("bad.pt" in err or "px" in err) and "Traceback" not in err
    assert not out.exists()


def test_npy_reader(tmp_path):
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (3, 28, 28), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    path = tmp_path / "a.npy"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(x.flatten().tolist()))
    assert torch.equal(common.load_images(str(path)), x[:, None])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(common.DataError, match="truncated"):
        common.load_images(str(path))
    for cut in range(6, 12):  # cut inside the first bytes of its header
        path.write_bytes((b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)))[:cut])
        with pytest.raises(common.DataError, match="truncated"):
            common.load_images(str(path))
    empty = "{'descr': '|u1', 'fortran_order': False, 'shape': (0, 28, 28), }"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(empty)) + empty.encode())
    with pytest.raises(common.DataError, match="empty"):  # zero images
        common.load_images(str(path))


def test_cifar10_binary_reader(tmp_path):
    # the binary version: records of 1 label byte + 3072 pixel bytes (R, G, B planes), no pickle
    path = tmp_path / "cifar-10-binary.tar.gz"
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for k, name in enumerate([f"data_batch_{j}.bin" for j in range(1, 6)] + ["test_batch.bin"]):
            recs = torch.randint(0, 256, (2, 3073), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
            batches[name] = recs
            raw = bytes(recs.flatten().tolist())
            info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    train, test = common._read_cifar(str(path), "train"), common._read_cifar(str(path), "test")
    assert train.shape == (10, 3, 32, 32) and test.shape == (2, 3, 32, 32)
    assert torch.equal(test[1, 2], batches["test_batch.bin"][1, 1 + 2 * 1024:].reshape(32, 32))  # blue plane
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(common.DataError, match="not a readable CIFAR-10"):
        common._read_cifar(str(path), "train")


def idx_gz(n=3):
    pixels = bytes((k * 7) % 256 for k in range(n * 28 * 28))
    return gzip.compress(struct.pack(">IIII", 2051, n, 28, 28) + pixels)


@contextlib.contextmanager
def serve(folder):
    """A local http.server on 127.0.0.1 serving `folder`; yields the base URL and the list of requested paths."""
    seen = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            seen.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    th = threading.Thread(target=httpd.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """Serve a good and a corrupt copy of a fake MNIST file from two local mirrors; patch the md5."""
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    payload = idx_gz()
    (good / "train-images-idx3-ubyte.gz").write_bytes(payload)
    (bad / "train-images-idx3-ubyte.gz").write_bytes(payload[:-5] + b"xxxxx")
    md5 = hashlib.md5(payload).hexdigest()
    entry = dict(common.DATASETS["mnist"], train=("train-images-idx3-ubyte.gz", md5))
    monkeypatch.setitem(common.DATASETS, "mnist", entry)
    return entry, good, bad, tmp_path / "data"


def test_download_tries_mirrors_checks_and_reuses(fake_mnist):
    entry, good, bad, data_dir = fake_mnist
    empty = good.parent / "empty"
    empty.mkdir()
    with serve(empty) as (u_missing, _), serve(bad) as (u_bad, _), serve(good) as (u_good, seen):
        entry["mirrors"] = [u_missing, u_bad, u_good]
        x = common.load_images("mnist", str(data_dir))
        assert x.shape == (3, 1, 28, 28) and x.dtype == torch.uint8
        assert len(seen) == 1
        common.load_images("mnist", str(data_dir))  # second time: from disk, checked, no request
        assert len(seen) == 1
    assert [p.name for p in (data_dir / "mnist").iterdir()] == ["train-images-idx3-ubyte.gz"]  # no .part files


def test_download_failure_is_one_clear_message(fake_mnist, tmp_path, capsys):
    entry, good, bad, data_dir = fake_mnist
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(empty) as (u_missing, _), serve(bad) as (u_bad, _):
        entry["mirrors"] = [u_missing, u_bad]
        err = usage_error(ddpm.main, ["--train", "--data", "mnist", "--data-dir", str(data_dir),
                                      "--out", str(tmp_path / "run")], capsys)
    assert "404" in err and "checksum" in err and "by hand" in err and "train-images-idx3-ubyte.gz" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    assert "usage:" not in err and "\nddpm.py: error: could not download" in err  # no flag was wrong
    assert list((data_dir / "mnist").iterdir()) == []  # nothing half-written left behind


class FailsAt:
    """A file whose flush() or close() reports a full disk (ENOSPC), as a file system may for buffered data."""

    def __init__(self, f, at):
        self.f, self.at = f, at

    def flush(self):
        if self.at == "flush":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.f.flush()

    def close(self):
        self.f.close()
        if self.at == "close":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FullDisk:
    """A file that takes `after` bytes, then fails every write as a full disk does (ENOSPC)."""

    def __init__(self, f, after=0):
        self.f, self.left = f, after

    def write(self, b):
        if len(b) > self.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_download_reports_progress_and_a_silent_mirror_times_out(fake_mnist, tmp_path, monkeypatch, capsys):
    entry, good, _, data_dir = fake_mnist
    payload = gzip.compress(struct.pack(">IIII", 2051, 1000, 28, 28) + os.urandom(1000 * 28 * 28))
    (good / "train-images-idx3-ubyte.gz").write_bytes(payload)
    entry["train"] = ("train-images-idx3-ubyte.gz", hashlib.md5(payload).hexdigest())
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    with serve(good) as (u_good, seen):
        entry["mirrors"] = [f"http://127.0.0.1:{silent.getsockname()[1]}/", u_good]
        start = time.monotonic()
        path = common.download("mnist", "train", str(data_dir), timeout=0.5)
        assert time.monotonic() - start < 5 and len(seen) == 1
        err = capsys.readouterr().err
        # stderr is not a terminal here: plain lines, bytes of the total and the rate
        mb = len(payload) / 1e6
        assert re.search(rf"  {mb:.1f} of {mb:.1f} MB, [0-9.]+ MB/s\n", err), err
        os.remove(path)
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: one line, updated with \r
        common.download("mnist", "train", str(data_dir), timeout=0.5)
        assert re.search(rf"\r  {mb:.1f} of {mb:.1f} MB", capsys.readouterr().err)
    silent.close()


def test_download_stops_at_a_full_disk_without_trying_other_mirrors(fake_mnist, monkeypatch):
    entry, good, _, data_dir = fake_mnist

    real_open = common.open_new
    monkeypatch.setattr(common, "open_new", lambda path: FullDisk(real_open(path), after=100))
    with serve(good) as (u1, seen1), serve(good) as (u2, seen2):
        entry["mirrors"] = [u1, u2]
        with pytest.raises(common.DataError, match="could not write .*train-images-idx3-ubyte.gz: No space left"):
            common.load_images("mnist", str(data_dir))
        assert len(seen1) == 1 and seen2 == []  # the second mirror was not asked
    assert list((data_dir / "mnist").iterdir()) == []  # no temporary file left


# ---------------------------------------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3)])
def test_vae_shapes(arch, size, channels):
    m = vae.VAE(channels, size, latent_dim=4, hidden=16, arch=arch)
    x = torch.rand(2, channels, size, size)
    out, mu, lv = m(x)
    assert out.shape == x.shape and mu.shape == lv.shape == (2, 4)
    assert vae.iwae_bound(m, x, 3).shape == (2,) and vae.generate(m, 3).shape == (3, channels, size, size)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_vae_steps_lower_the_loss(likelihood):
    torch.manual_seed(0)
    m = vae.VAE(latent_dim=4, hidden=32, likelihood=likelihood)
    g = torch.Generator().manual_seed(0)
    protos = (torch.rand(2, 1, 28, 28, generator=g) > 0.5).float()  # two binary images: learnable structure
    x = vae.prepare(protos.repeat(8, 1, 1, 1), likelihood, g)
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    loss = lambda: -vae.elbo(m, x, likelihood, 0.1, torch.Generator().manual_seed(1)).mean()  # noqa: E731
    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first - 0.1 * abs(first)


def test_vae_cli_trains_resumes_samples_reconstructs_evaluates(tmp_path, tiny_pt, capsys):
    out = str(tmp_path / "run")
    base = ["--data", tiny_pt, "--out", out, "--batch-size", "4", "--hidden", "16", "--latent-dim", "3", "--log-every", "1"]
    assert vae.main(["--train", "--steps", "3", *base]) == 0
    assert vae.load_checkpoint(out + "/ckpt.pt")["step"] == 3
    vae.main(["--train", "--resume", "--steps", "4", *base])
    assert "resumed from" in capsys.readouterr().out and vae.load_checkpoint(out + "/ckpt.pt")["step"] == 4
    vae.main(["--sample", "6", "--reconstruct", "--eval", "--k", "5", "--eval-n", "4", "--data", tiny_pt, "--out", out])
    printed = capsys.readouterr().out
    assert "IWAE NLL (k=5)" in printed and "bits/dim" in printed and "4 test images" in printed
    assert read_png(tmp_path / "run" / "samples.png")[2] == 1
    W, H, _, _ = read_png(tmp_path / "run" / "reconstructions.png")
    assert (W, H) == (8 * 30 + 2, 2 * 30 + 2)  # 8 originals above 8 reconstructions
    err = usage_error(vae.main, ["--train", "--likelihood", "bernoulli", "--data", tiny_pt, "--out", out], capsys)
    assert "--binarize" in err
    err = usage_error(vae.main, ["--sample", "2", "--out", str(tmp_path / "nothing")], capsys)
    assert "no checkpoint" in err


# ---------------------------------------------------------------------------------------------------------- NCSN


@pytest.mark.parametrize("size,channels,ch_mult", [(28, 1, (1, 2, 2)), (32, 3, (1, 2, 2, 2))])
def test_score_net_shapes(size, channels, ch_mult):
    sig = ncsn.geometric_sigmas()
    m = ncsn.ScoreNet(sig, in_ch=channels, ch=8, ch_mult=ch_mult, num_res_blocks=1, attn=(1,), dropout=0.0, image_size=size)
    x = torch.rand(3, channels, size, size)
    assert m(x, torch.tensor([1, 5, 10])).shape == x.shape
    norms = [mod for mod in m.modules() if isinstance(mod, ncsn.CondInstanceNorm2dPlus)]
    assert norms and not any(isinstance(mod, torch.nn.GroupNorm) for mod in m.modules())
    assert m.unet.time_mlp is None


def test_score_net_steps_lower_the_loss():
    torch.manual_seed(0)
    sig = ncsn.geometric_sigmas()
    m = ncsn.ScoreNet(sig, in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), dropout=0.0, image_size=28)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 28, 28, generator=g)
    i, eps = torch.randint(1, 11, (8,), generator=g), torch.randn(8, 1, 28, 28, generator=g)
    opt = torch.optim.Adam(m.parameters(), 2e-3)
    first = ncsn.dsm_loss(m, x, sig, i=i, eps=eps).item()
    for _ in range(30):
        loss = ncsn.dsm_loss(m, x, sig, i=i, eps=eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ncsn.dsm_loss(m, x, sig, i=i, eps=eps).item() < 0.8 * first


def test_ncsn_cli_trains_resumes_and_samples(tmp_path, tiny_pt, capsys):
    out = str(tmp_path / "run")
    base = ["--data", tiny_pt, "--out", out, "--batch-size", "4", "--log-every", "1", "--levels", "3",
            "--corrector-steps", "2", "--final-samples", "0", *TINY_UNET]
    assert ncsn.main(["--train", "--steps", "2", *base]) == 0
    ncsn.main(["--train", "--resume", "--steps", "3", *base])
    assert "resumed from" in capsys.readouterr().out and ncsn.load_checkpoint(out + "/ckpt.pt")["step"] == 3
    ncsn.main(["--sample", "4", "--strip", "--sampler", "annealed", "--langevin-steps", "2", "--out", out])
    x = torch.load(tmp_path / "run" / "samples.pt", weights_only=True)
    assert x.shape == (4, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    W, H, _, _ = read_png(tmp_path / "run" / "chain.png")
    assert (W, H) == (4 * 30 + 2, 4 * 30 + 2)  # 4 rows: start + 3 levels
    err = usage_error(ncsn.main, ["--train", "--sigma-1", "0.01", "--sigma-L", "0.1", "--out", out], capsys)
    assert "must exceed" in err


# ---------------------------------------------------------------------------------------------------------- faults
# Each script, the same guarantees: kill -9 and resume == never interrupted; Ctrl-C saves; NaN stops without
# saving NaN; mismatched or corrupt checkpoints and bad flags give clear errors (exit 2).

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {
    "ddpm": (ddpm, ["--T", "10", "--dropout", "0.1", "--final-samples", "0", *TINY_UNET], "loss_simple"),
    "vae": (vae, ["--hidden", "16", "--latent-dim", "3"], "elbo"),
    "ncsn": (ncsn, ["--levels", "3", "--corrector-steps", "2", "--dropout", "0.1", "--final-samples", "0", *TINY_UNET], "dsm_loss"),
}


def train_argv(name, out, data, steps, *extra):
    return ["--train", "--data", data, "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--log-every", "1", "--ckpt-every", "3", "--seed", "5", *SCRIPTS[name][1], *extra]


def assert_same_state(a, b):
    for key in ("model", "ema", "opt"):
        if key not in a:
            continue
        fa, fb = flatten(a[key]), flatten(b[key])
        assert fa.keys() == fb.keys()
        for k in fa:
            assert torch.equal(fa[k], fb[k]), f"{key}/{k} differs"


def flatten(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        if isinstance(v, (dict, list)):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = torch.tensor(float(v)) if isinstance(v, (int, float)) else v
    return {k: (v if torch.is_tensor(v) else torch.tensor(0.0)) for k, v in out.items()}


# Runs a script's main() in a child process that stops right after writing the checkpoint of step 3 and
# waits to be killed: the fixed kill point of the test below, set from inside the test, not the product code.
PAUSE_AFTER_STEP_3 = """
import sys, time
module = __import__(sys.argv[1])
save = module.save_checkpoint
def save_then_pause(path, obj):
    save(path, obj)
    if isinstance(obj, dict) and obj.get("step") == 3:
        print("paused after checkpoint 3", flush=True)
        time.sleep(3600)
module.save_checkpoint = save_then_pause
sys.exit(module.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("name", SCRIPTS)
def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(name, tmp_path, tiny_pt):
    module = SCRIPTS[name][0]
    ref = tmp_path / "ref"
    module.main(train_argv(name, ref, tiny_pt, 6))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_STEP_3, name, *train_argv(name, killed, tiny_pt, 6)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE)
    try:
        for line in proc.stdout:
            if line.startswith("paused after checkpoint 3"):
                break
        else:
            pytest.fail("the training process ended without pausing")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert module.load_checkpoint(str(killed / "ckpt.pt"))["step"] == 3
    module.main(train_argv(name, killed, tiny_pt, 6, "--resume"))
    a, b = (module.load_checkpoint(str(d / "ckpt.pt")) for d in (ref, killed))
    assert a["step"] == b["step"] == 6
    assert_same_state(a, b)


# Kills at each point of the checkpoint write: os._exit (no clean-up, like SIGKILL) while the temporary file
# is half written, after it is written and before fsync, after fsync and before the replace, right after
# the replace; all in the write of step 6's checkpoint, step 3's being on disk. The children are forks of
# a process that has imported torch but run nothing, so that fork is safe.
KILL_INSIDE_WRITE = """
import json, os, sys
import common
module = __import__(sys.argv[1])
runs = json.loads(sys.argv[2])
real_save, real_open, real_fsync, real_replace = module.save_checkpoint, common.open_new, os.fsync, os.replace
armed = []

def save(path, obj):
    armed[:] = [isinstance(obj, dict) and obj.get("step") == 6]
    real_save(path, obj)

class HalfThenDie:
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        if self.n + len(b) > 2000:  # write part of this block, make it reach the disk, die
            self.f.write(b[:len(b) // 2])
            self.f.flush()
            os._exit(9)
        self.n += len(b)
        return self.f.write(b)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

pids = {}
for point, argv in runs.items():
    pid = os.fork()
    if pid == 0:
        def open_new(path):
            f = real_open(path)
            return HalfThenDie(f) if armed[0] and point == "half written" and path.endswith(".tmp") else f
        def fsync(fd):
            if armed[0] and point == "before fsync":
                os._exit(9)
            real_fsync(fd)
        def replace(a, b):
            if armed[0] and point == "before replace":
                os._exit(9)
            real_replace(a, b)
            if armed[0] and point == "after replace" and b.endswith("ckpt.pt"):
                os._exit(9)
        armed[:] = [False]
        module.save_checkpoint, common.open_new, os.fsync, os.replace = save, open_new, fsync, replace
        module.main(argv)
        os._exit(0)
    pids[point] = pid
print(json.dumps({point: os.waitpid(pid, 0)[1] >> 8 for point, pid in pids.items()}))
"""
KILL_POINTS = {"half written": 3, "before fsync": 3, "before replace": 3, "after replace": 6}  # -> step on disk


@pytest.mark.parametrize("name", SCRIPTS)
def test_kill_inside_the_checkpoint_write_leaves_a_checkpoint_that_resumes(name, tmp_path, tiny_pt):
    module = SCRIPTS[name][0]
    ref = tmp_path / "ref"
    module.main(train_argv(name, ref, tiny_pt, 6))
    runs = {point: train_argv(name, tmp_path / point.replace(" ", "_"), tiny_pt, 6) for point in KILL_POINTS}
    r = subprocess.run([sys.executable, "-c", KILL_INSIDE_WRITE, name, json.dumps(runs)], cwd=HERE,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {point: 9 for point in KILL_POINTS}  # all killed
    for point, on_disk in KILL_POINTS.items():
        out = tmp_path / point.replace(" ", "_")
        leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        assert len(leftovers) == (on_disk == 3), (point, leftovers)  # the killed write's temporary file
        assert module.load_checkpoint(str(out / "ckpt.pt"))["step"] == on_disk, point
        module.main(train_argv(name, out, tiny_pt, 6, "--resume"))  # the temporary file is never taken
        assert_same_state(module.load_checkpoint(str(ref / "ckpt.pt")), module.load_checkpoint(str(out / "ckpt.pt")))


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("layer", ["torch's zip writer", "fsync", "flush", "close"])
def test_a_full_disk_during_a_checkpoint_write_is_one_message(name, layer, tmp_path, tiny_pt, monkeypatch, capsys):
    # the first checkpoint (step 3) fits, the second (step 6) meets a full disk: ENOSPC inside torch.save,
    # which torch reports as a RuntimeError, or EIO at fsync
    module = SCRIPTS[name][0]
    real_save, real_open, real_fsync, armed = module.save_checkpoint, common.open_new, os.fsync, []

    def save(path, obj):
        armed[:] = [obj.get("step") == 6]
        real_save(path, obj)

    def fsync(fd):
        if armed[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(module, "save_checkpoint", save)
    if layer == "fsync":
        monkeypatch.setattr(os, "fsync", fsync)
    elif layer in ("flush", "close"):  # a file system that reports the full disk only for buffered data
        monkeypatch.setattr(common, "open_new", lambda p: FailsAt(real_open(p), layer) if armed[0] else real_open(p))
    else:
        monkeypatch.setattr(common, "open_new", lambda p: FullDisk(real_open(p), 1000) if armed[0] else real_open(p))
    out = tmp_path / "run"
    err = usage_error(module.main, train_argv(name, out, tiny_pt, 6), capsys)
    why = "Input/output error" if layer == "fsync" else "No space left on device"
    assert err == f"{name}.py: error: [Errno {errno.EIO if layer == 'fsync' else errno.ENOSPC}] could not write {out / 'ckpt.pt'}: {why}\n"
    assert module.load_checkpoint(str(out / "ckpt.pt"))["step"] == 3  # the previous one, intact
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_failing_sample_write_is_one_message_and_keeps_the_old_file(name, tmp_path, tiny_pt, monkeypatch, capsys):
    module = SCRIPTS[name][0]
    module.main(train_argv(name, tmp_path, tiny_pt, 1))
    extra = ["--corrector-steps", "1"] if name == "ncsn" else []
    module.main(["--sample", "2", "--out", str(tmp_path), *extra])
    before = (tmp_path / "samples.png").read_bytes()
    real_open = common.open_new
    monkeypatch.setattr(common, "open_new", lambda p: FullDisk(real_open(p), 10) if p.endswith(".png.tmp") or ".samples.png." in p else real_open(p))
    err = usage_error(module.main, ["--sample", "3", "--out", str(tmp_path), "--seed", "1", *extra], capsys)
    assert f"could not write {tmp_path / 'samples.png'}: No space left on device" in err and "Traceback" not in err
    assert (tmp_path / "samples.png").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# The signal tests run in a child whose dispositions they set themselves, so they pass however the suite is
# started (a background job starts with SIGINT ignored). Each scenario sends its signal from inside a step
# (or from inside the sampler), as a terminal or a scheduler would while it runs.
SIGNALS = """
import contextlib, io, json, os, signal, sys
script = __import__(sys.argv[1])
scenarios = json.loads(sys.argv[2])
results = {}
for name, (target, at_call, signals, ignored, argv) in scenarios.items():
    module, _, target = (__import__(target.split(".")[0]), 0, target.split(".")[1]) if "." in target else (script, 0, target)
    real, calls = getattr(module, target), []
    def wrapped(*a, _real=real, _signals=signals, _at=at_call, **kw):
        calls.append(1)
        if len(calls) == _at:
            for s in _signals:
                os.kill(os.getpid(), getattr(signal, s))
        return _real(*a, **kw)
    setattr(module, target, wrapped)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in ("SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, s), signal.SIG_DFL)
    for s in ignored:
        signal.signal(getattr(signal, s), signal.SIG_IGN)
    before = [signal.getsignal(getattr(signal, s)) for s in ("SIGINT", "SIGTERM", "SIGHUP")]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = script.main(argv)
        except SystemExit as e:
            code = e.code
    setattr(module, target, real)
    restored = before == [signal.getsignal(getattr(signal, s)) for s in ("SIGINT", "SIGTERM", "SIGHUP")]
    results[name] = dict(code=code, err=err.getvalue(), restored=restored)
print(json.dumps(results))
"""
SAMPLERS = {"ddpm": "ddim_sample", "vae": "generate", "ncsn": "pc_sample"}


@pytest.mark.parametrize("name", SCRIPTS)
def test_signals_stop_training_at_a_step_with_a_checkpoint_and_a_command_that_resumes(name, tmp_path, tiny_pt):
    module, _, loss_name = SCRIPTS[name]
    train = lambda out: train_argv(name, tmp_path / out, tiny_pt, 12, "--ckpt-every", "100")  # noqa: E731
    sample = ["--sample", "4", "--out", str(tmp_path / "int")] + (["--corrector-steps", "2"] if name == "ncsn" else [])
    scenarios = {
        "SIGINT": (loss_name, 2, ["SIGINT"], [], train("int")),
        "SIGTERM": (loss_name, 2, ["SIGTERM"], [], train("term")),
        "SIGHUP": (loss_name, 2, ["SIGHUP"], [], train("hup")),
        "SIGINT twice": (loss_name, 2, ["SIGINT", "SIGINT"], [], train("twice")),
        "SIGINT ignored": (loss_name, 2, ["SIGINT"], ["SIGINT"], train("ignored")),
        "SIGHUP ignored": (loss_name, 2, ["SIGHUP"], ["SIGHUP"], train("hup_ignored")),
        "SIGTERM while sampling": (SAMPLERS[name], 1, ["SIGTERM"], [], sample),
        "SIGINT while sampling": (SAMPLERS[name], 1, ["SIGINT"], [], sample),
        # the final samples of --train: the run is trained and saved; no sample file half-written
        "SIGTERM in the final samples": (SAMPLERS[name], 1, ["SIGTERM"], [],
                                         train_argv(name, tmp_path / "final", tiny_pt, 3, "--final-samples", "2")
                                         if name != "vae" else train_argv(name, tmp_path / "final", tiny_pt, 3)),
        # a second signal while the step-2 checkpoint is being written (its temporary file just opened)
        "SIGTERM twice, the second in the write": ("common.open_new", 2, ["SIGTERM", "SIGTERM"], [],
                                                   train_argv(name, tmp_path / "write", tiny_pt, 12,
                                                              "--ckpt-every", "1")),
    }
    if name != "ncsn":  # --eval: the bound of ddpm.py, the ELBO and IWAE bound of vae.py
        scenarios["SIGTERM while evaluating"] = ({"ddpm": "nll_bits_per_dim", "vae": "elbo"}[name], 1, ["SIGTERM"],
                                                 [], ["--eval", "--eval-n", "2", "--data", tiny_pt, "--out",
                                                      str(tmp_path / "int")] + (["--eval-t", "2"] if name == "ddpm" else []))
    r = subprocess.run([sys.executable, "-c", SIGNALS, name, json.dumps(scenarios)], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(v["restored"] for v in res.values()), res  # the caller's handlers are back after main()
    for sig, out, code in (("SIGINT", "int", 130), ("SIGTERM", "term", 143), ("SIGHUP", "hup", 129)):
        got = res[sig]
        assert got["code"] == code, (sig, got)
        # the step in which the signal came is finished and saved, then the command that resumes
        assert module.load_checkpoint(str(tmp_path / out / "ckpt.pt"))["step"] == 2, sig
        assert f"interrupted by {sig} at step 2" in got["err"] and "Traceback" not in got["err"]
    # the printed command is the run's own command line plus --resume: it resumes with the run's model flags
    command = shlex.split(res["SIGTERM"]["err"].split("Resume with:\n")[1].strip())
    assert command[:2] == ["python", f"{name}.py"] and command[-1] == "--resume"
    assert module.main(command[2:]) in (0, None)
    assert module.load_checkpoint(str(tmp_path / "term" / "ckpt.pt"))["step"] == 12
    # a second Ctrl-C acts at once: no checkpoint of step 2, one line
    assert res["SIGINT twice"]["code"] == 130 and "Traceback" not in res["SIGINT twice"]["err"]
    assert not (tmp_path / "twice" / "ckpt.pt").exists()
    # a signal ignored at start stays ignored: training runs to its end
    for k, out in (("SIGINT ignored", "ignored"), ("SIGHUP ignored", "hup_ignored")):
        assert res[k]["code"] in (0, None), res[k]
        assert module.load_checkpoint(str(tmp_path / out / "ckpt.pt"))["step"] == 12
    # while sampling: exit 143 or 130 with one line, and no output file
    for k, code in (("SIGTERM while sampling", 143), ("SIGINT while sampling", 130)):
        assert res[k]["code"] == code and res[k]["err"].strip().count("\n") == 0, res[k]
        assert "interrupted by" in res[k]["err"] and "Traceback" not in res[k]["err"]
    assert not (tmp_path / "int" / "samples.png").exists() and not (tmp_path / "int" / "samples.pt").exists()
    got = res["SIGTERM in the final samples"]
    assert got["code"] == 143 and "interrupted by SIGTERM" in got["err"] and "Traceback" not in got["err"]
    assert module.load_checkpoint(str(tmp_path / "final" / "ckpt.pt"))["step"] == 3
    assert not (tmp_path / "final" / "samples.png").exists() and not (tmp_path / "final" / "samples.pt").exists()
    got = res["SIGTERM twice, the second in the write"]
    assert got["code"] == 143 and "Traceback" not in got["err"], got
    assert module.load_checkpoint(str(tmp_path / "write" / "ckpt.pt"))["step"] in (1, 2)  # old or new, whole
    assert not [p for p in (tmp_path / "write").iterdir() if p.name.endswith(".tmp")]
    if name != "ncsn":
        got = res["SIGTERM while evaluating"]
        assert got["code"] == 143 and got["err"].strip().count("\n") == 0 and "interrupted by" in got["err"], got
        assert not (tmp_path / "int" / "eval.pt").exists()


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("log_every", ["1", "100"])
def test_nan_stops_training_and_never_reaches_a_checkpoint(name, log_every, tmp_path, tiny_pt, monkeypatch):
    # NaN from step 5. Logging every step, the loop stops there; at --log-every 100, step 6 writes a checkpoint and
    # logs nothing, and only save()'s own check of the device-side flag keeps the NaN weights out of ckpt.pt
    module, _, loss_name = SCRIPTS[name]
    real, calls = getattr(module, loss_name), []

    def nan_from_step_5(*a, **kw):
        calls.append(1)
        out = real(*a, **kw)
        return out * float("nan") if len(calls) >= 5 else out

    monkeypatch.setattr(module, loss_name, nan_from_step_5)
    with pytest.raises(SystemExit) as e:
        module.main(train_argv(name, tmp_path / "run", tiny_pt, 8, "--log-every", log_every))
    assert "non-finite loss or gradient at step 5" in str(e.value.code)
    ck = module.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ck["step"] == 3  # the last good one
    assert all(torch.isfinite(v).all() for v in flatten(ck["model"]).values() if v.is_floating_point())


def test_checkpoint_mismatches_and_corruption_are_named(tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    ddpm.main(train_argv("ddpm", out, tiny_pt, 1))
    err = usage_error(ddpm.main, train_argv("ddpm", out, tiny_pt, 2, "--resume", "--ch", "16"), capsys)
    assert "--ch: checkpoint 8, now 16" in err
    torch.save(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), tiny_pt)  # the same file, other images in it
    err = usage_error(ddpm.main, train_argv("ddpm", out, tiny_pt, 2, "--resume"), capsys)
    assert "in_ch: checkpoint 1, now 3" in err and "image_size: checkpoint 28, now 32" in err
    err = usage_error(vae.main, ["--sample", "2", "--out", str(out)], capsys)
    assert "is a ddpm.py checkpoint, not a vae.py one" in err
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 2])
    err = usage_error(ddpm.main, ["--sample", "2", "--out", str(out)], capsys)
    assert "truncated or corrupt" in err and "Traceback" not in err


def test_checkpoints_load_with_weights_only(tmp_path, tiny_pt):
    for name, (module, _, _) in SCRIPTS.items():
        module.main(train_argv(name, tmp_path / name, tiny_pt, 1))
        torch.load(tmp_path / name / "ckpt.pt", weights_only=True)  # raises if anything but tensors and plain values


@pytest.mark.parametrize("name,flag", [
    ("ddpm", ["--steps", "-1"]), ("ddpm", ["--batch-size", "0"]), ("ddpm", ["--T", "0"]), ("ddpm", ["--beta-1", "1.5"]),
    ("ddpm", ["--beta-1", "0.02", "--beta-T", "0.001"]), ("ddpm", ["--eta", "-1"]), ("ddpm", ["--lr", "nan"]),
    ("vae", ["--k", "0"]), ("vae", ["--sigma-x", "-1"]), ("vae", ["--latent-dim", "0"]),
    ("ncsn", ["--sigma-1", "-1"]), ("ncsn", ["--levels", "0"]), ("ncsn", ["--step-size", "0"]),
])
def test_out_of_range_flags_are_refused(name, flag, tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    err = usage_error(SCRIPTS[name][0].main, train_argv(name, out, tiny_pt, 1) + flag, capsys)
    assert "error:" in err and flag[-2].lstrip("-") in err.replace("_", "-") and not out.exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_unwritable_output_and_missing_checkpoint(name, tmp_path, tiny_pt, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run folder would go")
    err = usage_error(SCRIPTS[name][0].main, train_argv(name, blocker / "run", tiny_pt, 1), capsys)
    assert "can't be written" in err
    err = usage_error(SCRIPTS[name][0].main, ["--sample", "2", "--out", str(tmp_path / "empty")], capsys)
    assert "no checkpoint" in err


@pytest.mark.parametrize("name", SCRIPTS)
def test_same_seed_same_samples(name, tmp_path, tiny_pt):
    module = SCRIPTS[name][0]
    module.main(train_argv(name, tmp_path, tiny_pt, 1))
    extra = ["--corrector-steps", "2"] if name == "ncsn" else []
    runs = []
    for _ in range(2):
        module.main(["--sample", "3", "--out", str(tmp_path), "--seed", "11", *extra])
        runs.append(torch.load(tmp_path / "samples.pt", weights_only=True))
    assert torch.equal(*runs)


def test_torchrun_two_ranks_equal_one_process(tmp_path, tiny_pt):
    lr, warmup, steps = 1e-3, 100, 3
    argv = ["--data", tiny_pt, "--steps", str(steps), "--batch-size", "4", "--log-every", "1", "--T", "10",
            "--dropout", "0", "--final-samples", "0", "--lr", str(lr), "--warmup", str(warmup), *TINY_UNET]
    one = tmp_path / "one"
    ddpm.main(["--train", "--out", str(one), *argv])
    two = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(HERE, "ddpm.py"), "--train", "--out", str(two), "--device", "cpu", *argv],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("step 3/3") == 1  # only rank 0 reports
    assert sorted(p.name for p in two.iterdir()) == [".lock", "ckpt.pt"]  # rank 0 alone locks and writes
    a, b = (ddpm.load_checkpoint(str(d / "ckpt.pt")) for d in (one, two))
    # The two runs sum the gradient in different orders, so they differ by rounding. Adam's first steps are
    # ±lr_k for every weight whatever its gradient's size, so a near-zero gradient whose sign the rounding flips
    # moves that weight by up to 2 Σ_k lr_k: that bounds every difference; nearly all weights agree to 1e-6.
    bound = 2 * sum(lr * (k + 1) / warmup for k in range(steps)) + 1e-6  # lr_k of the linear warm-up
    diffs = torch.cat([(a["model"][k] - b["model"][k]).abs().flatten() for k in a["model"]])
    assert diffs.max() <= bound and (diffs > 1e-6).double().mean() < 1e-3
    # the same command again: every rank refuses to start the trained run over (exit 2 each), nothing written
    before = (two / "ckpt.pt").read_bytes()
    r = subprocess.run(r.args, capture_output=True, text=True, timeout=180, env=env)
    # (torchrun's agent prints a traceback of its own for a failed child; none goes through ddpm.py)
    assert r.returncode != 0 and 'ddpm.py", line' not in r.stderr, r.stderr[-3000:]
    # each rank checks for itself (torchrun may stop one before it prints, once the other has exited)
    assert "holds a run trained to step 3" in r.stderr, r.stderr[-3000:]
    _, args = ddpm.parse(["--train", "--out", str(two), *argv])
    with pytest.raises(ddpm.CheckpointError, match="holds a run trained to step 3"):
        ddpm.continue_run(args, str(two / "ckpt.pt"), rank=1)
    assert (two / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("name", ["ddpm", "ncsn"])
def test_main_destroys_the_process_group_it_made(name, tmp_path, tiny_pt, monkeypatch):
    # A rank that exits with gloo's process group alive can abort during the interpreter's shutdown
    # ("terminate called without an active exception": torchrun then reports the run as failed).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    script = {"ddpm": ddpm, "ncsn": ncsn}[name]
    levels = ["--levels", "3"] if name == "ncsn" else ["--T", "10"]
    assert script.main(["--train", "--steps", "1", "--data", tiny_pt, "--out", str(tmp_path / "run"),
                        "--batch-size", "4", "--final-samples", "0", "--device", "cpu", *levels,
                        *TINY_UNET]) == 0
    assert not torch.distributed.is_initialized()


def torchrun(script, argv, tmp_path, **popen):
    """torchrun with 2 CPU processes (gloo), SIGINT at its default as in a terminal, in its own process group."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", **popen.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             script, "--device", "cpu", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)


def children(pid):
    """The processes whose parent is pid (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


TORCHRUN_WITH_FAKE_MNIST = """
import json, os, sys
sys.path.insert(0, os.environ["PROJECT"])
import common
common.DATASETS["mnist"] = json.loads(os.environ["FAKE_MNIST"])
sys.exit(__import__(os.environ["SCRIPT"]).main(sys.argv[1:]))
"""
TORCHRUN_SCRIPTS = ["ddpm", "ncsn"]  # vae.py runs in one process


@pytest.mark.parametrize("name", TORCHRUN_SCRIPTS)
def test_torchrun_ctrl_c_stops_every_rank_after_the_same_step_and_rank_0_downloads_alone(name, fake_mnist, tmp_path):
    # as a terminal does: SIGINT to the whole group. torchrun's agent passes it on to every worker (torch 2.13
    # starts them in sessions of their own; launchers that don't deliver the terminal's too, hence the repeat
    # sent below), then waits 30 s before SIGKILL: the ranks must agree on a step (they share their signals
    # every 20 steps), write the checkpoint and leave within that time; a rank left behind would wait in the
    # next all-reduce until the agent kills it. A repeat during that time is not a second Ctrl-C. The run
    # starts by downloading (fake) MNIST.
    entry, good, _, data_dir = fake_mnist
    module = SCRIPTS[name][0]
    (tmp_path / "launch.py").write_text(TORCHRUN_WITH_FAKE_MNIST)
    out = tmp_path / "run"
    argv = ["--train", "--out", str(out), "--data", "mnist", "--data-dir", str(data_dir), "--steps", "1000",
            "--batch-size", "4", "--log-every", "1", "--final-samples", "0", "--ckpt-every", "1000", *TINY_UNET,
            *(["--T", "10"] if name == "ddpm" else ["--levels", "3"])]
    with serve(good) as (url, seen):
        entry["mirrors"] = [url]
        proc = torchrun("launch.py", argv, tmp_path, env=dict(PROJECT=HERE, SCRIPT=name, FAKE_MNIST=json.dumps(entry)))
        try:
            for line in proc.stdout:
                if line.startswith("step 3/"):
                    os.killpg(proc.pid, signal.SIGINT)
                    sent = time.monotonic()
                if line.startswith("step 5/"):  # the first one is handled: a repeat now, to every worker
                    for pid in children(proc.pid):
                        os.kill(pid, signal.SIGINT)
                    break
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert time.monotonic() - sent < 25, err[-3000:]  # well inside the agent's 30 s
    step = module.load_checkpoint(str(out / "ckpt.pt"))["step"]
    assert step % 20 == 0 and step > 3 and f"interrupted by SIGINT at step {step}" in err, err[-3000:]
    assert f"torchrun --nproc_per_node 2 {name}.py --device cpu --train --out {out}" in err
    assert err.count("interrupted by SIGINT") == 1  # rank 0 alone reports
    assert len(seen) == 1  # one download, by rank 0; rank 1 waited, then read its checked file


@pytest.mark.parametrize("name", TORCHRUN_SCRIPTS)
def test_torchrun_a_failed_write_on_rank_0_stops_every_rank(name, tmp_path, tiny_pt):
    out = tmp_path / "run"
    (out / "ckpt.pt").mkdir(parents=True)  # the checkpoint can't be written there: rank 0's write fails
    argv = ["--train", "--out", str(out), "--data", tiny_pt, "--steps", "4", "--ckpt-every", "2", "--batch-size", "4",
            "--final-samples", "0", *TINY_UNET, *(["--T", "10"] if name == "ddpm" else ["--levels", "3"])]
    proc = torchrun(os.path.join(HERE, f"{name}.py"), argv, tmp_path)
    try:
        _, err = proc.communicate(timeout=120)  # without the shared outcome rank 1 would wait for minutes
    finally:
        proc.kill()
    assert f"{name}.py: error: [Errno {errno.EISDIR}] could not write {out / 'ckpt.pt'}: Is a directory" in err
    assert f"{name}.py: error: rank 0 could not write {out / 'ckpt.pt'} (its message says why)" in err
    assert proc.returncode != 0


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_lives_in_measure_not_in_the_scripts(name, capsys):
    # measure/bench.py times the scripts; the scripts themselves no longer take --bench
    with pytest.raises(SystemExit):
        SCRIPTS[name][0].main(["--help"])
    assert "--bench" not in capsys.readouterr().out
    assert "unrecognized arguments: --bench" in usage_error(SCRIPTS[name][0].main, ["--bench"], capsys)


def test_cuda_device_turns_on_tf32_for_fp32_matmuls(monkeypatch):
    # the GPU fast path: picking CUDA (auto or named) lets fp32 matmuls run in TF32; a CPU run leaves it alone.
    # No CUDA here, so availability is patched: pick_device only decides, it allocates nothing.
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert ddpm.pick_device("cpu").type == "cpu" and torch.get_float32_matmul_precision() == "highest"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert ddpm.pick_device("auto").type == "cuda" and torch.get_float32_matmul_precision() == "high"
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        torch.set_float32_matmul_precision("highest")
        assert ddpm.pick_device("cuda:0").type == "cuda" and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------------------------------------------------- budget, recipes, samplers


@pytest.mark.parametrize("name", ["ddpm", "ncsn"])
def test_minutes_budget_counts_across_resume(name, tmp_path, tiny_pt, capsys):
    # --minutes M trains until M minutes of training in all; the time is kept in the checkpoint, so
    # --resume --minutes M' trains until the run's total reaches M'
    module, flags, _ = SCRIPTS[name]
    out = tmp_path / "run"
    base = ["--data", tiny_pt, "--out", str(out), "--batch-size", "4", *flags]
    module.main(["--train", "--minutes", "0.01", *base])
    ck = module.load_checkpoint(str(out / "ckpt.pt"))
    assert ck["step"] >= 1 and 0.6 <= ck["train_seconds"] < 30
    printed = capsys.readouterr().out
    assert " it/s " in printed and "trained" in printed
    more = ck["train_seconds"] / 60 + 0.01
    module.main(["--train", "--resume", "--minutes", str(more), *base])
    ck2 = module.load_checkpoint(str(out / "ckpt.pt"))
    assert ck2["step"] > ck["step"] and ck2["train_seconds"] >= 60 * more
    module.main(["--train", "--resume", "--minutes", "0.01", *base])  # already past it: no step more
    assert module.load_checkpoint(str(out / "ckpt.pt"))["step"] == ck2["step"]
    module.main(["--train", "--resume", "--minutes", "10", "--steps", str(ck2["step"] + 2), *base])  # steps first
    assert module.load_checkpoint(str(out / "ckpt.pt"))["step"] == ck2["step"] + 2


@pytest.mark.parametrize("module", [ddpm, ncsn], ids=["ddpm", "ncsn"])
def test_recipe_length_is_minutes_on_cpu_unless_steps_are_given(module):
    p = module.build_parser()
    cpu = torch.device("cpu")
    args = p.parse_args(["--train"])
    module.fill_recipe(args, cpu)
    assert args.minutes == 15 and args.steps is None
    args = p.parse_args(["--train", "--steps", "7"])
    module.fill_recipe(args, cpu)
    assert args.steps == 7 and args.minutes is None
    args = p.parse_args(["--train", "--minutes", "2"])
    module.fill_recipe(args, torch.device("cuda"))
    assert args.minutes == 2 and args.steps is None and args.lr == module.GPU_RECIPE["lr"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_progress_line_gives_step_loss_lr_rate_and_budget(name, tiny_pt, tmp_path, capsys):
    # each progress line: the step (of --steps), the loss, the learning rate, it/s and the time against the budget
    argv = train_argv(name, str(tmp_path / "run"), tiny_pt, 4, "--lr", "1e-3", "--warmup", "4", "--log-every", "2")
    SCRIPTS[name][0].main(argv)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    for step, line in zip((2, 4), lines):
        m = re.fullmatch(r"step (\d+)/4 loss (\S+) lr (\S+) (\S+) it/s (\d+m\d\ds) ETA (\d+m\d\ds)", line)
        assert m, line
        assert int(m[1]) == step and math.isfinite(float(m[2])) and float(m[4]) > 0
        # the warm-up's rate after the step: lr min(1, (k + 1)/warmup) with k = step
        assert float(m[3]) == pytest.approx(1e-3 * min(1.0, (step + 1) / 4), rel=1e-3)


def test_cli_samplers_and_ode_eval(tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    ddpm.main(["--train", "--steps", "2", *ddpm_cli(out, tiny_pt)])
    for extra in (["--sampler", "dpm++2m", "--sample-steps", "4"], ["--sampler", "ddim"], ["--no-clip-x0"]):
        ddpm.main(["--sample", "3", "--out", str(out), *extra])
        x = torch.load(out / "samples.pt", weights_only=True)
        assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()
    assert "dpm++2m with 4 network calls" in capsys.readouterr().out
    # the CLI's default: DDIM with η = 1, 50 calls (here T = 10 of them), even in t, x̂_0 clipped
    ddpm.main(["--sample", "2", "--out", str(out), "--precision", "fp32", "--seed", "3"])
    assert "ddim with 10 network calls, η = 1, uniform time grid, x̂_0 clipped" in capsys.readouterr().out
    model, sch = ddpm.model_from_checkpoint(ddpm.load_checkpoint(str(out / "ckpt.pt")), torch.device("cpu"))
    want = ddpm.ddim_sample(model, sch, (2, 1, 28, 28), 10, eta=1.0, clip_x0=True,
                            generator=torch.Generator().manual_seed(3), spacing="uniform")
    torch.testing.assert_close(torch.load(out / "samples.pt", weights_only=True), (want.clamp(-1, 1) + 1) / 2)
    ddpm.main(["--sample", "2", "--out", str(out), "--sampler", "dpm++2m", "--time-grid", "log-sigma",
               "--sample-steps", "4"])
    assert "dpm++2m with 4 network calls, log-sigma time grid" in capsys.readouterr().out
    ddpm.main(["--eval", "--ode", "--ode-steps", "3", "--probes", "2", "--eval-n", "2", "--data", tiny_pt, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "ODE bound" in printed and "bits/dim" in printed and "per image" in printed
    assert torch.load(out / "eval.pt", weights_only=True)["bits_per_dim"].shape == (2,)  # per image
    nodes = len(ddpm.ode_grid(ddpm.schedule(10), 3))
    assert f"{nodes} nodes even in log σ̄, {2 * (nodes - 1)} network calls and 2 probe(s)" in printed
    for bad, msg in ((["--ddim-steps", "5", "--sampler", "dpm++2m"], "one or the other"),
                     (["--sampler", "ancestral", "--sample-steps", "5"], "ancestral sampler takes T steps"),
                     (["--sampler", "ddim", "--sample-steps", "20"], "> T = 10 of the model"),
                     (["--ode"], "goes with --eval")):
        err = usage_error(ddpm.main, ["--sample", "2", "--out", str(out), "--T", "10", *bad], capsys)
        assert msg in err


def test_ncsn_pc_sampler_cli(tmp_path, tiny_pt, capsys):
    out = str(tmp_path / "run")
    ncsn.main(["--train", "--steps", "1", "--data", tiny_pt, "--out", out, "--batch-size", "4", "--levels", "3",
               "--final-samples", "0", *TINY_UNET])
    ncsn.main(["--sample", "3", "--sampler", "pc", "--corrector-steps", "2", "--denoise", "--out", out])
    assert "predictor-corrector, 9 network calls" in capsys.readouterr().out  # (3 - 1) + 3 x 2 + 1
    x = torch.load(tmp_path / "run" / "samples.pt", weights_only=True)
    assert x.shape == (3, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    # the VE prior's start: the chain's first frame is N(0, σ_1^2 I), not uniform on [0, 1]
    ncsn.main(["--sample", "8", "--start", "gaussian", "--corrector-steps", "1", "--strip", "--out", out])
    start = torch.load(tmp_path / "run" / "chain.pt", weights_only=True).reshape(8, 4, 1, 28, 28)[:, 0]
    assert start.min() < -0.5 and start.max() > 1.5 and abs(start.std().item() - 1.0) < 0.1  # σ_1 = 1


def test_ncsn_cli_default_sampler_is_the_measured_one(tmp_path, tiny_pt, capsys):
    # README, score model: the CLI samples with predictor-corrector, M = 39 corrector steps, r = 0.35, the
    # final denoising step, from the uniform start (the notes' Algorithm 1 start); the library keeps [SDE]'s
    out = str(tmp_path / "run")
    ncsn.main(["--train", "--steps", "1", "--data", tiny_pt, "--out", out, "--batch-size", "4", "--levels", "2",
               "--final-samples", "0", *TINY_UNET])
    # fp32 as the reference below: --precision auto is bf16 autocast on a CPU with native bf16
    ncsn.main(["--sample", "2", "--seed", "5", "--out", out, "--precision", "fp32"])
    assert "predictor-corrector, 80 network calls" in capsys.readouterr().out  # (2 - 1) + 2 x 39 + 1
    model, sigmas = ncsn.model_from_checkpoint(ncsn.load_checkpoint(out + "/ckpt.pt"), torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 28, 28, generator=g)
    want = ncsn.pc_sample(model, x, sigmas, corrector_steps=39, snr=0.35, denoise=True, generator=g).clamp(0, 1)
    assert torch.equal(torch.load(out + "/samples.pt", weights_only=True), want)
    args = ncsn.build_parser().parse_args(["--sample", "1"])
    assert (args.langevin_steps, args.step_size) == (40, 5e-5)  # Algorithm 1's best at the same calls
    # the old spelling (ε is the noise's name in ncsn.py): a usage error that names the new flag
    err = usage_error(ncsn.main, ["--sample", "1", "--out", out, "--langevin-eps", "2e-5"], capsys)
    assert "--langevin-eps is now --step-size" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------- copying the files


# Helpers that are byte-identical copies: each script stays self-contained, so a fix in one copy must be made in
# every copy. Taken from the code as it stands; a helper that stops being the same fails the test below.
COPIES = {
    ("ddpm", "ncsn", "vae"): ("CheckpointError", "FlagError", "_flag", "COUNT", "POSITIVE", "POSITIVE_INT", "SEED",
                              "SEED_MAX", "LR", "autocast", "use_bf16", "pick_device", "make_optimizer", "clock",
                              "rng_state", "set_rng_state", "raise_interrupt", "stop_signals", "check_writable",
                              "save_checkpoint", "tensor_checksum", "given_flags", "data_id", "continue_run",
                              "fitting", "lock_folder"),
    ("ddpm", "ncsn"): ("INT_LIST", "OPEN_UNIT", "UNIT", "agree", "fill_recipe", "make_ema", "setup_distributed"),
    ("ncsn", "vae"): ("OLDER", "check_same"),
}


def top_level_sources(text):
    """Each top-level function, class and assignment of a module's source, by name: its exact text."""
    import ast
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(text, node)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = ast.get_source_segment(text, node)
    return found


def copies_that_differ(texts):
    """The COPIES entries that are missing from a script or not the same text in all of them."""
    sources = {name: top_level_sources(text) for name, text in texts.items()}
    bad = []
    for scripts, names in COPIES.items():
        for name in names:
            if len({sources[s].get(name) for s in scripts}) != 1 or sources[scripts[0]].get(name) is None:
                bad.append(f"{name} in {', '.join(s + '.py' for s in scripts)}")
    return bad


def test_copied_helpers_are_the_same_in_every_script():
    texts = {name: open(os.path.join(HERE, f"{name}.py"), encoding="utf-8").read() for name in ("ddpm", "ncsn", "vae")}
    assert copies_that_differ(texts) == []
    # one copy edited, the others not: named
    edited = dict(texts, vae=texts["vae"].replace('        return "?"', '        return "-"', 1))
    assert edited["vae"] != texts["vae"]
    assert copies_that_differ(edited) == ["clock in ddpm.py, ncsn.py, vae.py"]
    edited = dict(texts, ncsn=texts["ncsn"].replace("def check_same(", "def check_the_same(", 1))
    assert copies_that_differ(edited) == ["check_same in ncsn.py, vae.py"]


def test_a_script_copied_without_common_py_helps_and_says_what_it_needs(tmp_path):
    # --help and usage errors need the file alone; anything else names common.py, with no traceback
    for name in ("ddpm", "ncsn", "vae"):
        (tmp_path / f"{name}.py").write_bytes(open(os.path.join(HERE, f"{name}.py"), "rb").read())
    code = ("import contextlib, io, sys\n"
            "for name in ('ddpm', 'ncsn', 'vae'):\n"
            "    module = __import__(name)\n"
            "    for argv in (['--help'], ['--sample', '1']):\n"
            "        out, err = io.StringIO(), io.StringIO()\n"
            "        code = None\n"
            "        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "            try:\n"
            "                module.main(argv)\n"
            "            except SystemExit as e:\n"
            "                code = e.code\n"
            "        print(name, argv[0], code, repr(out.getvalue()[:6]), repr(err.getvalue()))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    for k, name in enumerate(("ddpm", "ncsn", "vae")):
        assert lines[2 * k] == f"{name} --help 0 'usage:' ''", lines
        assert lines[2 * k + 1].startswith(f"{name} --sample 2 '' '{name}.py: error: needs common.py beside it"), lines
def test_scripts_import_where_the_unix_only_resource_module_is_missing():
    # Windows has no `resource`: the scripts never need it (measure/bench.py's peak memory does)
    code = "import sys; sys.modules['resource'] = None\nimport torch, common, ddpm, vae, ncsn\nprint('ok')\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def readme_snippet(heading):
    """The first ```python block after `heading` in README.md."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    after = text[text.index(heading):]
    start = after.index("```python\n") + len("```python\n")
    return after[start:after.index("```", start)]


def run_in(folder, code, timeout=300):
    """Run `code` with Python in `folder`, where only the files copied there can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    (folder / "check.py").write_text(code, encoding="utf-8")
    r = subprocess.run([sys.executable, "check.py"], cwd=folder, capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert r.returncode == 0 and "ok" in r.stdout.split(), r.stderr[-3000:]


def copy_alone(tmp_path, *files):
    for f in files:
        (tmp_path / f).write_bytes(open(os.path.join(HERE, f), "rb").read())
    return tmp_path


def test_ddpm_math_copies_alone_and_takes_any_callable(tmp_path):
    # ddpm.py without common.py: one loss_simple step of a network of the user's, and the three samplers
    # driven by a plain function with no parameters (here the exact ε of a point mass at 0.5)
    run_in(copy_alone(tmp_path, "ddpm.py"), """
import sys, torch, ddpm
sch = ddpm.schedule(T=50)
net = torch.nn.Conv2d(1, 1, 3, padding=1)
my_eps = lambda x_t, t: net(x_t) + 0 * t.reshape(-1, 1, 1, 1)
opt = torch.optim.Adam(net.parameters(), 1e-3)
loss = ddpm.loss_simple(my_eps, sch, torch.rand(4, 1, 8, 8) * 2 - 1)
loss.backward(); opt.step()
assert torch.isfinite(loss) and net.weight.grad is not None
ab = sch.alpha_bar
exact = lambda x_t, t: (x_t - ab[t].sqrt().reshape(-1, 1, 1, 1) * 0.5) / (1 - ab[t]).sqrt().reshape(-1, 1, 1, 1)
g = torch.Generator().manual_seed(0)
for x in (ddpm.sample(exact, sch, (3, 1, 4, 4), generator=g),
          ddpm.ddim_sample(exact, sch, (3, 1, 4, 4), steps=10, generator=g),
          ddpm.dpm_solver_sample(exact, sch, (3, 1, 4, 4), steps=10, x_T=torch.randn(3, 1, 4, 4).double())):
    assert x.shape == (3, 1, 4, 4) and (x - 0.5).abs().max() < 1e-3, x
assert ddpm.dpm_solver_sample(exact, sch, (2, 1, 4, 4), x_T=torch.randn(2, 1, 4, 4).double()).dtype == torch.float64
assert "common" not in sys.modules
print("ok")
""")


def test_vae_math_copies_alone(tmp_path):
    run_in(copy_alone(tmp_path, "vae.py"), """
import sys, torch, vae
m = vae.VAE(latent_dim=3, hidden=16)
opt = torch.optim.Adam(m.parameters(), 1e-3)
x = torch.rand(4, 1, 28, 28)
loss = -vae.elbo(m, x).mean()
loss.backward(); opt.step()
assert torch.isfinite(loss) and vae.generate(m, 2).shape == (2, 1, 28, 28)
assert vae.iwae_bound(m, x, 5).shape == (4,)
assert "common" not in sys.modules
print("ok")
""")


def test_ncsn_math_copies_alone_but_for_the_score_net(tmp_path):
    # the samplers and the loss take any score function; only ScoreNet needs common.py's U-Net
    run_in(copy_alone(tmp_path, "ncsn.py"), """
import sys, torch, ncsn
sig = ncsn.geometric_sigmas(1.0, 0.01, 4)
exact = lambda x, i: -(x - 0.5) / (1 + sig[i].reshape(-1, 1, 1, 1) ** 2)  # data N(0.5, 1): exact score
x0 = torch.rand(8, 1, 4, 4, dtype=torch.float64)
assert ncsn.annealed_langevin(exact, x0, sig, T=3).shape == x0.shape
assert ncsn.pc_sample(exact, x0, sig, corrector_steps=2, denoise=True).shape == x0.shape
assert torch.isfinite(ncsn.dsm_loss(exact, x0, sig))
assert "common" not in sys.modules
try:
    ncsn.ScoreNet(sig, in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), image_size=28)
except ImportError:
    print("ok")
""")


def test_readme_copy_snippet_runs_with_only_ddpm_and_common(tmp_path, tiny_pt):
    # ddpm.py + common.py copied alone into an empty folder; the README's snippet runs there unchanged after a
    # prelude that supplies what it names: a network `my_unet`, images `x0`, and a checkpoint at runs/ddpm
    copy_alone(tmp_path, "ddpm.py", "common.py")
    r = subprocess.run([sys.executable, "ddpm.py", "--train", "--steps", "1", "--data", tiny_pt, "--T", "10",
                        "--batch-size", "2", "--final-samples", "0", *TINY_UNET], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    prelude = ("import torch, common\n"
               "my_unet = common.UNet(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), image_size=28)\n"
               "x0 = torch.rand(4, 1, 28, 28) * 2 - 1\n")
    check = ("\nassert torch.isfinite(loss) and x.shape == (16, 1, 28, 28) and torch.isfinite(x).all()\n"
             "assert isinstance(model, common.UNet) and sch.T == 10\n"
             "print('ok')\n")
    run_in(tmp_path, prelude + readme_snippet("## Copying into another project") + check)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".py") == ["check.py", "common.py", "ddpm.py"]


# ---------------------------------------------------------------------------------------------------------- the READMEs' commands


def measure_module(name):
    """A script of measure/ (imported by path: measure/ is no package, and the scripts never import it)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"measure_{name}", os.path.join(HERE, "measure", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def readme_commands(path):
    """Each command that runs one of the project's Python files, from the fenced blocks (not ```python ones) of a
    README: (line, script, argv, environment assignments), comments stripped, each part of `a && b` or `a; b` its
    own command."""
    commands, fence = [], None
    for line in open(path, encoding="utf-8"):
        line = line.rstrip("\n")
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:]
            continue
        if fence is None or fence == "python":
            continue
        words = shlex.split(line, comments=True)
        while words:
            end = next((k for k, w in enumerate(words) if w in ("&&", ";", "||")), len(words))
            part, words = words[:end], words[end + 1:]
            env = {}
            while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", part[0]):
                key, _, value = part.pop(0).partition("=")
                env[key] = value
            if part[:1] == ["export"]:
                continue
            if part[:1] in (["python"], ["python3"], ["torchrun"]):
                k = next((k for k, w in enumerate(part) if w.endswith(".py")), None)
                if k is not None:
                    commands.append((line, part[k], part[k + 1:], env))
    return commands


DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10")


def shipped(path):
    """Tracked by git (a clean clone holds it); where there is no git, present."""
    if os.path.isdir(os.path.join(HERE, ".git")):
        r = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=HERE, capture_output=True)
        return r.returncode == 0
    return os.path.exists(os.path.join(HERE, path))


def reads_and_writes(script, argv):
    """(files read, files written) by one README command, from the script's own parser: never run."""
    norm = os.path.normpath
    if script.startswith("measure/"):
        mod = measure_module(os.path.basename(script)[:-3])
        args = mod.build_parser().parse_args(argv)  # a renamed or removed flag: SystemExit, and the test fails
        if mod.__name__ == "measure_bench":  # each setting is the script's own flags, parsed by its parser
            reads = [mod.script_args(args.script, setting).data for setting in args.settings or [""]]
            return [norm(f) for f in reads if f not in DATASET_NAMES], []
        return [norm(f) for f in mod.inputs(args)], [norm(f) for f in mod.outputs(args)]
    mod = SCRIPTS[os.path.basename(script)[:-3]][0]
    _, args = mod.parse(argv)  # with the script's own checks of flags that contradict each other
    ckpt = os.path.join(args.out, "ckpt.pt")
    reads = [] if args.data in DATASET_NAMES or not (args.train or getattr(args, "eval", False)
                                                      or getattr(args, "reconstruct", False)) else [args.data]
    if args.resume or args.sample or getattr(args, "eval", False) or getattr(args, "reconstruct", False):
        reads.append(ckpt)
    writes = [ckpt] if args.train else []
    if args.sample or (args.train and getattr(args, "final_samples", 64)):
        writes.append(os.path.join(args.out, "samples.pt"))
    return [norm(f) for f in reads], [norm(f) for f in writes]


@pytest.mark.parametrize("readme", ["README.md", os.path.join("measure", "README.md")])
def test_readme_commands_parse_and_read_only_files_that_exist(readme):
    # every `python X.py ...` and `torchrun ... X.py ...` in both READMEs' code blocks parses with X's own parser,
    # reads only files that ship, that an earlier line writes, or data sets the script downloads, and never
    # trains twice into one --out without --resume
    commands = readme_commands(os.path.join(HERE, readme))
    assert len(commands) >= (10 if readme == "README.md" else 3)
    written, trained = set(), set()
    for line, script, argv, env in commands:
        assert script.startswith("measure/") or script in ("ddpm.py", "vae.py", "ncsn.py"), line
        assert shipped(script), line
        try:
            reads, writes = reads_and_writes(script, argv)
        except SystemExit:
            pytest.fail(f"{readme}: does not parse: {line}")
        for f in reads:
            assert f in written or shipped(f), f"{readme}: {line!r} reads {f}, which no earlier line writes"
        if script in ("ddpm.py", "vae.py", "ncsn.py") and "--train" in argv:
            out = os.path.normpath(SCRIPTS[script[:-3]][0].parse(argv)[1].out)
            assert "--resume" in argv or out not in trained, f"{readme}: {line!r} trains into {out} a second time"
            trained.add(out)
        written.update(writes)


def test_readme_command_test_sees_a_renamed_flag_and_a_missing_file(tmp_path):
    # the test above fails for a flag the parser does not know and for a file nothing writes
    good = tmp_path / "good.md"
    good.write_text("```\npython ddpm.py --train --out runs/x --steps 3  # a comment\n"
                    "python ddpm.py --sample 4 --out runs/x && python measure/judge.py runs/x/samples.pt --n 4\n```\n")
    found = readme_commands(good)
    assert [(s, a) for _, s, a, _ in found] == [("ddpm.py", ["--train", "--out", "runs/x", "--steps", "3"]),
                                                ("ddpm.py", ["--sample", "4", "--out", "runs/x"]),
                                                ("measure/judge.py", ["runs/x/samples.pt", "--n", "4"])]
    assert reads_and_writes("measure/judge.py", ["runs/x/samples.pt"])[0][0] == os.path.normpath("runs/x/samples.pt")
    with pytest.raises(SystemExit):
        reads_and_writes("ddpm.py", ["--sample", "4", "--langevin-eps", "1"])
    assert reads_and_writes("ddpm.py", ["--sample", "4", "--out", "runs/y"])[0] == [os.path.normpath("runs/y/ckpt.pt")]
    assert not shipped("runs/y/ckpt.pt") and shipped("ddpm.py")


def test_every_test_the_readme_names_exists():
    # the fault table names the test that tries each row: a renamed or merged test must not leave a stale name
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    defined = set()
    for f in ("test_models.py", "test_math.py", os.path.join("measure", "test_measure.py")):
        defined |= set(re.findall(r"^def (test_\w+)", open(os.path.join(HERE, f), encoding="utf-8").read(), re.M))
    named = set(re.findall(r"`(test_\w+)`", readme))
    assert len(named) >= 20 and named <= defined, sorted(named - defined)


def test_every_picture_in_assets_is_shown_by_a_readme():
    shown = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    shown += open(os.path.join(HERE, "measure", "README.md"), encoding="utf-8").read()
    pictures = [f for f in os.listdir(os.path.join(HERE, "assets")) if f.endswith(".png")]
    assert pictures and all(f"assets/{f}" in shown for f in pictures), pictures
    for f in re.findall(r"assets/[\w.-]+\.png", shown):
        assert os.path.isfile(os.path.join(HERE, f)), f


# ---------------------------------------------------------------------------------------------------------- a user's slips


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_second_train_into_a_trained_folder_is_refused_and_loses_nothing(name, tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    SCRIPTS[name][0].main(train_argv(name, out, tiny_pt, 3))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    err = usage_error(SCRIPTS[name][0].main, train_argv(name, out, tiny_pt, 5), capsys)
    ckpt = str(out / "ckpt.pt")
    assert f"{ckpt} holds a run trained to step 3" in err and "Traceback" not in err
    assert "--resume" in err and "another --out" in err and f"delete {ckpt}" in err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing written, nothing lost


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_continues_the_same_run_and_refuses_a_changed_flag(name, tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    main = SCRIPTS[name][0].main
    main(train_argv(name, out, tiny_pt, 2, "--lr", "3e-3", "--warmup", "0"))
    before = (out / "ckpt.pt").read_bytes()
    err = usage_error(main, train_argv(name, out, tiny_pt, 4, "--resume", "--lr", "1e-5", "--warmup", "0"), capsys)
    assert "--lr: checkpoint 0.003, now 1e-05" in err and "Traceback" not in err
    other = tmp_path / "other.pt"
    other.write_bytes(open(tiny_pt, "rb").read())
    argv = train_argv(name, out, str(other), 4, "--resume", "--lr", "3e-3", "--warmup", "0", "--batch-size", "8",
                      "--seed", "6", "--grad-clip", "0.5")
    err = usage_error(main, argv, capsys)
    for flag in ("--batch-size: checkpoint 4, now 8", "--seed: checkpoint 5, now 6", "--grad-clip", "--data"):
        assert flag in err, flag
    assert (out / "ckpt.pt").read_bytes() == before
    # the flags left out come from the checkpoint: the run goes on at its own learning rate and batch
    main(["--train", "--resume", "--out", str(out), "--steps", "4", "--log-every", "1",
          *([] if name == "vae" else ["--final-samples", "0"])])
    printed = capsys.readouterr().out
    assert "step 4/4" in printed and "lr 0.003 " in printed
    ck = SCRIPTS[name][0].load_checkpoint(str(out / "ckpt.pt"))
    assert ck["step"] == 4 and ck["args"]["lr"] == 3e-3 and ck["args"]["batch_size"] == 4
    assert ck["args"]["data_id"] == os.path.realpath(tiny_pt)


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_without_a_checkpoint_starts_a_new_run_and_steps_0_trains_nothing(name, tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    SCRIPTS[name][0].main(train_argv(name, out, tiny_pt, 0))
    assert "nothing to train" in capsys.readouterr().out and not out.exists()
    SCRIPTS[name][0].main(train_argv(name, out, tiny_pt, 1, "--resume"))
    assert f"no checkpoint at {out / 'ckpt.pt'}; starting a new run" in capsys.readouterr().out
    assert SCRIPTS[name][0].load_checkpoint(str(out / "ckpt.pt"))["step"] == 1


def test_cli_says_once_that_a_short_schedule_leaves_x_T_far_from_noise(tmp_path, tiny_pt, capsys):
    # ddpm.schedule() warns through `warnings` (for code that imports it); the command line says it once, in a line
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ddpm.main(train_argv("ddpm", out, tiny_pt, 1, "--final-samples", "0"))
        ddpm.main(["--sample", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert printed.out.count("note: --T 10 with β from 0.0001 to 0.02 leaves ᾱ_T = 0.904") == 1
    assert "Warning" not in printed.err and "ᾱ_T" not in printed.err  # (stderr has the progress lines)


def test_data_naming_a_folder_is_one_message(tmp_path, capsys):
    err = usage_error(ddpm.main, ["--train", "--data", str(tmp_path), "--out", str(tmp_path / "run")], capsys)
    assert "is a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("name", SCRIPTS)
def test_one_run_per_folder_and_a_dead_holders_lock_frees_itself(name, tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    out.mkdir()
    held = SCRIPTS[name][0].lock_folder(str(out))  # a run training into the folder (flock: per open file, even in-process)
    try:
        err = usage_error(SCRIPTS[name][0].main, train_argv(name, out, tiny_pt, 1), capsys)
        assert f"{out} is in use: pid {os.getpid()} on " in err and "another --out" in err
        assert not (out / "ckpt.pt").exists()
    finally:
        held.close()
    # a process that held the lock and was killed: the OS released it
    code = f"import {name}, time; held = {name}.lock_folder({str(out)!r}); print('locked', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert "is in use: pid" in usage_error(SCRIPTS[name][0].main, train_argv(name, out, tiny_pt, 1), capsys)
    finally:
        proc.kill()
        proc.wait()
    SCRIPTS[name][0].main(train_argv(name, out, tiny_pt, 1))
    assert SCRIPTS[name][0].load_checkpoint(str(out / "ckpt.pt"))["step"] == 1


def test_sampling_is_allowed_while_a_run_trains_into_the_folder(tmp_path, tiny_pt):
    # --sample and --eval read the checkpoint whole (os.replace swaps it in at once): they take no lock
    out = tmp_path / "run"
    ddpm.main(train_argv("ddpm", out, tiny_pt, 1))
    held = ddpm.lock_folder(str(out))
    try:
        assert ddpm.main(["--sample", "2", "--out", str(out)]) == 0
    finally:
        held.close()


@pytest.mark.parametrize("writer", ["checkpoint", "png", "download"])
def test_writes_fsync_the_file_then_replace_then_fsync_the_folder(writer, tmp_path, monkeypatch, fake_mnist):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(a, b):
        calls.append(("replace",))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    if writer == "checkpoint":
        for module in (ddpm, ncsn, vae):
            module.save_checkpoint(str(tmp_path / f"{module.__name__}.pt"), {"x": torch.zeros(2)})
        want = 3 * [("fsync", "file"), ("replace",), ("fsync", "folder")]
    elif writer == "png":
        common.write_png(str(tmp_path / "a.png"), torch.zeros(2, 1, 4, 4))
        want = [("fsync", "file"), ("replace",), ("fsync", "folder")]
    else:
        entry, good, _, data_dir = fake_mnist
        with serve(good) as (url, _):
            entry["mirrors"] = [url]
            common.download("mnist", "train", str(data_dir))
        want = [("fsync", "file"), ("replace",), ("fsync", "folder")]
    assert calls == want


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("damage", ["zeroed", "flipped"])
def test_a_checkpoint_damaged_inside_a_tensor_is_refused_as_corrupt(name, damage, tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    module = SCRIPTS[name][0]
    module.main(train_argv(name, out, tiny_pt, 1))
    path = out / "ckpt.pt"
    data = bytearray(path.read_bytes())
    # the zip stores tensors uncompressed: find the bytes of one weight in the file and damage a block of them
    weight = next(v for v in module.load_checkpoint(str(path))["model"].values() if v.numel() >= 64)
    raw = ctypes.string_at(weight.data_ptr(), weight.numel() * weight.element_size())
    at = data.find(raw)
    assert at > 0
    data[at + 16:at + 48] = bytes(32) if damage == "zeroed" else bytes(b ^ 0x10 for b in data[at + 16:at + 48])
    path.write_bytes(bytes(data))
    assert isinstance(torch.load(path, weights_only=True), dict)  # torch's reader itself sees nothing wrong
    err = usage_error(module.main, ["--sample", "2", "--out", str(out)], capsys)
    assert "is corrupt" in err and "Traceback" not in err
    # a checkpoint written before the checksum existed loads as it always did
    ck = torch.load(path, weights_only=True)
    del ck["checksum"]
    torch.save(ck, path)
    assert module.load_checkpoint(str(path))["step"] == 1


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_seed_lr_and_device_are_usage_errors_not_tracebacks(name, tmp_path, tiny_pt, capsys, monkeypatch):
    module = SCRIPTS[name][0]
    nanoseconds = str(time.time_ns())  # a seed from a nanosecond clock would overflow seed * 1_000_003 + step
    for flags, message in ((["--seed", nanoseconds], f"is not an integer from -{module.SEED_MAX} to {module.SEED_MAX}"),
                           (["--lr", "1e39"], "is not a number > 0 that fp32 holds"),
                           (["--device", "mps"], "'mps' asked for, but it is not available here"),
                           (["--device", "xpu"], "'xpu' asked for, but it is not available here")):
        err = usage_error(module.main, train_argv(name, tmp_path / "run", tiny_pt, 1, *flags), capsys)
        assert message in err and "Traceback" not in err, flags
    # seeds that worked before keep their data order: the largest allowed one still seeds every step
    torch.Generator().manual_seed(module.SEED_MAX * 1_000_003 + 10 ** 9)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = usage_error(module.main, train_argv(name, tmp_path / "run", tiny_pt, 1, "--device", "cuda:3"), capsys)
    assert "'cuda:3' asked for, but this machine has 2 CUDA device(s)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_checkpoint_of_another_version_is_one_message_naming_the_key_or_shape(name, tmp_path, tiny_pt, capsys):
    out = tmp_path / "run"
    module = SCRIPTS[name][0]
    module.main(train_argv(name, out, tiny_pt, 1))
    path = out / "ckpt.pt"
    ck = torch.load(path, weights_only=True)
    del ck["checksum"]
    weights = "model" if name == "vae" else "ema"
    key = next(iter(ck[weights]))
    ck[weights][key] = torch.zeros(3, 1, 2)
    torch.save(ck, path)
    err = usage_error(module.main, ["--sample", "1", "--out", str(out)], capsys)
    assert "does not fit this version" in err and key in err and "Traceback" not in err
    err = usage_error(module.main, train_argv(name, out, tiny_pt, 2, "--resume"), capsys)
    assert "does not fit this version" in err and key in err
    del ck["args"]["image_size"]
    torch.save(ck, path)
    err = usage_error(module.main, ["--sample", "1", "--out", str(out)], capsys)
    assert "does not fit this version of the script: it has no 'image_size'" in err


def test_a_console_that_is_not_utf8_gets_replacement_characters(tmp_path, tiny_pt):
    out = tmp_path / "run"
    ddpm.main(train_argv("ddpm", out, tiny_pt, 1))
    env = dict(os.environ, PYTHONIOENCODING="cp1252")  # what Windows gives output redirected to a file
    r = subprocess.run([sys.executable, "ddpm.py", "--sample", "2", "--out", str(out)], cwd=HERE, env=env,
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode("cp1252", "replace")[-2000:]
    assert "?, 0 clipped" in r.stdout.decode("cp1252") or "x?_0 clipped" in r.stdout.decode("cp1252")


def test_a_broken_reply_moves_on_to_the_next_mirror(fake_mnist):
    # a chunked body cut off, and a reply that is not HTTP: http.client's errors, not OSError
    entry, good, _, data_dir = fake_mnist
    replies = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100\r\nabc", b"hello, not HTTP\r\n\r\n"]
    servers = []
    for reply in replies:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)

        def answer(s=s, reply=reply):
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = s.accept()
                    conn.recv(4096)
                    conn.sendall(reply)
                    conn.close()
        threading.Thread(target=answer, daemon=True).start()
        servers.append(s)
    try:
        with serve(good) as (u_good, _):
            entry["mirrors"] = [f"http://127.0.0.1:{s.getsockname()[1]}/" for s in servers] + [u_good]
            assert common.load_images("mnist", str(data_dir)).shape == (3, 1, 28, 28)
            entry["mirrors"] = entry["mirrors"][:2]
            (data_dir / "mnist" / "train-images-idx3-ubyte.gz").unlink()
            with pytest.raises(common.DataError, match="could not download mnist") as e:
                common.load_images("mnist", str(data_dir))
            assert "IncompleteRead" in str(e.value) or "incomplete" in str(e.value).lower()
    finally:
        for s in servers:
            s.close()
