"""CIFAR-10 in minutes on a CPU: the `cifar10-fast` recipe chosen on validation, then measured.

Stages, each saving its runs to results/cifar10-fast/<name>.json so any stage can be rerun alone:

- select: candidate settings, each trained on the first 45,000 training images and scored on
  the last 5,000 (`--holdout 5000`), with every test-time augmentation level scored on the same
  split. The test split is not read.
- final: the preset as committed, on all 50,000 training images, one run per seed. Test accuracy
  is read after every epoch (only for the time-to-91.19% curve; nothing is chosen from it) and
  once at the end with test-time augmentation (the result).
- authors: the authors' network (`nin_cifar` with batch norm) under the same recipe, its epochs
  cut to fit the same wall-time budget.
- report: the section "cifar10-fast" of docs/results.md.

Every run is `python -m nin train ...` in a subprocess, timed end to end (interpreter start-up,
data loading, whitening, training, evaluations, saving).

    python benchmarks/cifar10_fast.py --stages select final authors report --data-dir DIR

Not a test: each run takes 10-15 minutes on 2 CPU cores; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path
from typing import Any

from report import (
    TARGETS,
    Records,
    fill,
    listed,
    machine,
    mean_std,
    run_stages,
    stage_parser,
    t_test,
    time_to,
    write_readme_results,
    write_section,
)

from nin.models import create_model
from nin.resources import leaf_rows, summarize

RECORDS = Records(Path("results/cifar10-fast"), "cifar10-fast")  # every figure is rendered from it
SEEDS = (0, 1, 2)
PAPER = TARGETS[0]  # the paper's best CIFAR-10 accuracy (with augmentation)
HOLDOUT = 5000
# Candidates tried on the validation split: name -> options on top of the preset.
CANDIDATES: dict[str, list[str]] = {
    "e10": ["--epochs", "10"],
    "pw2": ["--epochs", "10", "--model-kwargs", '{"num_pointwise": 2}'],
}
# The authors' network under the same recipe: batch norm on, no whitening (its first layer is
# a 5×5 convolution to 192 maps, not 2·3·2·2), epochs cut to the same budget.
AUTHORS = ["--model", "nin_cifar", "--model-kwargs", '{"batch_norm": true}', "--init", "default"]
AUTHORS_EPOCHS = 2
# The 45-minute budget: the most epochs of the same recipe that fit 45 minutes with a 10%
# margin for the machine's run-to-run variation (about 90 s an epoch here, evaluation included).
LONG_EPOCHS = 27


def stage_select(args: argparse.Namespace) -> None:
    """Each candidate on the validation split; the test split is not read."""
    RECORDS.run_candidates(CANDIDATES, HOLDOUT, (0, 1, 2), args)


def stage_final(args: argparse.Namespace) -> None:
    """The committed preset on the full training split, one run per seed."""
    RECORDS.run_seeds("final", [], SEEDS, args)


def stage_authors(args: argparse.Namespace) -> None:
    """nin_cifar with batch norm under the same recipe and budget."""
    RECORDS.run("authors", [*AUTHORS, "--epochs", str(AUTHORS_EPOCHS)], args.data_dir)


def stage_long(args: argparse.Namespace) -> None:
    """The same recipe with the epochs of the 45-minute budget, on the full training split."""
    RECORDS.run("long", ["--epochs", str(LONG_EPOCHS)], args.data_dir)


STAGES = {
    "select": stage_select,
    "final": stage_final,
    "authors": stage_authors,
    "long": stage_long,
}


def flops(model_name: str, **kwargs: Any) -> int:
    """Forward FLOPs per 32×32 image (multiply-adds × 2)."""
    model = create_model(model_name, **kwargs)
    return sum(r.flops for r in leaf_rows(summarize(model, (3, 32, 32))))


def minutes(seconds: float | None) -> str:
    """Seconds as minutes with one decimal, or a dash for none."""
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def network_cells(row: dict[str, Any] | None) -> str:
    """Parameters, epochs, accuracy (or why the run stopped), wall time, images/s of a run."""
    if row is None:
        return "| not run yet | | | |"
    result = row["result"]
    each = listed((100 * r["test_acc"] for r in row["history"]), "{:.1f}")
    acc = (
        f"{100 * result['test_acc']:.2f} (after each epoch: {each})"
        if "test_acc" in result
        else f"stopped: {result['error']} (after each epoch: {each or 'none'})"
    )
    speed = f"{result['examples_per_sec']:.0f}" if "examples_per_sec" in result else "–"
    wall = minutes(row["wall_seconds"])
    return f"{row['parameters']:,} | {row['epochs']} | {acc} | {wall} | {speed}"


def per_seed_row(row: dict[str, Any]) -> str:
    """A final (or the long) run's row: accuracy with and without TTA, times to each mark."""
    seed = row["name"].split("-s")[-1] if "-s" in row["name"] else 0
    result = row["result"]
    times = " | ".join(minutes(time_to(row, t)) for t in TARGETS)
    return (
        f"| {row['epochs']} | {seed} | {100 * result['test_acc']:.2f} | "
        f"{100 * result['test_acc_no_tta']:.2f} | {times} | {minutes(row['wall_seconds'])} | "
        f"{result['examples_per_sec']:.0f} |"
    )


