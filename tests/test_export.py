"""nin export: ONNX and torch.export files with a free batch dimension, equal to PyTorch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nin.checkpoint import load_checkpoint, save_checkpoint
from nin.cli import main
from nin.models import create_model
from tests.conftest import checkpoint_config

CONFIG = checkpoint_config()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with an untrained nin_compact whose batch-norm statistics are not trivial."""
    torch.manual_seed(0)
    model = create_model("nin_compact")
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 1, 28, 28) * 2 + 0.5)  # move the running mean and variance
    run = tmp_path_factory.mktemp("export") / "run"
    save_checkpoint(run, model, CONFIG)
    return run


def test_onnx_matches_pytorch_at_any_batch(run_dir: Path, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    assert main(["export", str(run_dir), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "max abs difference from PyTorch" in out and "(batch 3)" in out
    path = run_dir / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.name == "images" and isinstance(images.shape[0], str)  # symbolic batch
    model, _ = load_checkpoint(run_dir)
    model.eval()
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28)
        (got,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["nin.classes"])[0] == "t-shirt/top"
    assert json.loads(meta["nin.mean"]) == pytest.approx(0.2860)


def test_torch_export_matches_pytorch(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nin.pt2"
    assert main(["export", str(run_dir), "--format", "torch-export", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    program = torch.export.load(out).module()
    model, _ = load_checkpoint(run_dir)
    model.eval()
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert (program(x) - model(x)).abs().max().item() < 1e-4


def test_missing_onnx_packages_say_what_to_install(run_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    assert main(["export", str(run_dir), "--out", str(run_dir / "never.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nin: error: ") and "pip install 'nin[export]'" in err
    assert len(err.strip().splitlines()) == 1 and not (run_dir / "never.onnx").exists()


def test_bad_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path / "nowhere")]) == 1
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_an_export_that_fails_its_check_leaves_no_file(run_dir: Path, tmp_path, monkeypatch, fmt):
    import nin.export

    monkeypatch.setattr(nin.export, "MAX_DIFFERENCE", -1.0)  # every comparison now fails
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 1
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
