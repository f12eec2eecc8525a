import pytest
import torch
from torch import nn
from torch.nn.modules.utils import _pair

import nin
from nin.models import count_parameters, model_info, nin_block, xavier_init_

# The chapter's shape table for a 1×1×224×224 input, one line per top-level layer.
CHAPTER_SHAPES = [
    ("Sequential", (1, 96, 54, 54)),
    ("MaxPool2d", (1, 96, 26, 26)),
    ("Sequential", (1, 256, 26, 26)),
    ("MaxPool2d", (1, 256, 12, 12)),
    ("Sequential", (1, 384, 12, 12)),
    ("MaxPool2d", (1, 384, 5, 5)),
    ("Dropout", (1, 384, 5, 5)),
    ("Sequential", (1, 10, 5, 5)),
    ("AdaptiveAvgPool2d", (1, 10, 1, 1)),
    ("Flatten", (1, 10)),
]


def test_nin_d2l_matches_the_chapter():
    net = nin.create_model("nin_d2l", num_classes=10, in_channels=1)
    assert count_parameters(net) == 1_992_166
    x = torch.rand(1, 1, 224, 224)
    shapes = []
    for layer in net:
        x = layer(x)
        shapes.append((layer.__class__.__name__, tuple(x.shape)))
    assert shapes == CHAPTER_SHAPES


def describe(module: nn.Module):
    """A layer's whole configuration as plain values (a block: the tuple of its layers'), so
    that a changed padding, stride, width, pooling mode or dropout rate shows, not only a
    changed output shape."""
    if isinstance(module, nn.Sequential):
        return tuple(describe(m) for m in module)
    if isinstance(module, nn.Conv2d):
        return (
            "Conv2d", module.in_channels, module.out_channels, module.kernel_size,
            module.stride, module.padding, module.dilation, module.groups,
            module.bias is not None, module.padding_mode,
        )  # fmt: skip
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        extra = (
            (_pair(module.dilation), module.return_indices)
            if isinstance(module, nn.MaxPool2d)
            else (module.count_include_pad, module.divisor_override)
        )
        return (
            type(module).__name__, _pair(module.kernel_size), _pair(module.stride),
            _pair(module.padding), module.ceil_mode, *extra,
        )  # fmt: skip
    if isinstance(module, nn.BatchNorm2d):
        norm = (module.eps, module.momentum, module.affine, module.track_running_stats)
        return ("BatchNorm2d", module.num_features, *norm)
    if isinstance(module, nn.Dropout):
        return ("Dropout", module.p)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return ("AdaptiveAvgPool2d", _pair(module.output_size))
    if isinstance(module, nn.Flatten):
        return ("Flatten", module.start_dim, module.end_dim)
    if type(module) is nn.ReLU:
        return ("ReLU",)
    raise AssertionError(f"no description of {module!r}")


def conv(c_in: int, c_out: int, k: int = 1, s: int = 1, p: int = 0, bias: bool = True) -> tuple:
    """A plain convolution's description: square window, zero padding."""
    return ("Conv2d", c_in, c_out, (k, k), (s, s), (p, p), (1, 1), 1, bias, "zeros")


def block(c_in: int, widths: tuple[int, int, int], k: int, s: int, p: int) -> tuple:
    """A NiN block: a k×k convolution, then two 1×1 convolutions, each followed by ReLU."""
    a, b, c = widths
    relu = ("ReLU",)
    return (conv(c_in, a, k, s, p), relu, conv(a, b), relu, conv(b, c), relu)


def normed_block(c_in: int, c_out: int, k: int, p: int, bare_end: bool = False) -> tuple:
    """A NiN block with batch norm: each convolution unbiased, then BatchNorm and ReLU; with
    `bare_end` the last 1×1 convolution stands alone (biased, no norm, no ReLU)."""

    def unit(c: int, kernel: int, pad: int) -> list[tuple]:
        norm = ("BatchNorm2d", c_out, 1e-5, 0.1, True, True)
        return [conv(c, c_out, kernel, 1, pad, bias=False), norm, ("ReLU",)]

    last = [conv(c_out, c_out)] if bare_end else unit(c_out, 1, 0)
    return (*unit(c_in, k, p), *unit(c_out, 1, 0), *last)


