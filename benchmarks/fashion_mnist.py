"""The default recipe (`--preset compact`, Fashion-MNIST) chosen on validation, then measured.

Stages, each saving its runs to results/fashion-mnist/<name>.json (committed: every figure in
docs/recipe.md and the README's Fashion-MNIST row is rendered from them):

- select: candidate settings on top of the preset, each trained on the first 54,000 training
  images and scored on the last 6,000 (`--holdout 6000`), with every test-time augmentation
  level scored on the same split. The test split is not read.
- final: the best candidate on validation (the preset now), on all 60,000 training images, one
  run per seed, scored on the test split (read once per run, to report).
- before: the recipe shipped before this search (the first candidate), same seeds, so the two
  can be compared by a real test (when the search chose another).
- report: docs/recipe.md and the README's summary line.

Every run is `python -m nin train ...` in a subprocess, timed end to end.

    python benchmarks/fashion_mnist.py --stages select final before report --data-dir DIR

Not a test: each run takes 4-5 minutes on 2 CPU cores; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from report import (
    Records,
    dropout,
    fill,
    listed,
    mean_std,
    run_stages,
    stage_parser,
    t_test,
    write_readme_results,
    write_section,
    write_transcripts,
)

from nin.config import flag
from nin.fast import RECIPE
from nin.fast import TTA_LEVELS as TTA_NAMES
from nin.files import save_figure
from nin.plots import figure
from nin.presets import PRESETS

RECORDS = Records(Path("results/fashion-mnist"), "compact")
SEEDS = (0, 1, 2)
HOLDOUT = 6000
TTA_LEVELS = (0, 1, 2)
BUDGET = 300.0  # seconds, end to end: the aim is 94% test accuracy within it


def options(dropout: float = 0.5, lookahead: int = 0, flip: bool = False) -> list[str]:
    """`nin train` options that set every choice searched here, whatever the preset says."""
    return [
        *("--model-kwargs", json.dumps({"dropout": dropout})),
        *("--lookahead", str(lookahead)),
        "--flip" if flip else "--no-flip",
    ]


def fast_options(width: float, epochs: int) -> list[str]:
    """`nin train` options for the CIFAR-10 recipe (nin.fast.RECIPE: whitening, lookahead, the
    BN-shift learning rate, ...) on `nin_fast` at WIDTH times its channels, for EPOCHS."""
    recipe = {**RECIPE, "epochs": epochs}
    del recipe["tta"]  # scored at every level on validation
    flip = "--flip" if recipe.pop("flip") else "--no-flip"
    settings = [arg for key, value in recipe.items() for arg in (f"--{flag(key)}", str(value))]
    return [
        *("--model", "nin_fast", "--model-kwargs", json.dumps({"width": width})),
        *("--init", "whiten", "--schedule", "linear", flip, *settings),
    ]


# Candidates tried on the validation split, on top of the preset's 8 epochs: the budget is
# time, and the epochs are what it buys. The first is the recipe shipped before this search.
# The fast ones: CIFAR-10's recipe at three widths, each with the epochs that fit 5 minutes at
# its speed on 2 CPU cores (1.0: 4, 0.75: 6, 0.5: 9, from a 20,480-image probe).
CANDIDATES: dict[str, list[str]] = {
    "e8": options(),
    "e8-nodrop": options(dropout=0.0),
    "e8-nodrop-lookahead": options(dropout=0.0, lookahead=5),
    "e8-nodrop-flip": options(dropout=0.0, flip=True),
    "fast-w1-e4": fast_options(1.0, 4),
    "fast-w0.75-e6": fast_options(0.75, 6),
    "fast-w0.5-e9": fast_options(0.5, 9),
}
BEFORE = [*CANDIDATES["e8"], "--tta", "0"]


TIE = 0.003  # about one standard error of an accuracy near 94% on 6,000 validation images
FIRST_ROUND = 4  # candidates of the first round, where the best score won outright


def best_candidate() -> tuple[str, str]:
    """The best candidate on validation and its best test-time augmentation level: the first
    round's best (on a tie, the earlier), which a later candidate must beat by more than TIE."""
    best: tuple[float, str, str] | None = None
    for i, name in enumerate(CANDIDATES):
        if not (r := RECORDS.load(f"select-{name}")):
            raise SystemExit("run the select stage first: --stages select")
        for level, acc in sorted(r["val_acc_by_tta"].items()):
            if best is None or acc > best[0] + (TIE if i >= FIRST_ROUND else 0):
                best = (acc, name, level)
    return best[1], best[2]


