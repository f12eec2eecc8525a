"""The benchmark scripts' pieces that can be checked without a GPU or minutes of running.

Nothing here skips: the scripts need only the package and its dependencies, so a script that
no longer imports (say, after a rename in `nin`) fails here instead of vanishing from the run.
"""

import argparse
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

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


@pytest.fixture
def mnist_results(tmp_path, monkeypatch):
    """benchmarks/results.py on a folder of made-up records, its training runs faked: what it
    chooses and renames, never what it measures."""
    results = importlib.import_module("results")
    monkeypatch.setattr(results, "RECORDS", report.Records(tmp_path, "mnist"))
    monkeypatch.setattr(results.torch.cuda, "is_available", lambda: True)
    ran = []

    def fake_run(records, name, args, data_dir, echo=True, extra=None):
        ran.append(name)
        if name == "final-s3":
            raise RuntimeError("out of memory")
        row = {"name": name, "result": {"test_acc": 0.997}, "run_dir": "", **(extra or {})}
        records.save(row)
        return row

    monkeypatch.setattr(report.Records, "run", fake_run)

    def save(name, **fields):
        report.write_json(tmp_path / f"{name}.json", {"name": name, **fields})

    return results, save, ran


def test_the_gpu_round_chooses_and_the_old_finals_step_aside(mnist_results, tmp_path):
    results, save, ran = mnist_results
    errors = {"e8": 40, "e20": 38, "e20-wide2": 33, "e20-wide2-rotate10": 33}  # of 10,000
    for name, wrong in errors.items():
        for seed in results.GPU_SEEDS:
            val = {"val_acc": 1 - (wrong + seed - 1) / 10000}  # the same mean, spread by seed
            save(results.gpu_select_name(name, seed), result=val)
    (tmp_path / "runs" / "final-s0").mkdir(parents=True)
    for seed in results.SEEDS:
        run_dir = str(tmp_path / "runs" / f"final-s{seed}")
        save(f"final-s{seed}", candidate="e8", run_dir=run_dir, result={"test_acc": 0.996})
    assert results.chosen() == "e20-wide2"  # tied with rotate10 on the mean: the first listed
    with pytest.raises(SystemExit, match=r"failed: final-s3 \(out of memory\)"):
        results.stage_mnist(argparse.Namespace(data_dir=None, jobs=2))
    assert sorted(ran) == [f"final-s{s}" for s in results.SEEDS]  # one failure stops no other
    retired = results.RECORDS.load("e8-s0")
    assert retired["name"] == "e8-s0" and (tmp_path / "runs" / "e8-s0").is_dir()
    assert retired["run_dir"] == str(tmp_path / "runs" / "e8-s0")
    final = results.RECORDS.load("final-s0")
    assert final["candidate"] == "e20-wide2" and final["jobs"] == 2


def test_finals_that_name_no_candidate_are_not_renamed_blindly(mnist_results):
    results, save, ran = mnist_results
    for seed in results.VAL_SEEDS:
        for name in results.ROUND3:
            save(results.select_name(name, seed), result={"val_acc": 0.996})
    save("final-s0", result={"test_acc": 0.996}, run_dir="")
    with pytest.raises(SystemExit, match="final-s0 name no candidate"):
        results.stage_mnist(argparse.Namespace(data_dir=None, jobs=1))
    assert not ran


def test_a_failed_validation_run_stops_the_choice(mnist_results):
    results, save, _ = mnist_results
    for name in results.GPU_ROUND:
        for seed in results.GPU_SEEDS:
            save(results.gpu_select_name(name, seed), result={"val_acc": 0.996})
    save(results.gpu_select_name("e20", 1), result={"error": "diverged"})
    with pytest.raises(SystemExit, match="select-gpu-e20-s1 failed"):
        results.chosen()


