"""nin report: one self-contained HTML file, checked in headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nin.checkpoint import save_checkpoint
from nin.cli import main
from nin.models import create_model
from tests.browser import page  # noqa: F401 (a fixture)
from tests.conftest import checkpoint_config

SECTIONS = ("summary", "curves", "confusion", "per-class", "mistakes", "config", "environment")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """The report on a run with an untrained nin_compact and three epochs of metrics."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set NIN_TEST_DATA)")
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("report") / "run"
    config = checkpoint_config(
        environment={"torch": torch.__version__, "device": "cpu"},
        result={"test_acc": 0.1, "per_class_acc": [0.1] * 10},
    )
    save_checkpoint(run, create_model("nin_compact"), config)
    rows = [
        {"epoch": e, "loss": 2.0 / e, "train_acc": 0.3 * e, "test_acc": 0.28 * e} for e in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run.parent / "out" / "report.html"
    args = ["report", str(run), "--out", str(out), "--data-dir", str(SHARED_DATA)]
    assert main([*args, "--test-subset", "300"]) == 0
    return out


def test_self_contained(report: Path) -> None:
    text = report.read_text()
    assert text.startswith("<!doctype html>")
    # Nothing fetched from anywhere: every image inline, no links to scripts or styles.
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)
    assert "<script" not in text and "<link" not in text and "url(" not in text
    assert text.count('src="data:image/png;base64,') >= 3


def test_opens_in_chromium(report: Path, page, tmp_path: Path) -> None:  # noqa: F811
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
    )
    assert len(images) >= 3 and all(done and width > 0 for _, done, width in images), images
    for section in SECTIONS:
        assert page.locator(f"#{section}").count() == 1, section
    assert "test accuracy" in page.inner_text("#summary")
    assert page.locator("#per-class tr").count() == 1 + 10
    assert page.locator("#mistakes figure").count() > 0
    assert "nin_compact" in page.inner_text("#config")
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_bad_run_dir(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 1
    assert "config.json: not found" in capsys.readouterr().err


def test_a_run_that_did_not_finish_says_what_it_holds_and_what_to_do(
    tmp_path: Path, capsys
) -> None:
    run = tmp_path / "killed"
    save_checkpoint(run, create_model("nin_compact"), checkpoint_config(epochs=8))
    (run / "model.safetensors").rename(run / "last.safetensors")  # killed before the end
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 2.0}) + "\n")
    for command in ("eval", "export", "report"):
        assert main([command, str(run)]) == 1
        err = capsys.readouterr().err
        assert (
            f"{run}: a run that did not finish (it holds last.safetensors, its checkpoint " in err
        )
        assert "after epoch 1 of 8" in err and f"`nin train --resume {run}`" in err, err
        assert f"give {run / 'last.safetensors'} to use its weights" in err and err.count("\n") == 1
    # A run that failed before its first checkpoint leaves no directory: that one is named.
    assert main(["report", str(tmp_path / "runs" / "shapes")]) == 1
    assert f"{tmp_path / 'runs' / 'shapes'}: not found" in capsys.readouterr().err


def test_edited_metrics_get_one_line(tmp_path: Path) -> None:
    from nin.errors import NinError
    from nin.report import read_history

    for text in ("[1, 2]\n", '{"loss": 0.5}\n', "{oops\n"):
        (tmp_path / "metrics.jsonl").write_text(text)
        with pytest.raises(NinError, match="was the file edited"):
            read_history(tmp_path)


def test_a_report_replaces_a_file_only_with_force_and_never_a_checkpoint(
    report: Path, capsys
) -> None:
    from tests.conftest import SHARED_DATA

    run = report.parent.parent / "run"
    args = ["report", str(run), "--data-dir", str(SHARED_DATA), "--test-subset", "50"]
    weights = (run / "model.safetensors").read_bytes()
    for out, force, expect in [
        (run / "model.safetensors", ["--force"], "part of a checkpoint"),
        (run / "config.json", ["--force"], "part of a checkpoint"),
        (run, ["--force"], "is a directory"),
        (report, [], "already exists; give --force"),
    ]:
        before = out.read_bytes() if out.is_file() else None
        assert main([*args, "--out", str(out), *force]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expect in err, err
        assert (out.read_bytes() if out.is_file() else None) == before
    assert (run / "model.safetensors").read_bytes() == weights
    assert main([*args, "--out", str(report), "--force"]) == 0
    assert "on 50 test images" in report.read_text()
