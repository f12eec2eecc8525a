"""Shared by the benchmark scripts: the one way to run a timed `nin train`, the committed records
of such runs, the stages of a script, report prose from templates/, and the sections it fills.

Each script owns one section of docs/benchmarks.md (or another page), between
`<!-- begin NAME -->` and `<!-- end NAME -->`; rerunning a script replaces its section and leaves
the others alone.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import torch

from nin.config import make_config
from nin.device import describe, environment
from nin.exercises.common import mean_std as mean_and_std
from nin.exercises.common import sections
from nin.files import atomic_path, write_json
from nin.models import model_info

TEMPLATES = Path(__file__).with_name("templates")
POLL = 0.5  # seconds between looks at a running child (its metrics, its deadline)
# What a record keeps of its run's config.json.
FROM_CONFIG = ("model", "model_kwargs", "epochs", "parameters", "result")
# The marks a CIFAR-10 run is timed to: the paper's best accuracy (with augmentation), 93%, 94%.
TARGETS = (0.9119, 0.93, 0.94)


def dropout(model: str, model_kwargs: dict[str, Any]) -> float:
    """A run's dropout: its model kwargs' value, else the model builder's own default."""
    default = inspect.signature(model_info(model).build).parameters["dropout"].default
    return model_kwargs.get("dropout", default)


def read_json(path: Path) -> Any:
    """A JSON file's value (written whole, atomically), or None if there is none."""
    return json.loads(path.read_text()) if path.is_file() else None


def today() -> str:
    """Today's date, as a section's header gives it."""
    return f"{date.today():%Y-%m-%d}"


def script_parser(doc: str, out: str | None = None) -> argparse.ArgumentParser:
    """A script's command line: --data-dir and (OUT given) --out, the page it writes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--data-dir", help="data directory (default: $NIN_DATA_DIR or ~/.cache/nin)"
    )
    if out:
        parser.add_argument("--out", default=out)
    return parser


def machine() -> str:
    """CPU, threads, GPU if any, torch and Python versions, in one line."""
    return describe(environment("cuda" if torch.cuda.is_available() else "cpu"))


def fill(name: str, section: str, **values: Any) -> str:
    """Section SECTION of templates/NAME.md (the text after its `<!-- SECTION -->` line, up to the
    next), filled in with `str.format`; text before the first section is a note."""
    return sections(TEMPLATES / f"{name}.md")[section].format(**values)


def write_section(path: str | Path, name: str, markdown: str) -> None:
    """Put `markdown` between the markers of section `name` in `path`, atomically."""
    path = Path(path)
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    before, _, rest = text.partition(begin)
    if end in rest:
        text = before + block + rest.partition(end)[2]
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# --- Statistics (mean ± std as the exercises compute it) ---------------------------------------


def mean_std(values: list[float], digits: int = 2) -> str:
    """Mean ± sample std (just the mean for one value)."""
    mean, std = mean_and_std(values)
    spread = f" ± {std:.{digits}f}" if len(values) > 1 else ""
    return f"{mean:.{digits}f}{spread}"


def listed(values: Iterable[float], form: str = "{:.2f}") -> str:
    """Each value in FORM, comma-separated."""
    return ", ".join(form.format(v) for v in values)


def t_test(
    a: list[float], b: list[float] | float, alternative: str = "two-sided"
) -> tuple[float, float]:
    """t and p of Welch's test between two samples' means (B a list), or of the one-sample test
    of A's mean against the number B."""
    from scipy import stats  # here: the GPU check imports this file where SciPy may be missing

    if isinstance(b, list):
        test = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    else:
        test = stats.ttest_1samp(a, b, alternative=alternative)
    return float(test.statistic), float(test.pvalue)


