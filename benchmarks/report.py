"""Shared by the benchmark scripts: where a run happened, and writing its section of a report.

Each script owns one section of docs/benchmarks.md, between `<!-- begin NAME -->` and
`<!-- end NAME -->`; rerunning a script replaces its section and leaves the others alone.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from nin.config import make_config
from nin.device import describe, environment
from nin.files import atomic_path, write_json
from nin.models import model_info


def dropout(model: str, model_kwargs: dict[str, Any]) -> float:
    """A run's dropout: its model kwargs' value, else the model builder's own default."""
    default = inspect.signature(model_info(model).build).parameters["dropout"].default
    return model_kwargs.get("dropout", default)


def machine() -> str:
    """CPU, threads, GPU if any, torch and Python versions, in one line."""
    return describe(environment("cuda" if torch.cuda.is_available() else "cpu"))


def write_section(path: str | Path, name: str, markdown: str) -> None:
    """Put `markdown` between the markers of section `name` in `path`, atomically."""
    path = Path(path)
    block = f"<!-- begin {name} -->\n{markdown.strip()}\n<!-- end {name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(
        rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->", re.S
    )
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{block}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def timed_run(
    saved: Path,
    name: str,
    preset: str,
    args: list[str],
    data_dir: str | None,
    echo: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`nin train --preset PRESET ARGS` in a subprocess, timed end to end (interpreter start-up,
    data loading, training, evaluations, saving); the run's record saved as SAVED/NAME.json.
    Its output is shown as it comes, or (echo False: runs side by side) its last line at the end;
    EXTRA adds fields to the record (what it was run as)."""
    out = saved / "runs" / name
    if out.exists():
        raise SystemExit(f"{out} exists: delete it to run {name} again")
    data = ["--data-dir", data_dir] if data_dir else []
    command = ["nin", "train", "--preset", preset, *args]
    start = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "nin", *command[1:], *data, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as done:
        log = []
        for line in done.stdout:  # shown as it comes, and kept: the docs quote it
            if echo:
                print(line, end="", flush=True)
            log.append(line.rstrip("\n"))
    wall = time.perf_counter() - start
    if not echo:
        print(f"{name}: {log[-1] if log else 'no output'} ({wall:.0f} s)", flush=True)
    config = json.loads((out / "config.json").read_text())
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if done.returncode:  # a run that stopped (diverged, collapsed) is a result too: say why
        config["result"] = {"error": log[-1] if log else "no output", "wall_seconds": wall}
    row = {
        "name": name,
        "command": shlex.join(command),
        "machine": machine(),
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "run_dir": str(out),
        "wall_seconds": wall,
        # Interpreter start-up and imports: the part of `wall` the run's own clock misses.
        "startup_seconds": wall - config["result"]["wall_seconds"],
        "model": config["model"],
        "model_kwargs": config["model_kwargs"],
        "epochs": config["epochs"],
        "parameters": config["parameters"],
        "result": config["result"],
        "history": history,
        "log": log,
    } | (extra or {})
    write_json(saved / f"{name}.json", row)
    return row


# The marks a CIFAR-10 run is timed to: the paper's best accuracy (with augmentation), 93%, 94%.
TARGETS = (0.9119, 0.93, 0.94)


def time_to(row: dict[str, Any], target: float) -> float | None:
    """Seconds from the command's start to the end of the first epoch whose test accuracy (no
    test-time augmentation) reached `target`, else to the end of the run if its final
    evaluation (with it) did; None if neither did."""
    for epoch in row["history"]:
        if epoch.get("test_acc", 0) >= target:
            return row["startup_seconds"] + epoch["elapsed_seconds"]
    final = row.get("result", {}).get("test_acc", 0) >= target
    return row.get("wall_seconds") if final else None


def load_run(saved: Path, name: str) -> dict[str, Any] | None:
    """A run saved by `timed_run`, or None if it has not been run."""
    path = saved / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def score_tta_levels(
    row: dict[str, Any], preset: str, holdout: int, levels: tuple[int, ...], data_dir: str | None
) -> dict[str, float]:
    """Validation accuracy of a holdout run's final weights at each test-time augmentation
    level (on the holdout split, never test)."""
    from nin.checkpoint import load_checkpoint
    from nin.evaluate import evaluate
    from nin.loaders import make_loader

    model, saved = load_checkpoint(row["run_dir"])
    config = make_config(preset, model=saved["model"], holdout=holdout, data_dir=data_dir)
    config.channels_last = saved["channels_last"]
    loader = make_loader(config, "val", torch.device("cpu"))
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return {
        str(level): evaluate(model, loader, saved["num_classes"], True, level).accuracy
        for level in levels
    }


def welch(a: list[float], b: list[float]) -> str:
    """Welch's two-sided t-test of two samples' means, as a short phrase with t and p."""
    from scipy import stats  # here: the GPU check imports this file without SciPy

    test = stats.ttest_ind(a, b, equal_var=False)
    return f"Welch's t = {test.statistic:.2f}, p = {test.pvalue:.2g}"


def seed_runs(saved: Path, prefix: str) -> list[dict[str, Any]]:
    """The runs PREFIX-s0, PREFIX-s1, ... saved in SAVED, in seed order, until one is missing."""
    runs = []
    while row := load_run(saved, f"{prefix}-s{len(runs)}"):
        runs.append(row)
    return runs


def mean_std(values: list[float], digits: int = 2) -> str:
    """Mean ± sample std (just the mean for one value)."""
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def gpu_chapter_cell(summary_path: Path = Path("results/gpu-check/summary.json")) -> str:
    """The chapter's setting as `make gpu-check` last measured it (results/gpu-check/)."""
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    chapter = next((s for s in summary.get("steps", []) if s["name"] == "chapter"), {})
    runs = [r for r in chapter.get("figures", {}).get("runs", []) if r.get("finished")]
    if not runs:
        return "not measured yet: a GPU's job"
    accs = [100 * r["result"]["test_acc"] for r in runs]
    wall = statistics.mean(r["wall_seconds"] for r in runs)
    seeds = f"over {len(runs)} seeds" if len(runs) > 1 else "with one seed so far"
    return (
        f"**{mean_std(accs, 1)}% test accuracy** {seeds}, {wall:.0f} s a run end to end on one "
        f"{summary['gpu']} ([GPU check](docs/results.md#on-one-gpu-the-chapters-setting-and-"
        f"cifar-10-against-the-clock))"
    )


