"""Training and sampling throughput of ddpm.py, ncsn.py and vae.py, timed with torch.utils.benchmark.

    python measure/bench.py ddpm                                  # the CPU (or GPU) recipe's step
    python measure/bench.py ddpm "--precision fp32" "--precision bf16"   # two settings, side by side

Each SETTING is a string of the script's own flags (those of `python ddpm.py --help`; unset ones come
from the script's recipe, as in --train). For each setting it builds the script's model, optimiser
and EMA, and times the training step that the script's own loop takes (on random data of the data
set's shape) and one network call of its sampler (a decoder call for vae.py). With two or more
settings the rounds alternate, A B A B ..., so that the machine's drift (10 to 30% within an hour
on a shared VM) hits every setting alike, and the ratio of each setting to the first is the median
of the per-round ratios. One JSON line per setting: parameters, multiply-accumulates per image
(torch.utils.flop_counter), training images/s and sampling calls/s as the median over rounds with
the interquartile range, the peak memory so far, device, dtype, torch version.

Needs torch alone, and the scripts beside it; the scripts never import this file.
"""
import argparse
import json
import os
import shlex
import statistics
import sys

import torch
import torch.utils.benchmark as benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SCRIPTS = ("ddpm", "ncsn", "vae")


def build_parser():
    p = argparse.ArgumentParser(prog="measure/bench.py", description=__doc__.split("\n")[0])
    p.add_argument("script", choices=SCRIPTS)
    p.add_argument("settings", nargs="*", metavar="SETTING",
                   help="the script's flags, quoted, one string per setting (default: one setting, "
                        "the recipe)")
    p.add_argument("--rounds", type=int, default=7,
                   help="timed rounds per setting, alternated between settings (default 7)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="seconds of calls per round and per timed function (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default torch's: every core)")
    return p


def module(name):
    import importlib
    return importlib.import_module(name)


def script_args(name, setting):
    """The script's own flags for one setting, parsed by its own parser (with its defaults)."""
    return module(name).build_parser().parse_args(shlex.split(setting))


def macs_per_image(model, *example):
    """Multiply-accumulates of one forward pass on one image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example)
    return counter.get_total_flops() // 2


def peak_memory_mib(device):
    """Peak memory of this process in MiB: the CUDA allocator's, or the resident set's (Unix only;
    None elsewhere)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    try:
        import resource  # Unix only
    except ImportError:
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(kib / (2 ** 20 if sys.platform == "darwin" else 2 ** 10), 1)


def seconds_per_call(fn, min_time=1.0):
    """Median seconds per call of fn, from torch.utils.benchmark (which synchronises CUDA), on all of
    torch's threads (the Timer's own default is one)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median


def setup(name, args, device):
    """(model, train_step, sample_call, example inputs of one image, batch size, dtype label) for one
    setting: the step that the script's training loop takes, on random data of the data's shape."""
    import common
    m = module(name)
    C, H = common.data_shape(args.data, args.data_dir)
    m.fill_recipe(args, device)
    torch.manual_seed(args.seed)
    B = args.batch_size
    bf16 = m.use_bf16(device, args.precision)
    if name == "ddpm":
        model = common.UNet(**m.unet_config(args, C, H)).to(device)
        sch = m.schedule(args.T, args.beta_1, args.beta_T).to(device)
        x = torch.rand(B, C, H, H, device=device) * 2 - 1
        index = torch.full((B,), sch.T, device=device)

        def loss(net):
            return m.loss_simple(net, sch, x)
    elif name == "ncsn":
        sigmas = m.geometric_sigmas(args.sigma_1, args.sigma_L, args.levels)
        model = m.ScoreNet(sigmas, **m.unet_config(args, C, H)).to(device)
        x = torch.rand(B, C, H, H, device=device)
        index = torch.full((B,), args.levels, device=device)

        def loss(net):
            return m.dsm_loss(net, x, sigmas)
    else:
        model = m.VAE(C, H, args.latent_dim, args.hidden, args.arch, args.likelihood).to(device)
        x = m.prepare(torch.rand(B, C, H, H, device=device), args.likelihood, None)
        v = torch.randn(B, args.latent_dim, device=device)

        def loss(net):
            return -m.elbo(net, x, args.likelihood, args.sigma_x).mean()
    opt, warm = m.make_optimizer(model, args.lr, args.warmup)
    ema = m.make_ema(model, args.ema_decay) if name != "vae" else None
    net = torch.compile(model) if args.compile else model

    def train_step():
        with m.autocast(device, bf16):
            value = loss(net)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        warm.step()
        if ema is not None:
            ema.update_parameters(model)

    def sample_call():
        with torch.no_grad(), m.autocast(device, bf16):
            model.decode(v) if name == "vae" else net(x, index)

    example = (x[:1],) if name == "vae" else (x[:1], index[:1])
    return model, train_step, sample_call, example, B, "bf16 autocast" if bf16 else "fp32"


def run(name, settings, rounds=7, min_time=1.0, device=None):
    """Time every setting, alternating them round by round. A list of result dicts, in order."""
    device = device or module(name).pick_device("auto")
    built = []
    for setting in settings:
        args = script_args(name, setting)
        model, train_step, sample_call, example, B, dtype = setup(name, args, device)
        for _ in range(3):  # untimed warm-up (compilation included, with --compile)
            train_step()
            sample_call()
        built.append(dict(setting=setting, model=model, train=train_step, sample=sample_call,
                          example=example, B=B, dtype=dtype, t_train=[], t_sample=[]))
    for _ in range(rounds):
        for b in built:
            b["t_train"].append(seconds_per_call(b["train"], min_time))
            b["t_sample"].append(seconds_per_call(b["sample"], min_time))
    results = []
    for b in built:
        train_rate = [b["B"] / s for s in b["t_train"]]
        sample_rate = [1 / s for s in b["t_sample"]]
        r = dict(setting=b["setting"], params=sum(q.numel() for q in b["model"].parameters()),
                 macs_per_image=macs_per_image(b["model"], *b["example"]), batch_size=b["B"],
                 train_img_per_s=round(statistics.median(train_rate), 2),
                 train_img_per_s_iqr=round(iqr(train_rate), 2),
                 sample_calls_per_s=round(statistics.median(sample_rate), 3),
                 sample_img_calls_per_s=round(b["B"] * statistics.median(sample_rate), 2),
                 rounds=rounds, peak_mem_mib=peak_memory_mib(device), device=str(device),
                 dtype=b["dtype"], torch=torch.__version__, threads=torch.get_num_threads())
        if b is not built[0]:
            first = built[0]
            # per-round ratio of training images/s against the first setting, median over rounds
            r["train_ratio_to_first"] = round(statistics.median(
                (b["B"] / x) / (first["B"] / y) for x, y in zip(b["t_train"], first["t_train"])), 3)
        results.append(r)
    return results


def iqr(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[2] - q[0]


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.rounds < 1 or not args.min_time > 0:
        p.error("--rounds must be >= 1 and --min-time > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = args.settings or [""]
    for s in settings:
        try:
            script_args(args.script, s)
        except SystemExit:
            p.error(f"setting {s!r} is not a set of {args.script}.py flags (see python "
                    f"{args.script}.py --help)")
    for r in run(args.script, settings, args.rounds, args.min_time):
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
