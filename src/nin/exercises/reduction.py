"""Exercise 4: reduce 384×5×5 to 10×5×5 at once, against gradual heads and two fixes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nin.config import TrainConfig
from nin.exercises.common import (
    Context,
    differs,
    fill,
    fit_seeds,
    mean_std,
    per_seed,
    plot_seeds,
    plural,
    pm,
    recipe_config,
    split_accuracy,
    welch_p,
    write_up,
)
from nin.models import create_model

TITLE = "Exercise 4: reduce 384×5×5 to 10×5×5 at once"

REDUCTIONS = {
    # label -> (model keyword arguments over the chapter's network, what it is)
    "direct": ({}, "the chapter: a 3×3 convolution straight to one channel per class, ReLU, GAP"),
    "gradual": ({"head": "gradual"}, "halve the width at each convolution (C → C/2 → C/4 → 10)"),
    "late": ({"head": "late"}, "the paper's: keep the width, reach 10 at the last 1×1"),
    "dense": ({"head": "dense"}, "flatten + two fully connected layers, no last block or GAP"),
    "no final ReLU": ({"final_relu": False}, "the chapter's block, its last ReLU removed"),
    "batch norm": ({"batch_norm": True}, "the chapter's network with batch normalisation"),
}
CHANCE_BAR = 0.15  # a run below this test accuracy ended at chance (10 classes)


def at_chance(accuracies: list[float]) -> int:
    """How many runs ended at chance: test accuracy below CHANCE_BAR."""
    return sum(a < CHANCE_BAR for a in accuracies)


def dead_class_channels(model: nn.Module, config: TrainConfig) -> int | None:
    """How many class maps are zero on every test image (their ReLU died).

    None when no ReLU comes right before global average pooling (a dense head, or bare
    logits): there is nothing that can die.
    """
    leaves = [m for m in model.modules() if not list(m.children())]
    pools = [i for i, m in enumerate(leaves) if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not pools or not isinstance(leaves[pools[0] - 1], nn.ReLU):
        return None
    seen: list[torch.Tensor] = []
    handle = leaves[pools[0]].register_forward_hook(
        lambda m, args, out: seen.append(args[0].float().amax(dim=(0, 2, 3)))
    )
    try:
        split_accuracy(model, config, "test")
    finally:
        handle.remove()
    return int((torch.stack(seen).amax(0) <= 0).sum())


def run(ctx: Context) -> dict[str, Any]:
    """The chapter's last block vs gradual reductions, a dense head and two fixes, over seeds."""
    results = {}
    for label, (kwargs, _) in REDUCTIONS.items():
        runs = fit_seeds(ctx, "chapter", "reduction", label, kwargs)
        config = recipe_config(ctx, "chapter", "reduction", model_kwargs=kwargs)
        results[label] = per_seed(runs, "test_acc", "loss")
        results[label]["at_chance"] = at_chance(results[label]["test_acc"])
        results[label]["dead_channels"] = [dead_class_channels(r["model"], config) for r in runs]
    return results


def failed(r: dict[str, Any]) -> bool:
    """Whether a last block had a run at chance or a dead class map."""
    return r["at_chance"] > 0 or any(d for d in r["dead_channels"] if d)


def verdict(results: dict[str, Any]) -> tuple[str, list[str]]:
    """Which changes removed the chapter's failures and which beat it beyond seed noise; and
    which of the heads that stay wide until their last 1×1 beat it."""
    chapter = results["direct"]
    chapter_mean = mean_std(chapter["test_acc"])[0]
    clean = [name for name, r in results.items() if name != "direct" and not failed(r)]
    better = [
        name for name in clean
        if differs(results[name]["test_acc"], chapter["test_acc"])
        and mean_std(results[name]["test_acc"])[0] > chapter_mean
    ]  # fmt: skip
    # Each with its Welch p against the chapter's block.
    p = {n: welch_p(results[n]["test_acc"], chapter["test_acc"]) for n in better}
    shown = [f"{n} (p = {p[n]:.2g})" for n in better]
    if failed(chapter):
        names = ", ".join(shown) or "none"
        text = fill("reduction", "failed", clean=", ".join(clean) or "none", better=names)
    else:
        names = "none was better beyond seed noise"
        if better:
            names = "better beyond seed noise: " + ", ".join(shown)
        text = fill("reduction", "not_failed", better=names)
    return text, [label for label in ("gradual", "late") if label in better]


def render(results: dict[str, Any], ctx: Context) -> str:
    """Exercise 4's write-up: accuracy, chance runs and dead class maps per last block."""
    rows = [
        [label, REDUCTIONS[label][1], f"{r['parameters']:,}", pm(r["test_acc"]),
         f"{r['at_chance']} of {len(r['test_acc'])}",
         "— (no ReLU before pooling)" if r["dead_channels"][0] is None
         else " / ".join(map(str, r["dead_channels"]))]
        for label, r in results.items()
    ]  # fmt: skip
    chapter = results["direct"]
    width = create_model(ctx.scale.model)[-3][0].in_channels  # into the last block: 384 or 192
    text, wide_better = verdict(results)
    if wide_better:
        text += " " + fill("reduction", "bottleneck", width=width, heads=", ".join(wide_better))
    return write_up(
        ctx, "reduction", "the chapter's", rows, here="" if width == 384 else f"(here {width}) ",
        ln10=math.log(10), seeds=plural(len(chapter["test_acc"]), "seed"),
        dead=sum(d or 0 for d in chapter["dead_channels"]), at_chance=chapter["at_chance"],
        n=len(chapter["test_acc"]), verdict=text,
    )  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    """Final test accuracy of every seed, one column per last block."""
    plot_seeds({label: r["test_acc"] for label, r in results.items()}, path)
