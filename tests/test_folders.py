"""nin train --data: a folder of your own images, read as carefully as the official data sets."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nin.folders
from nin.cli import main
from nin.config import make_config
from nin.data import Preprocess, dataset_spec, load_split
from nin.folders import load_folder
from nin.loaders import DeviceLoader, make_loader
from nin.models import create_model
from nin.train import train_step
from tests.conftest import SHARED_DATA, unusable

REPO = Path(__file__).resolve().parents[1]
CIFAR_CLASSES = list(dataset_spec("cifar10").classes)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decodes into its own cache folder, and forgets what an earlier one loaded."""
    monkeypatch.setenv("NIN_CACHE_DIR", str(tmp_path / "cache"))
    load_folder.cache_clear()


def png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def colour_folder(root: Path, per_class: int = 6, classes: int = 3, side: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in range(per_class):
            png(
                root / f"class{c}" / f"{i:03d}.png", rng.integers(0, 256, (side, side, 3), np.uint8)
            )
    return root


@pytest.fixture
def cifar_folder(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """2,000 CIFAR-10 test images as PNG files in train/ class folders (and 100 more in val/),
    and the same 2,000 as the binary reader gives them, in the folder's order (class, then
    file name)."""
    if not (SHARED_DATA / "cifar-10").is_dir():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_DATA} (set NIN_TEST_DATA)")
    images, labels = load_split("cifar10", "test", SHARED_DATA)
    root = tmp_path / "cifar-pngs"
    for i, (image, label) in enumerate(zip(images[:2100], labels[:2100].tolist(), strict=True)):
        split = "train" if i < 2000 else "val"
        png(root / split / CIFAR_CLASSES[label] / f"{i:05d}.png", image.permute(1, 2, 0).numpy())
    order = sorted(range(2000), key=lambda i: (labels[i].item(), i))
    return root, images[order], labels[order]


def test_a_folder_of_pngs_gives_the_binary_readers_tensors_and_steps(cifar_folder) -> None:
    root, images, labels = cifar_folder
    data = load_folder(str(root), 32)
    train = data.split("train")
    assert data.classes == tuple(CIFAR_CLASSES) and data.skipped == []
    assert torch.equal(data.images.subset(train).load(), images)
    assert torch.equal(data.labels[train], labels)
    # The same training batches, hence the same steps, as the binary reader's images.
    config = make_config("cifar10-fast", data=str(root), batch_size=64, amp=False)
    folder = make_loader(config, "train", torch.device("cpu"))
    spec_loader = DeviceLoader(
        images, labels, 64, shuffle=True, preprocess=folder.preprocess, flip=True,
        crop_padding=2, seed=config.seed,
    )  # fmt: skip
    model = create_model("nin_fast")
    twin = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    loss = torch.nn.CrossEntropyLoss()
    pairs = zip(folder.batches(), spec_loader.batches(), strict=False)
    for step, ((x1, y1), (x2, y2)) in enumerate(pairs):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        a = train_step(model, x1, y1, optimizers[0], loss, False)
        b = train_step(twin, x2, y2, optimizers[1], loss, False)
        assert torch.equal(a, b)
        if step == 2:
            break


def test_modes_and_formats_decode_as_pillow_says(tmp_path: Path) -> None:
    root = tmp_path / "modes"
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    png(root / "grey" / "l.png", grey)
    png(root / "grey" / "sixteen.png", grey.astype(np.uint16) * 257)  # mode I;16
    Image.fromarray(grey).save(root / "grey" / "j.jpg", quality=100)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 0  # one transparent pixel: black, the background
    png(root / "colour" / "rgba.png", rgba)
    Image.fromarray(rgba[..., :3]).save(root / "colour" / "w.webp", lossless=True)
    palette = Image.fromarray(rgba[..., :3]).quantize(colors=4)  # exact colours
    palette.save(root / "colour" / "p.png")
    # A photo stored sideways with an EXIF orientation tag: read upright (8×4 becomes 4×8).
    tall = Image.fromarray(np.full((4, 8, 3), 90, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    tall.save(root / "colour" / "rotated.jpg", exif=exif.tobytes())
    data = load_folder(str(root), 8)
    assert data.skipped == [] and data.images.shape == (7, 3, 8, 8)
    by_name = dict(zip(data.files, data.images.load(), strict=True))
    assert torch.equal(by_name["grey/l.png"][0], torch.from_numpy(grey))
    assert torch.equal(by_name["grey/sixteen.png"][0], torch.from_numpy(grey))  # 16 → 8 bits
    red = by_name["colour/rgba.png"]
    assert red[0, 0, 0] == 0 and red[0, 1, 1] == 200 and red[1].max() == 0
    webp = by_name["colour/w.webp"]  # lossless, no transparency: red everywhere
    assert (webp[0] == 200).all() and webp[1:].max() == 0
    assert by_name["colour/p.png"][0, 1, 1] == 200
    rotated = by_name["colour/rotated.jpg"][0]  # padded left and right once upright
    assert rotated[:, 2:6].float().mean() > 80 and rotated[:, :2].max() == 0
    # Grey throughout: one channel; a colour image among them: three.
    load_folder.cache_clear()
    assert load_folder(str(root), 8, None).images.shape[1] == 3
    for colour in (root / "colour").iterdir():
        colour.unlink()
    png(root / "more-grey" / "m.png", grey)
    (root / "colour").rmdir()
    load_folder.cache_clear()
    assert load_folder(str(root), 8).images.shape[1] == 1


def test_bad_files_are_skipped_and_listed_and_bad_folders_are_one_line(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = colour_folder(tmp_path / "pics")
    (root / "class0" / "empty.png").write_bytes(b"")
    (root / "class1" / "text.jpg").write_text("not an image")
    good = (root / "class2" / "000.png").read_bytes()
    (root / "class2" / "cut.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "run"
    argv = ["train", "--data", str(root), "--model", "nin_fast", "--epochs", "1"]
    assert main([*argv, "--batch-size", "4", "--out", str(out), "--no-amp"]) == 0
    log = capsys.readouterr().out
    assert "skipped 3 unusable files" in log
    listed = (out / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == [
        "class0/empty.png", "class1/text.jpg", "class2/cut.png",
    ]  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert saved["classes"] == ["class0", "class1", "class2"] and saved["in_channels"] == 3
    # What cannot be a data set: one line each, nothing written.
    single = colour_folder(tmp_path / "single", classes=1)
    nothing = tmp_path / "nothing"
    (nothing / "a").mkdir(parents=True), (nothing / "b").mkdir()
    dead = colour_folder(tmp_path / "dead", classes=2)
    for f in (dead / "class1").iterdir():
        f.write_bytes(b"garbage")
    cases = [
        (single, "1 class folder; a classifier needs at least two"),
        (nothing, "no image files"),
        (dead, "no usable training image in class folder(s) class1"),
        (tmp_path / "missing", "not a folder"),
    ]
    for folder, message in cases:
        bad_out = tmp_path / f"out-{folder.name}"
        assert main([*argv, "--data", str(folder), "--out", str(bad_out)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not bad_out.exists()


def test_special_files_and_bombs_in_a_grey_folder_are_skipped_not_waited_on(tmp_path: Path):
    """The grey-or-colour scan opens every file: a FIFO, /dev/zero, a dangling link, a loop
    and a decompression bomb are each skipped with their reason, never read or waited on."""
    root = tmp_path / "grey"
    for c in range(2):
        for i in range(3):
            png(root / f"class{c}" / f"{i}.png", np.full((8, 8), 40 * i, np.uint8))
        unusable(root / f"class{c}")
    data = load_folder(str(root), 8)
    assert data.images.shape == (6, 1, 8, 8)
    why = dict(data.skipped)
    assert why["class0/pipe.png"].startswith("a named pipe, not a regular file")
    assert why["class0/zero.png"].startswith("a character device, not a regular file")
    assert why["class0/dangling.png"].startswith("not found")
    assert why["class0/loop.png"].startswith("a symbolic link loop")
    assert "pixel limit" in why["class0/bomb.png"] and len(why) == 10


def test_folder_decoding_is_bounded_in_memory(tmp_path: Path, monkeypatch) -> None:
    """As many decodes at once as half the free memory holds; a big picture reduced at once."""
    monkeypatch.setattr(nin.folders, "memory_budget", lambda device: 2 * nin.folders.DECODE_BYTES)
    assert nin.folders.decode_workers() == min(2, os.cpu_count())
    big = png(tmp_path / "big.png", np.zeros((2048, 1024), np.uint8))
    sizes, real = [], nin.folders.to_pixels
    monkeypatch.setattr(
        nin.folders,
        "to_pixels",
        lambda image, *args: (sizes.append(image.size), real(image, *args))[1],
    )
    assert nin.folders.decode(big, 1, 8).shape == (1, 8, 8)
    assert sizes == [(128, 256)]  # reduced 8 times, its longer side still 256 (decode_side(8))


def test_a_damaged_cache_is_decoded_again(tmp_path: Path) -> None:
    """Cut short, emptied or of another shape: the cache is what is wrong, and it is rebuilt."""
    from safetensors.torch import save_file

    root = colour_folder(tmp_path / "pics")
    first = load_folder(str(root), 8).images.load()
    (cache,) = (tmp_path / "cache").glob("*.safetensors")
    whole = cache.read_bytes()
    other = tmp_path / "other.safetensors"
    save_file(
        {
            "images": torch.zeros(18, 3, 4, 4, dtype=torch.uint8),
            "labels": torch.zeros(18, dtype=torch.long),
        },
        str(other),
        {"nin": json.dumps({"files": ["x"] * 18, "skipped": []})},
    )
    for damaged in (whole[: len(whole) // 2], b"", other.read_bytes()):
        cache.write_bytes(damaged)
        load_folder.cache_clear()
        assert torch.equal(load_folder(str(root), 8).images.load(), first)
        assert cache.read_bytes() == whole


def test_cached_decoding_and_a_changed_folder(tmp_path: Path, monkeypatch) -> None:
    root = colour_folder(tmp_path / "pics")
    first = load_folder(str(root), 8)
    load_folder.cache_clear()

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(nin.folders, "decode", no_decoding)
    again = load_folder(str(root), 8)
    assert torch.equal(again.images.load(), first.images.load())
    load_folder.cache_clear()
    png(root / "class0" / "new.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(AssertionError, match="decoded again"):
        load_folder(str(root), 8)  # a new file: decoded afresh


def test_the_carved_validation_split_is_seeded_stratified_and_kept(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "pics", per_class=20)
    data = load_folder(str(root), 8)
    train, val, carved = data.train_val(0, seed=1)
    assert carved and len(val) == 6 and torch.bincount(data.labels[val]).tolist() == [2, 2, 2]
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(train) + len(val) == 60
    assert torch.equal(data.train_val(0, seed=1)[1], val)
    assert not torch.equal(data.train_val(0, seed=2)[1], val)
    assert len(data.train_val(30, seed=1)[1]) == 30
    # train/ and val/ folders: the val/ folder is the validation split, nothing carved.
    split = tmp_path / "split"
    colour_folder(split / "train", per_class=4)
    colour_folder(split / "val", per_class=2)
    load_folder.cache_clear()
    data = load_folder(str(split), 8)
    train, val, carved = data.train_val(0, seed=0)
    assert not carved and len(train) == 12 and len(val) == 6


def test_streamed_batches_equal_resident_ones(tmp_path: Path) -> None:
    root = colour_folder(tmp_path / "pics", per_class=10)
    batches = {}
    for loader in ("resident", "stream"):
        config = make_config("compact", data=str(root), model="nin_fast", batch_size=8,
                             flip=True, crop_padding=1, loader=loader)  # fmt: skip
        train = make_loader(config, "train", torch.device("cpu"))
        assert train.stream == (loader == "stream")
        batches[loader] = [(x.clone(), y.clone()) for x, y in train.batches(1)]
    assert len(batches["stream"]) == len(batches["resident"]) == 3
    for (x1, y1), (x2, y2) in zip(batches["stream"], batches["resident"], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_folder_run_labels_by_name_everywhere(tmp_path: Path, capsys) -> None:
    root = colour_folder(tmp_path / "pics", per_class=8)
    out = tmp_path / "run"
    argv = ["--data", str(root), "--model", "nin_fast", "--epochs", "1", "--batch-size", "8"]
    assert main(["train", *argv, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "class0" in shown and "no test/ folder, so the validation split" in shown
    assert main(["predict", str(out), str(root / "class1" / "000.png"), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert {t["class"] for t in top} == {"class0", "class1", "class2"}
    assert Preprocess.for_run(json.loads((out / "config.json").read_text())).side == 32


def test_the_example_script_makes_a_folder_nin_trains_on(tmp_path: Path, data_dir: Path) -> None:
    out = tmp_path / "fashion"
    script = REPO / "examples" / "make_image_folder.py"
    subprocess.run(
        [sys.executable, str(script), "fashion-mnist", str(out), "--per-class", "3",
         "--data-dir", str(data_dir)], check=True, capture_output=True,
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir())[:2] == ["ankle boot", "bag"]
    assert len(list(out.rglob("*.png"))) == 30
    assert load_folder(str(out), 28).images.shape == (30, 1, 28, 28)  # grey: one channel


@pytest.mark.parametrize("kind", ["garbled", "deep", "fifo"])
def test_a_resumed_run_whose_split_file_is_not_nins_is_one_line(tmp_path: Path, kind, capsys):
    from nin.config import make_config
    from nin.train import train

    folder = colour_folder(tmp_path / "pics", per_class=10)
    out = tmp_path / "run"

    def stop(metrics: dict) -> None:
        raise KeyboardInterrupt  # killed after its first epoch's checkpoint

    with pytest.raises(KeyboardInterrupt):
        train(make_config(data=str(folder), epochs=2, out=str(out)), log=lambda _: None,
              on_epoch=stop)  # fmt: skip
    (out / "split.json").unlink()
    if kind == "fifo":
        os.mkfifo(out / "split.json")  # read naively, it would wait for a writer forever
    elif kind == "deep":
        (out / "split.json").write_text("[" * 100_000)  # past the JSON parser's recursion limit
    else:
        (out / "split.json").write_text("{not json")
    assert main(["train", "--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert "split" in err and len(err.strip().splitlines()) == 1, err
