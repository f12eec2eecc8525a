"""The chapter's exercises and ideas, each answered by a measurement (`nin exercises`).

Each exercise has two halves: `run_*` does the experiments and returns plain results (saved as
JSON beside the README), `render_*` turns results into markdown and plots. Every number and
every claim in the markdown comes from the results, and the README is rebuilt from all saved
sections, so exercises can be rerun one at a time (`--rebuild` re-renders without running).
The default scale fits 2 CPU cores; `--full` is the chapter's, for a GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nin.config import TrainConfig
from nin.data import dataset_spec, load_split, make_loader
from nin.device import cpu_name, pick_device
from nin.errors import NinError
from nin.evaluate import evaluate
from nin.files import atomic_path, save_figure, write_json
from nin.models import count_parameters, create_model, model_info
from nin.presets import PRESETS
from nin.resources import (
    Memory,
    Resources,
    format_bytes,
    format_count,
    format_resources,
    measure_resources,
    summarize,
)
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
        budgets={
            "pointwise": (10000, 4),
            "reduction": (None, 2),
            "tuning": (6000, 4),
            "gap": (10000, 6),
        },
        chapter_kwargs={"batch_norm": False, "final_relu": True},
        recipe="compact",
    ),
    # The chapter's network, size and epochs; meant for a GPU.
    "full": Scale(
        name="full",
        model="nin_d2l",
        resize=224,
        budgets={
            "pointwise": (None, 10),
            "reduction": (None, 10),
            "tuning": (None, 10),
            "gap": (None, 10),
        },
    ),
}


@dataclass
class Context:
    """What every exercise gets: the scale, seeds, where to write plots, the data directory."""

    scale: Scale
    seeds: int
    out: Path
    data_dir: str | None = None
    device: str | None = None
    log: Callable[[str], None] = print


# --- Statistics and markdown ----------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """'91.23 ± 0.15': mean ± std of accuracies, in percent by default."""
    m, s = mean_std(values)
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def differs(a: list[float], b: list[float]) -> bool:
    """Whether two sets of seeds differ by more than twice the standard error of the difference.

    False with fewer than two seeds on either side: one run gives no estimate of the noise.
    """
    if min(len(a), len(b)) < 2:
        return False
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    return abs(ma - mb) > 2 * se


def noise(a: list[float], b: list[float]) -> str:
    """'beyond seed noise', 'within seed noise', or why there is no telling."""
    if min(len(a), len(b)) < 2:
        return "one seed: no estimate of the noise"
    return "beyond seed noise" if differs(a, b) else "within seed noise"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plural(n: int, word: str) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def scale_line(ctx: Context, exercise: str, recipe: str) -> str:
    """The scale of an exercise's runs, written beside its table."""
    subset, epochs = ctx.scale.budgets[exercise]
    data = f"the first {subset:,} training images" if subset else "the full training split"
    size = f"{ctx.scale.resize}×{ctx.scale.resize}" if ctx.scale.resize else "28×28"
    return (
        f"*Scale: {ctx.scale.model} at {size}, {data}, {plural(epochs, 'epoch')}, {recipe} "
        f"recipe, {plural(ctx.seeds, 'seed')}; accuracy on the full 10,000-image test split "
        "unless stated.*"
    )


# --- Training runs --------------------------------------------------------------------------


