"""GPU speed: the textbook pipeline vs ours on one GPU, in one run (the GPU section of
docs/benchmarks.md).

1. Reference: the chapter's pipeline as d2l runs it: per-sample PIL resize to 224 and
   to-tensor in a DataLoader with 4 workers, fp32, NCHW, plain SGD, metrics read every batch.
2. Ours, chapter preset as it is: `--preset d2l` (same network, init, hyper-parameters and fp32
   precision): data resident on the GPU as uint8, resized and normalised there in batch, metrics
   read once per epoch. Against 1, only the pipeline changes.
3. The same with the fast path (`--amp --channels-last`: bfloat16 autocast, channels-last), and
   with `--compile --fused` on top: each its own row, so precision is never mixed into 2's ratio.
4. Ours, fast recipe: the compact preset (batch norm, one-cycle, label smoothing) at 28×28.
Then the collapse count: the chapter's network over N seeds, and with the fix (no ReLU before
global average pooling), each stopped by the collapse watch or after a few epochs.

Images/s is wall clock including data, the median of the epochs after the first; MFU is
training FLOPs per image (FlopCounterMode) × images/s ÷ the GPU's dense bfloat16 peak.

    python benchmarks/gpu_speed.py [--data-dir DIR] [--epochs 10] [--collapse-seeds 10]
    python benchmarks/gpu_speed.py --smoke        # tiny sizes on any device; prints, writes nothing
    python benchmarks/gpu_speed.py --placeholder  # no GPU here: every GPU row "not measured"
    python benchmarks/gpu_speed.py --render       # the section from the committed figures

The GPU check (gpu_check.py) runs its speed step as `--check-speed JSON`: the reference, then
`--preset d2l` as it is and with the fast path, one epoch each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report import fill, machine, read_json, script_parser, today, write_section
from torch import nn

from nin.config import make_config
from nin.data import load_split
from nin.errors import NinError
from nin.files import write_json
from nin.models import create_model, model_info, xavier_init_
from nin.resources import training_flops
from nin.train import train

SAVED = Path("results/gpu-speed/summary.json")  # the figures, committed with the section
# A run's figures as they come: the committed copy is replaced only by a whole run.
RUNNING = Path("runs/gpu-speed/summary.json")

# Dense bfloat16 tensor-core peaks, FLOP/s, from the vendors' data sheets.
# Checked in this order: the first name found in the GPU's name wins.
PEAK_BF16 = {
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
}
CELLS = 6  # a table row's cells after its label (templates/gpu_speed.md has the header)


def peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bfloat16 peak, or None for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


class TextbookDataset(torch.utils.data.Dataset):
    """d2l's transforms, one image at a time: PIL resize to 224, then to a [0, 1] tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int = 224) -> None:
        self.images, self.labels, self.size = images[:, 0].numpy(), labels.numpy(), size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.images[i]).resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
        return x, int(self.labels[i])


