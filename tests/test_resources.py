import pytest
import torch

import nin
from nin.models import count_parameters
from nin.resources import (
    OPTIMIZER_SLOTS,
    analytic_memory,
    format_resources,
    format_summary,
    formula_flops,
    layer_flops,
    layer_parameters,
    leaf_rows,
    measure_memory,
    measure_resources,
    summarize,
    training_flops,
)

from .test_models import CHAPTER_SHAPES


@pytest.fixture(scope="module")
def d2l_rows():
    return summarize(nin.create_model("nin_d2l"), (1, 224, 224))


def test_totals_equal_the_sum_of_rows(d2l_rows):
    leaves = leaf_rows(d2l_rows)
    top = [r for r in d2l_rows if r.depth == 1]
    assert sum(r.parameters for r in leaves) == sum(r.parameters for r in top) == 1_992_166
    assert sum(r.flops for r in leaves) == sum(r.flops for r in top)
    # Each block's row is the subtotal of the rows inside it.
    for block in (r for r in top if r.kind == "Sequential"):
        inside = [r for r in leaves if r.name.startswith(block.name + ".")]
        assert block.flops == sum(r.flops for r in inside)
        assert block.parameters == sum(r.parameters for r in inside)


def test_d2l_flops_match_the_published_cost(d2l_rows):
    total = sum(r.flops for r in leaf_rows(d2l_rows))
    assert total == pytest.approx(1.52e9, rel=0.01)  # ≈ 0.76 G multiply-adds


def test_top_level_rows_are_the_chapters_shapes(d2l_rows):
    top = [(r.kind, r.output_shape) for r in d2l_rows if r.depth == 1]
    assert top == CHAPTER_SHAPES


def test_format_summary_prints_rows_and_totals(d2l_rows):
    text = format_summary(d2l_rows, "nin_d2l")
    assert "1×96×54×54" in text and "1×384×5×5" in text and "1×10" in text
    assert "1,992,166" in text
    assert text.splitlines()[-2].startswith("total")


def test_summary_of_any_input_size():
    net = nin.create_model("nin_compact")
    rows = summarize(net, (1, 28, 28), batch_size=4)
    assert rows[-1].output_shape == (4, 10)
    assert sum(r.parameters for r in leaf_rows(rows)) == count_parameters(net)
    assert net.training  # summarize leaves the mode as it found it


# --- Analytic formulas against FlopCounterMode and the measured counts ------------------------

VARIANTS = [
    ("nin_d2l", {}, (1, 224, 224)),
    ("nin_compact", {}, (1, 28, 28)),
    ("nin_compact", {"head": "dense"}, (1, 28, 28)),
    ("nin_compact", {"head": "gradual", "num_pointwise": 3}, (1, 28, 28)),
    ("nin_cifar", {}, (3, 32, 32)),
    ("nin_imagenet", {}, (3, 224, 224)),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), VARIANTS)
def test_layer_formulas_match_flop_counter_and_parameter_counts(name, kwargs, size):
    model = nin.create_model(name, **kwargs)
    rows = summarize(model, size)
    modules = dict(model.named_modules())
    for row in leaf_rows(rows):
        module = modules[row.name]
        assert layer_flops(module, row.output_shape) == row.flops, row.name
        assert layer_parameters(module) == row.parameters, row.name
    assert sum(layer_parameters(m) for m in model.modules()) == count_parameters(model)


@pytest.mark.parametrize(
    ("name", "size"), [("nin_compact", (1, 28, 28)), ("nin_cifar", (3, 32, 32))]
)
def test_training_flops_formula_matches_flop_counter(name, size):
    model = nin.create_model(name)
    forward, training = formula_flops(model, summarize(model, size))
    assert training == training_flops(model, size, batch_size=2) // 2
    assert 2.5 * forward < training < 3 * forward  # backward ≈ 2× forward, less the first layer


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("nin_compact", {}, (1, 28, 28)),
        ("nin_compact", {"batch_norm": False, "final_relu": True}, (1, 28, 28)),
        ("nin_compact", {"head": "dense"}, (1, 28, 28)),
        ("nin_d2l", {}, (1, 96, 96)),
        ("nin_cifar", {}, (3, 32, 32)),
    ],
)
def test_analytic_memory_matches_measurement(name, kwargs, size):
    torch.manual_seed(0)
    model = nin.create_model(name, **kwargs)
    analytic, layers = analytic_memory(model, size, 3, "momentum")
    measured = measure_memory(model, size, 3, "momentum")
    assert measured is not None
    # Weights, gradients, optimizer state and saved activations: exact, to the byte.
    for key in ("weights", "gradients", "optimizer_state", "saved_activations"):
        assert getattr(measured, key) == getattr(analytic, key), key
    assert sum(kept for _, _, kept in layers) == analytic.saved_activations
    # Peaks: the analytic sums leave out temporaries and freeing order; they stay close.
    assert measured.training_peak == pytest.approx(analytic.training_peak, rel=0.25)
    assert measured.inference_peak == pytest.approx(analytic.inference_peak, rel=0.6)
    assert measured.inference_peak < measured.training_peak


def test_measuring_leaves_the_model_as_it_was():
    model = nin.create_model("nin_compact").eval()
    before = [t.clone() for t in model.state_dict().values()]
    measure_memory(model, (1, 28, 28), 2, "momentum")
    training_flops(model, (1, 28, 28))
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values(), strict=True))


def test_optimizer_state_scales_with_the_optimizer():
    model = nin.create_model("nin_compact")
    sizes = {
        opt: analytic_memory(model, (1, 28, 28), 1, opt)[0].optimizer_state
        for opt in OPTIMIZER_SLOTS
    }
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert sizes == {"sgd": 0, "momentum": weights, "adam": 2 * weights}


def test_chapter_network_resources():
    r = measure_resources(nin.create_model("nin_d2l"), "nin_d2l", (1, 224, 224), 1)
    assert r.parameters == r.formula_parameters == 1_992_166
    assert r.forward_flops / 2 == pytest.approx(0.76e9, rel=0.01)
    assert r.training_flops == r.formula_training_flops
    text = format_resources(r)
    assert "1,992,166" in text and "saved activations" in text and "not measured" not in text
