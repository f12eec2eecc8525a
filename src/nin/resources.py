"""Resources: a per-layer table of output shapes, parameters and FLOPs (`nin summary`).

FLOPs come from PyTorch's own `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts
as two FLOPs); a layer's count is the counter's total after it ran minus the total before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerRow:
    """One row of the summary: a layer (depth 1: a top-level layer, depth 2: inside a block)."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    parameters: int
    flops: int
    depth: int


def summarize(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1) -> list[LayerRow]:
    """Run one forward pass in eval mode and record every layer's output shape, params and FLOPs.

    Top-level layers that contain others (NiN blocks) get a row with their subtotals, followed
    by one row per layer inside them; leaf rows alone add up to the totals.
    """
    leaves = {name: m for name, m in model.named_modules() if name and not list(m.children())}
    rows: dict[str, LayerRow] = {}
    counter = FlopCounterMode(display=False)
    before: dict[str, int] = {}

    def pre_hook(name: str):
        def hook(module: nn.Module, args) -> None:
            before[name] = counter.get_total_flops()

        return hook

    def post_hook(name: str, depth: int):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            params = sum(p.numel() for p in module.parameters())
            flops = counter.get_total_flops() - before[name]
            rows[name] = LayerRow(
                name, type(module).__name__, tuple(output.shape), params, flops, depth
            )

        return hook

    handles = []
    for name, module in model.named_children():
        handles.append(module.register_forward_pre_hook(pre_hook(name)))
        handles.append(module.register_forward_hook(post_hook(name, 1)))
    for name, module in leaves.items():
        if "." in name:  # leaves inside a top-level block
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name, 2)))
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        x = torch.zeros(batch_size, *input_size, dtype=param.dtype, device=param.device)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    # Order rows as the modules are declared: a block, then its layers.
    return [rows[name] for name, _ in model.named_modules() if name in rows]


def leaf_rows(rows: list[LayerRow]) -> list[LayerRow]:
    """The rows that are single layers (not blocks); their sums are the model's totals."""
    names = {r.name for r in rows}
    return [r for r in rows if not any(n.startswith(r.name + ".") for n in names)]


def format_count(n: float) -> str:
    """1234567 -> '1.23 M': short human units for parameters and FLOPs."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def format_summary(rows: list[LayerRow], title: str = "") -> str:
    """The summary as a fixed-width text table with totals at the bottom."""
    header = f"{'layer':<10} {'type':<18} {'output shape':<20} {'params':>12} {'FLOPs':>14}"
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for r in rows:
        indent = "  " * (r.depth - 1)
        shape = "×".join(str(d) for d in r.output_shape)
        kind = "nin_block" if r.kind == "Sequential" else r.kind
        name, kind = indent + r.name, indent + kind
        lines.append(f"{name:<10} {kind:<18} {shape:<20} {r.parameters:>12,} {r.flops:>14,}")
    leaves = leaf_rows(rows)
    params, flops = sum(r.parameters for r in leaves), sum(r.flops for r in leaves)
    lines.append("-" * len(header))
    lines.append(f"{'total':<50} {params:>12,} {flops:>14,}")
    lines.append(
        f"{format_count(params)} parameters, {format_count(flops)}FLOP per forward pass "
        f"({format_count(flops / 2)} multiply-adds)"
    )
    return "\n".join(lines)
