"""What each switch of the fast path buys on the CPU, measured in one run (a section of
docs/benchmarks.md).

Times training steps of the compact network at batch 256 on real Fashion-MNIST batches with
each switch on and off (channels-last memory format, bfloat16 autocast, fused SGD,
torch.compile, thread count), and evaluation under `no_grad` vs `inference_mode`. Not a test:
it takes two minutes or so.

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

from nin.data import DeviceLoader, Preprocess, dataset_spec, load_split
from nin.device import place_model
from nin.models import create_model
from nin.train import train_step


def batches(data_dir: str | None, batch_size: int, channels_last: bool) -> list:
    """Real, normalised training batches, prepared once so only the step is timed."""
    spec = dataset_spec("fashion-mnist")
    images, labels = load_split("fashion-mnist", "train", data_dir)
    loader = DeviceLoader(
        images[: batch_size * 12], labels[: batch_size * 12], batch_size,
        preprocess=Preprocess(None, spec.mean, spec.std, channels_last),
    )  # fmt: skip
    return list(loader)


class StepTimer:
    """One training setting of nin_compact at batch 256, ready to time a few steps at a time."""

    def __init__(
        self,
        data: dict[bool, list],
        channels_last: bool,
        amp: bool,
        threads: int,
        fused: bool = False,
        compile: bool = False,
    ) -> None:
        torch.manual_seed(0)
        model = place_model(create_model("nin_compact"), torch.device("cpu"), channels_last)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, fused=fused or None
        )
        self.model = torch.compile(model) if compile else model
        self.data, self.amp, self.threads = data[channels_last], amp, threads
        self.loss_fn = nn.CrossEntropyLoss()
        self.times: list[float] = []
        self.run(3, timed=False)  # warm-up (and compilation), not timed

    def run(self, steps: int, timed: bool = True) -> None:
        """Take `steps` training steps, recording each one's time."""
        torch.set_num_threads(self.threads)
        for i in range(steps):
            x, y = self.data[i % len(self.data)]
            start = time.perf_counter()
            train_step(self.model, x, y, self.optimizer, self.loss_fn, self.amp)
            if timed:
                self.times.append(time.perf_counter() - start)

    def speed(self) -> float:
        """Images/s from the median step."""
        return 256 / statistics.median(self.times)


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
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    data = {cl: batches(args.data_dir, 256, cl) for cl in (False, True)}
    settings = {
        "fp32, NCHW (plain)": StepTimer(data, False, False, threads),
        "+ channels-last": StepTimer(data, True, False, threads),
        "+ bfloat16 autocast, NCHW": StepTimer(data, False, True, threads),
        "+ channels-last + bfloat16 (the default)": StepTimer(data, True, True, threads),
        "the default + fused SGD": StepTimer(data, True, True, threads, fused=True),
        "the default + torch.compile (compile time not counted)": StepTimer(
            data, True, True, threads, compile=True
        ),
        "the default on 1 thread": StepTimer(data, True, True, 1),
    }
    # Rounds of a few steps each, settings interleaved, so a slow spell of this shared machine
    # hits every setting alike instead of whichever happened to be running.
    for _ in range(args.rounds):
        for timer in settings.values():
            timer.run(args.steps // args.rounds)
    speeds = {label: timer.speed() for label, timer in settings.items()}
    timed = args.steps // args.rounds * args.rounds
    base = speeds["fp32, NCHW (plain)"]
    rows = [
        f"| {label} | {settings[label].threads} | {speed:.0f} | {speed / base:.2f} |"
        for label, speed in speeds.items()
    ]
    torch.set_num_threads(threads)
    default = speeds["+ channels-last + bfloat16 (the default)"]
    extras = {
        "the default + fused SGD": "`--fused`",
        "the default + torch.compile (compile time not counted)": "`--compile`",
    }
    verdicts = {"slower": [], "within 5% (no measurable gain)": [], "faster": []}
    for label, flag in extras.items():
        ratio = speeds[label] / default
        kind = (
            "slower"
            if ratio < 0.95
            else "faster"
            if ratio > 1.05
            else "within 5% (no measurable gain)"
        )
        verdicts[kind].append(flag)
    verdict = (
        "Against the default: "
        + "; ".join(f"{kind}: {' and '.join(flags)}" for kind, flags in verdicts.items() if flags)
        + (
            ". What does not pay here stays off on the CPU; the flags turn it on (e.g. on a GPU). "
            "Step timings on the 2-core machine measured here vary by about 10% from run to run."
        )
    )
    evals = {mode: eval_speed(args.data_dir, mode) for mode in ("no_grad", "inference_mode")}
    text = f"""## CPU: what each switch buys

Written by `python benchmarks/cpu_switches.py` on {date.today():%Y-%m-%d}; {machine()}.
Training steps of `nin_compact` at batch 256 on real Fashion-MNIST batches (data prepared
beforehand, so only the step is timed: forward, loss, backward, SGD momentum), median of
{timed} steps after 3 warm-up steps, taken in {args.rounds} rounds with the settings
interleaved; evaluation at batch 1000, median of 10 passes.

| training step | threads | images/s | vs plain |
|---|---|---|---|
{chr(10).join(rows)}

| evaluation (bf16, channels-last) | images/s |
|---|---|
| `torch.no_grad()` | {evals["no_grad"]:.0f} |
| `torch.inference_mode()` (what `nin` uses) | {evals["inference_mode"]:.0f} |

{verdict.strip()}
"""
    write_section(args.out, "cpu-switches", text)
    print(f"wrote the cpu-switches section of {args.out}")


if __name__ == "__main__":
    main()
