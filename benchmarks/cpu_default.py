"""Benchmark the default CPU preset end to end and write docs/benchmarks.md.

Runs `nin train` (preset compact, full Fashion-MNIST) and, in the same run, the same model and
data through a naive loop (fp32, NCHW, no bf16, metrics read every step) for 60 steps, so the
speed-up is a ratio measured on one machine at one time. Not a test: it takes minutes.

    python benchmarks/cpu_default.py [--data-dir DIR] [--epochs N] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import time
from typing import Any

import torch
from report import dropout, fill, machine, script_parser, today, write_section
from torch import nn

from nin.config import make_config
from nin.data import dataset_spec, load_split
from nin.fast import TTA_LEVELS
from nin.models import create_model
from nin.rundir import new_run_dir
from nin.train import train


def on(flag: bool) -> str:
    """'on' or 'off'."""
    return "on" if flag else "off"


def augmentation(config: Any) -> str:
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


def render(config: Any, result: dict[str, Any], wall: float, naive: float, steps: int) -> str:
    """The section from one run of `train()` and the naive loop's speed over STEPS steps."""
    rows = "\n".join(fill("cpu_default", "row", r=r) for r in result["history"])
    speed = result["examples_per_sec"]
    return fill(
        "cpu_default", "section", date=today(), machine=machine(),
        device=result["device"], config=config, dropout=dropout(config.model, config.model_kwargs),
        augmentation=augmentation(config), tta=TTA_LEVELS[config.tta], amp=on(config.amp),
        channels_last=on(config.channels_last), rows=rows, result=result, speed=speed, wall=wall,
        naive_steps=steps, naive=naive, ratio=speed / naive,
    )  # fmt: skip


def main() -> None:
    """Train the default preset once, time the naive loop after it, and write the section."""
    parser = script_parser(__doc__, "docs/benchmarks.md")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--naive-steps", type=int, default=60)
    args = parser.parse_args()
    # A fresh run directory each time: `nin train` never overwrites one that holds a run.
    out = str(new_run_dir("benchmark"))
    config = make_config("compact", data_dir=args.data_dir, epochs=args.epochs, out=out)
    wall = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - wall
    naive = naive_epoch_speed(args.data_dir, config.batch_size, args.naive_steps)
    write_section(args.out, "cpu-default", render(config, result, wall, naive, args.naive_steps))
    print(f"wrote the cpu-default section of {args.out}")


if __name__ == "__main__":
    main()
