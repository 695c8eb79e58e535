"""Models, CLIs and I/O: shapes, training steps, checkpoints, resume, PNG output, downloads, bad input.

CLI tests call each script's main(argv) in-process with a tiny T and tiny models; only the tests that need a
separate process (SIGKILL, torchrun) start one.
"""
import contextlib
import functools
import gzip
import hashlib
import http.server
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


def test_group_norm_groups_divide_small_widths():
    for ch in (8, 24, 48, 96, 128):
        assert ch % common.group_norm(ch).num_groups == 0


# ---------------------------------------------------------------------------------------------------------- DDPM


def test_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    s = ddpm.schedule(T=100)
    m = common.UNet(in_ch=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), dropout=0.0, image_size=28)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    t = torch.randint(1, 101, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    opt, sched = common.make_optimizer(m, 2e-3, 0)
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
    ck = common.load_checkpoint(str(out / "ckpt.pt"), kind="ddpm")
    assert ck["step"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    ddpm.main(["--train", "--resume", "--steps", "5", *ddpm_cli(out, tiny_pt)])
    assert "resumed from" in capsys.readouterr().out
    assert common.load_checkpoint(str(out / "ckpt.pt"))["step"] == 5
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
    assert list((data_dir / "mnist").iterdir()) == []  # nothing half-written left behind


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
    assert common.load_checkpoint(out + "/ckpt.pt", kind="vae")["step"] == 3
    vae.main(["--train", "--resume", "--steps", "4", *base])
    assert "resumed from" in capsys.readouterr().out and common.load_checkpoint(out + "/ckpt.pt")["step"] == 4
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
            "--langevin-steps", "2", "--final-samples", "0", *TINY_UNET]
    assert ncsn.main(["--train", "--steps", "2", *base]) == 0
    ncsn.main(["--train", "--resume", "--steps", "3", *base])
    assert "resumed from" in capsys.readouterr().out and common.load_checkpoint(out + "/ckpt.pt", "ncsn")["step"] == 3
    ncsn.main(["--sample", "4", "--strip", "--denoise", "--langevin-steps", "2", "--out", out])
    x = torch.load(tmp_path / "run" / "samples.pt", weights_only=True)
    assert x.shape == (4, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    W, H, _, _ = read_png(tmp_path / "run" / "chain.png")
    assert (W, H) == (4 * 30 + 2, 4 * 30 + 2)  # 4 rows: start + 3 levels
    err = usage_error(ncsn.main, ["--train", "--sigma-1", "0.01", "--sigma-L", "0.1", "--out", out], capsys)
    assert "must exceed" in err
