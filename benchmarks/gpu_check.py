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
   (benchmarks/gpu_speed.py's pieces).
4. cifar10: `nin train --preset cifar10-fast`, timed to 91.19%, 93% and 94% test accuracy; if it
   misses one, a longer run with as many epochs as the time left allows.

Each step runs in subprocesses under a deadline (its share of `--budget`, plus what the steps
before it left unused), so a crash or a hang costs one step, never the run. Each prints one line:
ran, skipped (why) or failed (why). OUT/summary.json holds every figure, rewritten whenever one
arrives, and so are the sections "gpu-check" of docs/benchmarks.md and docs/results.md (with
--smoke: OUT/benchmarks.md and OUT/results.md).

    python benchmarks/gpu_check.py [--data-dir DIR] [--out runs/gpu-check] [--budget 480]
    python benchmarks/gpu_check.py --steps speed cifar10   # again, keeping the other steps' figures
    python benchmarks/gpu_check.py --smoke

The data is never downloaded here: a step whose data set is not in DIR is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
from cifar10_fast import TARGETS, time_to
from report import machine, mean_std, write_readme_results, write_section

from nin.data import DATASETS, data_root
from nin.files import write_json

REPO = Path(__file__).resolve().parents[1]
# The chapter's published run (REFERENCE.md: the Chinese edition, on one GPU).
CHAPTER_SEEDS = (0, 1, 2)  # mean ± std over three, as every result of nin
CHAPTER = {"loss": 0.368, "train_acc": 0.865, "test_acc": 0.834, "examples_per_sec": 3376.1}
SPEED_WORKERS = 4  # the textbook pipeline's DataLoader workers, as d2l runs it
POLL = 0.5  # seconds between looks at a running step's files


@dataclass(frozen=True)
class Step:
    """One step of the check: its name, what it measures, its share of the budget, its runner."""

    name: str
    title: str
    share: float  # seconds of the default budget, 8 minutes less MARGIN
    run: Callable[[Check, dict, float], None]


class Check:
    """The run's settings and every step's record, saved (and the docs rendered) on change."""

    def __init__(self, args: argparse.Namespace, cuda: bool) -> None:
        self.out = Path(args.out)
        self.data_dir = data_root(args.data_dir).resolve()
        self.smoke = args.smoke
        self.cuda = cuda
        self.docs = Path(args.docs)
        self.records: dict[str, dict[str, Any]] = {}
        self.started = time.monotonic()
        self.lock = threading.Lock()
        self.render_failed = False  # the docs could not be written once: the check fails
        gpu = torch.cuda.get_device_name() if cuda else None
        self.info = {
            "date": f"{date.today():%Y-%m-%d}",
            "machine": machine() + (f", CUDA {torch.version.cuda}" if cuda else ""),
            "gpu": gpu,
            "torch": torch.__version__,
            "smoke": self.smoke,
            "budget_seconds": args.budget,
        }

    def env(self) -> dict[str, str]:
        """The environment of every subprocess: this checkout's nin, the data, no buffering."""
        env = dict(os.environ)
        paths = [str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["NIN_DATA_DIR"] = env["NIN_TEST_DATA"] = str(self.data_dir)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def save(self) -> None:
        """Write OUT/summary.json and the docs' sections from the records as they stand."""
        with self.lock:
            summary = {
                **self.info,
                "seconds": round(time.monotonic() - self.started, 1),
                "steps": [self.records[s.name] for s in STEPS if s.name in self.records],
            }
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "summary.json", summary)
            if not self.smoke:  # the raw figures behind the docs' sections, committed with them
                write_json(self.docs.parent / "results" / "gpu-check" / "summary.json", summary)
            where = self.out if self.smoke else self.docs
            for name, title in (("benchmarks.md", "# Benchmarks"), ("results.md", "# Results")):
                if not (where / name).exists():  # a smoke run's own copies
                    (where / name).write_text(title + "\n")
            try:
                write_section(where / "benchmarks.md", "gpu-check", render_benchmarks(summary))
                write_section(where / "results.md", "gpu-check", render_results(summary))
                if not self.smoke:  # the README's row of the chapter's setting
                    write_readme_results(self.docs.parent / "README.md")
            except Exception:  # a bug in the docs must not cost the figures: they are saved
                if not self.render_failed:
                    traceback.print_exc()
                self.render_failed = True


def read_json(path: Path) -> Any:
    """A JSON file's value, or None if it is missing or not (yet) whole."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a JSON-lines file (a line being written is left out)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def missing_data(check: Check, name: str) -> str:
    """Why data set `name` cannot be read from the data directory without a download ("" if
    it can)."""
    spec = DATASETS[name]
    folder = check.data_dir / (spec.folder or name)
    if spec.unpacks_to:
        unpacked = folder / spec.unpacks_to
        files = [unpacked / f for split in spec.split_files.values() for f in split]
        if all(f.is_file() for f in files) or (folder / spec.files["archive"][0]).is_file():
            return ""
    elif all((folder / f).is_file() for f, _ in spec.files.values()):
        return ""
    return f"{name} is not in {folder} (the check never downloads: `nin download {name}` first)"


def run_child(
    command: list[str], log_path: Path, deadline: float, env: dict, poll: Callable | None = None
) -> int | None:
    """Run `command` in a process group of its own, its output into `log_path` and, indented,
    onto stdout; call `poll` twice a second; kill the group at `deadline`. Returns the exit
    status, None if it was killed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def copy() -> None:
            for line in process.stdout:
                log.write(line)
                log.flush()
                print("    " + line, end="", flush=True)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        killed = False
        try:
            while process.poll() is None:
                if time.monotonic() >= deadline:
                    killed = True
                    break
                if poll:
                    poll()
                time.sleep(POLL)
        finally:
            if process.poll() is None:  # the deadline, or the check itself was interrupted
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            reader.join(10)
    if poll:
        poll()
    return None if killed else process.returncode


def last_error(log_path: Path) -> str:
    """The last `nin: error:` line of a log, else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text().splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("nin: error:")]
    return (errors or lines or [""])[-1][:400]


def train_run(
    check: Check,
    args: list[str],
    run_dir: Path,
    deadline: float,
    update: Callable[[], None],
    run: dict[str, Any],
) -> None:
    """`nin train ARGS` in a subprocess until it ends or `deadline`, filling `run` (already in
    the step's record): its epochs from metrics.jsonl as they come (`update` is called on each),
    its result from config.json at the end."""
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "nin", "train", *args, "--data-dir", str(check.data_dir)]
    run.update(
        command=shlex.join(["nin", "train", *args, "--data-dir", "DIR"]),
        history=[],
        finished=False,
        killed=False,
    )
    seen: dict[int, float] = {}  # epoch -> seconds since launch when its line was first read
    start = time.monotonic()

    def poll() -> None:
        rows = read_jsonl(run_dir / "metrics.jsonl")
        if len(rows) > len(run["history"]):
            now = time.monotonic() - start
            for row in rows[len(run["history"]) :]:
                seen.setdefault(row["epoch"], now)
            run["history"] = rows
            run["wall_seconds"] = now
            # Start-up (interpreter, imports) until the run's own clock: at most POLL too long.
            run["startup_seconds"] = min(seen[r["epoch"]] - r["elapsed_seconds"] for r in rows)
            update()

    log = run_dir.parent / f"{run_dir.name}.log"
    code = run_child([*command, "--out", str(run_dir)], log, deadline, check.env(), poll)
    run["wall_seconds"] = time.monotonic() - start
    run["killed"] = code is None
    config = read_json(run_dir / "config.json") or {}
    if code == 0 and "result" in config:
        run["finished"] = True
        run["result"] = config["result"]
        run["startup_seconds"] = run["wall_seconds"] - config["result"]["wall_seconds"]
    elif code is not None:
        run["error"] = last_error(log)
    update()


# --- 1. the chapter's setting ------------------------------------------------------------------


def step_chapter(check: Check, record: dict, deadline: float) -> None:
    """`nin train --preset d2l` to the end with seeds 0, 1, 2 while time allows; a collapse
    (the chapter's known failure at lr 0.1) is counted as one of them."""
    if reason := missing_data(check, "fashion-mnist"):
        record.update(status="skipped", why=reason)
        return
    # The smoke: one step of 64 images (the chapter's 224×224 runs ~30 images/s on 2 CPU cores).
    small = ["--train-subset", "64", "--test-subset", "64", "--batch-size", "64", "--epochs", "1"]
    small = small if check.smoke else []
    runs: list[dict[str, Any]] = []
    record["figures"] = {"runs": runs}
    for seed in CHAPTER_SEEDS:
        if runs and not enough_time(runs, deadline):
            break
        run: dict[str, Any] = {"seed": seed}
        runs.append(run)
        args = ["--preset", "d2l", "--seed", str(seed), *small]
        train_run(check, args, check.out / "chapter" / f"seed-{seed}", deadline, check.save, run)
        if run["killed"]:
            break
    finished = [r for r in runs if r["finished"]]
    collapses = [r["seed"] for r in runs if "collapsed" in r.get("error", "")]
    collapsed = f"; collapsed with seed {', '.join(map(str, collapses))}" if collapses else ""
    if finished:
        record["why"] = chapter_line(finished) + collapsed
    elif collapses and len(collapses) == len(runs):
        record["why"] = f"collapsed with every seed tried ({', '.join(map(str, collapses))})"
    elif runs[-1]["killed"]:
        record.update(
            status="failed",
            why=f"stopped at its deadline after "
            f"{len(runs[-1]['history'])} epochs (their figures are kept)",
        )
    else:
        record.update(status="failed", why=runs[-1].get("error") or "nin train failed")


def enough_time(runs: list[dict[str, Any]], deadline: float) -> bool:
    """Whether one more run as long as the longest so far ends before `deadline`."""
    longest = max(r.get("wall_seconds", 0.0) for r in runs)
    return time.monotonic() + longest * 1.1 < deadline


def chapter_means(finished: list[dict[str, Any]]) -> dict[str, str]:
    """Each figure of the finished chapter runs as mean ± std over their seeds."""
    results = [r["result"] for r in finished]
    means = {k: mean_std([r[k] for r in results], 3) for k in ("loss", "train_acc", "test_acc")}
    means["examples_per_sec"] = mean_std([r["examples_per_sec"] for r in results], 0)
    means["wall_seconds"] = mean_std([r["wall_seconds"] for r in finished], 0)
    return means


def chapter_line(finished: list[dict[str, Any]]) -> str:
    """The finished chapter runs in one line: each figure as mean ± std over the seeds."""
    m = chapter_means(finished)
    return (
        f"{plural(len(finished), 'seed')}: loss {m['loss']}, train acc {m['train_acc']}, test "
        f"acc {m['test_acc']}, {m['examples_per_sec']} examples/s, {m['wall_seconds']} s end to "
        "end"
    )


# --- 2. the CUDA tests -------------------------------------------------------------------------


def step_tests(check: Check, record: dict, deadline: float) -> None:
    """`pytest -m cuda tests/test_cuda.py`, each test's outcome read from its JUnit XML."""
    if importlib.util.find_spec("pytest") is None:
        record.update(status="skipped", why="pytest is not installed for this Python")
        return
    xml = check.out / "cuda-tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "cuda",
        "tests/test_cuda.py",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    if check.cuda and importlib.util.find_spec("xdist"):
        command += ["-n", "4"]  # four tests at a time on the GPU: the step takes half as long
    record["figures"] = {"command": shlex.join(["python", "-m", *command[2:]])}
    command.append(f"--junitxml={xml}")
    code = run_child(command, check.out / "cuda-tests.log", deadline, check.env())
    tests = junit_outcomes(xml) if code is not None else []
    record["figures"]["tests"] = tests
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    record["figures"]["counts"] = counts
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


def step_speed(check: Check, record: dict, deadline: float) -> None:
    """Every pipeline, one epoch each, in one subprocess (`--child speed`) that saves as it goes."""
    if reason := missing_data(check, "fashion-mnist"):
        record.update(status="skipped", why=reason)
        return
    partial = check.out / "speed.json"
    partial.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "speed",
        "--out",
        str(check.out),
        "--data-dir",
        str(check.data_dir),
    ]
    if check.smoke:
        command.append("--smoke")
    seen: list[Any] = [None]

    def poll() -> None:
        figures = read_json(partial)
        if figures and figures != seen[0]:
            seen[0] = figures
            record["figures"] = figures
            check.save()

    code = run_child(command, check.out / "speed.log", deadline, check.env(), poll)
    figures = record.get("figures") or {}
    ref, ours, fast = figures.get("reference"), figures.get("ours"), figures.get("fast")
    parts = [
        f"{label} {run['images_per_sec']:,.0f} images/s"
        + (f" (MFU {mfu(figures, run):.1%})" if mfu(figures, run) is not None else "")
        for label, run in (("textbook", ref), ("ours fp32", ours), ("ours bf16", fast))
        if run
    ]
    for label, run in (("ours fp32", ours), ("ours bf16", fast)):
        if ref and run:
            parts.append(f"{label} ÷ textbook {run['images_per_sec'] / ref['images_per_sec']:.1f}×")
    record["why"] = ", ".join(parts)
    if code is None:
        so_far = f" ({record['why']})" if parts else ""
        record.update(status="failed", why=f"stopped at its deadline{so_far}")
    elif code != 0:
        record.update(status="failed", why=last_error(check.out / "speed.log"))


def mfu(figures: dict[str, Any], run: dict[str, Any]) -> float | None:
    """Model FLOPs utilisation: training FLOPs per image × images/s ÷ the GPU's bf16 peak."""
    peak = figures.get("peak_flops")
    return figures["flops_per_image"] * run["images_per_sec"] / peak if peak else None


def child_speed(args: argparse.Namespace) -> None:
    """The speed step's own process: the textbook pipeline, then ours, each saved as it ends."""
    import warnings

    import gpu_speed

    from nin.models import create_model, model_info
    from nin.resources import training_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    subset = 64 if args.smoke else None
    path = Path(args.out) / "speed.json"
    figures: dict[str, Any] = {
        "flops_per_image": training_flops(
            create_model("nin_d2l"), model_info("nin_d2l").input_size
        ),
        "peak_flops": gpu_speed.peak_flops(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "workers": SPEED_WORKERS,
    }

    def keep(name: str, run: dict[str, Any], command: str) -> None:
        figures[name] = {
            "images": run["images"],
            "seconds": run["epoch_seconds"][0],
            "images_per_sec": run["images"] / run["epoch_seconds"][0],
            "test_acc": run["test_acc"],
            "peak_memory": run["peak_memory"],
            "command": command,
        }
        write_json(path, figures)
        print(f"{name}: {figures[name]['images_per_sec']:,.1f} images/s", flush=True)

    # The textbook pipeline's 4 workers are the point, however many cores there are.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    data_dir = args.data_dir
    ref = gpu_speed.reference(data_dir, device, 1, subset, SPEED_WORKERS)
    keep("reference", ref, "`python benchmarks/gpu_check.py --steps speed`")
    small = {"train_subset": subset, "test_subset": subset, "batch_size": subset} if subset else {}
    # The preset as it is (fp32): only the pipeline differs from the reference. Then the fast
    # path on top, its own row, so precision never hides inside the pipeline's ratio.
    for name, extra, flags in (
        ("ours", {}, ""),
        ("fast", {"amp": True, "channels_last": True}, " --amp --channels-last"),
    ):
        run = gpu_speed.ours("d2l", data_dir, device, epochs=1, **extra, **small)
        command = f"`nin train --preset d2l{flags} --epochs 1 --collapse-steps 0 --stuck-steps 0`"
        keep(name, run, command)


# --- 4. CIFAR-10 against the clock -------------------------------------------------------------


def step_cifar(check: Check, record: dict, deadline: float) -> None:
    """The cifar10-fast preset; then, for a target it missed, a longer run that fits the time."""
    if reason := missing_data(check, "cifar10"):
        record.update(status="skipped", why=reason)
        return
    small = ["--train-subset", "1024", "--test-subset", "256"] if check.smoke else []
    runs: list[dict[str, Any]] = []
    record["figures"] = {"runs": runs, "targets": list(TARGETS)}

    def update() -> None:
        for run in runs:
            timed = {
                "history": run.get("history", []),
                "startup_seconds": run.get("startup_seconds", 0),
            }
            run["time_to"] = {str(t): time_to(timed, t) for t in TARGETS}
        check.save()

    preset: dict[str, Any] = {}
    runs.append(preset)
    first = ["--preset", "cifar10-fast", *small, *(["--epochs", "1"] if check.smoke else [])]
    train_run(check, first, check.out / "cifar10" / "preset", deadline, update, preset)
    missed = [t for t in TARGETS if preset["time_to"][str(t)] is None]
    if preset["finished"] and missed:
        epochs = longer_epochs(check, preset, deadline)
        if epochs:
            longer: dict[str, Any] = {}
            runs.append(longer)
            args = ["--preset", "cifar10-fast", *small, "--epochs", str(epochs)]
            train_run(check, args, check.out / "cifar10" / "longer", deadline, update, longer)
        else:
            record["figures"]["longer"] = "no time left for a run longer than the preset's"
    record["why"] = cifar_line(runs)
    if not preset["finished"]:
        why = "stopped at its deadline" if preset["killed"] else preset.get("error", "failed")
        record.update(status="failed", why=f"{why}; {record['why']}")


def longer_epochs(check: Check, preset: dict[str, Any], deadline: float) -> int:
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


def plural(n: int, word: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n} {word}{'s' * (n != 1)}"


def cifar_line(runs: list[dict[str, Any]]) -> str:
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


STEPS = [
    # Shares from the first run on one H200 (2026-12-04): chapter 55 s a seed, tests 71 s,
    # speed 30 s, CIFAR-10's preset 11 s (its longer run takes what is left).
    Step("chapter", "the chapter's setting, `--preset d2l`, 10 epochs, 3 seeds", 200, step_chapter),
    Step("cuda-tests", "every CUDA path, `pytest -m cuda`", 110, step_tests),
    Step("speed", "the textbook pipeline vs ours, one epoch each", 60, step_speed),
    Step("cifar10", "CIFAR-10 `cifar10-fast`, time to 91.19% / 93% / 94%", 100, step_cifar),
]
MARGIN = 10  # seconds of the budget kept for start-up and the last writes


# --- the docs' sections ------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    """'42 s', '3.2 min', or '–'."""
    if value is None:
        return "–"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def outcome(record: dict[str, Any] | None) -> str:
    """'ran', 'skipped: why', 'failed: why', or that the check did not get there."""
    if record is None:
        return "not run: the check ended before this step"
    status, why = record["status"], record.get("why")
    if status == "running":
        return "running when last written (cut short?)"
    return f"{status}: {why}" if why else status


def header(summary: dict[str, Any]) -> str:
    """Who wrote the section, where, and whether it is a measurement."""
    smoke = (
        "**Smoke run (tiny subsets, any device): it checks the script and measures nothing.**"
        if summary["smoke"]
        else "Every figure below was measured; a step rerun alone (`--steps`) replaces only its "
        "own figures, so steps may come from different runs of the check."
    )
    return (
        f"Written by `make gpu-check` (`python benchmarks/gpu_check.py`) on {summary['date']}; "
        f"{summary['machine']}. {smoke} Rerun a step with `python benchmarks/gpu_check.py "
        "--steps NAME`; DIR below is the data directory (`--data-dir`)."
    )


def render_benchmarks(summary: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md: every step's outcome, the speed table, the tests."""
    records = {r["name"]: r for r in summary["steps"]}
    steps = "\n".join(
        f"| {i}. {s.name}: {records.get(s.name, {}).get('title', s.title)} | "
        f"{outcome(records.get(s.name))} | "
        f"{seconds(records.get(s.name, {}).get('seconds'))} |"
        for i, s in enumerate(STEPS, 1)
    )
    speed = records.get("speed", {}).get("figures") or {}
    rows = []
    for key, label in (
        (
            "reference",
            "textbook: PIL resize in 4 DataLoader workers, fp32 (TF32 convolutions), "
            "NCHW, metrics read every batch",
        ),
        ("ours", "ours: `--preset d2l` as it is (fp32, NCHW), data on the GPU"),
        ("fast", "ours + the fast path: `--amp --channels-last` (bf16)"),
    ):
        run = speed.get(key)
        if not run:
            rows.append(f"| {label} | not measured | | | | | |")
            continue
        memory = f"{run['peak_memory'] / 2**30:.2f} GiB" if run["peak_memory"] else "–"
        util = mfu(speed, run)
        base = speed.get("reference", {}).get("images_per_sec")
        rows.append(
            f"| {label} | {run['images_per_sec']:,.0f} | {run['test_acc']:.4f} | {memory} | "
            f"{f'{util:.1%}' if util is not None else 'peak unknown'} | "
            f"{run['images_per_sec'] / base:.1f}× | {run['command']} |"
        )
    flops = (
        f"{speed['flops_per_image'] / 1e9:.2f} GFLOP per training image (FlopCounterMode) × "
        f"images/s ÷ {speed['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16"
        if speed.get("peak_flops")
        else "training FLOPs per image × images/s ÷ the GPU's dense bf16 peak"
    )
    images = f"{speed['reference']['images']:,}" if speed.get("reference") else "all 60,000"
    tests = records.get("cuda-tests", {}).get("figures") or {}
    test_rows = "\n".join(
        f"| `{t['name']}` | {t['outcome']}{': ' + t['message'] if t['message'] else ''} |"
        for t in tests.get("tests", [])
    )
    return f"""## GPU check: every CUDA path, the chapter's run, textbook vs ours, CIFAR-10

{header(summary)}

| step | outcome | wall time |
|---|---|---|
{steps}

### The textbook pipeline vs ours, same GPU, one epoch each

Fashion-MNIST, {images} training images
resized to 224×224, `nin_d2l`, batch 128, lr 0.1; images/s is the wall clock of the epoch,
data loading and preparation included; test accuracy after that one epoch. MFU: {flops}.

| pipeline | images/s | test acc | peak GPU memory | MFU | ÷ textbook | command |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

### Every CUDA path (`{tests.get("command", "python -m pytest -m cuda tests/test_cuda.py")}`)

| test | outcome |
|---|---|
{test_rows or "| not run | |"}
"""


def render_results(summary: dict[str, Any]) -> str:
    """The section of docs/results.md: the chapter's setting and CIFAR-10 time to target."""
    records = {r["name"]: r for r in summary["steps"]}
    chapter = records.get("chapter")
    runs = (chapter or {}).get("figures", {}).get("runs", [])
    ours = []
    for run in runs:
        history = run.get("history", [])
        result = run.get("result") or (history[-1] if history else None)
        if "collapsed" in run.get("error", ""):
            ours.append(
                f"| ours, seed {run['seed']} | collapsed: {run['error']} | | | | | "
                f"`{run['command']}` |"
            )
        elif result:
            state = "" if run["finished"] else f" (stopped after {len(history)} epochs)"
            ours.append(
                f"| ours, seed {run['seed']}{state} | {result['loss']:.3f} | "
                f"{result['train_acc']:.3f} | {result['test_acc']:.3f} | "
                f"{result['examples_per_sec']:,.0f} | {seconds(run.get('wall_seconds'))} | "
                f"`{run['command']}` |"
            )
    if not ours:
        ours.append(f"| ours | {outcome(chapter)} | | | | | `nin train --preset d2l` |")
    finished = [r for r in runs if r.get("finished")]
    if len(finished) > 1:
        m = chapter_means(finished)
        ours.append(
            f"| ours, mean ± std of {len(finished)} seeds | {m['loss']} | {m['train_acc']} | "
            f"{m['test_acc']} | {m['examples_per_sec']} | {m['wall_seconds']} s | |"
        )
    epochs = "\n".join(
        f"| {h['epoch']} | {h['loss']:.3f} | {h['train_acc']:.3f} | {h['test_acc']:.3f} | "
        f"{h['examples_per_sec']:,.0f} |"
        for h in (finished[-1]["history"] if finished else [])
    )
    cifar = records.get("cifar10")
    cifar_runs = (cifar or {}).get("figures", {}).get("runs", [])
    cifar_rows = "\n".join(
        f"| {len(r['history'])}{'' if r.get('finished') else ' (stopped)'} | "
        + (f"{r['result']['test_acc']:.2%}" if r.get("finished") else "–")
        + " | "
        + " | ".join(seconds((r.get("time_to") or {}).get(str(t))) for t in TARGETS)
        + f" | {seconds(r.get('wall_seconds'))} | "
        + (f"{r['result']['examples_per_sec']:,.0f}" if r.get("finished") else "–")
        + f" | `{r['command']}` |"
        for r in cifar_runs
        if r.get("command")
    )
    return f"""## On one GPU: the chapter's setting, and CIFAR-10 against the clock

{header(summary)}

### The chapter's setting (`--preset d2l`: nin_d2l at 224×224, SGD lr 0.1, batch 128, 10 epochs)

Outcome: {outcome(chapter)}. examples/s: training passes only, data preparation included
(the chapter's counter leaves data loading out); wall time: the whole command.

| run | loss | train acc | test acc | examples/s | wall time | command |
|---|---|---|---|---|---|---|
| the chapter (published, one GPU) | {CHAPTER["loss"]} | {CHAPTER["train_acc"]} | {CHAPTER["test_acc"]} | {CHAPTER["examples_per_sec"]:,.0f} | – | d2l's `train_ch6` |
{chr(10).join(ours)}

Epoch by epoch, {f"seed {finished[-1]['seed']}" if finished else "no finished run"}:

| epoch | loss | train acc | test acc | examples/s |
|---|---|---|---|---|
{epochs or "| not measured | | | | |"}

### CIFAR-10, `--preset cifar10-fast`: time to the paper's 91.19%, to 93% and to 94%

Outcome: {outcome(cifar)}. "Time to" is from the command's start to the end of the first epoch
whose test accuracy (without test-time augmentation) reached the target, start-up and the
evaluation after every epoch included; the final accuracy is with test-time augmentation. The
longer run, where there is one, has the epochs the time left allowed.

| epochs | final test acc | to 91.19% | to 93% | to 94% | wall time | images/s | command |
|---|---|---|---|---|---|---|---|
{cifar_rows or "| not measured | | | | | | | |"}
"""  # noqa: E501 (a table row)


# --- the check ---------------------------------------------------------------------------------


def status_line(i: int, step: Step, record: dict[str, Any]) -> str:
    """One line per step: ran / skipped (why) / failed (why), and how long it took."""
    why = record.get("why", "")
    return (
        f"[{i}/{len(STEPS)}] {step.name}: {record['status']}"
        + (f" ({why})" if why else "")
        + f" in {record.get('seconds', 0):.0f} s"
    )


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
    previous = read_json(check.out / "summary.json") if args.steps else None
    if previous and previous.get("smoke") == check.smoke:  # keep the steps not rerun
        check.records = {r["name"]: r for r in previous["steps"] if r["name"] not in args.steps}
    for step in chosen:  # only what this check writes, never the folder itself
        for leftover in (step.name, f"{step.name}.json", f"{step.name}.log", f"{step.name}.xml"):
            path = check.out / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    # Deadlines from the shares of the chosen steps; what a step leaves unused goes to the next.
    usable = max(args.budget - MARGIN, 0) / sum(s.share for s in chosen)
    deadline = check.started
    print(
        f"gpu-check: {len(chosen)} steps, at most {args.budget:.0f} s; "
        f"{check.info['machine']}; data {check.data_dir}",
        flush=True,
    )
    for step in chosen:
        i = STEPS.index(step) + 1
        deadline += step.share * usable
        record = {"name": step.name, "title": step.title, "status": "running", "why": ""}
        check.records[step.name] = record
        check.save()
        began = time.monotonic()
        print(
            f"[{i}/{len(STEPS)}] {step.name}: {step.title} (deadline in {deadline - began:.0f} s)",
            flush=True,
        )
        try:
            step.run(check, record, deadline)
        except Exception as e:  # one step's bug must not cost the others
            traceback.print_exc()
            record.update(status="failed", why=f"{type(e).__name__}: {e}")
        if record["status"] == "running":
            record["status"] = "ran"
        record["seconds"] = round(time.monotonic() - began, 1)
        check.save()
        print(status_line(i, step, record), flush=True)
    total = time.monotonic() - check.started
    print(f"\ngpu-check summary ({total:.0f} s in all, budget {args.budget:.0f} s):")
    for step in chosen:
        print("  " + status_line(STEPS.index(step) + 1, step, check.records[step.name]))
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
    """Parse the command line; run the check, or (internally) one step's own process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", help="data directory (default: $NIN_DATA_DIR or ~/.cache/nin)"
    )
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
    parser.add_argument("--child", choices=["speed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_speed(args)
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