def write_readme_results(readme: Path = Path("README.md")) -> None:
    """The README's results table, rendered from the committed runs in results/ (the same data
    as the pages it links to), so no figure is copied by hand."""
    fashion = seed_runs(Path("results/fashion-mnist"), "final")
    mnist = seed_runs(Path("results/mnist"), "final")
    cifar = seed_runs(Path("results/cifar10-fast"), "final")

    def cell(runs: list[dict[str, Any]], what: str, error: bool = False, timed: bool = True) -> str:
        """Mean ± std over the seeds; for an error, the worst seed (the bar is per seed); the
        wall time where the runs had the machine to themselves (`timed`)."""
        if not runs:
            return "not measured yet"
        accs = [100 * r["result"]["test_acc"] for r in runs]
        values = [100 - a for a in accs] if error else accs
        text = f"**{mean_std(values)}% {what}** over {len(runs)} seeds"
        if error:
            text += f" (worst {max(values):.2f}%)"
        if timed:
            wall = statistics.mean(r["wall_seconds"] for r in runs) / 60
            text += f", {wall:.1f} min a run end to end on 2 CPU cores"
        elif gpu := re.search(r"GPU ([^,]+)", runs[0]["machine"]):
            text += f", trained on one {gpu[1]}"
        return text

    rows = [
        ("Fashion-MNIST", "`compact` (`nin_compact`, the default)", cell(fashion, "test accuracy"),
         "", "[recipe](docs/recipe.md)"),
        ("Fashion-MNIST", "`d2l` (`nin_d2l`, the chapter's exact setting)",
         gpu_chapter_cell(), "the chapter's printed runs: 0.834–0.867",
         "[the chapter](docs/chapter.md)"),
        ("MNIST", "`mnist` (`nin_compact`, 2× wide)",
         cell(mnist, "test error", error=True, timed=False), "the paper: 0.47% error",
         "[results](docs/results.md)"),
        ("CIFAR-10", "`cifar10-fast` (`nin_fast`)", cell(cifar, "test accuracy"),
         "the paper: 91.19% (8.81% error), about 300 epochs on a GPU",
         "[results](docs/results.md#cifar-10-in-minutes-on-a-cpu-nin-train-preset-cifar10-fast)"),
    ]  # fmt: skip
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    write_section(
        readme,
        "results",
        f"""
Rendered by `benchmarks/report.py` from the runs committed in `results/`; the page each row links
to gives its commands, machine and every run.

| data set | preset (network) | result | the paper, the chapter | more |
|---|---|---|---|---|
{table}
""",
    )


def write_transcripts(row: dict[str, Any], readme: Path = Path("README.md")) -> None:
    """What `nin train` printed in a committed run, as the README (shortened) and
    docs/training.md (whole) show it: one source, never copied by hand."""
    log = row["log"]
    caption = (
        f"What `nin train` printed in the run saved as `results/{Path(row['run_dir']).parts[1]}/"
        f"{row['name']}.json` (2 CPU cores, no GPU; {row['wall_seconds'] / 60:.1f} min end to "
        "end; `make train` prints the same after setting up `.venv`, with `runs/<time>-compact` "
        "for the folder):"
    )
    short = [*log[:3], "...", *log[-3:]] if len(log) > 7 else log
    for path, lines in ((readme, short), (Path("docs/training.md"), log)):
        body = "\n".join(lines)
        write_section(path, "transcript", f"{caption}\n\n```text\n{body}\n```")
