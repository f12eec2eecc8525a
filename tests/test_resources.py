import pytest

import nin
from nin.models import count_parameters
from nin.resources import format_summary, leaf_rows, summarize

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
