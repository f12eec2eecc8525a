import pytest
import torch
from torch import nn

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


def test_nin_d2l_blocks_are_the_chapters():
    net = nin.create_model("nin_d2l")
    first = net[0]
    kinds = [type(m) for m in first]
    assert kinds == [nn.Conv2d, nn.ReLU] * 3
    assert first[0].kernel_size == (11, 11) and first[0].stride == (4, 4)
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
    with pytest.raises(nin.NinError, match="unknown model 'resnet'"):
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


def test_xavier_init_sets_xavier_bounds():
    net = xavier_init_(nin.create_model("nin_d2l"))
    conv = net[2][0]  # 96 -> 256, 5×5
    fan_in, fan_out = 96 * 25, 256 * 25
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert conv.weight.abs().max() <= bound
    assert conv.weight.abs().max() > 0.9 * bound