def summary_lines(finals: list[dict[str, Any]], long: dict[str, Any] | None) -> list[str]:
    """The finals over their seeds, against the paper, and the long run, one line each."""
    lines = []
    if finals:
        accs = [100 * r["result"]["test_acc"] for r in finals]
        walls = [r["wall_seconds"] for r in finals]
        plain = statistics.mean(100 * r["result"]["test_acc_no_tta"] for r in finals)
        lines.append(fill(
            "cifar10_fast", "headline", acc=mean_std(accs), seeds=len(finals), each=listed(accs),
            wall=statistics.mean(walls) / 60, walls=", ".join(map(minutes, walls)), plain=plain,
        ))  # fmt: skip
        if len(accs) > 1:
            t, p = t_test(accs, 100 * PAPER, alternative="greater")
            lines.append(fill("cifar10_fast", "paper_test", t=t, p=p))
    if long:
        lines.append(fill(
            "cifar10_fast", "long", epochs=long["epochs"], acc=100 * long["result"]["test_acc"],
            wall=minutes(long["wall_seconds"]), to93=minutes(time_to(long, 0.93)),
        ))  # fmt: skip
    return lines


def report(out: Path, readme: Path = Path("README.md")) -> None:
    """Write the section of `out` from the saved runs, and the README's summary of it."""
    finals = RECORDS.seeds("final")
    long, authors = RECORDS.load("long"), RECORDS.load("authors")
    select_rows = "\n".join(
        f"| {name} | `{' '.join(CANDIDATES[name])}` | "
        f"{flops(r['model'], **r['model_kwargs']) / 1e6:.0f} M | "
        + " | ".join(f"{100 * r['val_acc_by_tta'][k]:.2f}" for k in ("0", "1", "2"))
        + " |"
        for name in CANDIDATES
        if (r := RECORDS.load(f"select-{name}"))
    )
    networks = [("nin_fast", {}, finals[0] if finals else None)]
    networks.append(("nin_cifar", {"batch_norm": True}, authors))
    network_rows = "\n".join(
        f"| `{name}` | {flops(name, **kw) / 1e6:.0f} M | {network_cells(r)} |"
        for name, kw, r in networks
    )
    lines = summary_lines(finals, long)
    command = finals[0]["command"].replace("--seed 0", "--seed {0,1,2}") if finals else ""
    where = finals[0]["machine"] if finals else machine()
    write_section(out, "cifar10-fast", fill(
        "cifar10_fast", "results", where=where, lines="\n".join(lines), command=command,
        per_seed="\n".join(map(per_seed_row, [*finals, *([long] if long else [])])),
        holdout=HOLDOUT, select_rows=select_rows, authors=shlex.join(AUTHORS),
        authors_epochs=AUTHORS_EPOCHS, network_rows=network_rows,
    ))  # fmt: skip
    print(f"wrote {out}")
    if finals and readme.exists():
        first = [t for r in finals if (t := time_to(r, PAPER)) is not None]
        reached = f", first past it after {minutes(min(first))}" if first else ""
        long_line = long and fill(
            "cifar10_fast", "readme_long", epochs=long["epochs"],
            acc=100 * long["result"]["test_acc"], wall=minutes(long["wall_seconds"]),
        )  # fmt: skip
        summary = fill(
            "cifar10_fast", "readme", where=where, headline=lines[0], reached=reached,
            long=long_line or "",
        )  # fmt: skip
        write_section(readme, "cifar10-fast", summary)
        write_readme_results(readme)
        print(f"wrote {readme}")


def main() -> None:
    """Run the chosen stages, then write the report."""
    parser = stage_parser(__doc__, STAGES, "docs/results.md")
    parser.add_argument("--only", nargs="+", help="candidate names or seeds to run")
    run_stages(parser.parse_args(), STAGES, report)


if __name__ == "__main__":
    main()