def recipe_config(ctx: Context, recipe: str, exercise: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig for one run: the chapter's recipe or the compact preset's, at this scale.

    The chapter's recipe is plain SGD at lr 0.1, batch 128, Xavier init, no normalisation; it
    runs here with bfloat16 autocast and channels-last, which change speed, not the method.
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
        amp=True,
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


def split_accuracy(model: nn.Module, config: TrainConfig, split: str) -> float:
    """Accuracy of a trained model on a whole split, in eval mode."""
    device = next(model.parameters()).device
    loader = make_loader(config, split, device)
    num_classes = len(dataset_spec(config.dataset).classes)
    return evaluate(model, loader, num_classes, config.amp).accuracy


# --- Plots ----------------------------------------------------------------------------------


def new_figure(width: float = 6.0, height: float = 3.6) -> tuple[Any, Any]:
    """A matplotlib Figure and its axes, without pyplot (the caller's backend is left alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    return fig, fig.subplots()


def finish_figure(fig: Any, ax: Any, path: Path, title: str = "", legend_size: int = 8) -> None:
    """Grid, legend and title in the house style, then write the PNG."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def plot_mean_curves(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """Mean ± std bands over seeds, one line per variant."""
    fig, ax = new_figure()
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


def plot_seeds(values: dict[str, list[float]], path: Path, title: str) -> None:
    """One dot per seed, one column per variant, with the chance level marked."""
    fig, ax = new_figure(7, 3.4)
    for i, accs in enumerate(values.values()):
        ax.scatter([i] * len(accs), accs, alpha=0.7)
        ax.hlines(mean_std(accs)[0], i - 0.25, i + 0.25, color="black")
    ax.axhline(0.1, color="red", linestyle=":", label="chance (10%)")
    ax.set_xticks(range(len(values)), list(values), fontsize=7)
    ax.set_ylabel("test accuracy")
    finish_figure(fig, ax, path, title)


# --- Exercise 3: resources ------------------------------------------------------------------


def run_resources(ctx: Context) -> dict[str, Any]:
    """Parameters, FLOPs and memory of nin_d2l and the scale's model, at batch 1 and 128."""
    device, _ = pick_device(ctx.device)
    names = ["nin_d2l"] + ([ctx.scale.model] if ctx.scale.model != "nin_d2l" else [])
    reports = []
    for name in names:
        model = create_model(name).to(device)
        for batch_size in ctx.scale.resource_batches:
            ctx.log(f"  {name}, batch {batch_size}")
            report = measure_resources(model, name, model_info(name).input_size, batch_size)
            reports.append(dataclasses.asdict(report))
    largest_conv = max(
        p.numel() * p.element_size() for p in create_model("nin_d2l").parameters() if p.dim() == 4
    )
    return {"reports": reports, "largest_conv_bytes": largest_conv}


def resources_from_dict(d: dict[str, Any]) -> Resources:
    """A Resources report back from its JSON form."""
    return Resources(
        **{
            **d,
            "input_size": tuple(d["input_size"]),
            "layers": [tuple(x) for x in d["layers"]],
            "analytic": Memory(**d["analytic"]),
            "measured": Memory(**d["measured"]) if d["measured"] else None,
        }
    )


def report_label(r: Resources) -> str:
    """'nin_d2l ×128': a report's model and batch size."""
    return f"{r.model} ×{r.batch_size}"


def render_resources(results: dict[str, Any], ctx: Context) -> str:
    """Exercise 3's write-up: a summary table, how memory is counted, why the peaks differ."""
    reports = [resources_from_dict(d) for d in results["reports"]]
    on_gpu = reports[0].device.startswith("cuda")
    rows = [
        [
            report_label(r),
            f"{r.parameters:,}",
            f"{r.forward_flops / 2e9:.4f} G",
            f"{r.training_flops / 1e9:.3f} G",
            format_bytes(r.analytic.training_peak),
            format_bytes(r.measured.training_peak) if r.measured else "not measured",
            format_bytes(r.analytic.inference_peak),
            format_bytes(r.measured.inference_peak) if r.measured else "not measured",
        ]
        for r in reports
    ]
    d2l = reports[0]
    formulas_agree = (d2l.formula_forward_flops, d2l.formula_training_flops) == (
        d2l.forward_flops,
        d2l.training_flops,
    )
    measured = [r for r in reports if r.measured]
    md = [
        table(
            [
                "model × batch",
                "parameters",
                "forward multiply-adds / image",
                "training FLOPs / image",
                "training memory, analytic",
                "measured peak",
                "inference memory, analytic",
                "measured peak",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"nin_d2l at 1×224×224: **{d2l.parameters:,} parameters**, "
        f"**{d2l.forward_flops / 2e9:.3f} G multiply-adds** ({d2l.forward_flops:,} FLOPs) per "
        f"forward pass, counted by `FlopCounterMode`; the per-layer formulas give "
        f"{d2l.formula_forward_flops:,} (forward) and {d2l.formula_training_flops:,} (training): "
        f"{'the same numbers' if formulas_agree else 'different numbers'}. A training step costs "
        f"{d2l.training_flops / d2l.forward_flops:.2f}× the forward pass: the backward pass "
        "computes each layer's input gradient and weight gradient, each as costly as its "
        "forward, and the first layer needs no input gradient.",
        "",
        "How the memory is counted. *Analytic*: weights (and batch-norm buffers), gradients "
        "(one per weight), optimizer state (none for the chapter's plain SGD, one buffer per "
        "weight with momentum, two with Adam) and the activations autograd saves for the "
        "backward pass, walked layer by layer from the output shapes (a convolution keeps its "
        "input; an in-place ReLU keeps the very tensor its convolution wrote, counted once; max "
        "pooling keeps int64 argmax indices; dropout keeps its mask); inference holds the "
        "weights, the input and the largest input + output pair of one layer. *Measured*: "
        "gradients and optimizer state read from the tensors after a real step; saved "
        "activations with a saved-tensors hook on a real forward pass (each storage once, "
        "weights left out); peaks "
        + (
            "with `torch.cuda.max_memory_allocated` around a real training step and a real "
            "inference pass."
            if on_gpu
            else "from the PyTorch profiler's allocation and free events over a real training "
            "step and a real inference pass, in time order, added to what was alive before."
        ),
        "",
    ]
    for r in measured:
        a, m = r.analytic, r.measured
        extra = m.saved_activations - a.saved_activations
        md.append(
            f"- {report_label(r)}: saved activations {format_bytes(a.saved_activations)} "
            f"analytic vs {format_bytes(m.saved_activations)} measured "
            f"({f'{extra:+,} bytes' if extra else 'identical to the byte'}); training peak "
            f"{(m.training_peak - a.training_peak) / a.training_peak:+.1%}, inference peak "
            f"{(m.inference_peak - a.inference_peak) / a.inference_peak:+.1%} measured vs "
            "analytic."
        )
    below = [
        report_label(r) for r in measured if r.measured.training_peak < r.analytic.training_peak
    ]
    above = [
        report_label(r) for r in measured if r.measured.training_peak > r.analytic.training_peak
    ]
    inference_above = all(r.measured.inference_peak > r.analytic.inference_peak for r in measured)
    md += [
        "",
        "Why the peaks differ from the sums. The analytic training figure adds every saved "
        "activation to every gradient as if all were alive at once; the backward pass frees "
        "each saved activation once its layer is done while it allocates the weight gradients, "
        "which pulls the real peak below the sum. It also leaves out temporaries, which push "
        "the peak above it: the gradient of the activation being back-propagated and the "
        "convolution library's buffers"
        + (
            f" — on the CPU, oneDNN's reorders: a convolution copies its weights (nin_d2l's "
            f"largest: {format_bytes(results['largest_conv_bytes'])}) and often its input or "
            "output into its blocked memory layout on each call"
            if not on_gpu
            else ""
        )
        + ". Measured below analytic: "
        + (", ".join(below) or "none")
        + "; above: "
        + (", ".join(above) or "none")
        + ". "
        + (
            "Every measured inference peak sits above weights + largest live activations, "
            "the same temporaries at work."
            if measured and inference_above
            else ""
        ),
        "",
        "Share of the analytic training memory held by saved activations: "
        + ", ".join(
            f"{report_label(r)} {r.analytic.saved_activations / r.analytic.training_peak:.0%}"
            for r in reports
        )
        + ". The batch size multiplies the activations and leaves weights, gradients and "
        "optimizer state alone.",
        "",
        "<details><summary>Full reports (`nin resources`)</summary>",
        "",
        "```",
        "\n\n".join(format_resources(r) for r in reports),
        "```",
        "</details>",
        "",
        "![memory](resources.png)",
    ]
    plot_resources(reports, ctx.out / "resources.png")
    return "\n".join(md)


def plot_resources(reports: list[Resources], path: Path) -> None:
    """Per model and batch size: the analytic parts stacked, beside the measured peak."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4), dpi=120)
    axes = fig.subplots(1, len(reports))
    parts = ("weights", "gradients", "optimizer_state", "saved_activations")
    for ax, r in zip(axes, reports, strict=True):
        bottom = 0.0
        for part in parts:
            value = getattr(r.analytic, part) / 2**20
            ax.bar(0, value, 0.6, bottom=bottom, label=part.replace("_", " "))
            bottom += value
        if r.measured:
            ax.bar(1, r.measured.training_peak / 2**20, 0.6, color="gray", label="measured peak")
        ax.set_xticks([0, 1], ["analytic", "measured"], fontsize=7)
        ax.set_title(report_label(r), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].set_ylabel("training memory, MiB")
    axes[0].legend(fontsize=6)
    save_figure(fig, path)


# --- Exercise 2: remove a 1×1 convolution ---------------------------------------------------


def run_pointwise(ctx: Context) -> dict[str, Any]:
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
            "parameters": runs[0]["parameters"],
            "flops": sum(r.flops for r in summarize(model, size) if r.depth == 1),
            "test_acc": [r["test_acc"] for r in runs],
            "loss": [r["loss"] for r in runs],
            "curves": [[h["test_acc"] for h in r["history"]] for r in runs],
            "seconds": [r["seconds"] for r in runs],
        }
    return {"variants": variants}


def render_pointwise(results: dict[str, Any], ctx: Context) -> str:
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
    norm = "batch norm and ReLU" if ctx.scale.recipe == "compact" else "ReLU"
    rows = [
        [f"{n}" + (" (chapter)" if n == 2 else ""), f"{v['parameters']:,}",
         format_count(v["flops"]), pm(v["loss"], 1, 3), pm(v["test_acc"])]
        for n, v in sorted(variants.items())
    ]  # fmt: skip
    md = [
        scale_line(ctx, "pointwise", ctx.scale.recipe),
        "",
        table(
            [
                "1×1 convolutions per block",
                "parameters",
                "forward FLOPs / image",
                "final train loss",
                "test accuracy (%)",
            ],
            rows,
        ),  # fmt: skip
        "",
        "![test accuracy per epoch](pointwise.png)",
        "",
        "Each 1×1 convolution is a fully connected layer applied at every pixel; inside a block "
        f"each is followed by {norm}, so it mixes channels and adds a non-linearity without "
        "touching the spatial layout. Going from the chapter's two to one changes test "
        f"accuracy by {change(2, 1)}; to none (each block a single convolution, a plain CNN "
        f"layer) by {change(2, 0)}; a third adds {change(2, 3)}. The chapter's second 1×1 "
        f"convolutions cost {variants[2]['parameters'] - variants[1]['parameters']:,} "
        f"parameters and {format_count(variants[2]['flops'] - variants[1]['flops'])}FLOPs per "
        "image in all. Final training loss for 0, 1, 2, 3: "
        + ", ".join(f"{x:.3f}" for x in losses)
        + (
            " — falling with every added 1×1 convolution: the extra per-pixel layers add "
            "fitting capacity."
            if falling
            else " — not falling with every added 1×1 convolution: at this budget, more "
            "per-pixel layers do not simply fit the training set better."
        )
        + f" Highest mean test accuracy: {best} per block"
        + (f", tied within seed noise with {', '.join(map(str, sorted(tied)))}." if tied else "."),
    ]
    plot_mean_curves(
        {f"{n} × 1×1": v["curves"] for n, v in sorted(variants.items())},
        ctx.out / "pointwise.png",
        "test accuracy per epoch, mean ± std over seeds",
    )
    return "\n".join(md)


# --- Exercise 4: 384×5×5 to 10×5×5 at once --------------------------------------------------

REDUCTIONS = {
    # label -> (model keyword arguments over the chapter's network, what it is)
    "direct": ({}, "the chapter: a 3×3 convolution straight to one channel per class, ReLU, GAP"),
    "gradual": ({"head": "gradual"}, "halve the width at each convolution (C → C/2 → C/4 → 10)"),
    "late": ({"head": "late"}, "the paper's: keep the width, reach 10 at the last 1×1"),
    "dense": ({"head": "dense"}, "flatten + two fully connected layers, no last block or GAP"),
    "no final ReLU": ({"final_relu": False}, "the chapter's block, its last ReLU removed"),
    "batch norm": ({"batch_norm": True}, "the chapter's network with batch normalisation"),
}


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


def run_reduction(ctx: Context) -> dict[str, Any]:
    """The chapter's last block vs gradual reductions, a dense head and two fixes, over seeds."""
    results = {}
    for label, (kwargs, _) in REDUCTIONS.items():
        runs = fit_seeds(ctx, "chapter", "reduction", label, kwargs)
        config = recipe_config(ctx, "chapter", "reduction", model_kwargs=kwargs)
        test = [r["test_acc"] for r in runs]
        results[label] = {
            "parameters": runs[0]["parameters"],
            "test_acc": test,
            "loss": [r["loss"] for r in runs],
            "at_chance": sum(a < 0.15 for a in test),
            "dead_channels": [dead_class_channels(r["model"], config) for r in runs],
        }
    return results


def render_reduction(results: dict[str, Any], ctx: Context) -> str:
    """Exercise 4's write-up: accuracy, chance runs and dead class maps per last block."""
    rows = [
        [label, REDUCTIONS[label][1], f"{r['parameters']:,}", pm(r["test_acc"]),
         f"{r['at_chance']} of {len(r['test_acc'])}",
         "— (no ReLU before pooling)" if r["dead_channels"][0] is None
         else " / ".join(map(str, r["dead_channels"]))]
        for label, r in results.items()
    ]  # fmt: skip
    chapter = results["direct"]
    dead_total = sum(d or 0 for d in chapter["dead_channels"])

    def failed(r: dict[str, Any]) -> bool:
        return r["at_chance"] > 0 or any(d for d in r["dead_channels"] if d)

    def beats_chapter(r: dict[str, Any]) -> bool:
        mean, chapter_mean = mean_std(r["test_acc"])[0], mean_std(chapter["test_acc"])[0]
        return differs(r["test_acc"], chapter["test_acc"]) and mean > chapter_mean

    chapter_failed = failed(chapter)
    clean = [name for name, r in results.items() if name != "direct" and not failed(r)]
    better = [name for name in clean if beats_chapter(results[name])]
    width = create_model(ctx.scale.model)[-3][0].in_channels  # into the last block: 384 or 192
    wide_better = [label for label in ("gradual", "late") if label in better]
    n = len(chapter["test_acc"])
    md = [
        scale_line(ctx, "reduction", "the chapter's")
        + " The chapter's recipe throughout: plain SGD, lr 0.1, batch 128, Xavier init.",
        "",
        table(
            [
                "last block",
                "what it is",
                "parameters",
                "test accuracy (%)",
                "runs at chance (< 15%)",
                "dead class maps per seed",
            ],
            rows,
        ),  # fmt: skip
        "",
        "![test accuracy of every seed](reduction.png)",
        "",
        "What goes wrong at once. The chapter's last block maps 384 "
        f"{'' if width == 384 else f'(here {width}) '}channels straight to one channel per "
        "class, and every one of those ten maps passes through a ReLU before global average "
        "pooling. A class map whose pre-activation is negative on every pixel of every image "
        "outputs 0 and gets no gradient again: it is dead, and its class can win only when "
        "every other class scores 0 too. When all ten die, every logit is 0 and the loss sits "
        f"at ln 10 = {math.log(10):.3f}, the collapse readers report. Over "
        f"{plural(n, 'seed')} the chapter's block ended with {dead_total} dead class maps in "
        f"all and {chapter['at_chance']} of {n} runs at chance. "
        + (
            (
                "Changes with no dead maps and no chance runs here: "
                + (", ".join(clean) or "none")
                + "; of those, better than the chapter's block beyond seed noise: "
                + (", ".join(better) or "none")
                + "."
            )
            if chapter_failed
            else "At this budget the chapter's block neither died nor collapsed, so no change "
            "can be credited with removing the failure here; "
            + (
                "better beyond seed noise: " + ", ".join(better)
                if better
                else "none was better beyond seed noise"
            )
            + "."
        )  # fmt: skip
        + (
            f" The one-step reduction is also a bottleneck — the 3×3 convolution compresses a "
            f"{width}×3×3 neighbourhood into 10 numbers — and the heads that reach 10 channels "
            f"only at their last 1×1 convolution ({', '.join(wide_better)}) did better here."
            if wide_better
            else ""
        ),
    ]
    plot_seeds(
        {label: r["test_acc"] for label, r in results.items()},
        ctx.out / "reduction.png",
        "final test accuracy of each seed",
    )
    return "\n".join(md)


# --- Exercise 1: tune hyper-parameters ------------------------------------------------------

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


def run_tuning(ctx: Context) -> dict[str, Any]:
    """A grid search on a validation split; the best setting vs the chapter's, tested at the end."""
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
    best = trials[0]
    _, budget = ctx.scale.budgets["tuning"]
    finals: dict[str, list[float]] = {}
    for label, setting, epochs in (
        ("chapter", CHAPTER_SETTING, budget),
        ("best found", {k: best[k] for k in GRID}, best["epochs"]),
    ):
        finals[label] = []
        for seed in range(ctx.seeds):
            config = tuning_config(
                ctx, setting, holdout=ctx.scale.holdout, epochs=epochs, seed=seed
            )
            result = fit(ctx, config, label)
            finals[label].append(split_accuracy(result["model"], config, "test"))
    return {"trials": trials, "finals": finals}


def render_tuning(results: dict[str, Any], ctx: Context) -> str:
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
    md = [
        scale_line(ctx, "tuning", "the chapter's")
        + f" Search on a validation split of the last {ctx.scale.holdout:,} training images "
        "(never trained on); the test split is read once per final run, at the end.",
        "",
        f"Grid ({len(trials)} settings, seed 0, the chapter's plain SGD; each setting's epochs "
        f"are its best validation epoch within the budget of {budget}), sorted by validation "
        "accuracy:",
        "",
        table(["lr", "batch", "weight decay", "batch norm", "best epoch", "val acc (%)"], rows),
        "",
        table(
            ["setting", "epochs", f"test accuracy (%), {plural(ctx.seeds, 'seed')}"],
            [
                [f"the chapter's ({describe(CHAPTER_SETTING)})", budget, pm(finals["chapter"])],
                [f"best found ({describe(best)})", best["epochs"], pm(finals["best found"])],
            ],
        ),
        "",
        "![validation accuracy of every setting](tuning.png)",
        "",
        f"The best setting found, trained for its best validation epoch ({best['epochs']} of "
        f"the budget's {budget}), scores {best_m * 100:.2f}% on the test split against "
        f"{chapter_m * 100:.2f}% for the chapter's setting trained for all {budget} "
        f"({(best_m - chapter_m) * 100:+.2f} points, "
        f"{noise(finals['chapter'], finals['best found'])}). " + marginal_effects(trials),
    ]
    plot_tuning(trials, ctx.out / "tuning.png")
    return "\n".join(md)


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
    return (
        "Mean validation accuracy at each value, averaged over the rest of the grid, from the "
        "most to the least influential: " + "; ".join(text for _, text in spreads) + "."
    )


def plot_tuning(trials: list[dict[str, Any]], path: Path) -> None:
    """Validation accuracy against learning rate, by batch size and batch norm."""
    fig, ax = new_figure()
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


# --- Idea: a 1×1 convolution is a per-pixel fully connected layer ---------------------------


def run_linear(ctx: Context) -> dict[str, Any]:
    """1×1 convolution ≡ Linear at every pixel (numerically), and spec 002's parameter counts."""
    torch.manual_seed(0)
    conv = nn.Conv2d(96, 256, 1)
    linear = nn.Linear(96, 256)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.view(256, 96))
        linear.bias.copy_(conv.bias)
        x = torch.randn(8, 96, 13, 13)
        by_linear = linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        diff = (conv(x) - by_linear).abs().max().item()
    conv3 = nn.Conv2d(512, 4096, 3, padding=1)
    dense = nn.Linear(512 * 7 * 7, 4096)
    feature = torch.zeros(1, 512, 7, 7)
    flops = {}
    for name, layer, inp in (("conv3", conv3, feature), ("dense", dense, feature.flatten(1))):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            layer(inp)
        flops[name] = counter.get_total_flops()
    return {
        "max_abs_difference": diff,
        "conv3_weights": conv3.weight.numel(),
        "conv3_parameters": count_parameters(conv3),
        "conv3_flops": flops["conv3"],
        "dense_weights": dense.weight.numel(),
        "dense_parameters": count_parameters(dense),
        "dense_flops": flops["dense"],
    }


def render_linear(r: dict[str, Any], ctx: Context) -> str:
    """The 1×1 ≡ Linear write-up with spec 002's comparison."""
    diff = r["max_abs_difference"]
    md = [
        "A 1×1 convolution with weights W (C_out × C_in) and a `Linear(C_in, C_out)` holding the "
        "same W, applied to every pixel's channel vector (moved last with `permute`), give the "
        f"same output: on a random 8×96×13×13 input, 96 → 256 channels, the largest absolute "
        f"difference is **{diff:.2e}**"
        + (" (float32 rounding)" if diff < 1e-4 else "")
        + ". That is why NiN calls its 1×1 convolutions a per-pixel multilayer perceptron: "
        "each pixel's channels go through the same small fully connected layer.",
        "",
        "Spec 002's comparison, computed from the layers themselves:",
        "",
        table(
            ["layer", "weights", "with bias", "FLOPs on a 512×7×7 input"],
            [
                [
                    "3×3 convolution, 512 → 4096 (padding 1)",
                    f"{r['conv3_weights']:,}",
                    f"{r['conv3_parameters']:,}",
                    f"{r['conv3_flops']:,}",
                ],
                [
                    "dense layer, 512×7×7 → 4096",
                    f"{r['dense_weights']:,}",
                    f"{r['dense_parameters']:,}",
                    f"{r['dense_flops']:,}",
                ],
            ],
        ),  # fmt: skip
        "",
        f"The convolution has {r['dense_weights'] / r['conv3_weights']:.2f}× fewer weights "
        f"({r['conv3_weights'] / 1e6:.1f} M vs {r['dense_weights'] / 1e6:.1f} M), because it "
        "shares one 3×3 filter bank across all 49 positions, yet it does "
        f"{r['conv3_flops'] / r['dense_flops']:.1f}× the arithmetic, because it applies that "
        "bank at every position: dense layers cost parameters, convolutions cost compute.",
    ]
    return "\n".join(md)


# --- Idea: global average pooling instead of dense layers -----------------------------------

GAP_HEADS = {"global average pooling": {}, "dense": {"head": "dense"}}


def run_gap(ctx: Context) -> dict[str, Any]:
    """Same body, GAP head vs flatten + dense head: parameters and overfitting, over seeds."""
    results = {}
    for label, kwargs in GAP_HEADS.items():
        runs = fit_seeds(ctx, ctx.scale.recipe, "gap", label, kwargs)
        config = recipe_config(ctx, ctx.scale.recipe, "gap")  # the same training images
        train_acc = [split_accuracy(r["model"], config, "train") for r in runs]
        test_acc = [r["test_acc"] for r in runs]
        results[label] = {
            "parameters": runs[0]["parameters"],
            "train_acc": train_acc,
            "test_acc": test_acc,
            "gap": [a - b for a, b in zip(train_acc, test_acc, strict=True)],
            "curves": [[h["test_acc"] for h in r["history"]] for r in runs],
        }
    return results


def render_gap(results: dict[str, Any], ctx: Context) -> str:
    """The GAP vs dense write-up: parameters, train − test gap, test accuracy."""
    gap_head, dense_head = results["global average pooling"], results["dense"]
    more = max(results, key=lambda k: mean_std(results[k]["gap"])[0])
    rows = [
        [label, f"{r['parameters']:,}", pm(r["train_acc"]), pm(r["test_acc"]), pm(r["gap"])]
        for label, r in results.items()
    ]
    md = [
        scale_line(ctx, "gap", ctx.scale.recipe)
        + " Train accuracy is measured after training, in eval mode, on the training images.",
        "",
        table(
            ["head", "parameters", "train acc (%)", "test acc (%)", "train − test (points)"], rows
        ),  # fmt: skip
        "",
        "![test accuracy per epoch](gap.png)",
        "",
        f"The dense head adds {dense_head['parameters'] - gap_head['parameters']:,} parameters "
        f"({dense_head['parameters'] / gap_head['parameters']:.1f}× the GAP network). "
        f"Train − test gap: {pm(gap_head['gap'])} points with global average pooling, "
        f"{pm(dense_head['gap'])} with the dense head "
        f"(larger for {more}; {noise(dense_head['gap'], gap_head['gap'])}). "
        f"Test accuracy: {pm(gap_head['test_acc'])}% with global average pooling vs "
        f"{pm(dense_head['test_acc'])}% dense "
        f"({noise(gap_head['test_acc'], dense_head['test_acc'])}). Global average pooling has "
        "no weights of its own: each class map is averaged into its logit, so the last NiN "
        "block must make class maps; the paper calls it a structural regulariser, where a "
        "dense head adds parameters that can memorise the training set.",
    ]
    plot_mean_curves(
        {label: r["curves"] for label, r in results.items()},
        ctx.out / "gap.png",
        "test accuracy per epoch, mean ± std over seeds",
    )
    return "\n".join(md)


# --- Running and writing --------------------------------------------------------------------


@dataclass(frozen=True)
class Exercise:
    """One exercise: its title, the function that runs it, the one that writes it up."""

    title: str
    run: Callable[[Context], dict[str, Any]]
    render: Callable[[dict[str, Any], Context], str]


# In the order of the README: the chapter's ideas, then its exercises.
EXERCISES = {
    "linear": Exercise(
        "Idea: a 1×1 convolution is a fully connected layer per pixel", run_linear, render_linear
    ),
    "gap": Exercise("Idea: global average pooling instead of a dense head", run_gap, render_gap),
    "tuning": Exercise("Exercise 1: tune the hyper-parameters", run_tuning, render_tuning),
    "pointwise": Exercise("Exercise 2: remove a 1×1 convolution", run_pointwise, render_pointwise),
    "resources": Exercise(
        "Exercise 3: parameters, FLOPs and memory", run_resources, render_resources
    ),
    "reduction": Exercise(
        "Exercise 4: reduce 384×5×5 to 10×5×5 at once", run_reduction, render_reduction
    ),
}
NEEDS_NO_DATA = ("linear", "resources")


def machine() -> str:
    """This machine in a few words: CPU model and cores, or the GPU, and the torch version."""
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"{cpu_name()}, {os.cpu_count()} cores"
    return f"{where}, torch {torch.__version__}"


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
                "command": f"nin exercises {name} --seeds {seeds}" + (" --full" if full else ""),
                "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
                "machine": machine(),
                "minutes": round((time.perf_counter() - start) / 60, 1),
            },
        )
    return write_readme(out)


