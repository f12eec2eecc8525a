"""What each switch of the fast path buys on the CPU, measured in one run (a section of
docs/benchmarks.md).

Times training steps of the compact network at batch 256 on real Fashion-MNIST batches with
each switch on and off (channels-last memory format, bfloat16 autocast, fused SGD,
torch.compile, thread count), and evaluation under `no_grad` vs `inference_mode`. Not a test:
it takes two minutes or so.

    python benchmarks/cpu_switches.py [--data-dir DIR] [--steps 30] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from report import fill, machine, script_parser, today, write_section
from torch import nn

from nin.data import Preprocess, dataset_spec, load_split
from nin.device import place_model
from nin.loaders import DeviceLoader
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
        threads: int | None = None,
        fused: bool = False,
        compile: bool = False,
    ) -> None:
        """Build the setting and take its warm-up steps (THREADS None: all of this machine's)."""
        torch.manual_seed(0)
        model = place_model(create_model("nin_compact"), torch.device("cpu"), channels_last)
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, fused=fused or None
        )
        self.model = torch.compile(model) if compile else model
        self.data, self.amp = data[channels_last], amp
        self.threads = threads or torch.get_num_threads()
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


DEFAULT = "+ channels-last + bfloat16 (the default)"
# Each setting timed: label -> StepTimer's switches.
SETTINGS: dict[str, dict[str, Any]] = {
    "fp32, NCHW (plain)": {"channels_last": False, "amp": False},
    "+ channels-last": {"channels_last": True, "amp": False},
    "+ bfloat16 autocast, NCHW": {"channels_last": False, "amp": True},
    DEFAULT: {"channels_last": True, "amp": True},
    "the default + fused SGD": {"channels_last": True, "amp": True, "fused": True},
    "the default + torch.compile (compile time not counted)": {
        "channels_last": True, "amp": True, "compile": True,
    },
    "the default on 1 thread": {"channels_last": True, "amp": True, "threads": 1},
}  # fmt: skip
# The settings a flag of `nin train` turns on, judged against the default.
FLAGS = {
    "the default + fused SGD": "`--fused`",
    "the default + torch.compile (compile time not counted)": "`--compile`",
}


def verdict(speeds: dict[str, float]) -> str:
    """Each flag's setting against the default: slower, within 5%, or faster."""
    same = "within 5% (no measurable gain)"
    kinds: dict[str, list[str]] = {"slower": [], same: [], "faster": []}
    for label, flag in FLAGS.items():
        ratio = speeds[label] / speeds[DEFAULT]
        kinds["slower" if ratio < 0.95 else "faster" if ratio > 1.05 else same].append(flag)
    said = "; ".join(f"{kind}: {' and '.join(flags)}" for kind, flags in kinds.items() if flags)
    return fill("cpu_switches", "verdict", verdicts=said)


def main() -> None:
    """Time every setting, interleaved, and evaluation in both modes; write the section."""
    parser = script_parser(__doc__, "docs/benchmarks.md")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    data = {cl: batches(args.data_dir, 256, cl) for cl in (False, True)}
    settings = {label: StepTimer(data, **switches) for label, switches in SETTINGS.items()}
    # Rounds of a few steps each, settings interleaved, so a slow spell of this shared machine
    # hits every setting alike instead of whichever happened to be running.
    for _ in range(args.rounds):
        for timer in settings.values():
            timer.run(args.steps // args.rounds)
    speeds = {label: timer.speed() for label, timer in settings.items()}
    base = speeds["fp32, NCHW (plain)"]
    rows = [
        f"| {label} | {settings[label].threads} | {speed:.0f} | {speed / base:.2f} |"
        for label, speed in speeds.items()
    ]
    torch.set_num_threads(threads)
    evals = {mode: eval_speed(args.data_dir, mode) for mode in ("no_grad", "inference_mode")}
    text = fill(
        "cpu_switches", "section", date=today(), machine=machine(),
        timed=args.steps // args.rounds * args.rounds, rounds=args.rounds, rows="\n".join(rows),
        verdict=verdict(speeds), **evals,
    )  # fmt: skip
    write_section(args.out, "cpu-switches", text)
    print(f"wrote the cpu-switches section of {args.out}")


if __name__ == "__main__":
    main()
