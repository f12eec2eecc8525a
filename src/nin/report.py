"""Report: one self-contained HTML page about a run — curves, confusion matrix, per-class
accuracy, the test images it gets wrong, its config and environment.

Every image is an inline base64 PNG and the style sheet is inline: the file opens anywhere,
offline, and can be mailed or attached as it is.
"""

from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from nin.checkpoint import load_checkpoint, read_history
from nin.config import saved_config
from nin.data import classes_of
from nin.device import environment, pick_device, place_model
from nin.evaluate import evaluate
from nin.files import atomic_path, check_out_path, data_uri, figure_png, image_png
from nin.loaders import make_loader
from nin.models import check_input
from nin.plots import confusion_figure, curves_figure

MAX_MISTAKES = 48  # images in the grid: the most confident mistakes first


def predict_test_split(
    run_dir: Path,
    data_dir: str | os.PathLike | None = None,
    test_subset: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate the run's checkpoint on the test split as `nin eval` does, keeping every
    prediction and its confidence."""
    model, saved = load_checkpoint(run_dir)
    # The run's settings, but this machine's device: a GPU run is reported on a laptop too.
    here = dict(data_dir=data_dir, test_subset=test_subset, device=device)
    config = saved_config({**saved, "device": None}, **here)
    chosen, _ = pick_device(config.device)
    loader = make_loader(config, "test", chosen)
    place_model(model, chosen, config.channels_last)
    check_input(model, loader.prepare(loader.images[:1]), config.model)
    found = evaluate(model, loader, saved["num_classes"], config.amp, config.tta, predictions=True)
    return {
        "config": saved,
        "labels": loader.labels.cpu(),
        "predicted": found.predicted,
        "confidence": found.confidence,
        "images": loader.images.cpu(),
        "confusion": found.confusion,
        "per_class": found.per_class,
        "accuracy": found.accuracy,
        "device": chosen,
    }


def table(rows: list[tuple[str, Any]]) -> str:
    """A two-column HTML table of names and values."""
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def per_class_section(classes: tuple[str, ...], accs: list[float], totals: list[int]) -> str:
    """Each class's accuracy, with its number of images and a bar."""
    rows = []
    for name, class_acc, total in zip(classes, accs, totals, strict=True):
        bar = f'<div class="bar" style="width:{200 * class_acc:.0f}px"></div>'
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class='num'>{class_acc:.3f}</td>"
            f"<td class='num'>{total}</td><td>{bar}</td></tr>"
        )
    return (
        '<section id="per-class"><h2>Per-class accuracy</h2><table><tr><th>class</th>'
        f"<th>accuracy</th><th>images</th><th></th></tr>{''.join(rows)}</table></section>"
    )


def mistakes_section(found: dict[str, Any], classes: tuple[str, ...]) -> str:
    """The most confident mistakes, as a grid of the test images with true and predicted class."""
    labels, predicted, confidence = found["labels"], found["predicted"], found["confidence"]
    wrong = (predicted != labels).nonzero().flatten()
    total = len(wrong)
    wrong = wrong[confidence[wrong].argsort(descending=True)][:MAX_MISTAKES]
    figures = []
    for i in wrong.tolist():
        true, guess = classes[labels[i]], classes[predicted[i]]
        src = data_uri(image_png(found["images"][i], scale=4))
        figures.append(
            f'<figure><img alt="test image {i}" src="{src}"><figcaption>#{i}<br>'
            f"true: {html.escape(true)}<br><span class='wrong'>predicted: "
            f"{html.escape(guess)} ({confidence[i]:.2f})</span></figcaption></figure>"
        )
    return (
        f'<section id="mistakes"><h2>Misclassified test images</h2><p>The {len(figures)} most '
        f"confident mistakes of {total}, most confident first.</p>"
        f'<div class="grid">{"".join(figures)}</div></section>'
    )


def build_report(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    test_subset: int | None = None,
    device: str | None = None,
) -> tuple[str, str]:
    """The HTML of the report on `run_dir`, and a one-line summary of what it found."""
    run_dir = Path(run_dir)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    found = predict_test_split(run_dir, data_dir, test_subset, device)
    config, confusion = found["config"], found["confusion"]
    classes = classes_of(config)
    n = len(found["labels"])
    acc = found["accuracy"]
    title = f"{config['model']} on {config['dataset']}"
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">run <code>{html.escape(str(run_dir))}</code>, preset '
        f"{html.escape(str(config['preset']))}; report written "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
        f'<p id="summary"><b>test accuracy {acc:.4f}</b> on {n} test images '
        f"({n - int(confusion.trace())} wrong), evaluated now on {found['device']}.</p>",
    ]

    history = read_history(run_dir)
    parts.append('<div class="row"><section id="curves"><h2>Training curves</h2>')
    if history:
        png = figure_png(curves_figure(history, f"{config['model']}, preset {config['preset']}"))
        parts.append(f'<img alt="loss and accuracy per epoch" src="{data_uri(png)}">')
        last = history[-1]
        parts.append(
            table([(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in last.items()])
        )
    else:
        parts.append("<p>No metrics.jsonl in the run directory: no curves to draw.</p>")
    parts.append("</section>")

    parts.append('<section id="confusion"><h2>Confusion matrix</h2>')
    png = figure_png(confusion_figure(confusion, classes))
    parts.append(f'<img alt="confusion matrix" src="{data_uri(png)}"></section></div>')

    parts.append(per_class_section(classes, found["per_class"], confusion.sum(1).tolist()))
    parts.append(mistakes_section(found, classes))
    settings = {k: v for k, v in config.items() if k not in ("environment", "result")}
    parts.append(f'<section id="config"><h2>Config</h2>{table(sorted(settings.items()))}')
    if isinstance(config.get("result"), dict):
        # Per-class figures are in their own section above; the scalars go here.
        result = [
            (k, f"{v:.4g}" if isinstance(v, float) else v)
            for k, v in config["result"].items()
            if not isinstance(v, list | dict)
        ]
        parts.append(f"<h3>Result saved by training</h3>{table(result)}")
    parts.append("</section>")
    trained = config.get("environment", {})
    now = environment(found["device"])
    parts.append(
        '<section id="environment"><h2>Environment</h2><h3>Where it trained</h3>'
        f"{table(sorted(trained.items()))}<h3>Where this report was made</h3>"
        f"{table(sorted(now.items()))}</section>"
    )
    style = (resources.files("nin") / "templates" / "report.css").read_text(encoding="utf-8")
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>'
        f"{html.escape(title)} — nin report</title><style>{style}</style></head>\n"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    summary = f"{title}: test acc {acc:.4f} on {n} test images ({n - int(confusion.trace())} wrong)"
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
    run = Path(run_dir)
    path = Path(out) if out else (run if run.is_dir() else run.parent) / "report.html"
    check_out_path(path, force)  # before the evaluation, and again before the rename
    page, summary = build_report(run_dir, data_dir, test_subset, device)
    with atomic_path(path, lambda p: check_out_path(p, force)) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path, summary
