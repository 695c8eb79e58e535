"""The peer row: diffusers' UNet2DModel and DDPMScheduler trained on the same digits for the same time.

    pip install diffusers==0.42.1   # this script alone needs it
    python measure/diffusers_peer.py --train --data data/mnist5k/gen_train.pt --minutes 15
    python measure/diffusers_peer.py --sample 400                   # 1000 DDPMScheduler steps

The recipe is a plain diffusers one at the size of ddpm.py's GPU model: UNet2DModel with
block_out_channels (32, 64, 64), one layer per block, attention at the 7x7 level (1.1M parameters),
DDPMScheduler with its defaults (T = 1000, β from 1e-4 to 0.02, β̃ variance, x̂_0 clipped), AdamW at
lr 1e-3, batch 64, fp32, no EMA, the data in [-1, 1]. Each step's batch, t and noise come from a
generator seeded by (seed, step), as in ddpm.py, so `--resume --minutes 45` continues the run
exactly. It writes OUT/ckpt.pt, and with --sample OUT/samples.pt (floats in [0, 1]) and
OUT/samples.png. diffusers is imported inside the functions that use it, so the README command test
parses this file's flags with torch alone.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BATCH, LR, T = 64, 1e-3, 1000


def build_parser():
    p = argparse.ArgumentParser(prog="measure/diffusers_peer.py", description=__doc__.split("\n")[0])
    p.add_argument("--train", action="store_true", help="train until --minutes of training in all")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--sample", type=int, metavar="N", help="write N samples from OUT/ckpt.pt")
    p.add_argument("--data", default=os.path.join("data", "mnist5k", "gen_train.pt"),
                   help="uint8 digits (N, 1, 28, 28) (default data/mnist5k/gen_train.pt)")
    p.add_argument("--out", default=os.path.join("runs", "diffusers"), help="the run's folder")
    p.add_argument("--minutes", type=float, default=15.0,
                   help="minutes of training in all, counted across --resume (default 15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p


def inputs(args):
    """The files a command reads (the README command test reads this)."""
    files = [args.data] if args.train else []
    return files + ([os.path.join(args.out, "ckpt.pt")] if args.resume or args.sample else [])


def outputs(args):
    return ([os.path.join(args.out, "ckpt.pt")] if args.train else []) + \
        ([os.path.join(args.out, "samples.pt")] if args.sample else [])


def make_model():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1,
                       block_out_channels=(32, 64, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def train(args, device):
    from diffusers import DDPMScheduler
    data = torch.load(args.data, weights_only=True).reshape(-1, 1, 28, 28).to(device)
    torch.manual_seed(args.seed)
    model = make_model().to(device)
    sch = DDPMScheduler(num_train_timesteps=T)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    path = os.path.join(args.out, "ckpt.pt")
    step, before = 0, 0.0
    if args.resume:
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, before = ck["step"], ck["train_seconds"]
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()

    def save():
        torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step,
                        train_seconds=before + time.monotonic() - start), path + ".tmp")
        os.replace(path + ".tmp", path)

    model.train()
    while before + time.monotonic() - start < 60 * args.minutes:
        g = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, len(data), (BATCH,), device=device, generator=g)
        t = torch.randint(0, T, (BATCH,), device=device, generator=g)
        noise = torch.randn((BATCH, 1, 28, 28), device=device, generator=g)
        x0 = data[idx].float() / 127.5 - 1
        loss = F.mse_loss(model(sch.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4g} "
                  f"{(before + time.monotonic() - start) / 60:.2f}/{args.minutes} min", flush=True)
        if step % 1000 == 0:
            save()
    save()
    print(f"trained {step} steps, {(before + time.monotonic() - start) / 60:.2f} minutes in all; "
          f"checkpoint {path}")


@torch.no_grad()
def sample(args, device):
    import common
    from diffusers import DDPMScheduler
    ck = torch.load(os.path.join(args.out, "ckpt.pt"), weights_only=True, map_location=device)
    model = make_model().to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    sch = DDPMScheduler(num_train_timesteps=T)
    sch.set_timesteps(T)
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn((args.sample, 1, 28, 28), device=device, generator=g)
    start = time.time()
    for t in sch.timesteps:
        x = sch.step(model(x, t).sample, t, x, generator=g).prev_sample
    x01 = ((x.clamp(-1, 1) + 1) / 2).float().cpu()
    torch.save(x01, os.path.join(args.out, "samples.pt"))
    common.write_png(os.path.join(args.out, "samples.png"), x01[:100])
    print(f"wrote {args.sample} samples ({T} DDPMScheduler steps, step {ck['step']}, "
          f"{time.time() - start:.1f}s) to {args.out}")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not (args.train or args.sample):
        p.error("nothing to do: give --train or --sample N")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32
    if args.train:
        train(args, device)
    if args.sample:
        sample(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
