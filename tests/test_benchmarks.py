"""The benchmark scripts' pieces that can be checked without a GPU or minutes of running.

Nothing here skips: the scripts need only the package and its dependencies, so a script that
no longer imports (say, after a rename in `nin`) fails here instead of vanishing from the run.
"""

import importlib
import sys

import pytest
import torch

from .conftest import REPO

BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
sys.path.insert(0, str(BENCHMARKS))
gpu_speed = importlib.import_module("gpu_speed")
report = importlib.import_module("report")


def test_the_scripts_are_the_benchmarks_folders():
    assert {"gpu_speed", "report", "results", "cpu_default"} <= set(SCRIPTS)
    for module in (gpu_speed, report):  # not a namesake found elsewhere on the path
        assert module.__file__ == str(BENCHMARKS / f"{module.__name__}.py")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_and_parses_its_command_line(name, monkeypatch, capsys):
    module = importlib.import_module(name)
    if not hasattr(module, "main"):  # a library of the others (report.py)
        return
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_benchmarks_import_without_torchvision():
    assert "torchvision" not in sys.modules


def test_textbook_dataset_is_d2ls_transform():
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    x, y = gpu_speed.TextbookDataset(images, torch.tensor([4, 5, 6]))[1]
    assert x.shape == (1, 224, 224) and x.dtype == torch.float32 and y == 5
    assert x.min() >= 0 and x.max() <= 1
    # A constant image stays constant through the resize.
    flat = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    assert torch.all(gpu_speed.TextbookDataset(flat, torch.tensor([0]))[0][0] == 1)


def test_sections_are_replaced_one_at_a_time(tmp_path):
    path = tmp_path / "benchmarks.md"
    report.write_section(path, "a", "first A")
    report.write_section(path, "b", "first B")
    report.write_section(path, "a", "second A")
    text = path.read_text()
    assert "second A" in text and "first B" in text and "first A" not in text
    assert text.index("second A") < text.index("first B")


def test_placeholder_measures_nothing():
    text = gpu_speed.placeholder()
    rows = [line for line in text.splitlines() if line.startswith(("| ours", "| reference"))]
    assert len(rows) == 5 and all(line.count("not measured") == 6 for line in rows)


def test_a_run_cut_short_renders_what_it_measured():
    run = {"epoch_seconds": [10.0, 2.0], "images": 600, "test_acc": 0.5, "peak_memory": None}
    figures = {
        "date": "2026-01-01", "machine": "m", "smoke": False, "images": None, "epochs": 2,
        "workers": 4, "collapse_seeds": 3, "collapse_epochs": 2, "peak_flops": None,
        "flops": {"nin_d2l": 1, "nin_compact": 1},
        "runs": {"reference": run, "chapter": run | {"epoch_seconds": [5.0, 1.0]}},
        "collapses": {"chapter": [True], "fixed": []},
    }  # fmt: skip
    text = gpu_speed.render(figures)
    rows = [line for line in text.splitlines() if line.startswith(("| ours", "| reference"))]
    assert [r.count("not measured (the run ended first)") for r in rows] == [0, 0, 6, 6, 6]
    assert rows[1].endswith("| 2.0× |")  # 600 images/s against the reference's 300
    assert "network 1 of 1 (of 3 planned)" in text and "pooling\n0 of 0 (of 3 planned)" in text


def test_speed_is_the_median_epoch_after_the_first():
    run = {"epoch_seconds": [10.0, 2.0, 3.0, 100.0], "images": 600}
    assert gpu_speed.speed(run) == 200.0


def test_ours_trains_a_preset_and_reads_its_history(data_dir):
    run = gpu_speed.ours(
        "compact", str(data_dir), torch.device("cpu"), train_subset=256, test_subset=128, epochs=1
    )
    assert len(run["epoch_seconds"]) == 1 and run["images"] == 256
    assert 0 < run["test_acc"] <= 1 and run["model"] == "nin_compact"
    assert run["input_size"] == (1, 28, 28) and run["peak_memory"] is None
    assert gpu_speed.speed(run) > 0
