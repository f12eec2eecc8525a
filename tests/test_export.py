"""nin export: ONNX and torch.export files with a free batch dimension, equal to PyTorch."""

from __future__ import annotations

import json
import os
import shutil
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


# --- What an export may replace: an earlier export with --force; never a checkpoint or a non-file


def one_line_error(capsys, expect: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("nin: error: ") and len(err.strip().splitlines()) == 1, err
    assert expect in err, err


@pytest.mark.parametrize(
    "target, expect",
    [
        ("model.safetensors", "part of a checkpoint"),
        ("config.json", "part of a checkpoint"),
        ("metrics.jsonl", "part of a checkpoint"),
        ("weights.bin", "part of a checkpoint"),  # safetensors under another name
        ("folder", "is a directory"),
        ("pipe", "is a named pipe"),
        ("link", "is a symbolic link"),
        (os.devnull, "is a character device"),
    ],
)
def test_an_export_never_replaces_a_checkpoint_or_what_is_not_a_file(
    tmp_path: Path, capsys, target: str, expect: str
) -> None:
    run = tmp_path / "run"
    save_checkpoint(run, create_model("nin_compact"), CONFIG)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    shutil.copy(run / "model.safetensors", run / "weights.bin")
    (run / "folder").mkdir()
    os.mkfifo(run / "pipe")
    (run / "link").symlink_to(run / "config.json")
    before = {p.name: p.read_bytes() if p.is_file() else None for p in run.iterdir()}
    out = run / target
    assert main(["export", str(run), "--format", "torch-export", "--out", str(out), "--force"]) == 1
    one_line_error(capsys, expect)
    after = {p.name: p.read_bytes() if p.is_file() else None for p in run.iterdir()}
    assert after == before
    assert (run / "link").is_symlink() and (run / "pipe").is_fifo()
    assert Path(os.devnull).is_char_device()


def test_an_earlier_export_is_replaced_only_with_force(run_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "model.pt2"
    export = ["export", str(run_dir), "--format", "torch-export", "--out", str(out)]
    earlier = b"PK\x03\x04 an earlier export (a zip, as every .pt2 is)"
    out.write_bytes(earlier)
    assert main(export) == 1
    one_line_error(capsys, "already exists; give --force to replace it")
    assert out.read_bytes() == earlier
    out.with_suffix(".json").write_bytes(earlier)  # not a .pt2: --force does not replace it
    assert main([*export[:-1], str(out.with_suffix(".json")), "--force"]) == 1
    one_line_error(capsys, "--force replaces only those")
    out.with_suffix(".json").unlink()
    assert main([*export, "--force"]) == 0
    assert torch.export.load(out).module() is not None
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_a_file_that_appears_at_out_during_the_export_is_kept(
    run_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import nin.export

    out = tmp_path / "model.pt2"
    inputs = nin.export.sample_inputs

    def someone_writes_out(shape, batch):
        out.write_text("written meanwhile")
        return inputs(shape, batch)

    monkeypatch.setattr(nin.export, "sample_inputs", someone_writes_out)
    assert main(["export", str(run_dir), "--format", "torch-export", "--out", str(out)]) == 1
    one_line_error(capsys, "already exists")
    assert out.read_text() == "written meanwhile"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A 256 kB tmpfs: a real file system that fills up (skips where it cannot be mounted)."""
    from tests.test_reliability import HELD, small_disk

    yield small_disk(tmp_path)
    HELD.close()


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(
    run_dir: Path, small: Path, capsys, fmt: str
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(small / "model")]) == 1
    one_line_error(capsys, "No space left on device")
    assert list(small.iterdir()) == []


def test_onnx_of_pictures_preprocesses_inside(tmp_path: Path, data_dir: Path) -> None:
    """`--images`: uint8 pictures of any size in; on 28×28 test images the file gives the
    probabilities `nin predict` computes, and on enlarged, non-square ones its classes."""
    import onnxruntime
    from PIL import Image

    from nin.data import load_split
    from nin.predict import load_predictor

    bundled = Path(__file__).resolve().parents[1] / "src" / "nin" / "pretrained" / "fashion-mnist"
    out = tmp_path / "pictures.onnx"
    assert main(["export", str(bundled), "--images", "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images, labels = load_split("fashion-mnist", "test", str(data_dir))
    batch = images[:16]  # (16, 1, 28, 28)
    (logits,) = session.run(["logits"], {"images": batch.permute(0, 2, 3, 1).numpy()})
    predictor = load_predictor(bundled="fashion-mnist")
    expected = predictor.probabilities(batch)
    assert torch.allclose(torch.from_numpy(logits).softmax(1), expected, atol=1e-4)
    # Enlarged 4× and set on a wider black canvas: padding and resizing happen in the graph.
    wide = torch.zeros((16, 112, 168, 1), dtype=torch.uint8)
    big = torch.nn.functional.interpolate(batch.float(), scale_factor=4, mode="nearest")
    wide[:, :, 28:140, 0] = big[:, 0].to(torch.uint8)
    (logits,) = session.run(["logits"], {"images": wide.numpy()})
    pictures = [Image.fromarray(w[:, :, 0].numpy()) for w in wide]  # as `nin predict` reads them
    classes = [predictor.predict(p, top_k=1, invert=False).top[0][0] for p in pictures]
    agree = (torch.from_numpy(logits).argmax(1) == torch.tensor(classes)).float().mean()
    assert agree >= 14 / 16  # Pillow's and the graph's resizing differ by rounding only
    # Photos: dark objects on light backgrounds are inverted and cut to the object in the graph,
    # as `nin predict` does (the cut found at another resolution: close, not to the pixel).
    photos = 255 - wide.numpy()
    photos[:, :, :20] = 255  # more light background on the left: the object is off-centre
    (logits,) = session.run(["logits"], {"images": photos})
    pictures = [Image.fromarray(p[:, :, 0]) for p in photos]
    found = [predictor.predict(p, top_k=1) for p in pictures]
    assert all(f.inverted for f in found)
    agree = torch.from_numpy(logits).argmax(1) == torch.tensor([f.top[0][0] for f in found])
    assert agree.float().mean() >= 14 / 16
    photo = Image.open(Path(__file__).resolve().parents[1] / "examples" / "photo.jpg").convert("L")
    (logits,) = session.run(["logits"], {"images": np.asarray(photo)[None, :, :, None]})
    expected = predictor.predict(photo, top_k=1).top[0]
    probs = torch.from_numpy(logits).softmax(1)[0]
    assert probs.argmax() == expected[0] and abs(probs.max() - expected[2]) < 0.02
    metadata = onnxruntime.InferenceSession(str(out)).get_modelmeta().custom_metadata_map
    assert metadata["nin.input"].startswith("uint8 (batch, height, width, 1) of any size")
    assert "inverted and cut to its object" in metadata["nin.input"]
