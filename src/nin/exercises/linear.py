"""Idea: a 1×1 convolution is a fully connected layer applied at every pixel."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nin.exercises.common import Context, fill
from nin.models import count_parameters

TITLE = "Idea: a 1×1 convolution is a fully connected layer per pixel"


def run_linear(ctx: Context) -> dict[str, Any]:
    """1×1 convolution ≡ Linear at every pixel (numerically), and the compared parameter
    counts."""
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
    """The 1×1 ≡ Linear write-up with the parameter-count comparison."""
    diff = r["max_abs_difference"]
    return fill(
        "linear", "body", r=r, diff=diff,
        rounding=" (float32 rounding)" if diff < 1e-4 else "",
        fewer=r["dense_weights"] / r["conv3_weights"],
        conv_m=r["conv3_weights"] / 1e6, dense_m=r["dense_weights"] / 1e6,
        more=r["conv3_flops"] / r["dense_flops"],
    )  # fmt: skip
