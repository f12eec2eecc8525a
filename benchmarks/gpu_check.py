"""The GPU check (`make gpu-check`): every CUDA path exercised and every GPU figure measured, in
one run of at most 8 minutes on one GPU. `--smoke` runs the same steps with tiny sizes on any
device (80 s on 2 busy CPU cores) and writes nothing into docs/.

Steps, the most valuable first; each keeps its figures as soon as it has them, so a run cut short
still leaves some:

1. chapter: the chapter's setting end to end, `nin train --preset d2l` (10 epochs, all of
   Fashion-MNIST): loss, train and test accuracy, examples/s, wall time, beside the chapter's
   0.368 / 0.865 / 0.834 at 3,376 examples/s. A run that collapses (the chapter's known failure
   at lr 0.1) is counted, and the next seed tried.
2. cuda-tests: `pytest -m cuda tests/test_cuda.py`, every CUDA path through a few steps, checked.
3. speed: the textbook pipeline (PIL resize in 4 DataLoader workers, fp32) against ours: the
   d2l preset as it is (fp32, data on the GPU), then with the fast path (bf16, channels-last) as
   its own row; one epoch each of all 60,000 images, in one process: images/s, the ratio, MFU
   (`benchmarks/gpu_speed.py --check-speed`).
4. cifar10: `nin train --preset cifar10-fast`, timed to 91.19%, 93% and 94% test accuracy; if it
   misses one, a longer run with as many epochs as the time left allows.

Each step runs in subprocesses under a deadline (its share of `--budget`, plus what the steps
before it left unused), so a crash or a hang costs one step, never the run. Each prints one line:
ran, skipped (why) or failed (why). OUT/summary.json holds every figure, rewritten whenever one
arrives, and so are the sections "gpu-check" of docs/benchmarks.md and docs/results.md (with
--smoke: OUT/benchmarks.md and OUT/results.md). `--render` rewrites those sections (and the
README's row of the chapter's setting) from the committed results/gpu-check/summary.json.

    python benchmarks/gpu_check.py [--data-dir DIR] [--out runs/gpu-check] [--budget 480]
    python benchmarks/gpu_check.py --steps speed cifar10   # again, keeping the other steps' figures
    python benchmarks/gpu_check.py --smoke
    python benchmarks/gpu_check.py --render

The data is never downloaded here: a step whose data set is not in DIR is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from report import (
    TARGETS,
    fill,
    machine,
    mean_std,
    read_json,
    run_process,
    run_train,
    script_parser,
    time_to,
    today,
    write_readme_results,
    write_section,
)

from nin.data import DATASETS, data_root
from nin.exercises.common import plural
from nin.files import write_json

REPO = Path(__file__).resolve().parents[1]
SAVED = Path("results/gpu-check/summary.json")  # beside docs/: the figures behind its sections
# The chapter's published run (REFERENCE.md: the Chinese edition, on one GPU).
CHAPTER_SEEDS = (0, 1, 2)  # mean ± std over three, as every result of nin
CHAPTER = {"loss": 0.368, "train_acc": 0.865, "test_acc": 0.834, "examples_per_sec": 3376.1}
MARGIN = 10  # seconds of the budget kept for start-up and the last writes
Record = dict[str, Any]  # one step's record in summary.json


class Check:
    """The check's settings and every step's record; `save` writes them and the docs."""

    def __init__(self, args: argparse.Namespace, cuda: bool) -> None:
        self.out, self.docs = Path(args.out), Path(args.docs)
        self.smoke, self.cuda = args.smoke, cuda
        self.data_dir = data_root(args.data_dir).resolve()
        self.records: dict[str, Record] = {}
        self.started = time.monotonic()
        self.render_failed = False  # the docs could not be written once: the check fails
        self.info = {
            "date": today(),
            "machine": machine() + (f", CUDA {torch.version.cuda}" if cuda else ""),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__,
            "smoke": self.smoke,
            "budget_seconds": args.budget,
        }
        # Every subprocess: this checkout's nin, the data, no buffering.
        python_path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.env = os.environ | {
            "PYTHONPATH": os.pathsep.join(python_path),
            "NIN_DATA_DIR": str(self.data_dir),
            "NIN_TEST_DATA": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
        }

    def run(
        self, command: list[str], log: Path, deadline: float, poll: Callable | None = None
    ) -> tuple[int | None, list[str]]:
        """COMMAND from the repository, its output indented here and kept in LOG, `poll` called
        as it runs; killed at `deadline` (then the exit status is None)."""
        code, lines = run_process(command, deadline, "    ", poll, cwd=REPO, env=self.env)
        write_log(log, lines)
        return code, lines

    def save(self) -> None:
        """Write OUT/summary.json and the docs' sections from the records as they stand."""
        steps = [self.records[s.name] for s in STEPS if s.name in self.records]
        summary = {
            **self.info,
            "seconds": round(time.monotonic() - self.started, 1),
            "steps": steps,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "summary.json", summary)
        if not self.smoke:  # the raw figures behind the docs' sections, committed with them
            write_json(self.docs.parent / SAVED, summary)
        try:
            write_docs(summary, self.out if self.smoke else self.docs, not self.smoke)
        except Exception:  # a bug in the docs must not cost the figures: they are saved
            if not self.render_failed:
                traceback.print_exc()
            self.render_failed = True


