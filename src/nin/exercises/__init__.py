"""The chapter's exercises and ideas, each answered by a measurement (`nin exercises`).

Each exercise is a module in three parts: `run` does the experiments and returns plain
results, `render` turns results into markdown, filling the prose of templates/<exercise>.md,
and `plot` draws its figure. `nin exercises NAME` prints the answer; with `--write` the results
are saved as JSON beside the README, which is rebuilt from all saved sections, so exercises can
be rerun one at a time (`--rebuild` re-renders without running). Every number and every claim
in the markdown comes from the results. The default scale fits 2 CPU cores; `--full` is the
chapter's, for a GPU. Shared helpers live in `common`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from nin.data import load_split
from nin.device import environment, pick_device
from nin.errors import NinError
from nin.exercises import gap, linear, pointwise, reduction, resources, tuning
from nin.exercises.common import (
    LEGACY_PRECISION,
    PRECISION,
    SCALES,
    Context,
    Scale,
    fill,
    table_rows,
)
from nin.files import atomic_path, write_json

__all__ = [
    "EXERCISES", "NEEDS_NO_DATA", "SCALES", "Context", "Scale",
    "main_log", "render_section", "run_exercises", "write_readme",
]  # fmt: skip


# Each module has its TITLE, `run(ctx)`, `render(results, ctx)` and, where it draws a figure,
# `plot(results, path)`. In the order of the README: the chapter's ideas, then its exercises.
EXERCISES: dict[str, ModuleType] = {
    "linear": linear, "gap": gap, "tuning": tuning, "pointwise": pointwise,
    "resources": resources, "reduction": reduction,
}  # fmt: skip
NEEDS_NO_DATA = ("linear", "resources")


def machine(device: str | None) -> str:
    """Where the exercises ran, from `nin.device.environment`: the GPU, or the CPU model and its
    cores; and the torch version."""
    env = environment(pick_device(device)[0])
    where = env.get("gpu") or f"{env['cpu']}, {env['cpu_count']} cores"
    return f"{where}, torch {env['torch']}"


def run_exercises(
    names: list[str],
    out: Path | None = None,
    seeds: int = 3,
    full: bool = False,
    data_dir: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Run the named exercises (all when empty) and return their answers, one markdown section
    each; with `out`, also save their results there and rebuild its README.md and plots."""
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        raise NinError(f"unknown exercise {unknown[0]!r}; choose from: {', '.join(EXERCISES)}")
    if seeds < 1:
        raise NinError(f"--seeds must be at least 1, got {seeds}")
    names = names or list(EXERCISES)
    scale = SCALES["full" if full else "cpu"]
    if any(n not in NEEDS_NO_DATA for n in names):
        load_split("fashion-mnist", "train", data_dir)  # fail now, not after the first exercise
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NinError(f"cannot write to {out} ({e.strerror}); choose --out") from None
    ctx = Context(scale, seeds, data_dir, device, log)
    answers = []
    for name in names:
        exercise = EXERCISES[name]
        log(f"nin exercises: {name} ({exercise.TITLE})")
        start = time.perf_counter()
        record = {
            "title": exercise.TITLE,
            "results": exercise.run(ctx),
            "scale": scale.name,
            "seeds": seeds,
            "precision": PRECISION,
            "command": f"nin exercises {name} --seeds {seeds}" + (" --full" if full else ""),
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": machine(device),
            "minutes": round((time.perf_counter() - start) / 60, 1),
        }
        if out is not None:  # saved before rendering: a long run is never lost
            write_json(out / f"{name}.json", record)
        answers.append(render_section(name, record))
    if out is not None:
        log(f"nin exercises: wrote {write_readme(out)}")
    return "\n\n".join(answers)


def render_section(name: str, record: dict[str, Any]) -> str:
    """One exercise's answer from its record (as saved): its title and its markdown write-up."""
    precision = record.get("precision", LEGACY_PRECISION)
    ctx = Context(SCALES[record["scale"]], record["seeds"], precision=precision)
    return f"## {record['title']}\n\n{EXERCISES[name].render(record['results'], ctx)}"


def read_sections(out: Path) -> dict[str, dict[str, Any]]:
    """Every exercise's saved results in `out`, in the README's order."""
    sections = {}
    for name in EXERCISES:
        path = out / f"{name}.json"
        if path.exists():
            try:
                sections[name] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise NinError(
                    f"cannot read {path} ({e}); rerun `nin exercises {name} --write`"
                ) from None
    if not sections:
        raise NinError(f"no saved exercise results in {out}; run `nin exercises --write` first")
    return sections


def write_readme(out: Path) -> Path:
    """Render every saved section in `out` into README.md, and draw their plots there."""
    sections = read_sections(out)
    rows = [
        [s["title"], f"`{s['command']}`", s["date"], s["machine"], s["minutes"]]
        for s in sections.values()
    ]
    text = fill("readme", "header", rows=table_rows(rows))
    for name, s in sections.items():
        try:
            text += "\n\n" + render_section(name, s)
            if plot := getattr(EXERCISES[name], "plot", None):
                plot(s["results"], out / f"{name}.png")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise NinError(
                f"cannot render {out / (name + '.json')}: its results are incomplete ({e!r}); "
                f"rerun `nin exercises {name} --write`"
            ) from None
    path = out / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def main_log(line: str) -> None:
    """Progress lines to stderr, so stdout holds only the answers."""
    print(line, file=sys.stderr, flush=True)
