"""What each switch of the fast path buys on the CPU, measured in one run (a section of
docs/benchmarks.md).

Times training steps of the compact network at batch 256 on real Fashion-MNIST batches with
each switch on and off (channels-last memory format, bfloat16 autocast, thread count), and
evaluation under `no_grad` vs `inference_mode`. Not a test: it takes a minute or two.

    python benchmarks/cpu_switches.py [--data-dir DIR] [--steps 30] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch
from report import machine, write_section
from torch import nn

from nin.data import DeviceLoader, dataset_spec, load_split
from nin.models import create_model
from nin.train import place_model, train_step


def batches(data_dir: str | None, batch_size: int, channels_last: bool) -> list:
    """Real, normalised training batches, prepared once so only the step is timed."""
    spec = dataset_spec("fashion-mnist")
    images, labels = load_split("fashion-mnist", "train", data_dir)
    loader = DeviceLoader(
        images[: batch_size * 12], labels[: batch_size * 12], batch_size, mean=spec.mean,
        std=spec.std, channels_last=channels_last,
    )  # fmt: skip
    return list(loader)


def step_speed(data_dir: str | None, steps: int, channels_last: bool, amp: bool) -> float:
    """Training images/s of nin_compact at batch 256: median of `steps` timed steps."""
    torch.manual_seed(0)
    model = place_model(create_model("nin_compact"), torch.device("cpu"), channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = batches(data_dir, 256, channels_last)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for i in range(steps + 3):  # three warm-up steps
        x, y = data[i % len(data)]
        start = time.perf_counter()
        train_step(model, x, y, optimizer, loss_fn, amp)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 256 / statistics.median(times)


def eval_speed(data_dir: str | None, mode: str) -> float:
    """Evaluation images/s (bf16, channels-last) under `no_grad` or `inference_mode`."""
    model = place_model(create_model("nin_compact"), torch.device("cpu"), True).eval()
    data = batches(data_dir, 1000, True)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    times = []
    for i in range(12):
        start = time.perf_counter()
        with context(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(data[i % len(data)][0]).argmax(1)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1000 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    rows, base = [], None
    for label, channels_last, amp, n in (
        ("fp32, NCHW (plain)", False, False, threads),
        ("+ channels-last", True, False, threads),
        ("+ bfloat16 autocast, NCHW", False, True, threads),
        ("+ channels-last + bfloat16 (the default)", True, True, threads),
        ("the default on 1 thread", True, True, 1),
    ):
        torch.set_num_threads(n)
        speed = step_speed(args.data_dir, args.steps, channels_last, amp)
        base = base or speed
        rows.append(f"| {label} | {n} | {speed:.0f} | {speed / base:.2f} |")
        print(rows[-1], flush=True)
    torch.set_num_threads(threads)
    evals = {mode: eval_speed(args.data_dir, mode) for mode in ("no_grad", "inference_mode")}
    text = f"""## CPU: what each switch buys

Written by `python benchmarks/cpu_switches.py` on {date.today():%Y-%m-%d}; {machine()}.
Training steps of `nin_compact` at batch 256 on real Fashion-MNIST batches (data prepared
beforehand, so only the step is timed: forward, loss, backward, SGD momentum), median of
{args.steps} steps after 3 warm-up steps; evaluation at batch 1000, median of 10 passes.

| training step | threads | images/s | vs plain |
|---|---|---|---|
{chr(10).join(rows)}

| evaluation (bf16, channels-last) | images/s |
|---|---|
| `torch.no_grad()` | {evals["no_grad"]:.0f} |
| `torch.inference_mode()` (what `nin` uses) | {evals["inference_mode"]:.0f} |
"""
    write_section(args.out, "cpu-switches", text)
    print(f"wrote the cpu-switches section of {args.out}")


if __name__ == "__main__":
    main()