def pool(kind: str, ceil: bool) -> tuple:
    """A 3×3 pooling of stride 2 (Caffe rounds its output size up: `ceil`)."""
    if kind == "max":
        return ("MaxPool2d", (3, 3), (2, 2), (0, 0), ceil, (1, 1), False)
    return ("AvgPool2d", (3, 3), (2, 2), (0, 0), ceil, True, None)


DROPOUT = ("Dropout", 0.5)
GAP = (("AdaptiveAvgPool2d", (1, 1)), ("Flatten", 1, -1))

# Written out from the sources, not from nin.models, so that a slip there shows here.
LAYOUTS = {
    # The chapter's code: nin_block(1, 96, 11, 4, 0), MaxPool2d(3, stride=2), nin_block(96,
    # 256, 5, 1, 2), ..., Dropout(0.5), nin_block(384, 10, 3, 1, 1), AdaptiveAvgPool2d, Flatten.
    "nin_d2l": [
        block(1, (96, 96, 96), 11, 4, 0), pool("max", False),
        block(96, (256, 256, 256), 5, 1, 2), pool("max", False),
        block(256, (384, 384, 384), 3, 1, 1), pool("max", False),
        DROPOUT,
        block(384, (10, 10, 10), 3, 1, 1),
        *GAP,
    ],
    # The CPU default (README): the chapter's structure at 28×28, 48/96/192 channels, a 5×5
    # first window, batch norm, and a last block ending in bare logits.
    "nin_compact": [
        normed_block(1, 48, 5, 2), pool("max", False),
        normed_block(48, 96, 3, 1), pool("max", False),
        normed_block(96, 192, 3, 1), pool("max", False),
        DROPOUT,
        normed_block(192, 10, 3, 1, bare_end=True),
        *GAP,
    ],
    # The authors' Caffe CIFAR-10 net: conv1 192 5×5 pad 2, cccp1 160, cccp2 96, max pool 3/2,
    # dropout; conv2 192 5×5 pad 2, cccp3 192, cccp4 192, average pool 3/2, dropout; conv3 192
    # 3×3 pad 1, cccp5 192, cccp6 10 (each with ReLU), global average pool.
    "nin_cifar": [
        block(3, (192, 160, 96), 5, 1, 2), pool("max", True), DROPOUT,
        block(96, (192, 192, 192), 5, 1, 2), pool("avg", True), DROPOUT,
        block(192, (192, 192, 10), 3, 1, 1),
        *GAP,
    ],
    # The CIFAR-10 structure at half its widths (the paper: "fewer feature maps").
    "nin_mnist": [
        block(1, (96, 80, 48), 5, 1, 2), pool("max", True), DROPOUT,
        block(48, (96, 96, 96), 5, 1, 2), pool("avg", True), DROPOUT,
        block(96, (96, 96, 10), 3, 1, 1),
        *GAP,
    ],
    # The authors' ImageNet model: conv1 96 11×11 stride 4, cccp1 96, cccp2 96, max pool 3/2;
    # conv2 256 5×5 pad 2, cccp3-4 256, max pool; conv3 384 3×3 pad 1, cccp5-6 384, max pool,
    # dropout; conv4 1024 3×3 pad 1, cccp7 1024, cccp8 1000, global average pool.
    "nin_imagenet": [
        block(3, (96, 96, 96), 11, 4, 0), pool("max", True),
        block(96, (256, 256, 256), 5, 1, 2), pool("max", True),
        block(256, (384, 384, 384), 3, 1, 1), pool("max", True), DROPOUT,
        block(384, (1024, 1024, 1000), 3, 1, 1),
        *GAP,
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layers_configuration_is_the_sources(name):
    with torch.device("meta"):  # the layout only: no weights allocated
        net = nin.create_model(name)
    assert [describe(m) for m in net] == LAYOUTS[name]


def test_nin_d2l_blocks_are_the_chapters():
    net = nin.create_model("nin_d2l")
    first = net[0]
    kinds = [type(m) for m in first]
    assert kinds == [nn.Conv2d, nn.ReLU] * 3
    assert first[0].kernel_size == (11, 11) and first[0].stride == (4, 4)
    assert first[0].padding == (0, 0)  # padding 1 still gives 54×54: (224 + 2 - 11) // 4 + 1
    assert [m.kernel_size for m in first if isinstance(m, nn.Conv2d)][1:] == [(1, 1), (1, 1)]
    assert isinstance(net[6], nn.Dropout) and net[6].p == 0.5


@pytest.mark.parametrize("name", nin.list_models())
def test_every_model_runs_on_its_input_size(name):
    info = model_info(name)
    net = nin.create_model(name, num_classes=7).eval()
    out = net(torch.rand(2, *info.input_size))
    assert out.shape == (2, 7)


def test_registry_knows_the_four_networks():
    assert set(nin.list_models()) >= {"nin_d2l", "nin_cifar", "nin_imagenet", "nin_compact"}
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        nin.create_model("resnet")


def test_paper_networks_parameter_counts():
    # Counted from the authors' Caffe definitions (REFERENCE.md); ImageNet: ~7.5 M as published.
    assert count_parameters(nin.create_model("nin_cifar")) == 966_986
    assert count_parameters(nin.create_model("nin_imagenet")) == 7_595_176
    assert nin.create_model("nin_imagenet").eval()(torch.rand(1, 3, 224, 224)).shape == (1, 1000)


def test_nin_cifar_uses_the_papers_widths():
    net = nin.create_model("nin_cifar")
    widths = [m.out_channels for m in net[0] if isinstance(m, nn.Conv2d)]
    assert widths == [192, 160, 96]
    assert isinstance(net[4], nn.AvgPool2d)


@pytest.mark.parametrize("num_pointwise", [0, 1, 2, 3])
def test_nin_block_number_of_pointwise_convolutions(num_pointwise):
    block = nin_block(3, 8, kernel_size=3, stride=1, padding=1, num_pointwise=num_pointwise)
    convs = [m for m in block if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + num_pointwise
    assert all(c.kernel_size == (1, 1) for c in convs[1:])
    assert sum(isinstance(m, nn.ReLU) for m in block) == 1 + num_pointwise
    assert block(torch.rand(1, 3, 5, 5)).shape == (1, 8, 5, 5)


@pytest.mark.parametrize("num_pointwise", [0, 1, 3])
@pytest.mark.parametrize("name", ["nin_d2l", "nin_compact", "nin_cifar", "nin_imagenet"])
def test_ablations_build_from_the_registry(name, num_pointwise):
    info = model_info(name)
    net = nin.create_model(name, num_classes=10, num_pointwise=num_pointwise).eval()
    assert net(torch.rand(1, *info.input_size)).shape == (1, 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    blocks = 3 if name == "nin_cifar" else 4
    assert sum(c.kernel_size == (1, 1) for c in convs) == blocks * num_pointwise


def test_nin_block_batch_norm_and_bare_last_convolution():
    block = nin_block(3, 8, 3, 1, 1, batch_norm=True)
    kinds = [type(m) for m in block]
    assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 3
    assert all(m.bias is None for m in block if isinstance(m, nn.Conv2d))
    bare = nin_block(3, 8, 3, 1, 1, batch_norm=True, final_relu=False)
    assert isinstance(bare[-1], nn.Conv2d) and bare[-1].bias is not None
    narrowing = nin_block(3, 16, 3, 1, 1, pointwise_channels=[12, 4])
    assert narrowing(torch.rand(1, 3, 6, 6)).shape == (1, 4, 6, 6)


def test_compact_ends_in_signed_logits():
    torch.manual_seed(0)
    net = nin.create_model("nin_compact")
    assert isinstance(net[7][-1], nn.Conv2d)
    assert (net.eval()(torch.randn(8, 1, 28, 28)) < 0).any()


def test_compact_width_scales_every_block():
    wide = nin.create_model("nin_compact", width=1.5)
    convs = [m.out_channels for m in wide.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0] == 72 and 144 in convs and 288 in convs and convs[-1] == 10
    assert wide(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    same = nin.create_model("nin_compact", width=1.0)
    assert count_parameters(same) == count_parameters(nin.create_model("nin_compact"))


def test_xavier_init_sets_xavier_bounds():
    net = xavier_init_(nin.create_model("nin_d2l"))
    conv = net[2][0]  # 96 -> 256, 5×5
    fan_in, fan_out = 96 * 25, 256 * 25
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert conv.weight.abs().max() <= bound
    assert conv.weight.abs().max() > 0.9 * bound
