"""Resources: a per-layer table of output shapes, parameters and FLOPs (`nin summary`).

FLOPs come from PyTorch's own `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts
as two FLOPs), which also keeps each module's share of them: a layer's row is its share.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nin.errors import NinError
from nin.models import create_model


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
    # Top-level layers (depth 1) and the single layers inside them (depth 2), in declared order.
    layers = {
        name: (module, 1 if "." not in name else 2)
        for name, module in model.named_modules()
        if name and ("." not in name or not list(module.children()))
    }
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record_shape(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        shapes[module] = tuple(output.shape)

    handles = [module.register_forward_hook(record_shape) for module, _ in layers.values()]
    counter = FlopCounterMode(display=False)
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
    # The counter keys each module's FLOPs by its path under the model's class name.
    flops = counter.get_flop_counts()
    prefix = type(model).__name__
    return [
        LayerRow(name, type(module).__name__, shapes[module],
                 sum(p.numel() for p in module.parameters()),
                 sum(flops.get(f"{prefix}.{name}", {}).values()), depth)
        for name, (module, depth) in layers.items()
        if module in shapes
    ]  # fmt: skip


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


# Optimizers and the number of parameter-sized state tensors each keeps.
OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "adam": 2}


def check_optimizer(name: str) -> None:
    """A clear error for an optimizer `nin resources` does not know."""
    if name not in OPTIMIZER_SLOTS:
        raise NinError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZER_SLOTS)}")


def make_optimizer(name: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer `name` (sgd: the chapter's plain SGD; momentum; adam) over `params`."""
    check_optimizer(name)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9 if name == "momentum" else 0.0)


@dataclass
class Memory:
    """Bytes a model needs at one batch size, by what holds them (analytic or measured)."""

    weights: int
    gradients: int
    optimizer_state: int
    saved_activations: int  # tensors autograd keeps from the forward pass for the backward
    training_peak: int  # the most bytes alive at once during a training step
    inference_peak: int  # the most bytes alive at once during an inference forward pass


@dataclass
class Resources:
    """Everything `nin resources` reports for one model, input size and batch size."""

    model: str
    input_size: tuple[int, int, int]
    batch_size: int
    optimizer: str
    parameters: int
    forward_flops: int  # per image, counted by FlopCounterMode
    training_flops: int  # per image, forward + backward, counted by FlopCounterMode
    formula_parameters: int  # these three from the per-layer formulas
    formula_forward_flops: int
    formula_training_flops: int
    analytic: Memory
    measured: Memory | None  # None where the device gives no way to measure
    layers: list[tuple[str, str, int]]  # (layer, kind, saved activation bytes) analytic
    device: str


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Total bytes of some tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_by_layer(
    model: nn.Module,
    rows: list[LayerRow],
    batch_size: int,
    input_bytes: int,
    element: int,
    mask_element: int,
) -> tuple[list[tuple[str, str, int]], int]:
    """Analytic bytes each layer makes autograd keep in training, and the inference peak.

    `rows` are a batch-1 summary; every activation scales with `batch_size`.

    The network is a chain, so layer i's input is layer i-1's output. Each activation is
    counted once however many layers keep it: an in-place ReLU keeps the very tensor its
    convolution wrote, and the next convolution keeps that same tensor as its input.
    Dropout keeps its mask at `mask_element` bytes an element: the CPU multiplies by a float
    mask, GPUs keep a bool one. Returns (layer, kind, new bytes kept) per layer and the largest
    live activations of an inference pass: the input (held by the caller throughout), one
    layer's input and output, and, for max pooling, the argmax indices PyTorch computes even
    without autograd.
    """
    modules = dict(model.named_modules())
    current, current_kept = input_bytes, False  # the activation flowing into the next layer
    is_input = True
    layers, live_peak = [], input_bytes
    for row in leaf_rows(rows):
        module = modules[row.name]
        numel = batch_size * math.prod(row.output_shape[1:])
        out = numel * element
        kept = 0
        keeps_input = isinstance(
            module, nn.Conv2d | nn.Linear | nn.BatchNorm2d | nn.MaxPool2d | nn.AvgPool2d
        )
        if keeps_input and not current_kept:
            kept += current
            current_kept = True
        if isinstance(module, nn.BatchNorm2d):
            kept += 2 * module.num_features * 4  # the batch mean and inverse std, in float32
        if isinstance(module, nn.MaxPool2d):
            kept += numel * 8  # the argmax of each window, as int64
        if isinstance(module, nn.Dropout) and module.p > 0:
            kept += numel * mask_element
        in_place = isinstance(module, nn.ReLU) and module.inplace
        new = not (isinstance(module, nn.Flatten) or in_place)  # a view or in place: same tensor
        if new:
            indices = numel * 8 if isinstance(module, nn.MaxPool2d) else 0
            live = input_bytes + (0 if is_input else current) + out + indices
            live_peak = max(live_peak, live)
            current, current_kept, is_input = out, False, False
        if isinstance(module, nn.ReLU) and not current_kept:
            kept += current  # ReLU's backward needs its output
            current_kept = True
        layers.append((row.name, row.kind, kept))
    return layers, live_peak


