"""The fast-training pieces (nin.fast) and the cifar10-fast preset: each fails when broken."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nin.config import make_config
from nin.fast import Lookahead, first_conv, init_whitening_, lr_scheduler, param_groups, tta_logits
from nin.models import NiN, create_model
from nin.train import train

from .conftest import SHARED_DATA


def test_nin_fast_is_a_nin_with_a_frozen_scale_and_identity_start():
    model = create_model("nin_fast")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # A 2×2 whitening convolution, then per block one 3×3 and 1×1s, a 1×1 class map: no Linear.
    assert [c.kernel_size for c in convs] == [(2, 2), (3, 3), (1, 1)] * 1 + [
        (3, 3),
        (1, 1),
        (3, 3),
        (1, 1),
        (1, 1),
    ]
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    # Dirac start: the 1×1 of block 1 maps channel i to channel i.
    pointwise = convs[2].weight[:, :, 0, 0]
    assert torch.equal(pointwise, torch.eye(64))
    with pytest.raises(ValueError, match="num_pointwise must be 0 or more, got -1"):
        create_model("nin_fast", num_pointwise=-1)


def test_whitening_makes_the_patch_covariance_the_identity():
    torch.manual_seed(0)
    # Correlated channels, as in real images.
    shared = torch.randn(256, 1, 12, 12).cumsum(-1)  # correlated across channels and pixels
    images = shared * torch.tensor([1.0, 0.9, 0.5]).view(1, 3, 1, 1)
    images = images + 0.3 * torch.randn(256, 3, 12, 12)
    model = NiN(nn.Conv2d(3, 24, 2))
    init_whitening_(model, images, eps=0.0)
    conv = first_conv(model)
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    out = F.conv2d(images, conv.weight[:12])  # the first half: the + eigenvectors
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12), atol=1e-3)
    assert torch.equal(conv.weight[12:], -conv.weight[:12])


def test_whitening_refuses_a_first_conv_of_the_wrong_width():
    with pytest.raises(Exception, match="whitening needs a first convolution from 3 to 24"):
        init_whitening_(NiN(nn.Conv2d(3, 16, 2)), torch.randn(4, 3, 8, 8))


def test_param_groups_scale_the_batch_norm_lr_and_keep_decay_per_step():
    model = create_model("nin_fast")
    groups = param_groups(model, lr=0.5, weight_decay=1e-3, bias_lr_scale=64)
    other, norm = groups
    assert norm["lr"] == 32 and math.isclose(norm["lr"] * norm["weight_decay"], 0.5 * 1e-3)
    norm_ids = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in norm["params"]} == norm_ids
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert len(param_groups(model, 0.5, 1e-3)) == 1  # no scale: one plain group
    # Where batch norm also learns a scale, the scale stays at the plain lr.
    compact = create_model("nin_compact")
    other, norm = param_groups(compact, lr=0.5, weight_decay=1e-3, bias_lr_scale=64)
    scales = {id(m.weight) for m in compact.modules() if isinstance(m, nn.BatchNorm2d)}
    assert scales <= {id(p) for p in other["params"]}
    assert not scales & {id(p) for p in norm["params"]}


def test_paper_lr_gives_the_authors_multipliers():
    """Caffe's blobs_lr/weight_decay: biases 2× without decay; nin_cifar's cccp6 at 0.1×."""
    model = create_model("nin_cifar")
    groups = param_groups(model, lr=0.1, weight_decay=1e-4, paper_lr=True)
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs[:-1]:
        assert by_id[id(conv.weight)] == (0.1, 1e-4)
        assert by_id[id(conv.bias)] == (0.2, 0.0)
    cccp6 = convs[-1]
    assert cccp6.out_channels == 10
    assert math.isclose(by_id[id(cccp6.weight)][0], 0.01) and by_id[id(cccp6.weight)][1] == 1e-4
    assert math.isclose(by_id[id(cccp6.bias)][0], 0.01) and by_id[id(cccp6.bias)][1] == 0.0
    assert len(by_id) == len(list(model.parameters()))
    # Without the flag, the mark is ignored: one plain group. nin_mnist has no cccp6 mark.
    assert len(param_groups(model, 0.1, 1e-4)) == 1
    mnist = param_groups(create_model("nin_mnist"), 0.1, 1e-4, paper_lr=True)
    assert sorted((g["lr"], g["weight_decay"]) for g in mnist) == [(0.1, 1e-4), (0.2, 0.0)]


def test_paper_presets_use_the_authors_multipliers():
    from nin.config import make_config

    assert make_config("paper-cifar10").paper_lr and make_config("paper-mnist").paper_lr
    assert not make_config("compact").paper_lr and not make_config("d2l").paper_lr


def test_lookahead_pulls_towards_the_average_and_ends_on_it():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    plain = copy.deepcopy(model)
    lookahead = Lookahead(model, every=2, total_steps=4)
    start = model.weight.detach().clone()
    for net in (model, plain):  # the same move on both
        with torch.no_grad():
            net.weight.add_(1.0)
    lookahead.step(model, 1)  # not an averaging step
    assert torch.equal(model.weight, plain.weight)
    lookahead.step(model, 2)  # decay 0.95² · (2/4)³
    decay = 0.95**2 * 0.5**3
    expected = decay * start + (1 - decay) * plain.weight
    assert torch.allclose(model.weight, expected) and not torch.equal(model.weight, plain.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    average = lookahead.average["weight"].clone()
    lookahead.step(model, 4)  # the last step: decay 0.95², then the model is left on the average
    expected = 0.95**2 * average + (1 - 0.95**2) * (average + 1)
    assert torch.allclose(lookahead.average["weight"], expected)
    assert torch.equal(model.weight, lookahead.average["weight"])
    restored = Lookahead(nn.Linear(4, 2), every=2, total_steps=4)
    restored.load_state_dict(lookahead.state_dict())
    assert torch.equal(restored.average["weight"], lookahead.average["weight"])


def test_tta_on_a_mirror_symmetric_image_equals_plain_and_otherwise_differs():
    torch.manual_seed(0)
    model = create_model("nin_fast").eval()
    half = torch.randn(2, 3, 32, 16)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    with torch.no_grad():
        assert torch.allclose(tta_logits(model, symmetric, 1), model(symmetric), atol=1e-5)
        x = torch.randn(2, 3, 32, 32)
        assert not torch.allclose(tta_logits(model, x, 1), model(x), atol=1e-5)
        # Level 2 = ½ level 1 + ¼ level 1 shifted up-left + ¼ shifted down-right.
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        by_hand = (
            tta_logits(model, x, 1) / 2
            + tta_logits(model, padded[..., :32, :32], 1) / 4
            + tta_logits(model, padded[..., 2:, 2:], 1) / 4
        )
        assert torch.allclose(tta_logits(model, x, 2), by_hand, atol=1e-5)
        # Level 3 = the same shifts on the image alone, never its mirror (digits).
        by_hand = model(x) / 2 + model(padded[..., :32, :32]) / 4 + model(padded[..., 2:, 2:]) / 4
        assert torch.allclose(tta_logits(model, x, 3), by_hand, atol=1e-5)
        assert not torch.allclose(tta_logits(model, x, 3), tta_logits(model, x, 2), atol=1e-5)


def test_linear_schedule_is_airbenchs_triangle():
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=2.0)
    scheduler = lr_scheduler(optimizer, "linear", total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert math.isclose(lrs[0], 0.4) and math.isclose(max(lrs), 2.0)
    assert 22 <= lrs.index(max(lrs)) <= 23 and math.isclose(lrs[-1], 0.14, rel_tol=1e-6)


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar-10").is_dir(), reason="real CIFAR-10 not found (set NIN_TEST_DATA)"
)
def test_cifar10_fast_learns_on_a_real_subset(tmp_path):
    config = make_config(
        "cifar10-fast",
        data_dir=str(SHARED_DATA),
        train_subset=4096,
        test_subset=500,
        batch_size=256,
        lr=0.4,
        epochs=3,
        out=str(tmp_path / "run"),
    )
    result = train(config, log=lambda _: None)
    assert result["tta"] == 2
    # Chance is 10%; three short epochs on 4,096 images (48 steps) reach well above it.
    assert result["test_acc"] > 0.25, result


# One step of the recipe, run from a copy of src/nin/fast.py alone: `import nin` fails there.
RECIPE_STEP = """
import sys
sys.modules["nin"] = None  # the copy must not reach for any other nin module
import torch
import torch.nn.functional as F
import fast

