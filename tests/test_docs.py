"""The documentation runs as written: its commands, its Python, its notebook, its site.

Every fenced block of README.md and docs/**/*.md is read:
- ```bash: each command line. `nin ...` and `python ...` commands run as written, in order, one
  page at a time, in a fresh directory that holds a copy of examples/ (and links to src/ and
  hubconf.py), so paths are as from the repository's root. A command that must not run here
  (minutes of training, a GPU, a server, the network, a placeholder for your own folder) is in
  SKIP with the reason; every other one must exit 0. `make TARGET` must name a Makefile target.
- ```console: a transcript, `$ command` then its output. The command runs as above and its
  output (stdout and stderr together) must match what is shown: words exactly, numbers to the
  last digit shown (file sizes within 5%; versions and e-notation are free), a line `...`
  standing for any lines; `$ echo $?` checks the previous command's exit status.
  UNCHECKED_OUTPUT lists commands whose output varies by machine: only their exit status counts.
- ```python: each block runs (in the page's directory, after the commands before it), unless
  its first line is in SKIP_PYTHON.

The commands run in one Python process (this file, run as a script): `nin ARGS` is
`nin.cli.main(ARGS)`, the console script's own entry point, and `python FILE ARGS` (or `-m
MODULE`) runs it as __main__. One interpreter start instead of one per command keeps the lot to
well under a minute on an idle 2-core machine.

The notebook, examples/chapter.ipynb, is executed in a Jupyter kernel with its `parameters`
cell made small (skipped where there is no kernel or no real data).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

# Commands shown but not run here, with the reason (exact text, as in the docs).
SKIP = {
    # Training for longer than a few seconds.
    "nin train": "the default preset end to end: minutes (make train does it)",
    "nin train --epochs 3": "three full epochs: over a minute",
    "nin train --epochs 3 --lr 0.1": "three full epochs: over a minute",
    "nin train --preset d2l": "the chapter's setting: hours on a CPU, a GPU's job",
    "nin train --preset cifar10-fast": "14 minutes",
    "nin train --preset mnist": "20 epochs at twice the width: a GPU's job",
    "nin train --preset mnist --holdout 10000": "as above, on a holdout",
    "nin train --epochs 30 --checkpoint-every 200 --out runs/long": "30 epochs",
    "nin train --resume runs/long": "resumes the 30-epoch run above",
    "nin train --config runs/quick/config.json --seed 1 --out runs/quick-seed1 --epochs 1": (
        "a second short training run; the one before it covers training, in a quarter of a minute"
    ),
    "python benchmarks/results.py --data-dir DIR": "hours of training; DIR is the reader's",
    "nin exercises": "all six exercises: half an hour",
    "nin exercises linear gap": "gap trains 3 seeds: minutes",
    "nin exercises --full": "the chapter's scale: a GPU's job",
    # A server, the network, or a placeholder for the reader's own folders.
    "nin serve --model fashion-mnist": "a server: runs until stopped (tests/test_serve.py)",
    "nin download cifar10": "downloads 160 MB where the data is not there",
    "python examples/make_image_folder.py cifar10 my-images --per-class 200 --data-dir DIR": (
        "DIR stands for the reader's data folder"
    ),
    "nin train --data my-images --model nin_fast --epochs 3 --out runs/my-images": (
        "a minute of training, on the folder above"
    ),
    "nin train --data my-images --finetune cifar10 --epochs 3 --out runs/my-images-ft": (
        "fine-tuning on the folder above (tests/test_finetune.py fine-tunes a CIFAR-10 folder)"
    ),
    "nin train --data my-images --finetune cifar10 --epochs 30 --out runs/my-images-ft": (
        "the same, longer"
    ),
    "nin eval runs/my-images-ft": "the run above",
    "nin predict runs/my-images-ft my-images/cat/00000.png": "the run above",
}
# Python blocks not run, by their first line.
SKIP_PYTHON = {
    "nin_block(in_channels, out_channels, kernel_size, stride=1, padding=0,": "a signature",
}
# Transcripts whose output differs from machine to machine: exit status only.
UNCHECKED_OUTPUT = {
    "nin resources nin_d2l --batch-size 1": "measured memory depends on the allocator",
}
RUNNABLE = ("nin", "python")


@dataclass
class Step:
    """One thing to run from a page: a command or a Python block, and what it should give."""

    page: str
    line: int
    kind: str  # "command", "python" or "status" (`echo $?`)
    text: str
    expected: list[str] | None = None  # a transcript's output lines, when checked
    skip: str = ""  # why it is not run

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Outcome:
    status: int
    output: str
    seconds: float
    error: str = ""


@dataclass
class Page:
    name: str
    steps: list[Step] = field(default_factory=list)


def blocks(text: str):
    """(language, first line number, lines) of each fenced block."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^```(\w*)\s*$", lines[i])
        if match:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            yield match.group(1), i + 2, lines[i + 1 : j]
            i = j
        i += 1