def chosen() -> list[str]:
    """The options of the best candidate on validation (`best_candidate`), with its level."""
    name, level = best_candidate()
    return [*CANDIDATES[name], "--tta", level]


def stage_select(args: argparse.Namespace) -> None:
    """Each candidate on the validation split; the test split is not read."""
    RECORDS.run_candidates(CANDIDATES, HOLDOUT, TTA_LEVELS, args)


def stage_final(args: argparse.Namespace) -> None:
    """The chosen candidate on the full training split, one run per seed."""
    RECORDS.run_seeds("final", chosen(), SEEDS, args)


def stage_before(args: argparse.Namespace) -> None:
    """The recipe shipped before the search, on the full training split, same seeds."""
    RECORDS.run_seeds("before", BEFORE, SEEDS, args)


STAGES = {"select": stage_select, "final": stage_final, "before": stage_before}


def main() -> None:
    """Run the chosen stages, then write the report."""
    parser = stage_parser(__doc__, STAGES, "docs/recipe.md")
    parser.add_argument("--only", nargs="+", help="candidate names or seeds to run")
    run_stages(parser.parse_args(), STAGES, report)


def test_accs(rows: list[dict[str, Any]]) -> list[float]:
    """Test accuracy % of each run."""
    return [100 * r["result"]["test_acc"] for r in rows]


def mean_std_each(values: list[float], digits: int = 2) -> str:
    """Mean ± std% (each value) of percentages over runs."""
    return f"{mean_std(values, digits)}% ({listed(values, f'{{:.{digits}f}}')})"


def minutes_in(run: dict[str, Any], epoch: dict[str, Any]) -> float:
    """Minutes from the command's start to the end of an epoch of the run."""
    return (run["startup_seconds"] + epoch["elapsed_seconds"]) / 60


def first_past(runs: list[dict[str, Any]], mark: float) -> str:
    """For each run, the epoch and minute its test accuracy (no TTA) first reached `mark` %."""
    found = []
    for r in runs:
        hit = next((e for e in r["history"] if 100 * e["test_acc"] >= mark), None)
        found.append(f"epoch {hit['epoch']} ({minutes_in(r, hit):.1f} min)" if hit else "never")
    return ", ".join(found)


def frontier_figure(select: list[tuple[str, dict]], finals: list[dict]) -> Any:
    """Accuracy against minutes: each final run's test accuracy after every epoch (no TTA),
    and each candidate's validation accuracy at its end (its best TTA level)."""
    fig, ax = figure(6, 4)
    for r in finals:
        times = [minutes_in(r, e) for e in r["history"]]
        accs = [100 * e["test_acc"] for e in r["history"]]
        ax.plot(times, accs, "-o", ms=3, alpha=0.7, label=f"{r['name']}: test, after each epoch")
    for name, r in select:
        point = (r["wall_seconds"] / 60, 100 * max(r["val_acc_by_tta"].values()))
        ax.plot(*point, "k^", ms=5)
        ax.annotate(name, point, fontsize=6, xytext=(3, -3), textcoords="offset points")
    ax.axhline(94, color="gray", ls=":", lw=1)
    ax.axvline(BUDGET / 60, color="gray", ls=":", lw=1)
    ax.set(xlabel="minutes from the command's start", ylabel="accuracy %", ylim=(88, 95))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Fashion-MNIST, compact preset: triangles are candidates (validation)", fontsize=8)
    return fig


