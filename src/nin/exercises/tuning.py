"""Exercise 1: tune the hyper-parameters on a validation split, then test the best once."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

from nin.config import TrainConfig
from nin.errors import NinError
from nin.exercises.common import (
    Context,
    finish_figure,
    fit,
    mean_std,
    noise,
    plural,
    pm,
    recipe_config,
    split_accuracy,
    write_up,
)
from nin.plots import figure

TITLE = "Exercise 1: tune the hyper-parameters"

GRID = {
    "lr": (0.05, 0.1, 0.2),
    "batch_size": (64, 256),
    "weight_decay": (0.0, 5e-4),
    "batch_norm": (False, True),
}
CHAPTER_SETTING = {"lr": 0.1, "batch_size": 128, "weight_decay": 0.0, "batch_norm": False}


def describe(setting: dict[str, Any]) -> str:
    """'lr 0.1, batch 128, weight decay 0.0, batch norm off'."""
    return (
        f"lr {setting['lr']}, batch {setting['batch_size']}, weight decay "
        f"{setting['weight_decay']}, batch norm {'on' if setting['batch_norm'] else 'off'}"
    )


def tuning_config(ctx: Context, setting: dict[str, Any], **overrides: Any) -> TrainConfig:
    """The chapter's recipe with one grid setting applied (batch norm through the model)."""
    values = {k: v for k, v in setting.items() if k != "batch_norm"}
    kwargs = {"batch_norm": setting["batch_norm"]}
    return recipe_config(ctx, "chapter", "tuning", model_kwargs=kwargs, **values, **overrides)


def search(ctx: Context) -> list[dict[str, Any]]:
    """Every grid setting on seed 0, scored by its best validation epoch; best first."""
    trials = []
    for values in itertools.product(*GRID.values()):
        setting = dict(zip(GRID, values, strict=True))
        config = tuning_config(ctx, setting, holdout=ctx.scale.holdout)
        try:
            curve = [h["val_acc"] for h in fit(ctx, config, describe(setting))["history"]]
        except NinError as e:  # a diverging setting is a result, not the end of the search
            ctx.log(f"  {describe(setting)}: {e}")
            trials.append({**setting, "val_acc": 0.0, "epochs": 0, "diverged": True})
            continue
        best_epoch = max(range(len(curve)), key=curve.__getitem__) + 1
        trials.append({**setting, "val_acc": curve[best_epoch - 1], "epochs": best_epoch})
    trials.sort(key=lambda t: -t["val_acc"])
    return trials


def run(ctx: Context) -> dict[str, Any]:
    """A grid search on a validation split; the best setting vs the chapter's, tested at the end."""
    trials = search(ctx)
    best = trials[0]
    _, budget = ctx.scale.budgets["tuning"]
    finals: dict[str, list[float]] = {}
    for label, setting, epochs in (
        ("chapter", CHAPTER_SETTING, budget),
        ("best found", {k: best[k] for k in GRID}, best["epochs"]),
    ):
        configs = [
            tuning_config(ctx, setting, holdout=ctx.scale.holdout, epochs=epochs, seed=seed)
            for seed in range(ctx.seeds)
        ]
        finals[label] = [split_accuracy(fit(ctx, c, label)["model"], c, "test") for c in configs]
    return {"trials": trials, "finals": finals}


def render(results: dict[str, Any], ctx: Context) -> str:
    """Exercise 1's write-up: the grid, the final comparison on test, what mattered."""
    trials, finals = results["trials"], results["finals"]
    best = trials[0]
    _, budget = ctx.scale.budgets["tuning"]
    rows = [
        [t["lr"], t["batch_size"], t["weight_decay"], "on" if t["batch_norm"] else "off",
         "diverged" if t.get("diverged") else t["epochs"],
         "—" if t.get("diverged") else f"{t['val_acc'] * 100:.2f}"]
        for t in trials
    ]  # fmt: skip
    chapter_m, best_m = mean_std(finals["chapter"])[0], mean_std(finals["best found"])[0]
    return write_up(
        ctx, "tuning", "the chapter's", rows, holdout=ctx.scale.holdout, settings=len(trials),
        budget=budget,
        seeds=plural(ctx.seeds, "seed"), chapter=describe(CHAPTER_SETTING), best=describe(best),
        chapter_acc=pm(finals["chapter"]), best_acc=pm(finals["best found"]),
        best_epochs=best["epochs"], best_m=best_m * 100, chapter_m=chapter_m * 100,
        gain=(best_m - chapter_m) * 100, noise=noise(finals["chapter"], finals["best found"]),
        effects=marginal_effects(trials),
    )  # fmt: skip


def marginal_effects(trials: list[dict[str, Any]]) -> str:
    """Mean validation accuracy at each value of each hyper-parameter, largest effect first."""
    spreads = []
    for key in GRID:
        values = sorted({t[key] for t in trials})  # the grid that ran, not today's GRID
        means = {v: statistics.fmean(t["val_acc"] for t in trials if t[key] == v) for v in values}
        spread = max(means.values()) - min(means.values())
        levels = ", ".join(f"{v}: {m * 100:.1f}%" for v, m in means.items())
        spreads.append((spread, f"{key.replace('_', ' ')} ({levels})"))
    spreads.sort(reverse=True)
    return "; ".join(text for _, text in spreads)


def plot(results: dict[str, Any], path: Path) -> None:
    """Validation accuracy against learning rate, by batch size and batch norm."""
    trials = results["trials"]
    fig, ax = figure(6.0, 3.6)
    batches = sorted({t["batch_size"] for t in trials})
    for bn, batch in itertools.product((False, True), batches):
        pts = [t for t in trials if t["batch_norm"] == bn and t["batch_size"] == batch]
        ax.scatter(
            [t["lr"] for t in pts],
            [t["val_acc"] for t in pts],
            marker="o" if bn else "x",
            label=f"batch {batch}, batch norm {'on' if bn else 'off'}",
        )
    ax.set_xscale("log")
    rates = sorted({t["lr"] for t in trials})
    ax.set_xticks(rates, [str(r) for r in rates])
    ax.minorticks_off()
    ax.set_xlabel("learning rate")
    ax.set_ylabel("best validation accuracy")
    finish_figure(fig, ax, path, legend_size=7)