def command_lines(lines: list[str], first: int):
    """(line number, command) of a bash block: continuations joined, comments dropped."""
    pending, start = "", first
    for number, line in enumerate(lines, first):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            yield start, shlex.join(words)


def read_page(path: Path) -> Page:
    """The steps of one page, in order."""
    name = str(path.relative_to(REPO))
    page = Page(name)
    for language, first, lines in blocks(path.read_text()):
        if language == "bash":
            for number, command in command_lines(lines, first):
                page.steps.append(Step(name, number, "command", command))
        elif language == "console":
            for number, line in enumerate(lines, first):
                if line.startswith("$ "):
                    command = shlex.join(shlex.split(line[2:], comments=True))
                    kind = "status" if command == "echo '$?'" else "command"
                    page.steps.append(Step(name, number, kind, command, expected=[]))
                elif page.steps and page.steps[-1].expected is not None:
                    page.steps[-1].expected.append(line.rstrip())
        elif language == "python" and lines:
            page.steps.append(Step(name, first, "python", "\n".join(lines)))
    for step in page.steps:
        if step.kind == "python":
            step.skip = SKIP_PYTHON.get(step.text.splitlines()[0], "")
        elif step.kind == "command":
            program = shlex.split(step.text)[0]
            step.skip = SKIP.get(step.text, "")
            if program not in RUNNABLE:
                step.skip = step.skip or f"{program}: not a nin command"
            if step.text in UNCHECKED_OUTPUT and step.expected is not None:
                step.expected = None
    return page


ALL = [read_page(path) for path in PAGES]
STEPS = [step for page in ALL for step in page.steps]


# --- The runner: this file as a script runs the pages' steps and writes their outcomes. ---


def run_step(step: Step) -> Outcome:
    """Run one command or Python block here, capturing what it prints."""
    buffer = io.StringIO()
    start = time.perf_counter()
    status, error = 0, ""
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            if step.kind == "python":
                exec(compile(step.text, step.id, "exec"), {"__name__": "__main__"})
            else:
                words = shlex.split(step.text)
                if words[0] == "nin":
                    from nin.cli import main

                    status = main(words[1:])
                elif words[1] == "-m":  # python -m MODULE ARGS
                    sys.argv = words[2:]
                    runpy.run_module(words[2], run_name="__main__", alter_sys=True)
                else:  # python FILE ARGS
                    sys.argv = words[1:]
                    runpy.run_path(words[1], run_name="__main__")
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # noqa: BLE001 - reported as the step's failure
        status, error = 1, f"{type(e).__name__}: {e}"
    finally:
        sys.argv = argv
    return Outcome(status, buffer.getvalue(), time.perf_counter() - start, error)


