"""The paper's table beside ours: the MNIST measurements, chosen on validation; docs/results.md.

Stages, each saving its runs to results/mnist/<name>.json (committed: the MNIST figures in
docs/results.md and the README are rendered from them), so any stage can be rerun alone:

- select: candidate settings on top of the `mnist` preset, each trained on the first 50,000
  training images and scored on the last 10,000 (`--holdout 10000`); the test split is not read.
  Every candidate runs on seed 0; the finalists (ROUND3) also on seed 1, and the one with the
  lowest mean validation error over both is chosen.
- select-gpu: the fourth round (GPU_ROUND), on a CUDA GPU, 3 seeds each; once all its runs are
  in, its lowest mean validation error chooses instead.
- mnist: the best candidate on validation, on the full train split, 5 seeds, scored on the test
  split (read once per run, to report); saved as final-s0..s4. When a later round of candidates
  changes the choice, the earlier finals are renamed CANDIDATE-s0..s4 and stay in the report.
- report: docs/results.md from whatever runs are saved; rows that need a GPU say so.

Every run is `python -m nin train ...` in a subprocess, timed end to end.

    python benchmarks/results.py [--stages select mnist report] [--data-dir DIR]
    python benchmarks/results.py --stages select-gpu mnist --jobs 6   # on one GPU

Not a test: on 2 CPU cores, each run takes minutes to an hour; run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from report import (
    Records,
    fill,
    listed,
    mean_std,
    run_stages,
    stage_parser,
    t_test,
    write_readme_results,
    write_section,
)

from nin.files import write_json

RECORDS = Records(Path("results/mnist"), "mnist")
SEEDS = (0, 1, 2, 3, 4)
HOLDOUT = 10000
PAPER = 0.47  # the paper's MNIST test error, %
BAR = 0.40  # every seed at or under it


def options(
    dropout: float = 0.5, lookahead: int = 0, epochs: int = 8, rotate: float = 0, width: float = 1
) -> list[str]:
    """`nin train` options that set every choice searched here, whatever the preset says (its
    model kwargs too: --model-kwargs is merged onto the preset's)."""
    kwargs = {"dropout": dropout, "width": width}
    chosen = ["--model-kwargs", json.dumps(kwargs), "--lookahead", str(lookahead)]
    return [*chosen, "--epochs", str(epochs), "--rotate", str(rotate)]


# Candidates on top of the `mnist` preset (compact NiN, 8 epochs, 2-pixel translations). The
# first is the recipe shipped before this search.
CANDIDATES: dict[str, list[str]] = {
    "e8": options(),
    "e8-nodrop": options(dropout=0.0),
    "e8-lookahead": options(lookahead=5),
    "e16": options(epochs=16),
    "e8-rotate10": options(rotate=10),
    "e8-rotate15": options(rotate=15),
    "e8-shift-tta": [*options(), "--tta", "3"],
    "e8-wide": options(width=1.5),
    "e20": options(epochs=20),
    "e20-wide2": options(epochs=20, width=2),
    "e20-wide2-rotate10": options(epochs=20, width=2, rotate=10),
}
# The third round, two seeds each: the best of the first two (on one seed) against rotations,
# test-time shifts and a wider network.
ROUND3 = ("e8", "e8-rotate10", "e8-rotate15", "e8-shift-tta", "e8-wide")
VAL_SEEDS = (0, 1)
# The fourth round, on one GPU, where a run takes about a minute: what 2 CPU cores could not afford
# (longer training, twice the width, rotations with both), 3 seeds each, against e8 on the same
# GPU. Its runs are saved as select-gpu-NAME-sSEED; once all have run, this round chooses.
GPU_ROUND = ("e8", "e20", "e20-wide2", "e20-wide2-rotate10")
GPU_SEEDS = (0, 1, 2)


def select_name(name: str, seed: int) -> str:
    """The saved name of a candidate's validation run (seed 0's has no suffix: it came first)."""
    return f"select-{name}" + (f"-s{seed}" if seed else "")


def gpu_select_name(name: str, seed: int) -> str:
    """The saved name of a candidate's validation run in the GPU round."""
    return f"select-gpu-{name}-s{seed}"


def error(row: dict[str, Any], split: str = "test") -> float:
    """Test error % of a run (validation error, SPLIT "val", of a holdout run)."""
    return 100 * (1 - row["result"][f"{split}_acc"])


def round_errors(
    name: str, seeds: tuple[int, ...], named: Callable[[str, int], str]
) -> list[float] | None:
    """A candidate's validation error % on each seed of a round, or None if one is not run yet;
    a run that failed stops the choice until it is rerun."""
    runs = [RECORDS.load(named(name, seed)) for seed in seeds]
    if None in runs:
        return None
    if failed := [r["name"] for r in runs if "error" in r["result"]]:
        raise SystemExit(
            f"{', '.join(failed)} failed (its JSON in {RECORDS.folder} says why): delete the JSON "
            "and its run folder to run it again"
        )
    return [error(r, "val") for r in runs]


GPU = (GPU_ROUND, GPU_SEEDS, gpu_select_name)
CPU = (ROUND3, VAL_SEEDS, select_name)
ROUNDS = (GPU, CPU)  # the rounds that choose, latest first: the first whose runs are all in


def finalist_errors(
    finalists: tuple[str, ...], seeds: tuple[int, ...], named: Callable[[str, int], str]
) -> dict[str, list[float]] | None:
    """Every finalist's validation errors % in a round, or None until all its runs are in."""
    errors = {name: round_errors(name, seeds, named) for name in finalists}
    return None if None in errors.values() else errors


def means(errors: dict[str, list[float]]) -> dict[str, float]:
    """Mean validation error % of each finalist, rounded so equal error counts tie exactly."""
    return {name: round(statistics.mean(e), 9) for name, e in errors.items()}


def round_means() -> dict[str, float] | None:
    """Each finalist's mean validation error % in the latest round whose runs are all in."""
    return next((means(e) for r in ROUNDS if (e := finalist_errors(*r))), None)


def chosen() -> str:
    """The finalist with the lowest mean validation error (the earlier one on a tie)."""
    if not (means := round_means()):
        raise SystemExit("run the select stage first: --stages select")
    return min(means, key=means.get)


def run_all(
    runs: list[tuple[str, list[str], dict[str, Any]]], data_dir: str | None, jobs: int
) -> None:
    """Each (NAME, ARGS, EXTRA) timed and saved, JOBS at a time (one GPU has room for several of
    these small runs; on 2 CPU cores, run one at a time); every run is tried, and those that
    failed are named at the end."""
    with ThreadPoolExecutor(jobs) as pool:
        futures = {
            name: pool.submit(
                RECORDS.run, name, args, data_dir, echo=jobs == 1, extra=extra | {"jobs": jobs}
            )
            for name, args, extra in runs
        }
    failed = []
    for name, future in futures.items():
        if raised := future.exception():
            failed.append(f"{name} ({raised})")
        elif "error" in future.result()["result"]:
            failed.append(name)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}; each saved JSON holds its output")


