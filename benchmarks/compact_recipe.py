"""Measure the compact preset's recipe choices one at a time; write docs/recipe.md.

Each row is a full `nin train --preset compact` run on all of Fashion-MNIST with one choice
changed, so the table says what each part of the recipe buys. Takes about 5 minutes a row on
2 CPU cores. Not a test.

    python benchmarks/compact_recipe.py [--data-dir DIR] [--out docs/recipe.md]
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import torch

from nin.checkpoint import new_run_dir
from nin.config import make_config
from nin.train import train

# (what changes, overrides of the compact preset)
VARIANTS = [
    ("the shipped recipe (seed 0)", {}),
    ("the shipped recipe (seed 1)", {"seed": 1}),
    ("with random flips and 2-pixel translations", {"flip": True, "crop_padding": 2}),
    ("with random flips only", {"flip": True}),
    ("no label smoothing", {"label_smoothing": 0.0}),
    ("no dropout before the last block", {"model_kwargs": {"dropout": 0.0}}),
    ("constant lr 0.05 instead of one-cycle", {"schedule": "constant", "lr": 0.05}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="docs/recipe.md")
    args = parser.parse_args()

    rows = []
    for i, (what, overrides) in enumerate(VARIANTS):
        out = str(new_run_dir(f"recipe-{i}"))  # fresh: a run directory is never overwritten
        config = make_config("compact", data_dir=args.data_dir, out=out, **overrides)
        result = train(config, log=lambda line: print(line, flush=True))
        rows.append(
            f"| {what} | {result['test_acc']:.4f} | {result['train_acc']:.4f} "
            f"| {result['loss']:.3f} | {result['examples_per_sec']:.0f} |"
        )
    base = make_config("compact")
    text = f"""# The compact preset's recipe, one choice at a time

Written by `python benchmarks/compact_recipe.py` on {date.today():%Y-%m-%d}, torch
{torch.__version__}, {torch.get_num_threads()} CPU threads, no GPU. Every row is a full run of
`nin_compact` on all 60,000 Fashion-MNIST training images for {base.epochs} epochs, scored on the
real 10,000-image test split, with one choice of the compact preset changed. The preset:
batch {base.batch_size}, SGD with nesterov momentum {base.momentum}, one-cycle lr {base.lr},
weight decay {base.weight_decay}, label smoothing {base.label_smoothing}, no augmentation,
dropout 0.5 before the last block, batch norm, bfloat16 autocast, channels-last.

| run | test acc | train acc | train loss | examples/sec |
|---|---|---|---|---|
{chr(10).join(rows)}

One seed per row except the first two, whose difference shows the seed-to-seed noise: read
gaps smaller than it as no difference. Examples/sec varies with whatever else the machine ran;
docs/benchmarks.md has the speed measured on a quiet machine. How the shipped recipe was
chosen: docs/recipe-history.md.
"""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
