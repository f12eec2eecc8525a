"""Shared by the benchmark scripts: where a run happened, and writing its section of a report.

Each script owns one section of docs/benchmarks.md, between `<!-- begin NAME -->` and
`<!-- end NAME -->`; rerunning a script replaces its section and leaves the others alone.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from nin.device import describe, environment
from nin.files import atomic_path


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