def holdout_runs(
    pairs: list[tuple[str, int]], named: Callable[[str, int], str]
) -> list[tuple[str, list[str], dict[str, Any]]]:
    """The validation runs of these (CANDIDATE, SEED) not yet run: the test split unread."""
    return [
        (named(name, seed), [*CANDIDATES[name], "--holdout", str(HOLDOUT), "--seed", str(seed)], {})
        for name, seed in pairs
        if RECORDS.load(named(name, seed)) is None
    ]


def stage_select(args: argparse.Namespace) -> None:
    """Each candidate's seeds not yet run on a 10,000-image holdout (the test split unread); the
    GPU round's own candidates run in select-gpu."""
    pairs = [
        (name, seed)
        for name in CANDIDATES
        if name in ROUND3 or name not in GPU_ROUND
        for seed in (VAL_SEEDS if name in ROUND3 else VAL_SEEDS[:1])
    ]
    run_all(holdout_runs(pairs, select_name), args.data_dir, args.jobs)


def stage_select_gpu(args: argparse.Namespace) -> None:
    """The GPU round's candidates not yet run, on the holdout; only on a CUDA device."""
    if not torch.cuda.is_available():
        raise SystemExit("the select-gpu stage needs a CUDA GPU; on CPUs run --stages select")
    pairs = [(name, seed) for name in GPU_ROUND for seed in GPU_SEEDS]
    run_all(holdout_runs(pairs, gpu_select_name), args.data_dir, args.jobs)


