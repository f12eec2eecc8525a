"""Benchmark the default CPU preset end to end and write docs/benchmarks.md.

Runs `nin train` (preset compact, full Fashion-MNIST) and, in the same run, the same model and
data through a naive loop (fp32, NCHW, no bf16, metrics read every step) for 60 steps, so the
speed-up is a ratio measured on one machine at one time. Not a test: it takes minutes.

    python benchmarks/cpu_default.py [--data-dir DIR] [--epochs N] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch
from report import dropout, machine, write_section
from torch import nn

from nin.checkpoint import new_run_dir
from nin.config import make_config
from nin.data import dataset_spec, load_split
from nin.fast import TTA_LEVELS
from nin.models import create_model
from nin.train import train


def on(flag: bool) -> str:
    """'on' or 'off'."""
    return "on" if flag else "off"


def augmentation(config) -> str:
    """The run's augmentation, in words."""
    parts = ["random flips"] * config.flip
    parts += [f"{config.crop_padding}-pixel translations"] * bool(config.crop_padding)
    return " and ".join(parts) or "no augmentation"


def naive_epoch_speed(data_dir: str | None, batch_size: int, steps: int) -> float:
    """Images/s of a textbook loop over the same model: fp32, NCHW, `.item()` every step."""
    spec = dataset_spec("fashion-mnist")
    images, labels = load_split("fashion-mnist", "train", data_dir)
    model = create_model("nin_compact")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    model.train()
    seen, start = 0, None
    for step in range(steps + 2):
        index = order[step * batch_size : (step + 1) * batch_size]
        x = (images[index].float() / 255 - spec.mean) / spec.std
        loss = loss_fn(model(x), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
        if step == 1:  # two warm-up steps
            start = time.perf_counter()
        elif step > 1:
            seen += len(index)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--out", default="docs/benchmarks.md")
    parser.add_argument("--naive-steps", type=int, default=60)
    args = parser.parse_args()

    # A fresh run directory each time: `nin train` never overwrites one that holds a run.
    out = str(new_run_dir("benchmark"))
    config = make_config("compact", data_dir=args.data_dir, epochs=args.epochs, out=out)
    wall = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - wall
    naive = naive_epoch_speed(args.data_dir, config.batch_size, args.naive_steps)

    device = result["device"]
    history = result["history"]
    rows = "\n".join(
        f"| {r['epoch']} | {r['epoch_seconds']:.1f} | {r['examples_per_sec']:.0f} "
        f"| {r['loss']:.3f} | {r['train_acc']:.4f} | {r['test_acc']:.4f} |"
        for r in history
    )
    speed = result["examples_per_sec"]
    text = f"""Written by `python benchmarks/cpu_default.py` (`make benchmark`); every measured
figure in this section comes from one run of it on {date.today():%Y-%m-%d}.

## CPU: the default preset (`nin train`), end to end

- Machine: {machine()}; trained on `{device}`.
- Settings: preset `compact` — `nin_compact` (324,874 parameters) on Fashion-MNIST at 28×28,
  {config.epochs} epochs, batch {config.batch_size}, SGD nesterov momentum {config.momentum},
  one-cycle lr {config.lr}, weight decay {config.weight_decay}, label smoothing
  {config.label_smoothing}, dropout {dropout(config.model, config.model_kwargs)},
  {augmentation(config)}, test-time augmentation: {TTA_LEVELS[config.tta]},
  bfloat16 autocast {on(config.amp)}, channels-last {on(config.channels_last)}; all 60,000
  training and 10,000 test images.
- examples/sec is wall-clock time of the training passes *including* data preparation
  (gather, convert, normalise, augment on the device); evaluation is timed separately.

| epoch | seconds | examples/sec | loss | train acc | test acc |
|---|---|---|---|---|---|
{rows}

**Result: test accuracy {result["test_acc"]:.4f} on the real test split
({result["test_acc_no_tta"]:.4f} without test-time augmentation), {speed:.0f} examples/sec,
{result["train_seconds"]:.0f} s of training, {wall:.0f} s wall time for `train()` as a
whole (loading the data, training, evaluation after every epoch, saving; interpreter start-up
not included).**

## CPU: fast path vs a naive loop, same run

The same network and data through a textbook loop (fp32, NCHW, `loss.item()` every step, no
augmentation, plain momentum SGD), timed over {args.naive_steps} steps after 2 warm-up steps,
just after the run above:

| loop | examples/sec | ratio |
|---|---|---|
| naive fp32 NCHW | {naive:.0f} | 1.00 |
| `nin train` (bf16, channels-last, metrics on the device) | {speed:.0f} | {speed / naive:.2f} |

The `nin train` figure is averaged over all epochs, the first included, and counts its own data
preparation; the naive one is timed after warm-up on steps only, so the ratio is, if anything,
an under-estimate.

"""
    write_section(args.out, "cpu-default", text)
    print(f"wrote the cpu-default section of {args.out}")


if __name__ == "__main__":
    main()