if __name__ == "__main__":
    plan = json.loads(Path(sys.argv[1]).read_text())  # [{"dir": ..., "steps": [...]}, ...]
    outcomes = []
    for page in plan:
        os.chdir(page["dir"])
        outcomes.append([asdict(run_step(Step(**s))) for s in page["steps"]])
    Path(sys.argv[2]).write_text(json.dumps(outcomes))
    sys.exit(0)


# --- The tests. ---

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)*(?:e[-+]?\d+)?(?:\+[\w.]+)?")
SIZES = (" B", " kB", " MB", " GB", " KiB", " MiB", " GiB")


def same_line(shown: str, actual: str) -> bool:
    """Words equal; numbers equal to the last digit shown (at most the 6th decimal), file sizes
    within 5%; versions and e-notation free."""
    shown_words, actual_words = NUMBER.split(shown), NUMBER.split(actual)
    if [w.rstrip() for w in shown_words] != [w.rstrip() for w in actual_words]:
        return False
    numbers = zip(NUMBER.findall(shown), NUMBER.findall(actual), shown_words[1:], strict=True)
    for a, b, after in numbers:
        if a == b or a.count(".") > 1 or "e" in a:
            continue
        try:
            x, y = float(a.replace(",", "")), float(b.replace(",", ""))
        except ValueError:
            return False
        if after.startswith(SIZES):
            if abs(x - y) > 0.05 * abs(x):
                return False
        # Full-precision floats (JSON) differ between CPUs past the 6th decimal.
        elif "." not in a or abs(x - y) > 1.5 * 10 ** -min(len(a.split(".")[1]), 6):
            return False
    return True


def matches(shown: list[str], actual: list[str]) -> bool:
    """`shown` equals `actual` line by line, a line `...` matching any number of lines."""
    if not shown:
        return not actual
    if shown[0] == "...":
        return any(matches(shown[1:], actual[i:]) for i in range(len(actual) + 1))
    return bool(actual) and same_line(shown[0], actual[0]) and matches(shown[1:], actual[1:])


@dataclass
class Ran:
    outcomes: dict[str, Outcome]
    have_data: bool


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> Ran:
    """Run every page's steps in one process, each page from a fresh directory."""
    from tests.conftest import SHARED_DATA  # the data_dir fixture's folder; this is per module

    env = dict(os.environ)
    have_data = (SHARED_DATA / "fashion-mnist").is_dir()
    if have_data:
        env["NIN_DATA_DIR"] = str(SHARED_DATA)
    plan, runs = [], []
    for page in ALL:
        steps = [s for s in page.steps if not s.skip and s.kind != "status"]
        if steps:
            work = tmp_path_factory.mktemp("page")
            shutil.copytree(REPO / "examples", work / "examples")
            (work / "src").symlink_to(REPO / "src")
            (work / "hubconf.py").symlink_to(REPO / "hubconf.py")
            plan.append({"dir": str(work), "steps": [asdict(s) for s in steps]})
            runs.append(steps)
    files = tmp_path_factory.mktemp("runner")
    (files / "plan.json").write_text(json.dumps(plan))
    subprocess.run(
        [sys.executable, __file__, str(files / "plan.json"), str(files / "outcomes.json")],
        cwd=files, env=env, timeout=600, check=True,
    )  # fmt: skip
    outcomes = json.loads((files / "outcomes.json").read_text())
    return Ran(
        {
            step.id: Outcome(**outcome)
            for steps, page in zip(runs, outcomes, strict=True)
            for step, outcome in zip(steps, page, strict=True)
        },
        have_data,
    )


@pytest.mark.parametrize("step", [s for s in STEPS if not s.skip], ids=lambda s: s.id)
def test_doc_step_runs_as_written(step: Step, ran: Ran) -> None:
    try:
        check_step(step, ran)
    except AssertionError:
        if not ran.have_data and wanted_data(step, ran):
            pytest.skip("no real data here and no internet to download it (set NIN_TEST_DATA)")
        raise


