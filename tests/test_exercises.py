"""The exercises at a tiny scale: each runs end to end on real data and writes its section."""

import json
import math

import pytest
import torch
from torch import nn

import nin.exercises as ex
from nin.config import make_config
from nin.errors import NinError
from nin.exercises import common, reduction, tuning
from nin.models import create_model

TINY = ex.Scale(
    name="cpu",  # stands in for the CPU scale
    model="nin_compact",
    resize=None,
    budgets={"pointwise": (256, 1), "reduction": (256, 1), "tuning": (256, 1), "gap": (256, 2)},
    chapter_kwargs={"batch_norm": False, "final_relu": True},
    recipe="compact",
    holdout=256,
    resource_batches=(1, 2),
)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(ex.SCALES, "cpu", TINY)
    monkeypatch.setattr(
        tuning,
        "GRID",
        {"lr": (0.1,), "batch_size": (128,), "weight_decay": (0.0,), "batch_norm": (False, True)},
    )


def run(names, tmp_path, data_dir, seeds=1):
    lines = []
    answer = ex.run_exercises(names, tmp_path, seeds, data_dir=str(data_dir), log=lines.append)
    readme = (tmp_path / "README.md").read_text()
    assert readme.endswith(answer + "\n")  # what is printed is the page's section
    return readme, lines


def test_linear_shows_conv1x1_equals_linear_and_spec_counts(tmp_path):
    ex.run_exercises(["linear"], tmp_path, log=lambda line: None)
    readme = (tmp_path / "README.md").read_text()
    results = json.loads((tmp_path / "linear.json").read_text())["results"]
    assert results["max_abs_difference"] < 1e-5
    assert results["conv3_weights"] == 512 * 4096 * 3 * 3  # ≈ 18.9 M
    assert results["dense_weights"] == 512 * 7 * 7 * 4096  # ≈ 102.8 M
    assert "18.9 M vs 102.8 M" in readme and "nin exercises linear --seeds 3" in readme


def test_an_answer_is_printed_and_nothing_written_unless_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    answer = ex.run_exercises(["linear"], log=lambda line: None)
    assert answer.startswith("## Idea: a 1×1 convolution is a fully connected layer per pixel\n")
    assert "18.9 M vs 102.8 M" in answer
    assert list(tmp_path.iterdir()) == []


def test_resources_section_reports_the_chapter_network(tmp_path, tiny, data_dir):
    readme, _ = run(["resources"], tmp_path, data_dir)
    assert "**1,992,166 parameters**" in readme and "0.762 G multiply-adds" in readme
    assert "identical to the byte" in readme
    assert (tmp_path / "resources.png").stat().st_size > 0


def test_pointwise_trains_each_variant_per_seed(tmp_path, tiny, data_dir):
    readme, lines = run(["pointwise"], tmp_path, data_dir, seeds=2)
    variants = json.loads((tmp_path / "pointwise.json").read_text())["results"]["variants"]
    assert sorted(variants) == ["0", "1", "2", "3"]
    params = [variants[n]["parameters"] for n in "0123"]
    assert params == sorted(params) and len(set(params)) == 4
    assert all(len(v["test_acc"]) == 2 for v in variants.values())
    assert sum("pointwise, seed" in line for line in lines) == 8
    assert "2 (chapter)" in readme and (tmp_path / "pointwise.png").exists()


def test_reduction_counts_chance_runs_and_dead_maps(tmp_path, tiny, data_dir):
    readme, _ = run(["reduction"], tmp_path, data_dir)
    results = json.loads((tmp_path / "reduction.json").read_text())["results"]
    assert set(results) == set(reduction.REDUCTIONS)
    assert results["dense"]["dead_channels"] == results["no final ReLU"]["dead_channels"] == [None]
    assert all(0 <= r["at_chance"] <= 1 for r in results.values())
    assert "ln 10 = 2.303" in readme and "(here 192)" in readme


def test_dead_class_channels_finds_a_dead_relu(data_dir):
    model = create_model("nin_compact", batch_norm=False, final_relu=True)
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last_conv.bias[:4] = -1e6  # four class maps that can never be positive
    config = make_config("compact", data_dir=str(data_dir), test_subset=200, amp=False)
    assert reduction.dead_class_channels(model, config) >= 4
    assert reduction.dead_class_channels(create_model("nin_compact", head="dense"), config) is None
    bare = create_model("nin_compact", batch_norm=False, final_relu=False)
    assert reduction.dead_class_channels(bare, config) is None  # bare logits cannot die