def layer_parameters(module: nn.Module) -> int:
    """Analytic parameter count of one layer: a k×k convolution has C_out·C_in·k² + C_out."""
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        weights = module.out_channels * module.in_channels // module.groups * k_h * k_w
        return weights + (module.out_channels if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return module.out_features * (module.in_features + (module.bias is not None))
    if isinstance(module, nn.BatchNorm2d):
        return 2 * module.num_features if module.affine else 0
    return 0


def layer_flops(module: nn.Module, output_shape: tuple[int, ...]) -> int:
    """Analytic forward FLOPs of one layer: 2 per multiply-add of a convolution or matrix product.

    A convolution does C_in·k² multiply-adds for every output element; pooling, ReLU, batch
    norm and bias additions are not counted, as `FlopCounterMode` does not count them.
    """
    if isinstance(module, nn.Conv2d):
        k_h, k_w = module.kernel_size
        return 2 * math.prod(output_shape) * module.in_channels // module.groups * k_h * k_w
    if isinstance(module, nn.Linear):
        return 2 * math.prod(output_shape) * module.in_features
    return 0


def formula_flops(model: nn.Module, rows: list[LayerRow]) -> tuple[int, int]:
    """Forward and training (forward + backward) FLOPs from the per-layer formulas.

    The backward pass computes each layer's weight gradient and input gradient, each as costly
    as its forward, except the first layer's input gradient, which nothing needs.
    """
    modules = dict(model.named_modules())
    flops = [layer_flops(modules[r.name], r.output_shape) for r in leaf_rows(rows)]
    first = next((f for f in flops if f), 0)
    return sum(flops), 3 * sum(flops) - first


def training_flops(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1) -> int:
    """FLOPs of one training step's forward and backward pass, counted by `FlopCounterMode`.

    It runs on a copy in training mode, so `model` (its batch-norm statistics, its gradients,
    its mode) is left as it was.
    """
    model = copy.deepcopy(model).train()
    param = next(model.parameters())
    x = torch.zeros(batch_size, *input_size, dtype=param.dtype, device=param.device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops()


def analytic_memory(
    model: nn.Module,
    input_size: tuple[int, ...],
    batch_size: int,
    optimizer: str,
    rows: list[LayerRow] | None = None,
) -> tuple[Memory, list[tuple[str, str, int]]]:
    """Memory from shapes alone: parameter counts and each layer's output shape, no measuring.

    Weights include buffers (batch norm's running statistics). Training holds weights,
    gradients, optimizer state and the saved activations (the input batch and labels among
    them); inference holds the weights and the largest live activations. `rows`: the model's
    batch-1 summary, if already made.
    """
    param = next(model.parameters())
    element = param.element_size()
    rows = rows or summarize(model, input_size)
    weight_bytes = nbytes(model.parameters())
    buffer_bytes = nbytes(model.buffers())
    input_bytes = batch_size * math.prod(input_size) * element
    mask_element = 1 if param.device.type == "cuda" else element
    layers, live_peak = saved_by_layer(model, rows, batch_size, input_bytes, element, mask_element)
    num_classes = math.prod(rows[-1].output_shape[1:])
    # The loss keeps its log-probabilities, the int64 labels and a float32 total weight.
    loss_bytes = batch_size * num_classes * element + batch_size * 8 + 4
    layers.append(("loss", "CrossEntropyLoss", loss_bytes))
    saved = sum(kept for _, _, kept in layers)
    memory = Memory(
        weights=weight_bytes + buffer_bytes,
        gradients=weight_bytes,
        optimizer_state=OPTIMIZER_SLOTS[optimizer] * weight_bytes,
        saved_activations=saved,
        training_peak=weight_bytes * (2 + OPTIMIZER_SLOTS[optimizer]) + buffer_bytes + saved,
        inference_peak=weight_bytes + buffer_bytes + live_peak,
    )
    return memory, layers


def training_bytes(
    name: str, input_size: tuple[int, ...], batch_size: int, optimizer: str, **kwargs: Any
) -> int:
    """The analytic peak bytes of one training step of registered model `name`, from shapes
    alone: the model is built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        model = create_model(name, in_channels=input_size[0], **kwargs)
    return analytic_memory(model, input_size, batch_size, optimizer)[0].training_peak


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes autograd keeps from one training forward pass for the backward: every tensor it
    packs (a saved-tensors hook), each storage counted once, the weights and buffers left out."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return sum(saved.values())


def measure_memory(
    model: nn.Module, input_size: tuple[int, ...], batch_size: int, optimizer: str
) -> Memory | None:
    """Memory measured on a real training step and a real inference pass on the model's device.

    Gradients and optimizer state are read from the tensors after a step; saved activations
    come from `saved_tensor_bytes`. Peaks: `torch.cuda.max_memory_allocated` on a GPU; on the
    CPU, the PyTorch profiler's allocation and free events in time order, added to the bytes
    already alive when the step starts. None where neither is available. The steps run on a
    copy: `model` is left as it was.
    """
    model = copy.deepcopy(model).train()
    param = next(model.parameters())
    x = torch.rand(batch_size, *input_size, dtype=param.dtype, device=param.device)
    y = torch.zeros(batch_size, dtype=torch.long, device=param.device)
    opt = make_optimizer(optimizer, model.parameters())

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    step()  # warm-up: creates the optimizer state, as in any step after the first
    grad_bytes = nbytes(p.grad for p in model.parameters() if p.grad is not None)
    opt.zero_grad(set_to_none=True)
    saved = saved_tensor_bytes(model, x, y)
    state_bytes = nbytes(
        t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0
    )
    weight_bytes = nbytes([*model.parameters(), *model.buffers()])  # with running statistics
    training_peak = peak_bytes(step, param.device, weight_bytes + state_bytes + nbytes([x, y]))
    opt.zero_grad(set_to_none=True)
    opt.state.clear()
    model.eval()
    inference_peak = peak_bytes(forward, param.device, weight_bytes + nbytes([x]))
    if training_peak is None or inference_peak is None:
        return None
    return Memory(weight_bytes, grad_bytes, state_bytes, saved, training_peak, inference_peak)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a while: the profiler's C++ side logs start/stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], None], device: torch.device, alive: int) -> int | None:
    """The most bytes alive at once while `fn` runs; `alive` is what exists before it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:  # the raw allocation events; the profiler's tables only keep per-op sums
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    events.sort(key=lambda e: e.start_ns())
    return alive + max([0, *itertools.accumulate(e.nbytes() for e in events)])  # running total


def measure_resources(
    model: nn.Module,
    name: str,
    input_size: tuple[int, int, int],
    batch_size: int,
    optimizer: str = "sgd",
    rows: list[LayerRow] | None = None,
) -> Resources:
    """Parameters, FLOPs and memory (analytic beside measured) of `model` at one batch size.

    `rows`: the model's batch-1 summary, if already made.
    """
    check_optimizer(optimizer)
    rows = rows or summarize(model, input_size)
    forward = sum(r.flops for r in leaf_rows(rows))
    formula_forward, formula_training = formula_flops(model, rows)
    analytic, layers = analytic_memory(model, input_size, batch_size, optimizer, rows)
    return Resources(
        model=name,
        input_size=tuple(input_size),
        batch_size=batch_size,
        optimizer=optimizer,
        parameters=sum(p.numel() for p in model.parameters()),
        forward_flops=forward,
        training_flops=training_flops(model, input_size),
        formula_parameters=sum(layer_parameters(m) for m in model.modules()),
        formula_forward_flops=formula_forward,
        formula_training_flops=formula_training,
        analytic=analytic,
        measured=measure_memory(model, input_size, batch_size, optimizer),
        layers=layers,
        device=str(next(model.parameters()).device),
    )


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': binary units for memory."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


MEMORY_LABELS = {
    "weights": "weights (and buffers)",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "saved_activations": "saved activations",
    "training_peak": "training step, peak",
    "inference_peak": "inference pass, peak",
}


def format_resources(r: Resources) -> str:
    """The `nin resources` report: counts, then memory with analytic and measured side by side."""
    size = "×".join(map(str, r.input_size))
    lines = [
        f"{r.model}, input {r.batch_size}×{size}, float32, optimizer {r.optimizer}, on {r.device}",
        f"{'':<22} {'counted':>16} {'formula':>16}",
        f"{'parameters':<22} {r.parameters:>16,} {r.formula_parameters:>16,}",
        f"{'forward FLOPs/image':<22} {r.forward_flops:>16,} {r.formula_forward_flops:>16,}"
        f"  ({format_count(r.forward_flops / 2)} multiply-adds)",
        f"{'training FLOPs/image':<22} {r.training_flops:>16,} {r.formula_training_flops:>16,}"
        f"  ({r.training_flops / max(r.forward_flops, 1):.2f}× forward)",
        "",
        f"{'memory':<24} {'analytic':>12} {'measured':>12} {'difference':>12}",
    ]
    for key, label in MEMORY_LABELS.items():
        a = getattr(r.analytic, key)
        if r.measured is None:
            m_text, d_text = "not measured", ""
        else:
            m = getattr(r.measured, key)
            m_text, d_text = format_bytes(m), f"{(m - a) / max(a, 1):+.1%}"
        lines.append(f"{label:<24} {format_bytes(a):>12} {m_text:>12} {d_text:>12}")
    return "\n".join(lines)
