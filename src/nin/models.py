"""NiN models: the chapter's `nin_block`, the `NiN` network, and a registry of named networks.

Every network here is a plain `nn.Sequential` of NiN blocks, pooling, dropout and global
average pooling, written out top to bottom the way the chapter writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from nin import fast


def nin_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    num_pointwise: int = 2,
    batch_norm: bool = False,
    pointwise_channels: Sequence[int] | None = None,
    final_relu: bool = True,
    pool: nn.Module | None = None,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """A k×k convolution followed by `num_pointwise` 1×1 convolutions, each with ReLU.

    `pointwise_channels` sets each 1×1 convolution's width (the paper's CIFAR/ImageNet nets
    narrow inside a block) and, when given, their number; by default there are `num_pointwise`
    of them, each keeping `out_channels`, as in the chapter.
    `batch_norm` puts BatchNorm between each convolution and its ReLU. `final_relu=False` leaves
    the block's last convolution bare, so a classifier block can emit signed logits.
    `pool` goes right after the k×k convolution (before its batch norm): the 1×1s then work
    on a quarter of the positions, as airbench pools. `activation` replaces ReLU.
    """
    if num_pointwise < 0:
        raise ValueError(f"num_pointwise must be 0 or more, got {num_pointwise}")
    if pointwise_channels is None:
        pointwise_channels = [out_channels] * num_pointwise
    widths = [out_channels, *pointwise_channels]
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(zip([in_channels] + widths[:-1], widths, strict=True)):
        is_last = i == len(widths) - 1
        k, s, p = (kernel_size, stride, padding) if i == 0 else (1, 1, 0)
        bare = is_last and not final_relu
        norm = batch_norm and not bare
        layers.append(nn.Conv2d(c_in, c_out, k, s, p, bias=not norm))
        if i == 0 and pool is not None:
            layers.append(pool)
        if norm:
            layers.append(nn.BatchNorm2d(c_out))
        if not bare:
            layers.append(activation() if activation is not nn.ReLU else nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class NiN(nn.Sequential):
    """Network in Network: NiN blocks and pooling, ending in global average pooling and flatten."""


def global_average_pool() -> list[nn.Module]:
    """The NiN head: average each class map over all positions, then flatten to logits."""
    return [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()]


HEADS = ("direct", "gradual", "late", "dense")


def classifier_head(
    head: str,
    in_channels: int,
    num_classes: int,
    spatial: int,
    num_pointwise: int = 2,
    batch_norm: bool = False,
    final_relu: bool = True,
    dense_hidden: int = 1024,
) -> list[nn.Module]:
    """The layers after the last pooling: the chapter's last NiN block and GAP, or a variant.

    - "direct" (the chapter): a 3×3 convolution straight from `in_channels` to `num_classes`,
      then `num_pointwise` 1×1 convolutions at `num_classes`, then global average pooling.
    - "gradual": halve the width at each convolution (C → C/2 → C/4 → classes), then GAP.
    - "late" (the paper's CIFAR net): keep the width, reach the classes at the last 1×1.
    - "dense": flatten the C×`spatial`×`spatial` maps into two fully connected layers
      (`dense_hidden` units, ReLU, dropout 0.5), as AlexNet and VGG end.

    `num_pointwise` shapes the "direct" head only ("gradual" and "late" always have two 1×1
    convolutions); `batch_norm` and `final_relu` do not apply to "dense".
    """
    c = in_channels
    if head == "dense":
        return [
            nn.Flatten(),
            nn.Linear(c * spatial * spatial, dense_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(dense_hidden, num_classes),
        ]
    widths = {
        "direct": (num_classes, [num_classes] * num_pointwise),
        "gradual": (c // 2, [c // 4, num_classes]),
        "late": (c, [c, num_classes]),
    }
    if head not in widths:
        raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    conv, pointwise = widths[head]
    block = nin_block(
        c, conv, 3, 1, 1,
        batch_norm=batch_norm, pointwise_channels=pointwise, final_relu=final_relu,
    )  # fmt: skip
    return [block, *global_average_pool()]


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry: how to build a model and the input size it is meant for."""

    name: str
    build: Callable[..., NiN]
    input_size: tuple[int, int, int]
    description: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(input_size: tuple[int, int, int], description: str):
    """Decorator: add a model builder to the registry under its function name."""

    def add(build: Callable[..., NiN]) -> Callable[..., NiN]:
        _REGISTRY[build.__name__] = ModelInfo(build.__name__, build, input_size, description)
        return build

    return add


def list_models() -> list[str]:
    """Names of every registered model."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry for `name`, or a clear error listing the known names."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def create_model(
    name: str, num_classes: int | None = None, in_channels: int | None = None, **kwargs
) -> NiN:
    """Build a registered model by name (timm-style); unset arguments keep the model's defaults."""
    build = model_info(name).build
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    given = {"num_classes": num_classes, "in_channels": in_channels}
    return build(**{k: v for k, v in given.items() if v is not None}, **kwargs)


@register_model((1, 224, 224), "the chapter's NiN (d2l): 96/256/384 channels, 11/5/3 windows")
def nin_d2l(
    num_classes: int = 10,
    in_channels: int = 1,
    num_pointwise: int = 2,
    batch_norm: bool = False,
    dropout: float = 0.5,
    head: str = "direct",
    final_relu: bool = True,
) -> NiN:
    """The chapter's network, layer for layer (1,992,166 parameters for 1 channel, 10 classes).

    `head` swaps the last block for a variant (see `classifier_head`); the exercises use it.
    """

    def block(c_in: int, c_out: int, k: int, s: int, p: int) -> nn.Sequential:
        return nin_block(c_in, c_out, k, s, p, num_pointwise=num_pointwise, batch_norm=batch_norm)

    return NiN(
        block(in_channels, 96, 11, 4, 0),
        nn.MaxPool2d(3, stride=2),
        block(96, 256, 5, 1, 2),
        nn.MaxPool2d(3, stride=2),
        block(256, 384, 3, 1, 1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(dropout),
        # There are `num_classes` label classes: one output channel per class.
        *classifier_head(
            head, 384, num_classes, 5, num_pointwise, batch_norm, final_relu, dense_hidden=4096
        ),
    )


@register_model(
    (1, 28, 28), "compact NiN for native 28×28 input: 48/96/192 channels, 5/3/3 windows"
)
def nin_compact(
    num_classes: int = 10,
    in_channels: int = 1,
    num_pointwise: int = 2,
    batch_norm: bool = True,
    dropout: float = 0.5,
    final_relu: bool = False,
    head: str = "direct",
    width: float = 1.0,
) -> NiN:
    """The chapter's structure at 28×28: narrower, a 5×5 first window, no resize needed.

    Batch norm is on and the last block ends in bare logits (no ReLU before global average
    pooling), which removes the chapter's collapse to loss ln 10. `width` scales the three
    blocks' 48/96/192 channels.
    """
    c1, c2, c3 = (max(1, round(c * width)) for c in (48, 96, 192))

    def block(c_in: int, c_out: int, k: int, p: int) -> nn.Sequential:
        return nin_block(c_in, c_out, k, 1, p, num_pointwise, batch_norm=batch_norm)

    return NiN(
        block(in_channels, c1, 5, 2),  # 28×28
        nn.MaxPool2d(3, stride=2),  # 13×13
        block(c1, c2, 3, 1),
        nn.MaxPool2d(3, stride=2),  # 6×6
        block(c2, c3, 3, 1),
        nn.MaxPool2d(3, stride=2),  # 2×2
        nn.Dropout(dropout),
        *classifier_head(head, c3, num_classes, 2, num_pointwise, batch_norm, final_relu),
    )


def paper_block(
    in_channels: int,
    widths: Sequence[int],
    kernel_size: int,
    stride: int,
    padding: int,
    num_pointwise: int,
    batch_norm: bool,
) -> nn.Sequential:
    """A block with the paper's widths (k×k convolution, then the 1×1s), or an ablation of it.

    Another number of 1×1 convolutions keeps the first width and ends on the last; with none,
    the k×k convolution goes straight to the last width. The output is always `widths[-1]`.
    """
    first, last = widths[0], widths[-1]
    if num_pointwise == len(widths) - 1:
        conv, pointwise = first, list(widths[1:])
    elif num_pointwise == 0:
        conv, pointwise = last, []
    else:
        conv, pointwise = first, [first] * (num_pointwise - 1) + [last]
    return nin_block(
        in_channels, conv, kernel_size, stride, padding,
        batch_norm=batch_norm, pointwise_channels=pointwise,
    )  # fmt: skip


# The paper's networks as the authors' Caffe files lay them out: each NiN block as (widths,
# kernel, stride, padding), the last width 0 for the classes; between blocks, 3×3 pooling of
# stride 2 in Caffe's ceil mode ("max" or "avg") and dropout ("drop").
PAPER_CFGS: dict[str, list] = {
    # 192 5×5 → 160 → 96, 192 5×5 → 192 → 192, 192 3×3 → 192 → C; 32 → 16 → 8.
    "nin_cifar": [
        ((192, 160, 96), 5, 1, 2), "max", "drop",
        ((192, 192, 192), 5, 1, 2), "avg", "drop",
        ((192, 192, 0), 3, 1, 1),
    ],
    # The paper says only that the maps are fewer: half the CIFAR-10 net's; 28 → 14 → 7.
    "nin_mnist": [
        ((96, 80, 48), 5, 1, 2), "max", "drop",
        ((96, 96, 96), 5, 1, 2), "avg", "drop",
        ((96, 96, 0), 3, 1, 1),
    ],
    # The authors' model zoo: 96/256/384/1024 channels, 11/5/3/3 windows; 54 → 27 → 13 → 6.
    "nin_imagenet": [
        ((96, 96, 96), 11, 4, 0), "max",
        ((256, 256, 256), 5, 1, 2), "max",
        ((384, 384, 384), 3, 1, 1), "max", "drop",
        ((1024, 1024, 0), 3, 1, 1),
    ],
}  # fmt: skip


def _create_paper(
    variant: str,
    num_classes: int,
    in_channels: int,
    num_pointwise: int = 2,
    batch_norm: bool = False,
    dropout: float = 0.5,
) -> NiN:
    """One of the paper's networks (see PAPER_CFGS), with `num_pointwise` 1×1s per block."""
    layers: list[nn.Module] = []
    c = in_channels
    for item in PAPER_CFGS[variant]:
        if item == "drop":
            layers.append(nn.Dropout(dropout))
        elif item in ("max", "avg"):
            pool = nn.MaxPool2d if item == "max" else nn.AvgPool2d
            layers.append(pool(3, stride=2, ceil_mode=True))
        else:
            widths, k, s, p = item
            widths = tuple(w or num_classes for w in widths)
            layers.append(paper_block(c, widths, k, s, p, num_pointwise, batch_norm))
            c = widths[-1]
    return NiN(*layers, *global_average_pool())


@register_model((3, 32, 32), "the paper's CIFAR-10 NiN (Caffe model): 192-channel blocks")
def nin_cifar(num_classes: int = 10, in_channels: int = 3, **kwargs) -> NiN:
    """Lin et al.'s CIFAR-10 network (see PAPER_CFGS)."""
    model = _create_paper("nin_cifar", num_classes, in_channels, **kwargs)
    # The authors' file trains cccp6, the 1×1 convolution to the classes, at 0.1× the rate
    # (used with `--paper-lr`, see fast.param_groups).
    [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1].lr_scale = 0.1
    return model


@register_model((1, 28, 28), "the paper's MNIST NiN: its CIFAR-10 structure at 96 channels")
def nin_mnist(num_classes: int = 10, in_channels: int = 1, **kwargs) -> NiN:
    """Lin et al.'s MNIST network: the CIFAR-10 structure with fewer maps (see PAPER_CFGS)."""
    return _create_paper("nin_mnist", num_classes, in_channels, **kwargs)


@register_model((3, 224, 224), "the paper's four-block ImageNet NiN (the authors' model zoo)")
def nin_imagenet(num_classes: int = 1000, in_channels: int = 3, **kwargs) -> NiN:
    """The authors' ImageNet model (see PAPER_CFGS)."""
    return _create_paper("nin_imagenet", num_classes, in_channels, **kwargs)


# The fast NiNs' widths: blocks 1-3 (each a 3×3 convolution, a 2×2 max-pool and 1×1s).
FAST_CFGS: dict[str, tuple[int, int, int]] = {
    "nin_fast": (64, 256, 256),
    "nin_fast_wide": (128, 384, 384),
}


@register_model((3, 32, 32), "fast NiN for CIFAR-10 (airbench's tricks): 64/256/256 channels")
def nin_fast(width: float = 1.0, **kwargs) -> NiN:
    """The fast NiN at airbench94's widths, each times `width` (see `nin.fast.nin_fast`)."""
    widths = tuple(max(1, round(c * width)) for c in FAST_CFGS["nin_fast"])
    return NiN(*fast.nin_fast(widths=widths, **kwargs))


@register_model((3, 32, 32), "wider fast NiN for CIFAR-10: 128/384/384 channels")
def nin_fast_wide(**kwargs) -> NiN:
    """The fast NiN at 128/384/384 channels (see `nin.fast.nin_fast`)."""
    return NiN(*fast.nin_fast(widths=FAST_CFGS["nin_fast_wide"], **kwargs))


def xavier_init_(model: nn.Module) -> nn.Module:
    """Xavier-uniform weights for every convolution and linear layer, as d2l's train_ch6 does."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
