"""Report: one self-contained HTML page about a run — curves, confusion matrix, per-class
accuracy, the test images it gets wrong, its config and environment.

Every image is an inline base64 PNG and the style sheet is inline: the file opens anywhere,
offline, and can be mailed or attached as it is. The page is templates/report.html, filled in.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from nin.checkpoint import load_checkpoint, read_history
from nin.config import FIX, TrainConfig, saved_config
from nin.data import classes_of, data_name
from nin.device import environment, pick_device, place_model
from nin.errors import NinError
from nin.evaluate import Evaluation, check_input, evaluate
from nin.files import atomic_path, check_out_path, data_uri, figure_png
from nin.images import image_png
from nin.loaders import DeviceLoader, make_loader
from nin.plots import confusion_figure, curves_figure

MAX_MISTAKES = 48  # images in the grid: the most confident mistakes first


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, predictions: bool = False, **here: Any
) -> tuple[dict[str, Any], TrainConfig, DeviceLoader, Evaluation]:
    """A checkpoint evaluated on its test split (`nin eval`, `nin report`): its saved config,
    the settings it ran with now, the test loader and the evaluation.

    The run's own settings, but this machine's device and `here` (those not None) on top, such
    as `data_dir`, `test_subset` or `batch_size`: a GPU run is evaluated on a laptop too.
    """
    model, saved = load_checkpoint(checkpoint)
    config = saved_config({**saved, "device": None}, **here)
    device, _ = pick_device(config.device)
    loader = make_loader(config, "test", device)
    place_model(model, device, config.channels_last)
    check_input(model, loader.prepare(loader.images[:1]), config.model)
    found = evaluate(
        model, loader, saved["num_classes"], config.amp, config.tta, predictions=predictions
    )
    return saved, config, loader, found


def read_template(name: str) -> str:
    """A file of nin/templates."""
    return (resources.files("nin") / "templates" / name).read_text(encoding="utf-8")


def table(rows: list[tuple[str, Any]]) -> str:
    """A two-column HTML table of names and values."""
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def rounded(rows: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Names and values, floats to 4 significant digits."""
    return [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in rows]


def per_class_rows(classes: tuple[str, ...], accs: list[float], totals: list[int]) -> str:
    """Each class's accuracy, with its number of images and a bar."""
    rows = []
    for name, class_acc, total in zip(classes, accs, totals, strict=True):
        bar = f'<div class="bar" style="width:{200 * class_acc:.0f}px"></div>'
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class='num'>{class_acc:.3f}</td>"
            f"<td class='num'>{total}</td><td>{bar}</td></tr>"
        )
    return "".join(rows)


def mistakes(loader: DeviceLoader, found: Evaluation, classes: tuple[str, ...]) -> str:
    """The most confident mistakes, most confident first: figures of the test images with
    their true and predicted class."""
    labels, predicted, confidence = loader.labels.cpu(), found.predicted, found.confidence
    wrong = (predicted != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][:MAX_MISTAKES]
    figures = []
    for i in wrong.tolist():
        src = data_uri(image_png(loader.images[i].cpu(), scale=4))
        figures.append(
            f'<figure><img alt="test image {i}" src="{src}"><figcaption>#{i}<br>'
            f"true: {html.escape(classes[labels[i]])}<br><span class='wrong'>predicted: "
            f"{html.escape(classes[predicted[i]])} ({confidence[i]:.2f})</span>"
            "</figcaption></figure>"
        )
    return "".join(figures)


def curves(run_dir: Path, config: dict[str, Any]) -> str:
    """The training curves and the last epoch's figures, or why there are none."""
    history = read_history(run_dir)
    if not history:
        return "<p>No metrics.jsonl in the run directory: no curves to draw.</p>"
    png = figure_png(curves_figure(history, f"{config['model']}, preset {config['preset']}"))
    last = table(rounded(history[-1].items()))
    return f'<img alt="loss and accuracy per epoch" src="{data_uri(png)}">{last}'


def build_report(run_dir: Path, checkpoint: Path, **here: Any) -> tuple[str, str]:
    """The HTML of the report on run directory `run_dir` with the weights at `checkpoint` (the
    directory: its model.safetensors), evaluated now with `here` on its settings (see
    `evaluate_checkpoint`), and a one-line summary of what it found."""
    config, _, loader, found = evaluate_checkpoint(checkpoint, predictions=True, **here)
    classes, confusion = classes_of(config), found.confusion
    count, wrong = len(loader.labels), len(loader.labels) - int(confusion.trace())
    title = f"{config['model']} on {data_name(config)}"
    if checkpoint.is_file():  # weights other than the run's result, such as last.safetensors
        title += f" ({checkpoint.name})"
    result = ""
    if isinstance(config.get("result"), dict):
        # Per-class figures are in their own section; the scalars go with the config.
        saved = [(k, v) for k, v in config["result"].items() if not isinstance(v, list | dict)]
        result = f"<h3>Result saved by training</h3>{table(rounded(saved))}"
    settings = {k: v for k, v in config.items() if k not in ("environment", "result")}
    page = read_template("report.html").format(
        title=html.escape(title),
        style=read_template("report.css"),
        run=html.escape(str(run_dir)),
        preset=html.escape(str(config["preset"])),
        written=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
        accuracy=found.accuracy,
        count=count,
        wrong=wrong,
        device=loader.device,
        curves=curves(run_dir, config),
        confusion=data_uri(figure_png(confusion_figure(confusion, classes))),
        per_class=per_class_rows(classes, found.per_class, confusion.sum(1).tolist()),
        shown=min(wrong, MAX_MISTAKES),
        figures=mistakes(loader, found, classes),
        config=table(sorted(settings.items())),
        result=result,
        trained=table(sorted(config.get("environment", {}).items())),
        here=table(sorted(environment(loader.device).items())),
    )
    summary = f"{title}: test acc {found.accuracy:.4f} on {count} test images ({wrong} wrong)"
    return page, summary


def write_report(
    run_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    test_subset: int | None = None,
    device: str | None = None,
    force: bool = False,
) -> tuple[Path, str]:
    """Write the report on `run_dir` (default: RUN_DIR/report.html), atomically; return its
    path and a one-line summary. An existing file is replaced only with `force`, never a
    checkpoint."""
    checkpoint = Path(run_dir)
    if not checkpoint.exists():  # not its parent's config.json: a failed run leaves no folder
        raise NinError(f"{checkpoint}: not found (a run that fails before its first checkpoint "
                       f"leaves no directory); {FIX}")  # fmt: skip
    run = checkpoint if checkpoint.is_dir() else checkpoint.parent
    path = Path(out) if out else run / "report.html"
    ours = (".html", b"<!doctype html>")  # what --force may replace: an earlier report
    check_out_path(path, force, ours)  # before the evaluation, and again before the rename
    page, summary = build_report(
        run, checkpoint, data_dir=data_dir, test_subset=test_subset, device=device
    )
    with atomic_path(path, lambda p: check_out_path(p, force, ours)) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path, summary
