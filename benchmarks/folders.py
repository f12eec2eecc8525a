"""Image folders (`nin train --data`): how fast they are read, and what streaming costs.

Writes CIFAR-10 test images as PNG files into class folders, then measures, in one run:
- ingest: images decoded per second on the first read (cold: Pillow, resize, cache write) and
  on the second (the safetensors cache);
- training throughput of `nin_fast` on that folder with the images resident in memory against
  streamed from the cache by a DataLoader, interleaved (resident, stream, resident, ...) so the
  ratio holds on a shared machine.
The section `folders` of docs/benchmarks.md is rewritten with the figures.

    python benchmarks/folders.py --data-dir DIR [--images 10000] [--steps 20]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from report import fill, listed, machine, script_parser, today, write_section

from nin.config import make_config
from nin.data import dataset_spec, load_split
from nin.folders import load_folder
from nin.loaders import make_loader
from nin.models import create_model
from nin.train import train_step


def write_pngs(root: Path, count: int, data_dir: str | None) -> None:
    """The first `count` CIFAR-10 test images as root/<class>/<index>.png."""
    images, labels = load_split("cifar10", "test", data_dir)
    classes = dataset_spec("cifar10").classes
    for i in range(count):
        folder = root / classes[labels[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")


def ingest(root: Path) -> float:
    """Seconds to read the folder (decoding it, or from the cache if there is one)."""
    load_folder.cache_clear()
    start = time.perf_counter()
    load_folder(str(root), 32).images.load()
    return time.perf_counter() - start


def throughput(root: Path, loader: str, steps: int, batch_size: int) -> float:
    """Training images per second of nin_fast over `steps` steps (after 2 warm-up steps)."""
    config = make_config("cifar10-fast", data=str(root), batch_size=batch_size, loader=loader)
    train = make_loader(config, "train", torch.device("cpu"))
    model = create_model("nin_fast").to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = torch.nn.CrossEntropyLoss()
    seen, start = 0, 0.0
    for step, (x, y) in enumerate(train.batches()):
        if step == 2:
            seen, start = 0, time.perf_counter()
        train_step(model, x, y, optimizer, loss, True)
        seen += len(y)
        if step == steps + 1:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    """Measure and write the section."""
    parser = script_parser(__doc__)
    parser.add_argument("--images", type=int, default=10000, help="PNG files to write")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per trial")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--trials", type=int, default=3, help="trials of each loader")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cifar-pngs"
        write_pngs(root, args.images, args.data_dir)
        cold = ingest(root)  # decodes and writes the cache (the cache lives in $NIN_CACHE_DIR)
        cached = statistics.median(ingest(root) for _ in range(3))
        speeds: dict[str, list[float]] = {"resident": [], "stream": []}
        for _ in range(args.trials):
            for loader in speeds:
                speeds[loader].append(throughput(root, loader, args.steps, args.batch_size))
    resident, stream = (statistics.median(v) for v in speeds.values())
    section = fill(
        "folders", "section", machine=machine(), date=today(), images=args.images,
        cold=cold, cold_speed=args.images / cold, cached=cached, cached_speed=args.images / cached,
        batch_size=args.batch_size, steps=args.steps, trials=args.trials, resident=resident,
        stream=stream, ratio=stream / resident,
        each={loader: listed(values, "{:.0f}") for loader, values in speeds.items()},
    )  # fmt: skip
    write_section(args.out, "folders", section)
    print(section, end="\n\n")


if __name__ == "__main__":
    main()