def retire(row: dict[str, Any], new: str) -> None:
    """Rename a superseded final, its JSON and its run folder, to NEW (never over another)."""
    target = RECORDS.folder / f"{new}.json"
    if target.exists():
        raise SystemExit(f"{target} exists: move it away to keep {row['name']} as {new}")
    run_dir = RECORDS.folder / "runs" / new
    if Path(row["run_dir"]).exists():
        Path(row["run_dir"]).rename(run_dir)
    write_json(target, row | {"name": new, "run_dir": str(run_dir)})
    (RECORDS.folder / f"{row['name']}.json").unlink()


def stage_mnist(args: argparse.Namespace) -> None:
    """The chosen candidate on the full train split, one run per seed, saved as final-sN (the
    finals of a candidate chosen earlier become CANDIDATE-sN and stay in the report)."""
    choice = chosen()
    finals = [row for seed in SEEDS if (row := RECORDS.load(f"final-s{seed}"))]
    if untagged := [row["name"] for row in finals if "candidate" not in row]:
        raise SystemExit(
            f'{", ".join(untagged)} name no candidate: add "candidate": the CANDIDATES entry '
            "they ran, to each"
        )
    for row in finals:
        if row["candidate"] != choice:
            retire(row, row["name"].replace("final", row["candidate"]))
    seeds = [seed for seed in SEEDS if RECORDS.load(f"final-s{seed}") is None]
    if seeds and finalist_errors(*GPU) and not torch.cuda.is_available():
        raise SystemExit(f"the GPU round chose {choice}: run its finals on a CUDA GPU, as it ran")
    finals_to_run = [
        (f"final-s{s}", [*CANDIDATES[choice], "--seed", str(s)], {"candidate": choice})
        for s in seeds
    ]
    run_all(finals_to_run, args.data_dir, args.jobs)


STAGES = {"select": stage_select, "select-gpu": stage_select_gpu, "mnist": stage_mnist}


def mnist_row(label: str, seeds: list[dict[str, Any]]) -> str:
    """An MNIST row of the table: mean ± std over the seeds, command, machine, time, speed."""
    if not seeds:
        return f"| {label} | 0.47 | not run yet | `nin train --preset mnist` | | | |"
    errors = [error(r) for r in seeds]
    command = seeds[0]["command"].replace("--seed 0", "--seed {" + f"0..{len(seeds) - 1}" + "}")
    wall = statistics.mean(r["wall_seconds"] for r in seeds) / 60
    speed = statistics.mean(r["result"]["examples_per_sec"] for r in seeds)
    return (
        f"| {label} | 0.47 | {mean_std(errors)} ({listed(errors)}; {len(seeds)} seeds) | "
        f"`{command}` | {seeds[0]['machine']} | {wall:.1f} min | {speed:.0f} |"
    )


def mnist_verdict(seeds: list[dict[str, Any]]) -> str:
    """Every seed against the bar, and the mean against the paper by a one-sided t-test."""
    if len(seeds) < 2:
        return ""
    errors = [error(r) for r in seeds]
    t, p = t_test(errors, PAPER, alternative="less")
    return fill(
        "results", "verdict", under=sum(e <= BAR for e in errors), seeds=len(errors), bar=BAR,
        worst=max(errors), paper=PAPER, t=t, p=p,
    )  # fmt: skip


def select_rows(runs: dict[str, list[dict[str, Any]]], columns: int) -> str:
    """A row for each candidate run: its validation error on each seed, their mean, time, speed."""
    rows = []
    for name, seeds in runs.items():
        errors = [error(r, "val") for r in seeds]
        cells = [f"{e:.2f}" for e in errors] + [""] * (columns - len(seeds))
        wall = statistics.mean(r["wall_seconds"] for r in seeds) / 60
        speed = statistics.mean(r["result"]["examples_per_sec"] for r in seeds)
        rows.append(
            f"| {name} | `{' '.join(CANDIDATES[name])}` | {' | '.join(cells)} | "
            f"{statistics.mean(errors):.3f} | {wall:.1f} min | {speed:.0f} |"
        )
    return "\n".join(rows)