def write_readme(out: Path) -> Path:
    """Render every saved section in `out` (markdown and plots) into README.md."""
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
    lines = [
        "# The chapter's exercises and ideas, measured",
        "",
        "Generated by `nin exercises` from the results saved beside this file; every number "
        "below comes from the run named in its row (rerun one with its command; `--rebuild` "
        're-renders from the saved results). "Beyond seed noise" means two means differ by '
        "more than twice the standard error of their difference, a loose bar at 3 seeds.",
        "",
        table(
            ["section", "command", "date", "machine", "minutes"],
            [
                [s["title"], f"`{s['command']}`", s["date"], s["machine"], s["minutes"]]
                for s in sections.values()
            ],
        ),  # fmt: skip
    ]
    for name, s in sections.items():
        try:
            ctx = Context(SCALES[s["scale"]], s["seeds"], out)
            markdown = EXERCISES[name].render(s["results"], ctx)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise NinError(
                f"cannot render {out / (name + '.json')}: its results are incomplete ({e!r}); "
                f"rerun `nin exercises {name}`"
            ) from None
        lines += ["", f"## {s['title']}", "", markdown]
    path = out / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def main_log(line: str) -> None:
    """Progress lines to stderr, so stdout stays the README path."""
    print(line, file=sys.stderr, flush=True)
