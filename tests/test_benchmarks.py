"""The benchmark scripts' pieces that can be checked without a GPU or minutes of running."""

import sys

import pytest
import torch

from .conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
gpu_speed = pytest.importorskip("gpu_speed")
report = pytest.importorskip("report")


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
    assert len(rows) == 4 and all(line.count("not measured") == 6 for line in rows)


def test_speed_is_the_median_epoch_after_the_first():
    run = {"epoch_seconds": [10.0, 2.0, 3.0, 100.0], "images": 600}
    assert gpu_speed.speed(run) == 200.0
