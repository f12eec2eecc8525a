"""The chapter's exercises and ideas, each answered by a measurement (`nin exercises`).

Each exercise is a module with two halves: `run_*` does the experiments and returns plain
results (saved as JSON beside the README), `render_*` turns results into markdown and plots,
filling the prose of templates/<exercise>.md. Every number and every claim in the markdown
comes from the results, and the README is rebuilt from all saved sections, so exercises can be
rerun one at a time (`--rebuild` re-renders without running). The default scale fits 2 CPU
cores; `--full` is the chapter's, for a GPU. Shared helpers live in `common`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
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
    "EXERCISES", "NEEDS_NO_DATA", "SCALES", "Context", "Exercise", "Scale",
    "main_log", "run_exercises", "write_readme",
]  # fmt: skip


@dataclass(frozen=True)
class Exercise:
    """One exercise: its title, the function that runs it, the one that writes it up."""

    title: str
    run: Callable[[Context], dict[str, Any]]
    render: Callable[[dict[str, Any], Context], str]


# In the order of the README: the chapter's ideas, then its exercises.
EXERCISES = {
    "linear": Exercise(linear.TITLE, linear.run_linear, linear.render_linear),
    "gap": Exercise(gap.TITLE, gap.run_gap, gap.render_gap),
    "tuning": Exercise(tuning.TITLE, tuning.run_tuning, tuning.render_tuning),
    "pointwise": Exercise(pointwise.TITLE, pointwise.run_pointwise, pointwise.render_pointwise),
    "resources": Exercise(resources.TITLE, resources.run_resources, resources.render_resources),
    "reduction": Exercise(reduction.TITLE, reduction.run_reduction, reduction.render_reduction),
}
NEEDS_NO_DATA = ("linear", "resources")


def machine(device: str | None) -> str:
    """Where the exercises ran, from `nin.device.environment`: the GPU, or the CPU model and its
    cores; and the torch version."""
    env = environment(pick_device(device)[0])
    where = env.get("gpu") or f"{env['cpu']}, {env['cpu_count']} cores"
    return f"{where}, torch {env['torch']}"


def run_exercises(
    names: list[str],
    out: Path,
    seeds: int = 3,
    full: bool = False,
    data_dir: str | None = None,
    device: str | None = None,
    log: Callable[[str], None] = print,
    rebuild: bool = False,
) -> Path:
    """Run the named exercises (all when empty), save their results, rebuild the README.

    With `rebuild`, nothing runs: the README and plots are rendered again from the saved
    results.
    """
    unknown = [n for n in names if n not in EXERCISES]
    if unknown:
        raise NinError(f"unknown exercise {unknown[0]!r}; choose from: {', '.join(EXERCISES)}")
    if seeds < 1:
        raise NinError(f"--seeds must be at least 1, got {seeds}")
    if rebuild:
        return write_readme(out)
    names = names or list(EXERCISES)
    scale = SCALES["full" if full else "cpu"]
    if any(n not in NEEDS_NO_DATA for n in names):
        load_split("fashion-mnist", "train", data_dir)  # fail now, not after the first exercise
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NinError(f"cannot write to {out} ({e.strerror}); choose --out") from None
    ctx = Context(scale, seeds, out, data_dir, device, log)
    for name in names:
        exercise = EXERCISES[name]
        log(f"nin exercises: {name} ({exercise.title})")
        start = time.perf_counter()
        results = exercise.run(ctx)
        write_json(
            out / f"{name}.json",
            {
                "title": exercise.title,
                "results": results,
                "scale": scale.name,
                "seeds": seeds,
                "precision": PRECISION,
                "command": f"nin exercises {name} --seeds {seeds}" + (" --full" if full else ""),
                "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
                "machine": machine(device),
                "minutes": round((time.perf_counter() - start) / 60, 1),
            },
        )
    return write_readme(out)


def read_sections(out: Path) -> dict[str, dict[str, Any]]:
    """Every exercise's saved results in `out`, in the README's order."""
    sections = {}
    for name in EXERCISES:
        path = out / f"{name}.json"
        if path.exists():
            try:
                sections[name] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise NinError(f"cannot read {path} ({e}); rerun `nin exercises {name}`") from None
    if not sections:
        raise NinError(f"no saved exercise results in {out}; run `nin exercises` first")
    return sections


def write_readme(out: Path) -> Path:
    """Render every saved section in `out` (markdown and plots) into README.md."""
    sections = read_sections(out)
    rows = [
        [s["title"], f"`{s['command']}`", s["date"], s["machine"], s["minutes"]]
        for s in sections.values()
    ]
    text = fill("readme", "header", rows=table_rows(rows))
    for name, s in sections.items():
        try:
            precision = s.get("precision", LEGACY_PRECISION)
            ctx = Context(SCALES[s["scale"]], s["seeds"], out, precision=precision)
            markdown = EXERCISES[name].render(s["results"], ctx)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise NinError(
                f"cannot render {out / (name + '.json')}: its results are incomplete ({e!r}); "
                f"rerun `nin exercises {name}`"
            ) from None
        text += f"\n\n## {s['title']}\n\n{markdown}"
    path = out / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return path


def main_log(line: str) -> None:
    """Progress lines to stderr, so stdout stays the README path."""
    print(line, file=sys.stderr, flush=True)