def check_step(step: Step, ran: Ran) -> None:
    """Assert that `step` ran as its page says: its exit status, and its output if shown."""
    index = STEPS.index(step)
    if step.kind == "status":
        previous = ran.outcomes[STEPS[index - 1].id]
        assert str(previous.status) == step.expected[0], f"{STEPS[index - 1].text}: exit status"
        return
    outcome = ran.outcomes[step.id]
    expected_status = 0
    if index + 1 < len(STEPS) and STEPS[index + 1].kind == "status":
        expected_status = int(STEPS[index + 1].expected[0])
    what = f"{step.id}: {step.text.splitlines()[0]}"
    assert outcome.status == expected_status, f"{what}\n{outcome.error}\n{outcome.output}"
    if step.expected is not None:
        actual = [line.rstrip() for line in outcome.output.rstrip("\n").splitlines()]
        assert matches(step.expected, actual), (
            f"{what}: the output differs from the docs\n--- shown\n"
            + "\n".join(step.expected)
            + "\n--- printed\n"
            + outcome.output
        )


def wanted_data(step: Step, ran: Ran) -> bool:
    """Whether `step`, or one before it on its page (whose run it may read), failed for want
    of a data set it could not download."""
    earlier = [s for s in STEPS[: STEPS.index(step) + 1] if s.page == step.page]
    return any(
        ran.outcomes[s.id].status != 0
        and "download" in ran.outcomes[s.id].output + ran.outcomes[s.id].error
        for s in earlier
        if s.id in ran.outcomes
    )


def test_every_skip_is_still_in_the_docs() -> None:
    commands = {s.text for s in STEPS if s.kind == "command"}
    firsts = {s.text.splitlines()[0] for s in STEPS if s.kind == "python"}
    assert not set(SKIP) - commands, "SKIP names commands the docs no longer have"
    assert not set(SKIP_PYTHON) - firsts
    assert not set(UNCHECKED_OUTPUT) - commands


def test_skipped_nin_commands_parse() -> None:
    """A `nin` command shown but not run still names real subcommands and flags."""
    from nin.cli import build_parser

    for command in SKIP:
        words = shlex.split(command)
        if words[0] == "nin":
            build_parser().parse_args(words[1:])  # a bad flag exits 2: the test fails


def test_make_targets_exist() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for step in STEPS:
        words = shlex.split(step.text) if step.kind == "command" else []
        if words[:1] == ["make"]:
            named = [w for w in words[1:] if "=" not in w] or ["setup"]
            assert set(named) <= targets, f"{step.id}: {step.text}"


def test_readme_python_is_examples_api() -> None:
    """The README's Python is the start of examples/api.py, which a docs step runs."""
    readme = [s for s in STEPS if s.page == "README.md" and s.kind == "python"]
    api = (REPO / "examples" / "api.py").read_text()
    assert readme and all(s.text in api for s in readme)


def test_readme_is_short() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_readme_links_resolve() -> None:
    """The README is read on GitHub and PyPI, outside the site's strict build: its links to
    files must resolve too."""
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text()):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), target


def test_the_notebook_runs(tmp_path, data_dir, monkeypatch) -> None:
    """examples/chapter.ipynb, executed in a Jupyter kernel, on a small subset."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import NoSuchKernel

    notebook = nbformat.read(REPO / "examples" / "chapter.ipynb", as_version=4)
    small = {"TRAIN_SUBSET": 512, "TEST_SUBSET": 256, "EPOCHS": 2}
    (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source = "\n".join(f"{name} = {value}" for name, value in small.items())
    monkeypatch.setenv("NIN_DATA_DIR", str(data_dir))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )  # fmt: skip
    try:
        client.execute()
    except NoSuchKernel as e:
        pytest.skip(f"no Jupyter kernel: {e}")
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert "largest difference" in text and "test accuracy" in text
    assert images, "the live plot showed no figure"