# --- Timed runs --------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a JSON-lines file (a line being written is left out)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def run_process(
    command: list[str],
    deadline: float | None = None,
    echo: str | None = "",
    poll: Callable[[], None] | None = None,
    **popen: Any,
) -> tuple[int | None, list[str]]:
    """Run COMMAND in a process group of its own until it ends or `deadline` (time.monotonic());
    each output line kept and, unless `echo` is None, printed after it as it comes; `poll`
    called twice a second and once at the end. Returns the exit status (None if it was killed at
    the deadline) and the output lines."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, **popen,
    )  # fmt: skip
    lines: list[str] = []

    def copy() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if echo is not None:
                print(echo + line, end="", flush=True)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    killed = False
    try:
        while process.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                killed = True
                break
            if poll:
                poll()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(POLL)  # returns as soon as the run ends
    finally:
        if process.poll() is None:  # the deadline, or this script was interrupted
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join(10)
    if poll:
        poll()
    return (None if killed else process.returncode), lines


def run_train(
    args: list[str],
    out: Path,
    deadline: float | None = None,
    echo: str | None = "",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    **popen: Any,
) -> dict[str, Any]:
    """`nin train ARGS --out OUT` in a subprocess (`run_process`), timed from launch to exit.

    The run: `history` (metrics.jsonl, read as it grows; `on_epoch` is called with the run on
    each new epoch), `wall_seconds`, `startup_seconds` (interpreter start-up and imports: the
    part of the wall time the run's own clock misses; while it runs, the least gap between an
    epoch's line being seen and its own time, at most POLL too long), `config` (config.json,
    None if it wrote none), `code` (the exit status, None if killed) and `log` (its output)."""
    run: dict[str, Any] = {"history": [], "startup_seconds": None}
    seen: dict[int, float] = {}  # epoch -> seconds since launch when its line was first read
    start = time.monotonic()

    def poll() -> None:
        rows = read_jsonl(out / "metrics.jsonl")
        if len(rows) > len(run["history"]):
            now = time.monotonic() - start
            for row in rows[len(run["history"]) :]:
                seen.setdefault(row["epoch"], now)
            startup = min(seen[r["epoch"]] - r["elapsed_seconds"] for r in rows)
            run.update(history=rows, wall_seconds=now, startup_seconds=startup)
            if on_epoch:
                on_epoch(run)

    command = [sys.executable, "-m", "nin", "train", *args, "--out", str(out)]
    code, log = run_process(command, deadline, echo, poll, **popen)
    config = read_json(out / "config.json")
    run.update(wall_seconds=time.monotonic() - start, config=config, code=code, log=log)
    if code == 0 and config and "result" in config:
        run["startup_seconds"] = run["wall_seconds"] - config["result"]["wall_seconds"]
    return run


def time_to(row: dict[str, Any], target: float) -> float | None:
    """Seconds from the command's start to the end of the first epoch whose test accuracy (no
    test-time augmentation) reached `target`, else to the end of the run if its final
    evaluation (with it) did; None if neither did."""
    for epoch in row["history"]:
        if epoch.get("test_acc", 0) >= target:
            return (row.get("startup_seconds") or 0) + epoch["elapsed_seconds"]
    final = row.get("result", {}).get("test_acc", 0) >= target
    return row.get("wall_seconds") if final else None


# --- Records and stages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Records:
    """A script's committed runs of `nin train --preset PRESET`, one JSON file each in `folder`
    (its runs' own folders in `folder`/runs)."""

    folder: Path
    preset: str = "compact"

    def load(self, name: str) -> dict[str, Any] | None:
        """A saved run, or None if it has not been run."""
        return read_json(self.folder / f"{name}.json")

    def seeds(self, prefix: str) -> list[dict[str, Any]]:
        """The runs PREFIX-s0, PREFIX-s1, ... in seed order, until one is missing."""
        runs = []
        while row := self.load(f"{prefix}-s{len(runs)}"):
            runs.append(row)
        return runs

    def run(
        self,
        name: str,
        args: list[str],
        data_dir: str | None,
        echo: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`nin train --preset PRESET ARGS` (`run_train`), its record saved here as NAME.json.
        Its output is shown as it comes, or (echo False: runs side by side) its last line at the
        end; EXTRA adds fields to the record (what it was run as)."""
        out = self.folder / "runs" / name
        if out.exists():
            raise SystemExit(f"{out} exists: delete it to run {name} again")
        data = ["--data-dir", data_dir] if data_dir else []
        command = ["nin", "train", "--preset", self.preset, *args]
        run = run_train([*command[2:], *data], out, echo="" if echo else None)
        log, wall, config = run["log"], run["wall_seconds"], run["config"]
        if not echo:
            print(f"{name}: {log[-1] if log else 'no output'} ({wall:.0f} s)", flush=True)
        if run["code"]:  # a run that stopped (diverged, collapsed) is a result too: say why
            config["result"] = {"error": log[-1] if log else "no output", "wall_seconds": wall}
        row = {
            "name": name,
            "command": shlex.join(command),
            "machine": machine(),
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "run_dir": str(out),
            "wall_seconds": wall,
            "startup_seconds": wall - config["result"]["wall_seconds"],
            **{key: config[key] for key in FROM_CONFIG},
            "history": run["history"],
            "log": log,
        } | (extra or {})
        self.save(row)
        return row

    def run_seeds(self, prefix: str, options: list[str], seeds: Iterable[int], args: Any) -> None:
        """PREFIX-sN: OPTIONS --seed N, for each seed N (those in ARGS.only, if it names any)."""
        for seed in seeds:
            if not args.only or str(seed) in args.only:
                self.run(f"{prefix}-s{seed}", [*options, "--seed", str(seed)], args.data_dir)

    def save(self, row: dict[str, Any]) -> None:
        """Write a run's record (again) as its NAME.json."""
        write_json(self.folder / f"{row['name']}.json", row)

    def run_candidates(
        self, candidates: dict[str, list[str]], holdout: int, levels: tuple[int, ...], args: Any
    ) -> None:
        """select-NAME: each candidate's options (those ARGS.only names, if any) trained on all
        but the last HOLDOUT training images, its final weights scored on those at each
        test-time augmentation level (`val_acc_by_tta`); the test split unread."""
        for name, options in candidates.items():
            if args.only and name not in args.only:
                continue
            row = self.run(f"select-{name}", [*options, "--holdout", str(holdout)], args.data_dir)
            row["val_acc_by_tta"] = score_tta_levels(
                row, self.preset, holdout, levels, args.data_dir
            )
            self.save(row)
            print(name, row["val_acc_by_tta"], f"{row['wall_seconds']:.0f} s", flush=True)


def stage_parser(
    doc: str, stages: Iterable[str], out: str, default: list[str] | None = None
) -> argparse.ArgumentParser:
    """The command line of a script in stages: --stages (`report` renders from the records),
    --data-dir and --out, the page it writes."""
    parser = script_parser(doc, out)
    choices = [*stages, "report"]
    parser.add_argument("--stages", nargs="+", default=default or ["report"], choices=choices)
    return parser


def run_stages(
    args: argparse.Namespace,
    stages: dict[str, Callable[[argparse.Namespace], None]],
    report: Callable[[Path], None],
) -> None:
    """The stages named on the command line, in its order; `report` writes ARGS.out."""
    for stage in args.stages:
        if stage == "report":
            report(Path(args.out))
        else:
            stages[stage](args)


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


# --- The README's generated blocks ---------------------------------------------------------------


def gpu_chapter_cell(summary_path: Path = Path("results/gpu-check/summary.json")) -> str:
    """The chapter's setting as `make gpu-check` last measured it (results/gpu-check/)."""
    summary = read_json(summary_path) or {}
    chapter = next((s for s in summary.get("steps", []) if s["name"] == "chapter"), {})
    runs = [r for r in chapter.get("figures", {}).get("runs", []) if r.get("finished")]
    if not runs:
        return "not measured yet: a GPU's job"
    accs = [100 * r["result"]["test_acc"] for r in runs]
    seeds = f"over {len(runs)} seeds" if len(runs) > 1 else "with one seed so far"
    wall = statistics.mean(r["wall_seconds"] for r in runs)
    return fill("readme", "gpu", acc=mean_std(accs, 1), seeds=seeds, wall=wall, gpu=summary["gpu"])


def readme_cell(runs: list[dict[str, Any]], what: str, error: bool = False) -> str:
    """Mean ± std over the seeds; for an error, the worst seed (the bar is per seed) and the GPU
    it trained on; else the wall time (those runs had 2 CPU cores to themselves)."""
    if not runs:
        return "not measured yet"
    values = [100 * r["result"]["test_acc"] for r in runs]
    values = [100 - a for a in values] if error else values
    text = f"**{mean_std(values)}% {what}** over {len(runs)} seeds"
    if not error:
        wall = statistics.mean(r["wall_seconds"] for r in runs) / 60
        return f"{text}, {wall:.1f} min a run end to end on 2 CPU cores"
    text += f" (worst {max(values):.2f}%)"
    gpu = re.search(r"GPU ([^,]+)", runs[0]["machine"])
    return f"{text}, trained on one {gpu[1]}" if gpu else text


def write_readme_results(readme: Path = Path("README.md")) -> None:
    """The README's results table, rendered from the committed runs in results/ (the same data
    as the pages it links to), so no figure is copied by hand."""
    fashion, mnist, cifar = (
        Records(Path("results") / name).seeds("final")
        for name in ("fashion-mnist", "mnist", "cifar10-fast")
    )
    cells = {
        "fashion": readme_cell(fashion, "test accuracy"),
        "chapter": gpu_chapter_cell(),
        "mnist": readme_cell(mnist, "test error", error=True),
        "cifar": readme_cell(cifar, "test accuracy"),
    }
    write_section(readme, "results", fill("readme", "results", **cells))


def write_transcripts(row: dict[str, Any], readme: Path = Path("README.md")) -> None:
    """What `nin train` printed in a committed run, as the README (shortened) and
    docs/training.md (whole) show it: one source, never copied by hand."""
    log = row["log"]
    folder = Path(row["run_dir"]).parts[1]
    caption = fill("readme", "transcript", folder=folder, row=row, minutes=row["wall_seconds"] / 60)
    short = [*log[:3], "...", *log[-3:]] if len(log) > 7 else log
    for path, lines in ((readme, short), (Path("docs/training.md"), log)):
        body = "\n".join(lines)
        write_section(path, "transcript", f"{caption}\n\n```text\n{body}\n```")
