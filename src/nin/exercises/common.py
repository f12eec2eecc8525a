"""What the exercises share: their scale, statistics, markdown, training runs, plots and prose."""

from __future__ import annotations

import dataclasses
import re
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nin.config import TrainConfig
from nin.evaluate import evaluate
from nin.files import save_figure
from nin.loaders import make_loader
from nin.models import count_parameters
from nin.plots import figure
from nin.presets import PRESETS
from nin.train import train


@dataclass(frozen=True)
class Scale:
    """How big the experiments are: the model, and (train subset, epochs) per exercise."""

    name: str
    model: str
    resize: int | None
    budgets: dict[str, tuple[int | None, int]]
    # The chapter's network as `model` spells it: no batch norm, a ReLU before global pooling.
    chapter_kwargs: dict[str, Any] = field(default_factory=dict)
    # The recipe for the exercises that compare networks rather than recipes.
    recipe: str = "chapter"
    holdout: int = 5000
    resource_batches: tuple[int, ...] = (1, 128)


SCALES = {
    # Compact NiN at 28×28; subsets and few epochs keep every run near a minute on 2 cores.
    "cpu": Scale(
        name="cpu",
        model="nin_compact",
        resize=None,
        budgets=dict(pointwise=(10000, 4), reduction=(None, 2), tuning=(6000, 4), gap=(10000, 6)),
        chapter_kwargs={"batch_norm": False, "final_relu": True},
        recipe="compact",
    ),
    # The chapter's network, size and epochs; meant for a GPU.
    "full": Scale(
        name="full",
        model="nin_d2l",
        resize=224,
        budgets={name: (None, 10) for name in ("pointwise", "reduction", "tuning", "gap")},
    ),
}


# Each recipe's precision: the chapter's runs in fp32 as the chapter does; the compact preset's
# with its own bfloat16 autocast. Both are channels-last, a memory layout that changes no
# precision (and makes fp32 about 1.3× faster on a CPU). Results saved before the chapter's
# recipe ran in fp32 (2026-11-22) had bfloat16 for both: LEGACY_PRECISION.
BF16 = "bfloat16 autocast, channels-last"
PRECISION = {"chapter": "fp32, channels-last", "compact": BF16}
LEGACY_PRECISION = {"chapter": BF16, "compact": BF16}


@dataclass
class Context:
    """What every exercise gets: the scale, seeds, the data directory and device, a log."""

    scale: Scale
    seeds: int
    data_dir: str | None = None
    device: str | None = None
    log: Callable[[str], None] = print
    # Each recipe's precision as the runs had it (saved with the results; see PRECISION).
    precision: dict[str, str] = field(default_factory=lambda: dict(PRECISION))


# --- Prose ----------------------------------------------------------------------------------

SECTION = re.compile(r"^<!-- (\w+) -->\n", re.MULTILINE)


@cache
def sections(path: Any) -> dict[str, str]:
    """The named sections of a prose template file (a Path or a package resource): each begins
    at its `<!-- NAME -->` line; text before the first one is a note. The benchmarks' templates
    are read by this too."""
    parts = SECTION.split(path.read_text(encoding="utf-8"))[1:]
    return {key: body.rstrip("\n") for key, body in zip(parts[::2], parts[1::2], strict=True)}


def prose(name: str) -> dict[str, str]:
    """The named sections of templates/<name>.md."""
    return sections(files("nin.exercises") / "templates" / f"{name}.md")


def fill(name: str, section: str, **values: Any) -> str:
    """One section of templates/<name>.md, filled in with `str.format`."""
    return prose(name)[section].format(**values)


# --- Statistics and markdown ----------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """'91.23 ± 0.15': mean ± std of accuracies, in percent by default."""
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


ALPHA = 0.05  # the significance level of every "beyond seed noise"


def welch_p(a: list[float], b: list[float]) -> float | None:
    """The two-sided p-value of Welch's t-test between two sets of seeds (None with fewer than
    two seeds on either side, or no spread at all: no estimate of the noise)."""
    if min(len(a), len(b)) < 2 or (statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0):
        return None
    from scipy import stats

    with warnings.catch_warnings():  # one side constant (all at chance): the test still holds
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def differs(a: list[float], b: list[float]) -> bool:
    """Whether two sets of seeds differ by Welch's t-test at level ALPHA."""
    p = welch_p(a, b)
    return p is not None and p < ALPHA


def noise(a: list[float], b: list[float]) -> str:
    """'beyond seed noise (Welch's p = 0.01)', 'within seed noise (p = 0.17)', or why there is
    no telling."""
    p = welch_p(a, b)
    if p is None:
        return "no estimate of the seed noise"
    verdict = "beyond seed noise" if p < ALPHA else "within seed noise"
    return f"{verdict}, Welch's p = {p:.2g}"


def table_rows(rows: list[list[Any]]) -> str:
    """The rows of a markdown table (its header is in the template)."""
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)


def write_up(ctx: Context, exercise: str, recipe: str, rows: list[list[Any]], **values: Any) -> str:
    """templates/<exercise>.md's body filled in, with its scale line and its table's rows."""
    scale = scale_line(ctx, exercise, recipe)
    return fill(exercise, "body", scale=scale, rows=table_rows(rows), **values)


