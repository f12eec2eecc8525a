"""Fine-tuning a small folder (`nin train --data DIR --finetune NAME`) against training it from
scratch, on folders the bundled models never trained on.

Stages, each saving its runs to results/finetune/<name>.json:
- folders: writes the folders as PNG files, each with train/, val/ and test/ parts of distinct
  pictures: CIFAR-10's *test* split (which the bundled cifar10 model never saw) as 3 classes ×
  50 and 10 classes × 100 training pictures, and Fashion-MNIST's test split as 10 × 100 (not
  CIFAR-10 at all, and grey).
- select: fine-tuning's learning-rate factor (nin.pretrained.FINETUNE_LR), each candidate scored
  on the val/ parts of the two CIFAR-10 folders, 1 seed; test/ is not read.
- final: each folder from scratch (nin_fast, the bundled cifar10 model's network, at 32×32) and
  fine-tuned from each bundled model, 3 seeds each, scored once on test/.
- report: the section `finetune` of docs/folders.md.

    python benchmarks/finetune.py --stages folders select final report --data-dir DIR
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from PIL import Image
from report import Records, fill, mean_std, run_stages, stage_parser, t_test, write_section

from nin.data import dataset_spec, load_split
from nin.pretrained import FINETUNE_LR

RECORDS = Records(Path("results/finetune"), "compact")
FOLDERS = Path("results/finetune/folders")  # written by the folders stage, not committed
# name: (data set, classes, training pictures a class); val/ and test/ get PARTS more a class.
SHAPES = {"cifar-3x50": ("cifar10", 3, 50), "cifar-10x100": ("cifar10", 10, 100),
          "fashion-10x100": ("fashion-mnist", 10, 100)}  # fmt: skip
PARTS = {"val": 30, "test": 100}
EPOCHS = 30  # every arm the same: the folders are small, an epoch is seconds
SEEDS = (0, 1, 2)
ARMS = {
    "scratch": ["--model", "nin_fast", "--model-kwargs", "{}", "--resize", "32"],
    "from-cifar10": ["--finetune", "cifar10"],
    "from-fashion-mnist": ["--finetune", "fashion-mnist"],
}
LR_FACTORS = (0.03, 0.1, 0.3)  # candidates for FINETUNE_LR, tried through --lr


def stage_folders(args: argparse.Namespace) -> None:
    """Each folder of SHAPES from its data set's test split: the first pictures of each class."""
    for name, (dataset, classes, count) in SHAPES.items():
        images, labels = load_split(dataset, "test", args.data_dir)
        names = dataset_spec(dataset).classes
        sizes = {"train": count, **PARTS}
        for c in range(classes):
            mine = (labels == c).nonzero().flatten().tolist()
            start = 0
            for part, size in sizes.items():
                folder = FOLDERS / name / part / names[c].replace("/", "-")
                folder.mkdir(parents=True, exist_ok=True)
                for i in mine[start : start + size]:
                    picture = images[i].permute(1, 2, 0).squeeze(-1).numpy()
                    Image.fromarray(picture).save(folder / f"{i:05d}.png")
                start += size
        print(f"wrote {FOLDERS / name}")


def options(folder: str, arm: str, seed: int, lr: float | None = None) -> list[str]:
    """`nin train` options of one run of ARM on FOLDER."""
    lr_flag = ["--lr", str(lr)] if lr else []
    return [*("--data", str(FOLDERS / folder), "--epochs", str(EPOCHS), "--batch-size", "64"),
            *ARMS[arm], *lr_flag, "--seed", str(seed)]  # fmt: skip


def stage_select(args: argparse.Namespace) -> None:
    """Fine-tuning from the cifar10 model at each LR_FACTORS × the preset's lr, on val/."""
    from nin.presets import PRESETS

    base = PRESETS["compact"].settings["lr"]
    for factor in LR_FACTORS:
        for folder in ("cifar-3x50", "cifar-10x100"):
            name = f"select-{folder}-lr{factor}"
            if not RECORDS.load(name):  # --lr sets the fine-tuning lr itself: undo FINETUNE_LR
                lr = base * factor / FINETUNE_LR
                RECORDS.run(name, options(folder, "from-cifar10", 0, lr), args.data_dir)


def stage_final(args: argparse.Namespace) -> None:
    """Every arm on every folder, 3 seeds, scored on test/ at the end."""
    from nin.report import evaluate_checkpoint

    for folder in SHAPES:
        for arm in ARMS:
            for seed in SEEDS:
                name = f"final-{folder}-{arm}-s{seed}"
                if RECORDS.load(name):
                    continue
                row = RECORDS.run(name, options(folder, arm, seed), args.data_dir)
                row["test_acc"] = evaluate_checkpoint(row["run_dir"])[3].accuracy
                RECORDS.save(row)
                print(f"{name}: test acc {row['test_acc']:.3f}", flush=True)


def accuracies(folder: str, arm: str) -> list[float]:
    """Test accuracy % of an arm's seeds on a folder."""
    rows = [RECORDS.load(f"final-{folder}-{arm}-s{seed}") for seed in SEEDS]
    return [100 * r["test_acc"] for r in rows if r]


def report(out: Path) -> None:
    """The section `finetune` of docs/folders.md, from the records."""
    val = {
        factor: statistics.mean(
            100 * RECORDS.load(f"select-{f}-lr{factor}")["result"]["val_acc"]
            for f in ("cifar-3x50", "cifar-10x100")
        )
        for factor in LR_FACTORS
    }
    rows = []
    for folder in SHAPES:
        cells = {arm: accuracies(folder, arm) for arm in ARMS}
        t, p = t_test(cells["from-cifar10"], cells["scratch"])
        rows.append(f"| {folder} | " + " | ".join(mean_std(v) for v in cells.values())
                    + f" | t = {t:.1f}, p = {p:.2g} |")  # fmt: skip
    text = fill(
        "finetune", "finetune", machine=RECORDS.load("final-cifar-3x50-scratch-s0")["machine"],
        select=", ".join(f"{k}: {v:.1f}%" for k, v in val.items()), chosen=FINETUNE_LR,
        factors=", ".join(map(str, LR_FACTORS)), spread=max(val.values()) - min(val.values()),
        rows="\n".join(rows), epochs=EPOCHS, seeds=len(SEEDS),
    )  # fmt: skip
    write_section(out, "finetune", text)
    print(f"wrote {out}")


STAGES = {"folders": stage_folders, "select": stage_select, "final": stage_final}


def main() -> None:
    """Run the chosen stages, then write the report."""
    run_stages(stage_parser(__doc__, STAGES, "docs/folders.md").parse_args(), STAGES, report)


if __name__ == "__main__":
    main()