def against_before(finals: list[dict[str, Any]], before: list[dict[str, Any]]) -> dict[str, str]:
    """The `before` runs' note on speeds and their comparison with the finals, where there are
    any (the comparison needs two seeds of each)."""
    values = {"before_note": "", "comparison": ""}
    if before:
        speeds = [
            statistics.mean(r["result"]["examples_per_sec"] for r in rs) for rs in (finals, before)
        ]
        values["before_note"] = fill(
            "fashion_mnist", "before_note", finals=speeds[0], before=speeds[1]
        )
    if len(before) > 1 and len(finals) > 1:
        accs, before_accs = test_accs(finals), test_accs(before)
        gain = statistics.mean(accs) - statistics.mean(before_accs)
        t, p = t_test(accs, before_accs)
        values["comparison"] = fill(
            "fashion_mnist", "comparison", options=" ".join(BEFORE), t=t, p=p, gain=gain,
            before=mean_std_each(before_accs), seeds=len(accs), before_seeds=len(before),
        )  # fmt: skip
    return values


def preset_values() -> dict[str, Any]:
    """The default preset's settings as the page describes them."""
    preset = PRESETS["compact"].settings
    return {
        "preset": preset,
        "dropout": dropout(preset["model"], preset.get("model_kwargs", {})),
        "flips": "random flips, " if preset.get("flip") else "",
        "tta": preset.get("tta", 0),
        "tta_name": TTA_NAMES[preset.get("tta", 0)],
    }


def final_row(r: dict[str, Any]) -> str:
    """A test run's row: command, accuracy with and without TTA, wall time, speed."""
    result = r["result"]
    return (
        f"| {r['name']} | {r['command']} | {100 * result['test_acc']:.2f} | "
        f"{100 * result.get('test_acc_no_tta', result['test_acc']):.2f} | "
        f"{r['wall_seconds']:.0f} s | {result['examples_per_sec']:.0f} |"
    )


def report(out: Path, readme: Path = Path("README.md")) -> None:
    """docs/recipe.md and the README's Fashion-MNIST summary, from the saved runs."""
    select = [(name, r) for name in CANDIDATES if (r := RECORDS.load(f"select-{name}"))]
    finals, before = RECORDS.seeds("final"), RECORDS.seeds("before")
    if not finals:
        raise SystemExit("no final runs saved: run --stages final first")
    accs, walls = test_accs(finals), [r["wall_seconds"] for r in finals]
    select_rows = "\n".join(
        f"| {name} | `{' '.join(CANDIDATES[name])}` | "
        + " | ".join(f"{100 * r['val_acc_by_tta'][str(k)]:.2f}" for k in TTA_LEVELS)
        + f" | {r['wall_seconds']:.0f} s |"
        for name, r in select
    )
    save_figure(frontier_figure(select, finals), out.with_suffix(".png"))
    epoch_seconds = statistics.mean(
        statistics.mean(b["elapsed_seconds"] - a["elapsed_seconds"] for a, b in zip(
            r["history"], r["history"][1:], strict=False)) for r in finals
    )  # fmt: skip
    text = fill(
        "fashion_mnist", "recipe", where=finals[0]["machine"], **preset_values(),
        accs=mean_std_each(accs), seeds=len(finals), wall=statistics.mean(walls),
        walls=listed(walls, "{:.0f}"), reached=sum(a >= 94 for a in accs),
        within=sum(w <= BUDGET for w in walls), budget=BUDGET / 60,
        speed=statistics.mean(r["result"]["examples_per_sec"] for r in finals),
        epoch_seconds=epoch_seconds,
        budget_epochs=(BUDGET - finals[0]["startup_seconds"]) / epoch_seconds,
        past93=first_past(finals, 93), past935=first_past(finals, 93.5), holdout=HOLDOUT,
        best=best_candidate()[0], tie=100 * TIE,
        select_rows=select_rows, final_rows="\n".join(map(final_row, [*finals, *before])),
        **against_before(finals, before),
    )  # fmt: skip
    write_section(out, "fashion-mnist", text)
    print(f"wrote {out}")
    write_readme_results(readme)
    write_transcripts(finals[0], readme)


if __name__ == "__main__":
    main()