def write_docs(summary: dict[str, Any], where: Path, readme: bool) -> None:
    """The sections "gpu-check" of WHERE/benchmarks.md and WHERE/results.md, and (README) the
    README's row of the chapter's setting."""
    for name, title in (("benchmarks.md", "# Benchmarks"), ("results.md", "# Results")):
        if not (where / name).exists():  # a smoke run's own copies
            (where / name).write_text(title + "\n")
    write_section(where / "benchmarks.md", "gpu-check", render_benchmarks(summary))
    write_section(where / "results.md", "gpu-check", render_results(summary))
    if readme:
        write_readme_results(where.parent / "README.md")


def report(page: Path) -> None:
    """The sections "gpu-check" of PAGE's folder (docs/) and the README's row of the chapter's
    setting, from the committed figures beside that folder (`--render`)."""
    write_docs(read_json(page.parent.parent / SAVED), page.parent, True)


def missing_data(check: Check, name: str) -> str:
    """Why data set `name` cannot be read from the data directory without a download ("" if
    it can)."""
    spec = DATASETS[name]
    folder = check.data_dir / (spec.folder or name)
    # Its files as downloaded (the IDX files, or CIFAR-10's archive), or the archive unpacked.
    unpacked = [folder / spec.unpacks_to / f for split in spec.split_files.values() for f in split]
    for files in ([folder / f for f, _ in spec.files.values()], unpacked):
        if files and all(f.is_file() for f in files):
            return ""
    return f"{name} is not in {folder} (the check never downloads: `nin download {name}` first)"


def write_log(path: Path, lines: list[str]) -> None:
    """A child's output, kept for reading after the check."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def last_error(lines: list[str]) -> str:
    """The last `nin: error:` line of a run's output, else its last line."""
    lines = [line.strip() for line in lines if line.strip()]
    errors = [line for line in lines if line.startswith("nin: error:")]
    return (errors or lines or [""])[-1][:400]