def test_reduction_counts_runs_at_chance_over_seeds(tmp_path, monkeypatch):
    # Three seeds per last block, no training: the chapter's block ends at chance twice, the
    # gradual head once; the count must reach the results, the table and the prose.
    accuracies = {"direct": [0.1, 0.8, 0.12], "gradual": [0.8, 0.11, 0.85]}

    def fake_fit_seeds(ctx, recipe, exercise, label, kwargs):
        accs = accuracies.get(label, [0.8, 0.85, 0.9])
        return [{"parameters": 1000, "test_acc": a, "loss": 1.0, "model": None} for a in accs]

    monkeypatch.setattr(reduction, "fit_seeds", fake_fit_seeds)
    monkeypatch.setattr(reduction, "dead_class_channels", lambda model, config: 0)
    assert reduction.at_chance([0.1, 0.5, 0.149, 0.15, 0.0999]) == 3  # below 15% is chance
    ctx = ex.Context(TINY, 3, log=lambda line: None)
    results = reduction.run(ctx)
    assert {label: r["at_chance"] for label, r in results.items()} == {
        "direct": 2, "gradual": 1, "late": 0, "dense": 0, "no final ReLU": 0, "batch norm": 0
    }  # fmt: skip
    text = reduction.render(results, ctx)
    assert "| 2 of 3 |" in text and "| 1 of 3 |" in text
    assert "0 dead class maps in all and 2 of 3 runs at chance" in text
    # A chapter block with chance runs failed: the changes without any are named.
    assert "no chance runs here: late, dense, no final ReLU, batch norm;" in text


def test_tuning_searches_on_validation_and_tests_at_the_end(tmp_path, tiny, data_dir):
    readme, lines = run(["tuning"], tmp_path, data_dir)
    results = json.loads((tmp_path / "tuning.json").read_text())["results"]
    assert len(results["trials"]) == 2  # the tiny grid: batch norm off and on
    assert all("val_acc" in t for t in results["trials"])
    assert set(results["finals"]) == {"chapter", "best found"}
    # Grid trials report validation accuracy; nothing in the search reads the test split.
    search = [line for line in lines if "weight decay" in line]
    assert search and all("val acc" in line for line in search)
    assert "validation split of the last 256 training images" in readme


def test_gap_reports_train_test_gap(tmp_path, tiny, data_dir):
    run(["gap"], tmp_path, data_dir)
    results = json.loads((tmp_path / "gap.json").read_text())["results"]
    gap, dense = results["global average pooling"], results["dense"]
    assert dense["parameters"] > gap["parameters"]
    for r in (gap, dense):
        assert math.isclose(r["gap"][0], r["train_acc"][0] - r["test_acc"][0])
        assert len(r["curves"][0]) == 2


def test_readme_is_rebuilt_from_the_saved_results(tmp_path):
    ex.run_exercises(["linear"], tmp_path, log=lambda line: None)
    saved = json.loads((tmp_path / "linear.json").read_text())
    saved["results"]["max_abs_difference"] = 0.5  # the README shows what the results say
    (tmp_path / "linear.json").write_text(json.dumps(saved))
    (tmp_path / "README.md").unlink()
    text = ex.write_readme(tmp_path).read_text()
    assert "**5.00e-01**" in text and "float32 rounding" not in text
    (tmp_path / "linear.json").write_text("{broken")
    with pytest.raises(NinError, match="rerun `nin exercises linear --write`"):
        ex.write_readme(tmp_path)


def test_rebuild_without_results_is_refused(tmp_path):
    with pytest.raises(NinError, match="no saved exercise results"):
        ex.write_readme(tmp_path)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(NinError, match="unknown exercise 'nope'"):
        ex.run_exercises(["nope"], tmp_path)
    with pytest.raises(NinError, match="--seeds must be at least 1"):
        ex.run_exercises(["linear"], tmp_path, seeds=0)


def test_statistics_helpers():
    assert common.pm([0.9, 0.92]) == "91.00 ± 1.41"
    assert common.differs([0.9, 0.91, 0.9], [0.5, 0.51, 0.5])
    assert not common.differs([0.9, 0.95], [0.91, 0.94])
    assert not common.differs([0.9], [0.1])  # one seed: no noise estimate, no claim
    assert common.noise([0.9], [0.1]) == "no estimate of the seed noise"
    # The case: +1.56 points over 3 seeds passed a 2-standard-error rule, yet Welch's
    # test (about 2 degrees of freedom) gives p ≈ 0.17: not beyond noise.
    a, b = [0.8272, 0.8467, 0.8519], [0.8572, 0.8567, 0.8586]  # docs/exercises: 2 vs 0 1×1s
    p = common.welch_p(a, b)
    from scipy import stats

    assert p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert not common.differs(a, b) and "within seed noise, Welch's p = " in common.noise(a, b)
    # All at chance on one side, spread on the other: a p, no warning, and a claim.
    assert common.differs([0.1, 0.1, 0.1], [0.79, 0.80, 0.78])


def test_chapter_recipe_runs_in_fp32_and_says_so():
    ctx = common.Context(common.SCALES["cpu"], 3)
    chapter = common.recipe_config(ctx, "chapter", "reduction")
    compact = common.recipe_config(ctx, "compact", "pointwise")
    assert not chapter.amp and chapter.channels_last  # a layout, not a precision
    assert compact.amp and compact.channels_last
    assert "the chapter's recipe in fp32," in common.scale_line(ctx, "reduction", "the chapter's")
    legacy = common.Context(common.SCALES["cpu"], 3, precision=common.LEGACY_PRECISION)
    assert "recipe in bfloat16 autocast" in common.scale_line(legacy, "reduction", "the chapter's")
