"""How close nin's training steps come to the machine's own ceiling, measured in one run.

On whatever machine runs it (CPU or GPU): the throughput of a large matrix multiply and of a large
convolution in bfloat16 and in float32 (the achievable ceiling), then one training step of each
network in its preset's settings (batch, input size, autocast, channels-last), as FLOP/s and as a
fraction of the ceiling in its precision. A step's FLOPs (forward and backward) are counted by
torch's FlopCounterMode (`nin.resources.training_flops`). Writes results/speed/<machine>.json and
the section "ceiling" of docs/benchmarks.md from every record there.

    python benchmarks/ceiling.py            # measure (minutes on 2 CPU cores), then render
    python benchmarks/ceiling.py --render   # render the section from the committed records
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from report import fill, machine, read_json, script_parser, today, write_section

from nin.config import make_config
from nin.device import place_model
from nin.files import write_json
from nin.models import create_model, model_info
from nin.resources import training_flops
from nin.train import train_step

RECORDS = Path("results/speed")
# Each network in the preset it trains with; timed steps after one warm-up (nin_d2l's step takes
# seconds on 2 CPU cores).
PRESETS = {"cifar10-fast": 3, "compact": 10, "d2l": 2}


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `fn` over `repeats` calls, after one warm-up call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(device: torch.device, small: bool) -> dict[str, float]:
    """FLOP/s of a large matrix multiply and of a large 3×3 convolution, per precision."""
    found = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        found[f"matmul_{name}"], found[f"conv_{name}"] = throughput(dtype, device, small)
    return found


def throughput(dtype: torch.dtype, device: torch.device, small: bool) -> tuple[float, float]:
    """FLOP/s of the matrix multiply and of the convolution in `dtype`."""
    n, batch, channels, side = (512, 4, 64, 16) if small else (4096, 64, 256, 32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    x = torch.randn(batch, channels, side, side, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    conv_flops = 2 * batch * channels * channels * 9 * side * side
    matmul = 2 * n**3 / seconds(lambda: a @ b, 5)
    return matmul, conv_flops / seconds(lambda: F.conv2d(x, w, padding=1), 5)


def step_speed(preset: str, repeats: int, device: torch.device, small: bool) -> dict:
    """One training step of the preset's network in its settings: seconds and FLOPs."""
    config = make_config(preset, device=str(device))
    batch = 8 if small else config.batch_size
    size = model_info(config.model).input_size
    size = (size[0], config.resize, config.resize) if config.resize else size
    model = place_model(create_model(config.model, **config.model_kwargs), device, False)
    flops = training_flops(model, size, batch)
    model = place_model(model, device, config.channels_last)
    x = torch.randn(batch, *size, device=device)
    x = x.contiguous(memory_format=torch.channels_last) if config.channels_last else x
    y = torch.randint(0, 10, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=config.momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    step = seconds(lambda: train_step(model, x, y, optimizer, loss_fn, config.amp), repeats)
    # The same step through torch.compile (`nin train --compile`), its compilation in the warm-up
    # (minutes on 2 CPU cores: not in the smoke run).
    compiled = torch.compile(model)
    fused = (
        None
        if small
        else seconds(lambda: train_step(compiled, x, y, optimizer, loss_fn, config.amp), repeats)
    )
    return dict(preset=preset, model=config.model, batch=batch, input="×".join(map(str, size)),
                precision="bf16" if config.amp else "fp32", channels_last=config.channels_last,
                step_seconds=step, compiled_step_seconds=fused, train_flops=flops)  # fmt: skip


def measure(small: bool) -> dict:
    """The ceilings and every preset's step, measured in this one process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    record = {"date": today(), "machine": machine(), "ceilings": ceilings(device, small)}
    record["steps"] = [step_speed(p, 1 if small else n, device, small) for p, n in PRESETS.items()]
    return record


def render(records: list[dict]) -> str:
    """The section: per machine, its ceilings and each step as a fraction of its precision's."""
    parts = []
    for record in records:
        peaks = record["ceilings"]
        rows = []
        for s in record["steps"]:
            speed = s["train_flops"] / s["step_seconds"]
            ceiling = max(peaks[f"matmul_{s['precision']}"], peaks[f"conv_{s['precision']}"])
            compiled = s.get("compiled_step_seconds")
            gain = f"{s['step_seconds'] / compiled:.2f}×" if compiled else "not measured"
            rows.append(fill("ceiling", "row", **s, images=s["batch"] / s["step_seconds"],
                             gflops=s["train_flops"] / 1e9, speed=speed / 1e12,
                             share=100 * speed / ceiling, compiled=gain))  # fmt: skip
        tflops = {k: v / 1e12 for k, v in peaks.items()}
        parts.append(fill("ceiling", "machine", **record, **tflops, rows="\n".join(rows)))
    return fill("ceiling", "section", machines="\n\n".join(parts))


def main() -> None:
    """Measure and record (unless --render), then write the section from every record."""
    parser = script_parser(__doc__, out="docs/benchmarks.md")
    parser.add_argument("--render", action="store_true", help="only render the committed records")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, nothing recorded")
    args = parser.parse_args()
    if not args.render:
        record = measure(args.smoke)
        print(render([record]))
        if args.smoke:
            return
        slug = re.sub(r"[^a-z0-9]+", "-", record["machine"].split(",")[0].lower()).strip("-")
        write_json(RECORDS / f"{slug}.json", record)
    report(Path(args.out))


def report(page: Path) -> None:
    """Write the section of `page` from every record in results/speed/."""
    records = [read_json(path) for path in sorted(RECORDS.glob("*.json"))]
    write_section(page, "ceiling", render(records))


if __name__ == "__main__":
    main()