def reference(
    data_dir: str | None, device: torch.device, epochs: int, subset: int | None, workers: int
) -> dict:
    """The textbook pipeline: train `epochs` epochs, time each, then test."""
    images, labels = load_split("fashion-mnist", "train", data_dir)
    test_images, test_labels = load_split("fashion-mnist", "test", data_dir)
    images, labels = images[:subset], labels[:subset]
    test_images, test_labels = test_images[:subset], test_labels[:subset]

    def loader(x: torch.Tensor, y: torch.Tensor, shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            TextbookDataset(x, y), batch_size=128, shuffle=shuffle, num_workers=workers
        )

    torch.manual_seed(0)
    model = xavier_init_(create_model("nin_d2l")).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(epochs):
        model.train()
        start = time.perf_counter()
        total_loss = correct = 0.0
        for x, y in loader(images, labels, True):
            x, y = x.to(device), y.to(device)
            y_hat = model(x)
            loss = loss_fn(y_hat, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            # d2l's Accumulator: metrics read back to the host after every batch.
            total_loss += loss.item() * len(y)
            correct += (y_hat.argmax(1) == y).sum().item()
        if device.type == "cuda":  # wait for the GPU, so the epoch's time is real
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    model.eval()
    right = 0
    with torch.no_grad():
        for x, y in loader(test_images, test_labels, False):
            right += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
    return {
        "epoch_seconds": seconds,
        "images": len(labels),
        "test_acc": right / len(test_labels),
        "peak_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def ours(preset: str, data_dir: str | None, device: torch.device, **overrides: Any) -> dict:
    """`nin train` with a preset as it is, plus `overrides`; per-epoch times from its history.

    The collapse watch is off unless `overrides` turn it on: a speed row must finish.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    settings = {"collapse_steps": 0, "stuck_steps": 0} | overrides
    with tempfile.TemporaryDirectory() as tmp:
        config = make_config(preset, data_dir=data_dir, device=str(device), out=tmp, **settings)
        result = train(config, log=lambda line: None)
    history = result["history"]
    reached = [h["epoch"] for h in history if h["test_acc"] >= 0.93]
    seconds = [h["epoch_seconds"] for h in history]
    return {
        "epoch_seconds": seconds,
        "images": result["train_examples"],
        "test_acc": result["test_acc"],
        "peak_memory": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "seconds_to_93": sum(seconds[: reached[0]]) if reached else None,
        "model": config.model,
        "input_size": (1, config.resize, config.resize) if config.resize else (1, 28, 28),
    }


def collapses(
    data_dir: str | None, device: torch.device, seeds: int, epochs: int, **kwargs: Any
) -> Iterator[bool]:
    """For each seed in turn, whether the chapter's run collapsed (caught by the collapse watch).

    The chapter's own precision: fp32 (TF32 convolutions, PyTorch's default), NCHW.
    """
    for seed in range(seeds):
        try:
            ours(
                "d2l", data_dir, device, seed=seed, epochs=epochs, amp=False,
                channels_last=False, collapse_steps=100, **kwargs,
            )  # fmt: skip
            collapsed = False
        except NinError as e:
            if "collapsed" not in str(e):
                raise
            collapsed = True
        print(f"  collapse run, seed {seed}: {'collapsed' if collapsed else 'trained'}")
        yield collapsed


def speed(run: dict) -> float:
    """Images/s: the median epoch after the first (the first pays warm-up), wall clock."""
    timed = run["epoch_seconds"][1:] or run["epoch_seconds"]
    return run["images"] / statistics.median(timed)


def row(label: str, run: dict, flops: int, peak: float | None, base: float | None) -> str:
    """One table row of a measured pipeline."""
    s = speed(run)
    memory = f"{run['peak_memory'] / 2**30:.2f} GiB" if run["peak_memory"] else "—"
    mfu = f"{flops * s / peak:.1%}" if peak else "peak unknown"
    ratio = f"{s / base:.1f}×" if base else "1.0×"
    seconds = run["epoch_seconds"]
    # The chapter's 10 epochs: measured when 10 ran; else the first (warm-up, compilation)
    # plus nine median epochs.
    ten = (
        sum(seconds)
        if len(seconds) == 10
        else seconds[0] + 9 * statistics.median(seconds[1:] or seconds)
    )
    return (
        f"| {label} | {s:,.0f} | {ten:.0f} s | {run['test_acc']:.4f} | {memory} | {mfu} | {ratio} |"
    )


# Each pipeline's row label, by the key its figures are saved under, in the table's order.
PIPELINES = {
    "reference": "reference: d2l's pipeline (PIL resize in DataLoader workers, fp32 with "
    "PyTorch's default TF32 convolutions, NCHW, metrics every batch)",
    "chapter": "ours, chapter preset as it is (`--preset d2l`: fp32, NCHW, data on the GPU)",
    "bf16": "ours, chapter preset + the fast path (`--amp --channels-last`: bf16)",
    "compiled": "ours, chapter preset + `--amp --channels-last --compile --fused`",
    "fast": "ours, fast recipe (`--preset compact`)",
}
FAST_PATH = {"amp": True, "channels_last": True}
# Our pipelines after the reference: key -> (what is printed as it starts, preset, options).
OURS = {
    "chapter": ("ours, chapter preset", "d2l", {}),
    "bf16": ("ours, chapter preset, fast path", "d2l", FAST_PATH),
    "compiled": (
        "ours, chapter preset, fast path, compiled",
        "d2l",
        {"compile": True, "fused": True, **FAST_PATH},
    ),
    "fast": ("ours, fast recipe", "compact", {}),
}


def placeholder() -> str:
    """The GPU section when no GPU has run this script: every row says so."""
    rows = [f"| {p} |" + " not measured |" * CELLS for p in PIPELINES.values()]
    return fill("gpu_speed", "placeholder", date=today(), rows="\n".join(rows))


def render(figures: dict) -> str:
    """The GPU section from the saved figures; what a cut-short run did not measure says so."""
    runs, peak, flops = figures["runs"], figures["peak_flops"], figures["flops"]
    base = speed(runs["reference"]) if "reference" in runs else None
    rows = []
    for key, label in PIPELINES.items():
        if key not in runs:
            rows.append(f"| {label} |" + " not measured (the run ended first) |" * CELLS)
            continue
        model_flops = flops["nin_compact" if key == "fast" else "nin_d2l"]
        rows.append(row(label, runs[key], model_flops, peak, None if key == "reference" else base))
    to_93 = runs.get("fast", {}).get("seconds_to_93")
    reached = f"93% test accuracy after {to_93:.1f} s of training" if to_93 else "did not reach 93%"
    seeds = figures["collapse_seeds"]
    counts = {
        key: f"{sum(c)} of {len(c)}" + (f" (of {seeds} planned)" if len(c) < seeds else "")
        for key, c in figures["collapses"].items()
    }
    return fill(
        "gpu_speed",
        "measured",
        **{k: figures[k] for k in ("date", "machine", "workers", "epochs", "collapse_epochs")},
        smoke="**Smoke run (tiny subsets): not a measurement.**" if figures["smoke"] else "",
        images=figures["images"] or "all 60,000",
        d2l_flops=flops["nin_d2l"] / 1e9,
        compact_flops=flops["nin_compact"] / 1e9,
        peak=f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "an unknown peak",
        rows="\n".join(rows),
        reached=reached if "fast" in runs else "not measured",
        chance=math.log(10),
        seeds=seeds,
        **counts,
    )


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Every pipeline, then the collapse counts; the figures saved to runs/ after each run, so
    a run cut short keeps what it measured (`--render PATH` shows it)."""
    subset = 256 if args.smoke else None
    epochs = 2 if args.smoke else args.epochs
    small = {"train_subset": subset, "test_subset": subset} if subset else {}
    figures = {
        "date": today(),
        "machine": machine(),
        "smoke": args.smoke,
        "images": subset,
        "epochs": epochs,
        "workers": args.workers,
        "collapse_seeds": 1 if args.smoke else args.collapse_seeds,
        "collapse_epochs": 1 if args.smoke else args.collapse_epochs,
        "peak_flops": peak_flops(device),
        "flops": {
            "nin_d2l": training_flops(create_model("nin_d2l"), model_info("nin_d2l").input_size),
            "nin_compact": training_flops(create_model("nin_compact"), (1, 28, 28)),
        },
        "runs": {},
        "collapses": {"chapter": [], "fixed": []},
    }

    def measured(key: str, run: dict) -> None:
        figures["runs"][key] = run
        write_json(RUNNING, figures)
        print(f"  {key}: {speed(run):,.0f} images/s, test acc {run['test_acc']:.4f}", flush=True)

    print("reference pipeline ...", flush=True)
    measured("reference", reference(args.data_dir, device, epochs, subset, args.workers))
    for key, (what, preset, options) in OURS.items():
        print(f"{what} ...", flush=True)
        own = {} if preset == "compact" else {"epochs": epochs}  # compact runs its own 8
        measured(key, ours(preset, args.data_dir, device, **own, **options, **small))
    print("collapse counts ...", flush=True)
    for key, kwargs in (("chapter", {}), ("fixed", {"model_kwargs": {"final_relu": False}})):
        for collapsed in collapses(
            args.data_dir, device, figures["collapse_seeds"], figures["collapse_epochs"],
            **kwargs, **small,
        ):  # fmt: skip
            figures["collapses"][key].append(collapsed)
            write_json(RUNNING, figures)
    return figures


def check_speed(args: argparse.Namespace) -> None:
    """The GPU check's speed step: the textbook pipeline, then `--preset d2l` as it is and with
    the fast path, one epoch each, every one saved to ARGS.check_speed as it ends."""
    import warnings

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    subset = 64 if args.smoke else None
    figures: dict = {
        "flops_per_image": training_flops(
            create_model("nin_d2l"), model_info("nin_d2l").input_size
        ),
        "peak_flops": peak_flops(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "workers": args.workers,
    }

    def keep(name: str, run: dict, command: str) -> None:
        first = run["epoch_seconds"][0]
        figures[name] = {
            "images": run["images"],
            "seconds": first,
            "images_per_sec": run["images"] / first,
        }
        figures[name] |= {k: run[k] for k in ("test_acc", "peak_memory")} | {"command": command}
        write_json(args.check_speed, figures)
        print(f"{name}: {figures[name]['images_per_sec']:,.1f} images/s", flush=True)

    # The textbook pipeline's 4 workers are the point, however many cores there are.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    ref = reference(args.data_dir, device, 1, subset, args.workers)
    keep("reference", ref, "`python benchmarks/gpu_check.py --steps speed`")
    small = {"train_subset": subset, "test_subset": subset, "batch_size": subset} if subset else {}
    # The preset as it is (fp32): only the pipeline differs from the reference. Then the fast
    # path on top, its own row, so precision never hides inside the pipeline's ratio.
    for name, options, flags in (("ours", {}, ""), ("fast", FAST_PATH, " --amp --channels-last")):
        run = ours("d2l", args.data_dir, device, epochs=1, **options, **small)
        command = f"`nin train --preset d2l{flags} --epochs 1 --collapse-steps 0 --stuck-steps 0`"
        keep(name, run, command)


def main() -> None:
    """Measure every pipeline and write the section; or write it from saved figures."""
    parser = script_parser(__doc__, "docs/benchmarks.md")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--collapse-seeds", type=int, default=10)
    parser.add_argument("--collapse-epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device, print only")
    parser.add_argument("--placeholder", action="store_true", help="write a not-measured section")
    parser.add_argument(
        "--render",
        nargs="?",
        const=SAVED,
        type=Path,
        metavar="JSON",
        help=f"rewrite the docs' section from saved figures (default {SAVED}; a run cut short "
        f"left its own in {RUNNING})",
    )
    parser.add_argument(
        "--check-speed", type=Path, metavar="JSON", help="the GPU check's speed step, into JSON"
    )
    args = parser.parse_args()
    if args.check_speed:
        return check_speed(args)
    if args.placeholder:
        write_section(args.out, "gpu", placeholder())
        print(f"wrote the gpu section of {args.out} (not measured)")
        return
    if args.render:
        if not (figures := read_json(args.render)):
            raise SystemExit(f"{args.render} not found: run the benchmark on a GPU first")
        write_section(args.out, "gpu", render(figures))
        print(f"wrote the gpu section of {args.out} from {args.render}")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("no CUDA GPU here: use --smoke to check the script, --placeholder to "
                         "write a not-measured section")  # fmt: skip
    figures = measure(args, device)
    text = render(figures)
    if args.smoke:
        print(text)
    else:
        write_json(SAVED, figures)
        write_section(args.out, "gpu", text)
        print(f"wrote the gpu section of {args.out}; figures in {SAVED}")


if __name__ == "__main__":
    main()