def gpu_round_prose(choice: str) -> dict[str, str]:
    """The GPU round's choice against e8 on the same GPU (Welch's t-test on validation error),
    and what its table shows beyond its means: ties, and e8 against its CPU rounds."""
    errors = finalist_errors(*GPU)
    if not errors or choice not in GPU_ROUND:
        return {"welch": "", "gpu_notes": ""}
    welch = ""
    if choice != "e8":
        t, p = t_test(errors[choice], errors["e8"])
        welch = fill("results", "gpu_test", choice=choice, seeds=len(GPU_SEEDS), t=t, p=p)
    mean = means(errors)
    tied = [name for name in GPU_ROUND if name != choice and mean[name] == mean[choice]]
    notes = fill("results", "gpu_tie", tied=", ".join(tied), choice=choice) + " " if tied else ""
    if cpu := round_errors("e8", VAL_SEEDS, select_name):
        more = "more" if mean["e8"] > statistics.mean(cpu) else "less"
        notes += fill("results", "gpu_e8", more=more, gpu=mean["e8"], cpu=statistics.mean(cpu))
    return {"welch": welch, "gpu_notes": notes}


def at_a_time(runs: list[dict[str, Any]]) -> str:
    """How many of these runs went side by side (`--jobs`, recorded with each run)."""
    jobs = max((r.get("jobs", 1) for r in runs), default=1)
    return "one at a time" if jobs == 1 else f"{min(jobs, len(runs))} at a time"


def seed_runs(names: tuple[str, ...], seeds: tuple[int, ...], named: Callable) -> dict[str, list]:
    """The validation runs saved of each candidate on the seeds, candidates with none left out."""
    runs = {name: [r for s in seeds if (r := RECORDS.load(named(name, s)))] for name in names}
    return {name: rows for name, rows in runs.items() if rows}


def report(out: Path, readme: Path = Path("README.md")) -> None:
    """Write the results table from the saved runs, and the README's MNIST line."""
    seeds = RECORDS.seeds("final")
    earlier = [(name, runs) for name in CANDIDATES if (runs := RECORDS.seeds(name))]
    gpu_select = seed_runs(GPU_ROUND, GPU_SEEDS, gpu_select_name)
    gpu_runs = [r for runs in gpu_select.values() for r in runs]
    table = [mnist_row("MNIST, `mnist` preset (compact NiN, 2× wide)", seeds)]
    table += [mnist_row(f"MNIST, {name} (chosen earlier, superseded)", r) for name, r in earlier]
    verdicts = [mnist_verdict(seeds)]
    verdicts += [f"Superseded {name}: {mnist_verdict(runs)}" for name, runs in earlier]
    cpu_select = seed_runs(tuple(CANDIDATES), VAL_SEEDS, select_name)
    choice = chosen() if round_means() else "not chosen yet"
    text = fill(
        "results", "results", gpu_at_a_time=at_a_time(gpu_runs), finals_at_a_time=at_a_time(seeds),
        table="\n".join(table), verdict="\n\n".join(verdicts), holdout=HOLDOUT, choice=choice,
        bar=BAR, val_seeds=len(VAL_SEEDS), best_so_far=ROUND3[0], gpu_seeds=len(GPU_SEEDS),
        select_rows=select_rows(cpu_select, len(VAL_SEEDS)),
        gpu_machine=gpu_runs[0]["machine"] if gpu_runs else "not run yet",
        gpu_rows=select_rows(gpu_select, len(GPU_SEEDS)) or "| not run yet | | | | | | | |",
        params=f"{seeds[0]['parameters']:,} parameters" if seeds else "not measured yet",
        **gpu_round_prose(choice),
    )  # fmt: skip
    write_section(out, "results", text)
    print(f"wrote {out}")
    write_readme_results(readme)


def main() -> None:
    """Run the chosen stages, then write docs/results.md."""
    parser = stage_parser(__doc__, STAGES, "docs/results.md", default=[*STAGES, "report"])
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs side by side (on a GPU; default 1)"
    )
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    run_stages(args, STAGES, report)


if __name__ == "__main__":
    main()