def train_run(
    check: Check, args: list[str], run_dir: Path, deadline: float, update: Callable, run: Record
) -> None:
    """`nin train ARGS` (report.run_train) until it ends or `deadline`, filling `run` (already in
    the step's record): its epochs as they come (`update` is called on each), its result at the
    end; its output in RUN_DIR.log."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run.update(
        command=shlex.join(["nin", "train", *args, "--data-dir", "DIR"]),
        history=[],
        finished=False,
        killed=False,
    )

    def on_epoch(live: dict[str, Any]) -> None:
        run.update({k: live[k] for k in ("history", "wall_seconds", "startup_seconds")})
        update()

    args = [*args, "--data-dir", str(check.data_dir)]
    done = run_train(args, run_dir, deadline, "    ", on_epoch, cwd=REPO, env=check.env)
    write_log(run_dir.with_name(f"{run_dir.name}.log"), done["log"])
    run.update(wall_seconds=done["wall_seconds"], killed=done["code"] is None)
    if done["code"] == 0 and "result" in (done["config"] or {}):
        run.update(finished=True, result=done["config"]["result"])
        run["startup_seconds"] = done["startup_seconds"]
    elif done["code"] is not None:
        run["error"] = last_error(done["log"])
    update()


# --- 1. the chapter's setting ------------------------------------------------------------------


def step_chapter(check: Check, record: Record, deadline: float) -> None:
    """`nin train --preset d2l` to the end with seeds 0, 1, 2 while time allows; a collapse
    (the chapter's known failure at lr 0.1) is counted as one of them."""
    if reason := missing_data(check, "fashion-mnist"):
        record.update(status="skipped", why=reason)
        return
    # The smoke: one step of 64 images (the chapter's 224×224 runs ~30 images/s on 2 CPU cores).
    small = ["--train-subset", "64", "--test-subset", "64", "--batch-size", "64", "--epochs", "1"]
    runs: list[Record] = []
    record["figures"] = {"runs": runs}
    for seed in CHAPTER_SEEDS:
        if runs and not enough_time(runs, deadline):
            break
        run: Record = {"seed": seed}
        runs.append(run)
        args = ["--preset", "d2l", "--seed", str(seed), *(small if check.smoke else [])]
        train_run(check, args, check.out / "chapter" / f"seed-{seed}", deadline, check.save, run)
        if run["killed"]:
            break
    finished = [r for r in runs if r["finished"]]
    collapses = [str(r["seed"]) for r in runs if "collapsed" in r.get("error", "")]
    if finished:
        means = chapter_means(finished)
        collapsed = f"; collapsed with seed {', '.join(collapses)}" if collapses else ""
        line = fill("gpu_check", "chapter_line", seeds=plural(len(finished), "seed"), m=means)
        record["why"] = line + collapsed
    elif collapses and len(collapses) == len(runs):
        record["why"] = f"collapsed with every seed tried ({', '.join(collapses)})"
    elif runs[-1]["killed"]:
        epochs = len(runs[-1]["history"])
        why = f"stopped at its deadline after {epochs} epochs (their figures are kept)"
        record.update(status="failed", why=why)
    else:
        record.update(status="failed", why=runs[-1].get("error") or "nin train failed")


def enough_time(runs: list[Record], deadline: float) -> bool:
    """Whether one more run as long as the longest so far ends before `deadline`."""
    longest = max(r.get("wall_seconds", 0.0) for r in runs)
    return time.monotonic() + longest * 1.1 < deadline


def chapter_means(finished: list[Record]) -> dict[str, str]:
    """Each figure of the finished chapter runs as mean ± std over their seeds."""
    results = [r["result"] for r in finished]
    means = {k: mean_std([r[k] for r in results], 3) for k in ("loss", "train_acc", "test_acc")}
    means["examples_per_sec"] = mean_std([r["examples_per_sec"] for r in results], 0)
    means["wall_seconds"] = mean_std([r["wall_seconds"] for r in finished], 0)
    return means


# --- 2. the CUDA tests -------------------------------------------------------------------------


def step_tests(check: Check, record: Record, deadline: float) -> None:
    """`pytest -m cuda tests/test_cuda.py`, each test's outcome read from its JUnit XML."""
    if importlib.util.find_spec("pytest") is None:
        record.update(status="skipped", why="pytest is not installed for this Python")
        return
    xml = check.out / "cuda-tests.xml"
    command = ["-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    if check.cuda and importlib.util.find_spec("xdist"):
        command += ["-n", "4"]  # four tests at a time on the GPU: the step takes half as long
    record["figures"] = {"command": shlex.join(["python", *command])}
    command = [sys.executable, *command, f"--junitxml={xml}"]
    code, _ = check.run(command, check.out / "cuda-tests.log", deadline)
    tests = junit_outcomes(xml) if code is not None else []
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    record["figures"] |= {"tests": tests, "counts": counts}
    bad = [t["name"] for t in tests if t["outcome"] == "failed"]
    text = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    if code is None:
        record.update(status="failed", why="stopped at its deadline (see cuda-tests.log)")
    elif bad:
        record.update(status="failed", why=f"{text}: {', '.join(bad)}")
    elif code != 0 or not tests:
        record.update(status="failed", why=f"pytest exited with {code} (see cuda-tests.log)")
    elif counts["skipped"] == len(tests):
        reasons = sorted({t["message"] for t in tests})
        record["why"] = f"all {len(tests)} skipped: {'; '.join(reasons)}"
    else:
        record["why"] = text


def junit_outcomes(path: Path) -> list[dict[str, str]]:
    """Name, outcome (passed, failed, skipped) and message of each test in a JUnit XML file."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                lines = (child.get("message") or "").splitlines()
                message = lines[0][:300].removeprefix("Skipped: ") if lines else ""
        tests.append({"name": case.get("name", "?"), "outcome": outcome, "message": message})
    return tests


# --- 3. the textbook pipeline against ours -----------------------------------------------------


def step_speed(check: Check, record: Record, deadline: float) -> None:
    """Every pipeline, one epoch each, in one subprocess (gpu_speed.py --check-speed) that saves
    its figures as it goes."""
    if reason := missing_data(check, "fashion-mnist"):
        record.update(status="skipped", why=reason)
        return
    partial = check.out / "speed.json"
    partial.unlink(missing_ok=True)
    script = str(REPO / "benchmarks" / "gpu_speed.py")
    command = [sys.executable, script, "--check-speed", str(partial)]
    command += ["--data-dir", str(check.data_dir), *(["--smoke"] if check.smoke else [])]

    def poll() -> None:
        figures = read_json(partial)
        if figures and figures != record.get("figures"):
            record["figures"] = figures
            check.save()

    code, lines = check.run(command, check.out / "speed.log", deadline, poll)
    figures = record.get("figures") or {}
    ref = figures.get("reference")
    ours, fast = figures.get("ours"), figures.get("fast")
    labelled = (("textbook", ref), ("ours fp32", ours), ("ours bf16", fast))
    parts = [
        f"{label} {run['images_per_sec']:,.0f} images/s"
        + (f" (MFU {mfu(figures, run):.1%})" if mfu(figures, run) is not None else "")
        for label, run in labelled
        if run
    ]
    parts += [
        f"{label} ÷ textbook {run['images_per_sec'] / ref['images_per_sec']:.1f}×"
        for label, run in labelled[1:]
        if ref and run
    ]
    record["why"] = ", ".join(parts)
    if code is None:
        so_far = f" ({record['why']})" if parts else ""
        record.update(status="failed", why=f"stopped at its deadline{so_far}")
    elif code != 0:
        record.update(status="failed", why=last_error(lines))


def mfu(figures: dict[str, Any], run: dict[str, Any]) -> float | None:
    """Model FLOPs utilisation: training FLOPs per image × images/s ÷ the GPU's bf16 peak."""
    peak = figures.get("peak_flops")
    return figures["flops_per_image"] * run["images_per_sec"] / peak if peak else None


# --- 4. CIFAR-10 against the clock -------------------------------------------------------------


def step_cifar(check: Check, record: Record, deadline: float) -> None:
    """The cifar10-fast preset; then, for a target it missed, a longer run that fits the time."""
    if reason := missing_data(check, "cifar10"):
        record.update(status="skipped", why=reason)
        return
    small = ["--train-subset", "1024", "--test-subset", "256"] if check.smoke else []
    runs: list[Record] = []
    record["figures"] = {"runs": runs, "targets": list(TARGETS)}

    def update() -> None:
        for run in runs:  # report.time_to: the epochs so far, then the final evaluation too
            run["time_to"] = {str(t): time_to(run, t) for t in TARGETS}
        check.save()

    preset: Record = {}
    runs.append(preset)
    first = ["--preset", "cifar10-fast", *small, *(["--epochs", "1"] if check.smoke else [])]
    train_run(check, first, check.out / "cifar10" / "preset", deadline, update, preset)
    missed = [t for t in TARGETS if preset["time_to"][str(t)] is None]
    if preset["finished"] and missed:
        if epochs := longer_epochs(check, preset, deadline):
            longer: Record = {}
            runs.append(longer)
            args = ["--preset", "cifar10-fast", *small, "--epochs", str(epochs)]
            train_run(check, args, check.out / "cifar10" / "longer", deadline, update, longer)
        else:
            record["figures"]["longer"] = "no time left for a run longer than the preset's"
    record["why"] = cifar_line(runs)
    if not preset["finished"]:
        why = "stopped at its deadline" if preset["killed"] else preset.get("error", "failed")
        record.update(status="failed", why=f"{why}; {record['why']}")


def longer_epochs(check: Check, preset: Record, deadline: float) -> int:
    """Epochs for the longer run: as many as the preset's per-epoch time fits before the
    deadline (start-up and the final evaluation left room); 0 if no more than the preset's."""
    history = preset["history"]
    done = len(history)
    if check.smoke:
        return done + 1
    per_epoch = (
        (history[-1]["elapsed_seconds"] - history[0]["elapsed_seconds"]) / (done - 1)
        if done > 1
        else history[0]["elapsed_seconds"]
    )
    final = preset["wall_seconds"] - preset["startup_seconds"] - history[-1]["elapsed_seconds"]
    left = deadline - time.monotonic() - preset["startup_seconds"] - final - 10
    epochs = min(200, int(left / per_epoch))
    return epochs if epochs > done else 0


def cifar_line(runs: list[Record]) -> str:
    """Time to each target (the first run that reached it) and each run's final accuracy."""
    parts = []
    for target in TARGETS:
        times = [r["time_to"][str(target)] for r in runs if r.get("time_to", {}).get(str(target))]
        reached = f"in {min(times):.0f} s" if times else "not reached"
        parts.append(f"{target * 100:g}% {reached}")
    finals = [
        f"{r['result']['test_acc']:.2%} after {plural(len(r['history']), 'epoch')}"
        for r in runs
        if r.get("finished")
    ]
    return "; ".join(parts) + (f" (final, with TTA: {', '.join(finals)})" if finals else "")


class Step(NamedTuple):
    """One step of the check: its name, what it measures, its share of the budget, its runner."""

    name: str
    title: str
    share: float  # seconds of the default budget, 8 minutes less MARGIN
    run: Callable[[Check, Record, float], None]


STEPS = [
    # Shares from the first run on one H200 (2026-12-04): chapter 55 s a seed, tests 71 s,
    # speed 30 s, CIFAR-10's preset 11 s (its longer run takes what is left).
    Step("chapter", "the chapter's setting, `--preset d2l`, 10 epochs, 3 seeds", 200, step_chapter),
    Step("cuda-tests", "every CUDA path, `pytest -m cuda`", 110, step_tests),
    Step("speed", "the textbook pipeline vs ours, one epoch each", 60, step_speed),
    Step("cifar10", "CIFAR-10 `cifar10-fast`, time to 91.19% / 93% / 94%", 100, step_cifar),
]


# --- the docs' sections ------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    """'42 s', '3.2 min', or '–'."""
    if value is None:
        return "–"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def outcome(record: Record | None) -> str:
    """'ran', 'skipped: why', 'failed: why', or that the check did not get there."""
    if record is None:
        return "not run: the check ended before this step"
    status, why = record["status"], record.get("why")
    if status == "running":
        return "running when last written (cut short?)"
    return f"{status}: {why}" if why else status


def header(summary: dict[str, Any]) -> str:
    """Who wrote the section, where, and whether it is a measurement."""
    smoke = fill("gpu_check", "smoke" if summary["smoke"] else "measured")
    return fill(
        "gpu_check", "header", date=summary["date"], machine=summary["machine"], smoke=smoke
    )


# The speed table's rows: the key of each pipeline's figures, and what it is.
SPEED_ROWS = {
    "reference": "textbook: PIL resize in 4 DataLoader workers, fp32 (TF32 convolutions), "
    "NCHW, metrics read every batch",
    "ours": "ours: `--preset d2l` as it is (fp32, NCHW), data on the GPU",
    "fast": "ours + the fast path: `--amp --channels-last` (bf16)",
}


def speed_row(speed: dict[str, Any], key: str) -> str:
    """One pipeline's row of the speed table."""
    run, label = speed.get(key), SPEED_ROWS[key]
    if not run:
        return f"| {label} | not measured | | | | | |"
    memory = f"{run['peak_memory'] / 2**30:.2f} GiB" if run["peak_memory"] else "–"
    util = mfu(speed, run)
    return fill(
        "gpu_check", "speed_row", label=label, run=run, memory=memory,
        mfu=f"{util:.1%}" if util is not None else "peak unknown",
        ratio=run["images_per_sec"] / speed["reference"]["images_per_sec"],
    )  # fmt: skip


def render_benchmarks(summary: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md: every step's outcome, the speed table, the tests."""
    records = {r["name"]: r for r in summary["steps"]}
    steps = "\n".join(
        f"| {i}. {s.name}: {records.get(s.name, {}).get('title', s.title)} | "
        f"{outcome(records.get(s.name))} | {seconds(records.get(s.name, {}).get('seconds'))} |"
        for i, s in enumerate(STEPS, 1)
    )
    speed = records.get("speed", {}).get("figures") or {}
    flops = (
        fill("gpu_check", "flops", per_image=speed["flops_per_image"] / 1e9, peak=peak / 1e12)
        if (peak := speed.get("peak_flops"))
        else fill("gpu_check", "flops_unknown")
    )
    tests = records.get("cuda-tests", {}).get("figures") or {}
    test_rows = "\n".join(
        f"| `{t['name']}` | {t['outcome']}{': ' + t['message'] if t['message'] else ''} |"
        for t in tests.get("tests", [])
    )
    return fill(
        "gpu_check", "benchmarks", header=header(summary), steps=steps, flops=flops,
        images=f"{speed['reference']['images']:,}" if speed.get("reference") else "all 60,000",
        speed="\n".join(speed_row(speed, key) for key in SPEED_ROWS),
        command=tests.get("command", "python -m pytest -m cuda tests/test_cuda.py"),
        tests=test_rows or "| not run | |",
    )  # fmt: skip


def chapter_rows(chapter: Record | None) -> list[str]:
    """Our rows of the chapter's table: each seed, then mean ± std over the finished ones."""
    runs = (chapter or {}).get("figures", {}).get("runs", [])
    rows = []
    for run in runs:
        history = run.get("history", [])
        result = run.get("result") or (history[-1] if history else None)
        if "collapsed" in run.get("error", ""):
            rows.append(fill("gpu_check", "collapsed_row", run=run))
        elif result:
            state = "" if run["finished"] else f" (stopped after {len(history)} epochs)"
            wall = seconds(run.get("wall_seconds"))
            rows.append(fill("gpu_check", "seed_row", run=run, state=state, r=result, wall=wall))
    if not rows:
        rows.append(f"| ours | {outcome(chapter)} | | | | | `nin train --preset d2l` |")
    finished = [r for r in runs if r.get("finished")]
    if len(finished) > 1:
        m = chapter_means(finished)
        rows.append(fill("gpu_check", "mean_row", seeds=len(finished), m=m))
    return rows


def cifar_row(run: Record) -> str:
    """One CIFAR-10 run's row: epochs, final accuracy, time to each target, wall time."""
    finished = run.get("finished")
    cells = [
        f"{len(run['history'])}{'' if finished else ' (stopped)'}",
        f"{run['result']['test_acc']:.2%}" if finished else "–",
        *(seconds((run.get("time_to") or {}).get(str(t))) for t in TARGETS),
        seconds(run.get("wall_seconds")),
        f"{run['result']['examples_per_sec']:,.0f}" if finished else "–",
        f"`{run['command']}`",
    ]
    return f"| {' | '.join(cells)} |"


def render_results(summary: dict[str, Any]) -> str:
    """The section of docs/results.md: the chapter's setting and CIFAR-10 time to target."""
    records = {r["name"]: r for r in summary["steps"]}
    chapter, cifar = records.get("chapter"), records.get("cifar10")
    runs = (chapter or {}).get("figures", {}).get("runs", [])
    last = [r for r in runs if r.get("finished")][-1:]
    history = last[0]["history"] if last else []
    epochs = "\n".join(fill("gpu_check", "epoch_row", h=h) for h in history)
    cifar_runs = (cifar or {}).get("figures", {}).get("runs", [])
    cifar_rows = "\n".join(cifar_row(r) for r in cifar_runs if r.get("command"))
    return fill(
        "gpu_check", "results", header=header(summary), chapter_outcome=outcome(chapter),
        book=CHAPTER, ours="\n".join(chapter_rows(chapter)),
        epochs=epochs or "| not measured | | | | |",
        which=f"seed {last[0]['seed']}" if last else "no finished run",
        cifar_outcome=outcome(cifar), cifar=cifar_rows or "| not measured | | | | | | | |",
    )  # fmt: skip


# --- the check ---------------------------------------------------------------------------------


def status_line(step: Step, record: Record) -> str:
    """One line per step: ran / skipped (why) / failed (why), and how long it took."""
    why = f" ({record['why']})" if record.get("why") else ""
    number = f"[{STEPS.index(step) + 1}/{len(STEPS)}]"
    return f"{number} {step.name}: {record['status']}{why} in {record.get('seconds', 0):.0f} s"


def start(args: argparse.Namespace, check: Check, chosen: list[Step]) -> None:
    """Keep the records of the steps not rerun (`--steps`); clear what the chosen ones wrote."""
    previous = read_json(check.out / "summary.json") if args.steps else None
    if previous and previous.get("smoke") == check.smoke:
        check.records = {r["name"]: r for r in previous["steps"] if r["name"] not in args.steps}
    for step in chosen:  # only what this check writes, never the folder itself
        for leftover in (step.name, f"{step.name}.json", f"{step.name}.log", f"{step.name}.xml"):
            path = check.out / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    print(
        f"gpu-check: {len(chosen)} steps, at most {args.budget:.0f} s; "
        f"{check.info['machine']}; data {check.data_dir}",
        flush=True,
    )


def run_step(check: Check, step: Step, deadline: float) -> None:
    """One step under its deadline; whatever it raises fails it, never the check."""
    record = {"name": step.name, "title": step.title, "status": "running", "why": ""}
    check.records[step.name] = record
    check.save()
    began = time.monotonic()
    number = f"[{STEPS.index(step) + 1}/{len(STEPS)}]"
    print(f"{number} {step.name}: {step.title} (deadline in {deadline - began:.0f} s)", flush=True)
    try:
        step.run(check, record, deadline)
    except Exception as e:  # one step's bug must not cost the others
        traceback.print_exc()
        record.update(status="failed", why=f"{type(e).__name__}: {e}")
    if record["status"] == "running":
        record["status"] = "ran"
    record["seconds"] = round(time.monotonic() - began, 1)
    check.save()
    print(status_line(step, record), flush=True)


def run_check(args: argparse.Namespace) -> int:
    """Run the chosen steps in order under their deadlines; 1 if any failed."""
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print(
            "gpu-check: no CUDA device here, so nothing to measure; `make gpu-check SMOKE=1` "
            "(--smoke) checks the script on this machine"
        )
        return 2
    check = Check(args, cuda)
    chosen = [s for s in STEPS if not args.steps or s.name in args.steps]
    start(args, check, chosen)
    # Each deadline adds the step's share of the budget to the one before: what a step leaves
    # unused goes to the next.
    usable = max(args.budget - MARGIN, 0) / sum(s.share for s in chosen)
    deadline = check.started
    for step in chosen:
        deadline += step.share * usable
        run_step(check, step, deadline)
    total = time.monotonic() - check.started
    print(f"\ngpu-check summary ({total:.0f} s in all, budget {args.budget:.0f} s):")
    for step in chosen:
        print("  " + status_line(step, check.records[step.name]))
    where = check.out if check.smoke else check.docs
    print(
        f"figures: {check.out / 'summary.json'}; sections gpu-check of "
        f"{where / 'benchmarks.md'} and {where / 'results.md'}"
    )
    if check.smoke:
        print("smoke run: tiny sizes, nothing measured, nothing written into docs/")
    if check.render_failed:
        print("gpu-check: writing the docs failed (traceback above); summary.json is whole")
    failed = [s for s in chosen if check.records[s.name]["status"] == "failed"]
    return 1 if failed or check.render_failed else 0


def main() -> int:
    """Parse the command line; run the check, or render the docs from the committed figures."""
    parser = script_parser(__doc__)
    parser.add_argument("--out", default="runs/gpu-check", help="default runs/gpu-check")
    parser.add_argument("--docs", default="docs", help="where benchmarks.md and results.md are")
    parser.add_argument("--budget", type=float, default=480, help="seconds in all (default 480)")
    parser.add_argument(
        "--steps",
        nargs="+",
        choices=[s.name for s in STEPS],
        help="run only these, keeping the others' figures",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device, no docs")
    parser.add_argument(
        "--render", action="store_true", help=f"rewrite the docs' sections from {SAVED}"
    )
    args = parser.parse_args()
    if args.render:
        report(Path(args.docs) / "results.md")
        print(f"wrote the gpu-check sections of {args.docs}/ from {SAVED}")
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
