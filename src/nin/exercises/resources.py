"""Exercise 3: parameters, FLOPs and memory of the chapter's network, counted and measured."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from nin.device import pick_device
from nin.exercises.common import Context, fill, table_rows
from nin.files import save_figure
from nin.models import create_model, model_info
from nin.resources import Memory, Resources, format_bytes, format_resources, measure_resources

TITLE = "Exercise 3: parameters, FLOPs and memory"


def run(ctx: Context) -> dict[str, Any]:
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


def summary_row(r: Resources) -> list[str]:
    """One report's row of the summary table."""
    m = r.measured
    return [
        report_label(r), f"{r.parameters:,}", f"{r.forward_flops / 2e9:.4f} G",
        f"{r.training_flops / 1e9:.3f} G", format_bytes(r.analytic.training_peak),
        format_bytes(m.training_peak) if m else "not measured",
        format_bytes(r.analytic.inference_peak),
        format_bytes(m.inference_peak) if m else "not measured",
    ]  # fmt: skip


def measured_line(r: Resources) -> str:
    """Analytic vs measured for one measured report: saved activations and the two peaks."""
    a, m = r.analytic, r.measured
    extra = m.saved_activations - a.saved_activations
    return fill(
        "resources", "measured", label=report_label(r), analytic=format_bytes(a.saved_activations),
        measured=format_bytes(m.saved_activations),
        extra=f"{extra:+,} bytes" if extra else "identical to the byte",
        training=(m.training_peak - a.training_peak) / a.training_peak,
        inference=(m.inference_peak - a.inference_peak) / a.inference_peak,
    )  # fmt: skip


def render(results: dict[str, Any], ctx: Context) -> str:
    """Exercise 3's write-up: a summary table, how memory is counted, why the peaks differ."""
    reports = [resources_from_dict(d) for d in results["reports"]]
    on_gpu = reports[0].device.startswith("cuda")
    d2l = reports[0]
    formulas = (d2l.formula_forward_flops, d2l.formula_training_flops)
    measured = [r for r in reports if r.measured]
    excess = [
        (report_label(r), r.measured.training_peak - r.analytic.training_peak) for r in measured
    ]
    below, above = [x for x, d in excess if d < 0], [x for x, d in excess if d > 0]
    inference_above = all(r.measured.inference_peak > r.analytic.inference_peak for r in measured)
    return fill(
        "resources", "body", rows=table_rows([summary_row(r) for r in reports]), d2l=d2l,
        madds=d2l.forward_flops / 2e9, ratio=d2l.training_flops / d2l.forward_flops,
        agree="the same numbers" if formulas == (d2l.forward_flops, d2l.training_flops)
        else "different numbers",
        peaks=fill("resources", "peaks_gpu" if on_gpu else "peaks_cpu"),
        # Each line ends in a newline, so no measured report leaves one blank line, not two.
        measured="".join(measured_line(r) + "\n" for r in measured),
        onednn="" if on_gpu else " " + fill(
            "resources", "onednn", largest=format_bytes(results["largest_conv_bytes"])),
        below=", ".join(below) or "none", above=", ".join(above) or "none",
        inference=fill("resources", "inference") if measured and inference_above else "",
        shares=", ".join(
            f"{report_label(r)} {r.analytic.saved_activations / r.analytic.training_peak:.0%}"
            for r in reports),
        reports="\n\n".join(format_resources(r) for r in reports),
    )  # fmt: skip


def plot(results: dict[str, Any], path: Path) -> None:
    """Per model and batch size: the analytic parts stacked, beside the measured peak."""
    from matplotlib.figure import Figure  # nin.plots.figure makes one Axes; this needs a row

    reports = [resources_from_dict(d) for d in results["reports"]]

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