torch.set_num_threads(1)
torch.manual_seed(0)
model = fast.nin_fast()
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
fast.init_whitening_(model, x)
before = model.eval()(x).detach()
r = fast.RECIPE
groups = fast.param_groups(model.train(), r["lr"], r["weight_decay"], r["bias_lr_scale"])
optimizer = torch.optim.SGD(groups, momentum=r["momentum"], nesterov=True)
scheduler = fast.lr_scheduler(optimizer, "linear", 10)
lookahead = fast.Lookahead(model, 1, 10)
loss = F.cross_entropy(model(x), y, label_smoothing=r["label_smoothing"])
optimizer.zero_grad(set_to_none=True)
loss.backward()
optimizer.step()
scheduler.step()
lookahead.step(model, 1)
torch.save({"before": before, "after": model.state_dict()}, sys.argv[1])
"""


def test_the_recipe_file_runs_alone_and_steps_as_the_package_does(tmp_path):
    import shutil
    import subprocess
    import sys

    from nin import fast
    from nin.presets import PRESETS
    from nin.train import train_step

    shutil.copy(fast.__file__, tmp_path / "fast.py")
    (tmp_path / "step.py").write_text(RECIPE_STEP)
    out = tmp_path / "copy.pt"
    subprocess.run([sys.executable, str(tmp_path / "step.py"), str(out)], check=True, cwd=tmp_path)
    copied = torch.load(out)

    # The package: the registry's nin_fast, the preset's settings, nin.train's step.
    config = make_config("cifar10-fast")
    assert {k: getattr(config, k) for k in fast.RECIPE} == fast.RECIPE
    assert PRESETS["cifar10-fast"].settings["model"] == "nin_fast"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model("nin_fast")
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        init_whitening_(model, x)
        assert torch.equal(model.eval()(x), copied["before"])
        initial = model.state_dict()["1.0.weight"].clone()
        groups = param_groups(model.train(), config.lr, config.weight_decay, config.bias_lr_scale)
        optimizer = torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.nesterov)
        scheduler = lr_scheduler(optimizer, config.schedule, 10)
        lookahead = Lookahead(model, 1, 10)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        train_step(model, x, y, optimizer, loss_fn, amp=False)
        scheduler.step()
        lookahead.step(model, 1)
    finally:
        torch.set_num_threads(threads)
    after = model.state_dict()
    assert after.keys() == copied["after"].keys()
    assert all(torch.equal(after[k], copied["after"][k]) for k in after)
    assert not torch.equal(after["1.0.weight"], initial)  # the step did change the weights
