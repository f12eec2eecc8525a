"""Exercise 2: remove a 1×1 convolution from each block (or add one)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from nin.exercises.common import (
    Context,
    curves,
    differs,
    fill,
    fit_seeds,
    mean_std,
    noise,
    per_seed,
    plot_mean_curves,
    pm,
    write_up,
)
from nin.models import create_model, model_info
from nin.resources import format_count, summarize

TITLE = "Exercise 2: remove a 1×1 convolution"


def run(ctx: Context) -> dict[str, Any]:
    """Blocks with 0, 1, 2 (chapter) and 3 pointwise convolutions, trained over seeds."""
    size = model_info(ctx.scale.model).input_size
    if ctx.scale.resize:
        size = (size[0], ctx.scale.resize, ctx.scale.resize)
    variants = {}
    for n in (0, 1, 2, 3):
        kwargs = {"num_pointwise": n}
        runs = fit_seeds(ctx, ctx.scale.recipe, "pointwise", f"{n} pointwise", kwargs)
        model = create_model(ctx.scale.model, **kwargs)
        variants[str(n)] = {
            **per_seed(runs, "test_acc", "loss", "seconds"),
            "flops": sum(r.flops for r in summarize(model, size) if r.depth == 1),
            "curves": curves(runs),
        }
    return {"variants": variants}


def render(results: dict[str, Any], ctx: Context) -> str:
    """Exercise 2's write-up: the table, the curves, and what the numbers say."""
    variants = {int(n): v for n, v in results["variants"].items()}
    acc = {n: v["test_acc"] for n, v in variants.items()}
    loss = {n: mean_std(v["loss"])[0] for n, v in variants.items()}

    def change(a: int, b: int) -> str:
        d = (mean_std(acc[b])[0] - mean_std(acc[a])[0]) * 100
        return f"{d:+.2f} points ({noise(acc[a], acc[b])})"

    best = max(acc, key=lambda n: mean_std(acc[n])[0])
    tied = [n for n in acc if n != best and not differs(acc[n], acc[best])]
    losses = [loss[n] for n in sorted(loss)]
    falling = all(a > b for a, b in itertools.pairwise(losses))
    rows = [
        [f"{n}" + (" (chapter)" if n == 2 else ""), f"{v['parameters']:,}",
         format_count(v["flops"]), pm(v["loss"], 1, 3), pm(v["test_acc"])]
        for n, v in sorted(variants.items())
    ]  # fmt: skip
    return write_up(
        ctx, "pointwise", ctx.scale.recipe, rows,
        norm="batch norm and ReLU" if ctx.scale.recipe == "compact" else "ReLU",
        one=change(2, 1), none=change(2, 0), three=change(2, 3),
        parameters=variants[2]["parameters"] - variants[1]["parameters"],
        flops=format_count(variants[2]["flops"] - variants[1]["flops"]),
        losses=", ".join(f"{x:.3f}" for x in losses),
        trend=fill("pointwise", "falling" if falling else "not_falling"), best=best,
        tied=(
            f", tied within seed noise (Welch's p ≥ 0.05) with {', '.join(map(str, sorted(tied)))}"
            if tied
            else ""
        ),
    )  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    """Test accuracy per epoch of each variant, mean ± std over seeds."""
    variants = sorted((int(n), v) for n, v in results["variants"].items())
    plot_mean_curves({f"{n} × 1×1": v["curves"] for n, v in variants}, path)