def plural(n: int, word: str) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def scale_line(ctx: Context, exercise: str, recipe: str) -> str:
    """The scale of an exercise's runs, written beside its table."""
    subset, epochs = ctx.scale.budgets[exercise]
    size = f"{ctx.scale.resize}×{ctx.scale.resize}" if ctx.scale.resize else "28×28"
    data = f"the first {subset:,} training images" if subset else "the full training split"
    precision = ctx.precision["chapter" if "chapter" in recipe else "compact"]
    return fill(
        "common", "scale", model=ctx.scale.model, size=size, data=data, recipe=recipe,
        epochs=plural(epochs, "epoch"), seeds=plural(ctx.seeds, "seed"), precision=precision,
    )  # fmt: skip


# --- Training runs --------------------------------------------------------------------------


def recipe_config(ctx: Context, recipe: str, exercise: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig for one run: the chapter's recipe or the compact preset's, at this scale.

    The chapter's recipe is plain SGD at lr 0.1, batch 128, Xavier init, no normalisation, in
    fp32 as the chapter runs it; the compact preset's keeps its bfloat16 (PRECISION). Both are
    channels-last.
    """
    subset, epochs = ctx.scale.budgets[exercise]
    if recipe == "chapter":
        values: dict[str, Any] = dict(init="xavier", model_kwargs=dict(ctx.scale.chapter_kwargs))
    else:
        values = {k: v for k, v in PRESETS["compact"].settings.items() if k != "model"}
    values.update(
        model=ctx.scale.model,
        resize=ctx.scale.resize,
        epochs=epochs,
        train_subset=subset,
        data_dir=ctx.data_dir,
        device=ctx.device,
        amp=PRECISION[recipe] == BF16,
        channels_last=True,
        collapse_steps=0,  # collapses are counted here, not stopped
        stuck_steps=0,
    )
    kwargs = {**values.get("model_kwargs", {}), **overrides.pop("model_kwargs", {})}
    return TrainConfig(**{**values, **overrides, "model_kwargs": kwargs})


def fit(ctx: Context, config: TrainConfig, label: str) -> dict[str, Any]:
    """Train `config` in a scratch directory; return its history, final metrics and model."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(dataclasses.replace(config, out=tmp), log=lambda line: None)
    result["seconds"] = time.perf_counter() - start
    result["parameters"] = count_parameters(result["model"])
    key = "val_acc" if config.holdout else "test_acc"
    ctx.log(
        f"  {label}, seed {config.seed}: loss {result['loss']:.3f}, {key.replace('_', ' ')} "
        f"{result[key]:.4f} ({result['seconds']:.0f} s)"
    )
    return result


def fit_seeds(
    ctx: Context, recipe: str, exercise: str, label: str, kwargs: dict[str, Any]
) -> list[dict[str, Any]]:
    """One run per seed of the same recipe and model keyword arguments."""
    return [
        fit(ctx, recipe_config(ctx, recipe, exercise, seed=seed, model_kwargs=kwargs), label)
        for seed in range(ctx.seeds)
    ]


def per_seed(runs: list[dict[str, Any]], *keys: str) -> dict[str, Any]:
    """The runs' parameter count, and each of `keys` as one value per run (seed)."""
    return {"parameters": runs[0]["parameters"], **{key: [r[key] for r in runs] for key in keys}}


def curves(runs: list[dict[str, Any]]) -> list[list[float]]:
    """Each run's test accuracy per epoch."""
    return [[h["test_acc"] for h in r["history"]] for r in runs]


def split_accuracy(model: nn.Module, config: TrainConfig, split: str) -> float:
    """Accuracy of a trained model on a whole split, in eval mode."""
    device = next(model.parameters()).device
    loader = make_loader(config, split, device)
    num_classes = len(loader.classes)
    return evaluate(model, loader, num_classes, config.amp).accuracy


# --- Plots ----------------------------------------------------------------------------------


def finish_figure(fig: Any, ax: Any, path: Path, title: str = "", legend_size: int = 8) -> None:
    """Grid, legend and title in the house style, then write the PNG."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_mean_curves(
    curves: dict[str, list[list[float]]],
    path: Path,
    title: str = "test accuracy per epoch, mean ± std over seeds",
) -> None:
    """Mean ± std bands over seeds, one line per variant."""
    fig, ax = figure(6.0, 3.6)
    for label, runs in curves.items():
        t = torch.tensor(runs, dtype=torch.float64)
        mean, std = t.mean(0), t.std(0) if len(runs) > 1 else torch.zeros(t.shape[1])
        epochs = range(1, t.shape[1] + 1)
        ax.plot(epochs, mean, marker="o", label=label)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xticks(list(epochs))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    finish_figure(fig, ax, path, title)


def plot_seeds(
    values: dict[str, list[float]], path: Path, title: str = "final test accuracy of each seed"
) -> None:
    """One dot per seed, one column per variant, with the chance level marked."""
    fig, ax = figure(7, 3.4)
    for i, accs in enumerate(values.values()):
        ax.scatter([i] * len(accs), accs, alpha=0.7)
        ax.hlines(mean_std(accs)[0], i - 0.25, i + 0.25, color="black")
    ax.axhline(0.1, color="red", linestyle=":", label="chance (10%)")
    ax.set_xticks(range(len(values)), list(values), fontsize=7)
    ax.set_ylabel("test accuracy")
    finish_figure(fig, ax, path, title)