@pytest.mark.parametrize(
    ("script", "page"),
    [
        ("cifar10_fast", "docs/results.md"),
        ("results", "docs/results.md"),
        ("fashion_mnist", "docs/recipe.md"),
        ("gpu_check", "docs/results.md"),
        ("gpu_check", "docs/benchmarks.md"),
        ("photos", "docs/using.md"),
        ("ceiling", "docs/benchmarks.md"),
        ("finetune", "docs/folders.md"),
    ],
)
def test_the_committed_records_render_the_committed_pages(script, page, tmp_path, monkeypatch):
    """The report stage, on the records in results/, writes the pages as they are committed (its
    prose from templates/, its figures from the records): here into copies of them."""
    pages = (page, "README.md", "docs/training.md")
    (tmp_path / "docs").mkdir()
    (tmp_path / "results").symlink_to(REPO / "results")
    for name in pages:
        shutil.copy(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    importlib.import_module(script).report(Path(page))
    for name in pages:
        assert (tmp_path / name).read_text() == (REPO / name).read_text(), name


def test_the_ceiling_script_measures_every_preset_against_the_machine():
    ceiling = importlib.import_module("ceiling")
    record = ceiling.measure(small=True)
    assert set(record["ceilings"]) == {"matmul_bf16", "conv_bf16", "matmul_fp32", "conv_fp32"}
    assert all(v > 0 for v in record["ceilings"].values())
    steps = {s["preset"]: s for s in record["steps"]}
    assert set(steps) == set(ceiling.PRESETS)
    assert steps["d2l"]["precision"] == "fp32" and steps["compact"]["precision"] == "bf16"
    assert all(s["step_seconds"] > 0 and s["train_flops"] > 0 for s in steps.values())
    table = ceiling.render([record])
    assert sum(line.startswith("| `") for line in table.splitlines()) == 3 and "% |" in table


def test_a_template_section_is_filled_and_a_missing_value_fails():
    cell = report.fill("readme", "gpu", acc="90.0", seeds="over 2 seeds", wall=61.4, gpu="GPU")
    assert cell.startswith("**90.0% test accuracy** over 2 seeds, 61 s a run end to end on one GPU")
    with pytest.raises(KeyError):
        report.fill("readme", "gpu", acc="90.0")


def test_a_run_past_its_deadline_is_killed_and_its_output_kept():
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    start = time.monotonic()
    code, lines = report.run_process(command, deadline=start + 2, echo=None)
    assert code is None and lines == ["started"] and time.monotonic() - start < 30
    code, lines = report.run_process([sys.executable, "-c", "print('done')"], echo=None)
    assert code == 0 and lines == ["done"]


def test_time_to_a_mark_counts_start_up_and_falls_back_on_the_final_result():
    row = {
        "startup_seconds": 5.0, "wall_seconds": 100.0, "result": {"test_acc": 0.95},
        "history": [{"test_acc": 0.90, "elapsed_seconds": 30.0},
                    {"test_acc": 0.935, "elapsed_seconds": 60.0}],
    }  # fmt: skip
    assert report.time_to(row, 0.93) == 65.0  # the epoch's end, from the command's start
    assert report.time_to(row, 0.94) == 100.0  # only the final evaluation (with TTA) got there
    assert report.time_to(row, 0.96) is None


def test_every_committed_record_has_a_real_wall_time_or_none():
    for path in (REPO / "results").rglob("*.json"):
        rows = json.loads(path.read_text())
        for row in rows if isinstance(rows, list) else [rows]:
            wall = row.get("wall_seconds", None) if isinstance(row, dict) else None
            assert wall is None or wall > 0, f"{path}: wall_seconds {wall}"


def test_a_timed_run_is_recorded_with_its_start_up(data_dir, tmp_path):
    records = report.Records(tmp_path, "compact")
    options = ["--epochs", "1", "--train-subset", "256", "--test-subset", "128"]
    row = records.run("tiny", options, str(data_dir), echo=False, extra={"jobs": 1})
    assert row == records.load("tiny") and row["jobs"] == 1
    assert row["command"] == "nin train --preset compact " + " ".join(options)  # no --data-dir
    assert len(row["history"]) == 1 and 0 < row["result"]["test_acc"] <= 1
    assert 0 < row["startup_seconds"] < row["wall_seconds"]
    assert row["startup_seconds"] + row["history"][0]["elapsed_seconds"] <= row["wall_seconds"]
    with pytest.raises(SystemExit, match="exists: delete it"):
        records.run("tiny", options, str(data_dir))
