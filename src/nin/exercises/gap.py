"""Idea: global average pooling instead of a dense head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nin.exercises.common import (
    Context,
    curves,
    fit_seeds,
    mean_std,
    noise,
    per_seed,
    plot_mean_curves,
    pm,
    recipe_config,
    split_accuracy,
    write_up,
)

TITLE = "Idea: global average pooling instead of a dense head"

GAP_HEADS = {"global average pooling": {}, "dense": {"head": "dense"}}


def run(ctx: Context) -> dict[str, Any]:
    """Same body, GAP head vs flatten + dense head: parameters and overfitting, over seeds."""
    results = {}
    for label, kwargs in GAP_HEADS.items():
        runs = fit_seeds(ctx, ctx.scale.recipe, "gap", label, kwargs)
        config = recipe_config(ctx, ctx.scale.recipe, "gap")  # the same training images
        r = {**per_seed(runs, "test_acc"), "curves": curves(runs)}
        r["train_acc"] = [split_accuracy(trained["model"], config, "train") for trained in runs]
        r["gap"] = [a - b for a, b in zip(r["train_acc"], r["test_acc"], strict=True)]
        results[label] = r
    return results


def render(results: dict[str, Any], ctx: Context) -> str:
    """The GAP vs dense write-up: parameters, train − test gap, test accuracy."""
    gap_head, dense_head = results["global average pooling"], results["dense"]
    rows = [
        [label, f"{r['parameters']:,}", pm(r["train_acc"]), pm(r["test_acc"]), pm(r["gap"])]
        for label, r in results.items()
    ]
    return write_up(
        ctx, "gap", ctx.scale.recipe, rows,
        added=dense_head["parameters"] - gap_head["parameters"],
        ratio=dense_head["parameters"] / gap_head["parameters"],
        gap_gap=pm(gap_head["gap"]), dense_gap=pm(dense_head["gap"]),
        more=max(results, key=lambda k: mean_std(results[k]["gap"])[0]),
        gap_noise=noise(dense_head["gap"], gap_head["gap"]),
        gap_test=pm(gap_head["test_acc"]), dense_test=pm(dense_head["test_acc"]),
        test_noise=noise(gap_head["test_acc"], dense_head["test_acc"]),
    )  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    """Test accuracy per epoch of both heads, mean ± std over seeds."""
    plot_mean_curves({label: r["curves"] for label, r in results.items()}, path)
