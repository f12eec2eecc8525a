"""Idea: a 1×1 convolution is a fully connected layer applied at every pixel."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nin.exercises.common import Context, fill
from nin.models import count_parameters
from nin.resources import summarize

TITLE = "Idea: a 1×1 convolution is a fully connected layer per pixel"


def run(ctx: Context) -> dict[str, Any]:
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
    feature = (512, 7, 7)  # FLOPs counted by FlopCounterMode, as `nin summary` counts them
    return {
        "max_abs_difference": diff,
        "conv3_weights": conv3.weight.numel(),
        "conv3_parameters": count_parameters(conv3),
        "conv3_flops": summarize(nn.Sequential(conv3), feature)[0].flops,
        "dense_weights": dense.weight.numel(),
        "dense_parameters": count_parameters(dense),
        "dense_flops": summarize(nn.Sequential(nn.Flatten(), dense), feature)[1].flops,
    }


def render(r: dict[str, Any], ctx: Context) -> str:
    """The 1×1 ≡ Linear write-up with the parameter-count comparison."""
    diff = r["max_abs_difference"]
    return fill(
        "linear", "body", r=r, diff=diff,
        rounding=" (float32 rounding)" if diff < 1e-4 else "",
        fewer=r["dense_weights"] / r["conv3_weights"],
        conv_m=r["conv3_weights"] / 1e6, dense_m=r["dense_weights"] / 1e6,
        more=r["conv3_flops"] / r["dense_flops"],
    )  # fmt: skip
