"""Every bad input gets one clear line and a non-zero exit: no traceback, no partial file.

CASES is the table of inputs; each runs through the real command line (in process, so a case
may simulate a full disk). The messages it gets are written to docs/reliability.md by
`NIN_WRITE_DOCS=1 pytest tests/test_reliability.py`, and a test checks that file is current.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import nin.export
import nin.train
from nin.checkpoint import save_checkpoint, save_state, save_tensors
from nin.cli import main
from nin.config import TYPES, flag, read_config, saved_config
from nin.data import DATASETS, read_idx
from nin.distributed import World
from nin.errors import NinError
from nin.models import create_model
from nin.rundir import lock_run_dir
from tests.conftest import REPO, checkpoint_config, unusable, write_idx

DOC = REPO / "docs" / "reliability.md"
# What a case holds while its command runs (a lock, a mount, a signal handler): let go after it.
HELD = contextlib.ExitStack()
LONG = "x" * 300  # one name over every common file system's limit of 255 bytes


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, the command, and a phrase its message must hold."""

    group: str
    what: str
    argv: Callable[[Path, pytest.MonkeyPatch], list[str]]
    expect: str
    status: int = 1


def tiny_mnist(tmp: Path, monkeypatch: pytest.MonkeyPatch, **broken: bytes) -> str:
    """A 64-image MNIST in tmp/data whose spec checksums match it; `broken` replaces files."""
    rng = np.random.default_rng(0)
    folder = tmp / "data" / "mnist"
    folder.mkdir(parents=True)
    arrays = {
        "train_images": rng.integers(0, 256, (64, 28, 28)),
        "train_labels": np.arange(64) % 10,
        "test_images": rng.integers(0, 256, (32, 28, 28)),
        "test_labels": np.arange(32) % 10,
    }
    spec = DATASETS["mnist"]
    files = {}
    for key, (name, _) in spec.files.items():
        path = folder / name
        if key in broken:
            path.write_bytes(broken[key])
        else:
            write_idx(path, arrays[key].astype(np.uint8))
        files[key] = (name, hashlib.md5(path.read_bytes()).hexdigest())
    patched = dataclasses.replace(spec, files=files, mirrors=("http://127.0.0.1:9/",))
    monkeypatch.setitem(DATASETS, "mnist", patched)
    return str(tmp / "data")


def gz(data: bytes) -> bytes:
    """`data` gzipped."""
    return gzip.compress(data)


def idx_header(*dims: int, dtype: int = 0x08) -> bytes:
    """An IDX header for uint8 data of shape `dims`."""
    return bytes([0, 0, dtype, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


def train_on(**broken: bytes) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """`nin train` on a tiny MNIST with some files replaced."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        data = tiny_mnist(tmp, monkeypatch, **broken)
        return ["train", "--dataset", "mnist", "--data-dir", data, "--out", str(tmp / "run")]

    return argv


def train_with(*flags: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """`nin train FLAGS` on a tiny MNIST."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        data = tiny_mnist(tmp, monkeypatch)
        out = ["--out", str(tmp / "run")] if "--out" not in flags else []
        return ["train", "--dataset", "mnist", "--data-dir", data, *out, *flags]

    return argv


def wrong_checksum(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    data = tiny_mnist(tmp, monkeypatch)
    spec = DATASETS["mnist"]
    files = {**spec.files, "train_images": (spec.files["train_images"][0], "0" * 32)}
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(spec, files=files))
    return ["train", "--dataset", "mnist", "--data-dir", data, "--out", str(tmp / "run")]


def missing_file_offline(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    data = tiny_mnist(tmp, monkeypatch)
    (Path(data) / "mnist" / DATASETS["mnist"].files["train_labels"][0]).unlink()
    return ["train", "--dataset", "mnist", "--data-dir", data, "--out", str(tmp / "run")]


def data_file_replaced_by(kind: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """Train on MNIST whose image file is a FIFO, or a link to /dev/zero: never read."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        data = tiny_mnist(tmp, monkeypatch)
        path = Path(data) / "mnist" / DATASETS["mnist"].files["train_images"][0]
        path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
        return ["train", "--dataset", "mnist", "--data-dir", data, "--out", str(tmp / "run")]

    return argv


def out_under_a_file(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    (tmp / "a-file").write_text("x")
    return train_with("--out", str(tmp / "a-file" / "run"))(tmp, monkeypatch)


def disk_full(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    return train_with()(tmp, monkeypatch)


def run_exists(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.json").write_text("{}")
    return train_with()(tmp, monkeypatch)


def checkpoint_dir(tmp: Path, model: str = "nin_compact", **config: object) -> Path:
    """A run directory holding a fresh (untrained) checkpoint."""
    run = tmp / "ckpt"
    save_checkpoint(
        run, create_model(model), checkpoint_config(model=model, dataset="mnist", **config)
    )
    return run


class Evil:
    """Unpickling this runs a shell command: the checkpoint attack nin must never fall for."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickle_checkpoint(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    run = checkpoint_dir(tmp)
    (run / "model.safetensors").write_bytes(pickle.dumps(Evil(tmp / "pwned")))
    return ["eval", str(run)]


def torch_save_checkpoint(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    run = checkpoint_dir(tmp)
    buffer = io.BytesIO()
    torch.save(create_model("nin_compact").state_dict(), buffer)
    (run / "model.safetensors").write_bytes(buffer.getvalue())
    assert zipfile.is_zipfile(run / "model.safetensors")
    return ["eval", str(run)]


def edit_checkpoint(change: Callable[[Path], None]) -> Callable[[Path, pytest.MonkeyPatch], list]:
    """`nin eval` of a fresh checkpoint that `change` has damaged."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        run = checkpoint_dir(tmp)
        change(run)
        return ["eval", str(run), "--data-dir", tiny_mnist(tmp, monkeypatch)]

    return argv


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def other_model_weights(run: Path) -> None:
    other = checkpoint_dir(run / "other", "nin_d2l")
    (run / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())


def other_shapes(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "num_classes": 5}))


def drop_config_key(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    del config["dataset"]
    (run / "config.json").write_text(json.dumps(config))


def eval_too_small(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    run = checkpoint_dir(tmp, resize=4)
    return ["eval", str(run), "--data-dir", tiny_mnist(tmp, monkeypatch)]


def resume(flags: tuple[str, ...] = (), finished: bool = False) -> Callable:
    """`nin train --resume` of a run trained for one tiny epoch (or of an empty directory)."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        data = tiny_mnist(tmp, monkeypatch)
        run = tmp / "run"
        if finished:
            common = ["--dataset", "mnist", "--data-dir", data, "--batch-size", "32"]
            assert main(["train", *common, "--epochs", "1", "--out", str(run)]) == 0
        else:
            run.mkdir()
        return ["train", "--resume", str(run), "--data-dir", data, *flags]

    return argv


def damaged_state(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    data = tiny_mnist(tmp, monkeypatch)
    run = tmp / "run"
    common = ["--dataset", "mnist", "--data-dir", data, "--batch-size", "32"]
    assert main(["train", *common, "--epochs", "2", "--out", str(run)]) == 0
    (run / "model.safetensors").unlink()
    state = {"epoch": 1, "model": "nin_compact", "world_size": 1, "device_type": "cpu"}
    save_state(
        run / "last.safetensors",
        "nin_compact",
        {"model": create_model("nin_compact").state_dict(), "run": state},
        read_config(run),  # the run's own id and settings: the state is damaged, not foreign
    )
    return ["train", "--resume", str(run)]


def nan_weights(run: Path) -> None:
    rewrite_weights(run, lambda t: t.fill_(float("nan")) if t.is_floating_point() else t)


def rewrite_weights(run: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Save the run's weights again, each tensor changed by `change`."""
    weights = {k: change(v.clone()) for k, v in create_model("nin_compact").state_dict().items()}
    save_tensors(run / "model.safetensors", weights, {"model": "nin_compact"})


def float16_weights(run: Path) -> None:
    rewrite_weights(run, lambda t: t.half() if t.is_floating_point() else t)


def int8_weights(run: Path) -> None:
    rewrite_weights(run, lambda t: t.to(torch.int8) if t.is_floating_point() else t)


def duplicate_key(run: Path) -> None:
    """Name the first tensor twice in the header, the second time over the bytes of another
    dtype: safetensors keeps the last silently."""
    path = run / "model.safetensors"
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    first = next(k for k in header if k != "__metadata__")
    entry = header[first]
    start, end = entry["data_offsets"]
    twin = {"dtype": "I8", "shape": [end - start], "data_offsets": [start, end]}
    text = json.dumps(header)[:-1] + f', "{first}": {json.dumps(twin)}}}'
    text += " " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + length :])


def deep_config(run: Path) -> None:
    (run / "config.json").write_text("[" * 200_000 + "]" * 200_000)


def edit_config(**changes: object) -> Callable[[Path], None]:
    """Change keys of a run's config.json."""

    def change(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, **changes}))

    return change


def trained(tmp: Path, monkeypatch: pytest.MonkeyPatch, name: str = "run", *flags: str) -> Path:
    """A run directory of one tiny epoch on a tiny MNIST."""
    data = tmp / "data"
    if not data.exists():
        tiny_mnist(tmp, monkeypatch)
    run = tmp / name
    common = ["--dataset", "mnist", "--data-dir", str(data), "--batch-size", "32"]
    assert main(["train", *common, "--epochs", "1", "--out", str(run), *flags]) == 0
    return run


def resume_edited(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    run = trained(tmp, monkeypatch, "run", "--schedule", "onecycle")
    edit_config(epochs=3)(run)  # a one-cycle schedule saved for 1 epoch would fail in the 2nd
    return ["train", "--resume", str(run)]


def resume_another_run(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    run, other = trained(tmp, monkeypatch), trained(tmp, monkeypatch, "other")
    shutil.copy(other / "last.safetensors", run / "last.safetensors")
    return ["train", "--resume", str(run)]


def hold_lock(run: Path, resume: bool = False) -> None:
    """Lock `run` as a training process does, until the case ends."""
    HELD.enter_context(lock_run_dir(run, resume))


def resume_in_use(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    run = trained(tmp, monkeypatch)
    hold_lock(run, resume=True)
    return ["train", "--resume", str(run)]


def new_run_in_use(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    hold_lock(tmp / "run")  # a run that has begun: it has written its config.json, no checkpoint
    (tmp / "run" / "config.json").write_text("{}")
    return train_with()(tmp, monkeypatch)


def small_disk(tmp: Path, size: str = "256k") -> Path:
    """A real file system of `size` (tmpfs) at tmp/small, unmounted when the case ends; skips
    where this machine does not let the test mount one."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs (a real full disk) needs root and mount(8)")
    where = tmp / "small"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    HELD.callback(subprocess.run, ["umount", "-l", str(where)], check=False)
    return where


def real_disk_full(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    small = small_disk(tmp)  # room for config.json and metrics.jsonl, not for the weights
    return train_with("--out", str(small / "run"), "--batch-size", "32")(tmp, monkeypatch)


def long_name(where: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """A command given a path whose name is over the system's limit (ENAMETOOLONG)."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        monkeypatch.chdir(tmp)  # a relative name: the message is the same on every machine
        if where == "--data-dir":
            return ["train", "--data-dir", LONG, "--out", str(tmp / "run")]
        if where in ("--out", "--resume"):
            return train_with(where, LONG)(tmp, monkeypatch)
        if where == "predict":
            return ["predict", LONG, str(tmp / "image.png")]
        return [where, LONG]

    return argv


def deep_file(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    (tmp / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    return train_with("--config", str(tmp / "deep.json"))(tmp, monkeypatch)


def export_to(out: Callable[[Path], Path], *flags: str) -> Callable:
    """`nin export` of a fresh checkpoint to the path `out` makes of its run directory."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        run = checkpoint_dir(tmp)
        return ["export", str(run), "--format", "torch-export", "--out", str(out(run)), *flags]

    return argv


def report_over_a_file(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    run = checkpoint_dir(tmp)
    (tmp / "notes.html").write_text("<p>my notes</p>")
    return ["report", str(run), "--out", str(tmp / "notes.html")]


def sigterm_in_export(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """SIGTERM arrives while the export's temporary file exists."""

    def not_handled(signum: int, frame: object) -> None:
        raise AssertionError("nin left SIGTERM to its default action: the process would die")

    HELD.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, not_handled))
    inputs = nin.export.sample_inputs

    def terminated(shape: tuple[int, ...], batch: int) -> torch.Tensor:
        assert list(tmp.glob("ckpt/.*.tmp")), "not inside the export"
        os.kill(os.getpid(), signal.SIGTERM)
        return inputs(shape, batch)

    monkeypatch.setattr(nin.export, "sample_inputs", terminated)
    return export_to(lambda run: run / "model.pt2")(tmp, monkeypatch)


def plain(*argv: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """A command that needs no files."""
    return lambda tmp, monkeypatch: list(argv)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def sparse(path: Path, size: int) -> Path:
    """A file of `size` bytes that takes no room: only its length is big."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def config_at(make: Callable[[Path], Path]) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """`nin train --config PATH` on a tiny MNIST, PATH what `make` gives in the case's folder."""
    return lambda tmp, monkeypatch: train_with("--config", str(make(tmp)))(tmp, monkeypatch)


def replace_file(name: str, make: Callable[[Path], object]) -> Callable[[Path], None]:
    """A change of a run directory: its file `name` replaced by what `make(path)` makes."""

    def change(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        make(run / name)

    return change


def predict_with(change: Callable[[Path], None]) -> Callable[[Path, pytest.MonkeyPatch], list]:
    """`nin predict` with a fresh checkpoint that `change` has damaged."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        run = checkpoint_dir(tmp)
        change(run)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "picture.png")
        return ["predict", str(run), str(tmp / "picture.png")]

    return argv


def train_folder(
    per_class: int, *flags: str, classes: int = 2, empty: int = 0, bad: bool = False
) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """`nin train --data` on a folder of `classes` classes of `per_class` grey 8×8 pictures
    (every unusable kind of file too, with `bad`), and `empty` class folders of none."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        monkeypatch.setenv("NIN_CACHE_DIR", str(tmp.parent / f"{tmp.name}-cache"))
        root = tmp / "pictures"
        for c in range(classes):
            (root / f"class{c}").mkdir(parents=True)
            for i in range(per_class):
                picture = np.full((8, 8), 30 * i, np.uint8)
                Image.fromarray(picture).save(root / f"class{c}" / f"{i}.png")
            if bad:
                unusable(root / f"class{c}")
        for e in range(empty):
            (root / f"empty{e:04d}").mkdir()
        return ["train", "--data", str(root), "--out", str(tmp / "run"), *flags]

    return argv


HALF_A_GZIP = gz(idx_header(64, 28, 28) + np.random.default_rng(0).bytes(64 * 784))[:20000]
CASES = [
    # Data files
    Case("data", "image file is not gzip", train_on(train_images=b"not gzip at all"),
         "not a readable gzip file"),
    Case("data", "gzip file cut short", train_on(train_images=HALF_A_GZIP),
         "not a readable gzip file"),
    Case("data", "wrong magic number", train_on(train_images=gz(b"\x08\x03\x00\x00" + bytes(64))),
         "bad magic number"),
    Case("data", "IDX dims disagree with the bytes", train_on(
        train_images=gz(idx_header(64, 28, 28) + bytes(100))), "need 50192 bytes"),
    Case("data", "IDX header cut short", train_on(train_images=gz(idx_header(64, 28, 28)[:9])),
         "IDX header is truncated"),
    Case("data", "images without an image's dims", train_on(
        train_images=gz(idx_header(64, 784) + bytes(64 * 784))), "expected images (N, H, W)"),
    Case("data", "label count disagrees with images", train_on(
        train_labels=gz(idx_header(60) + bytes(60))), "60 labels for 64 images"),
    Case("data", "label out of range", train_on(
        train_labels=gz(idx_header(64) + bytes([12] * 64))), "label 12 out of range"),
    Case("data", "file with a wrong checksum", wrong_checksum, "wrong checksum"),
    Case("data", "missing file, offline", missing_file_offline, "could not download"),
    Case("data", "image file is a FIFO", data_file_replaced_by("fifo"), "not a regular file"),
    Case("data", "image file links to /dev/zero", data_file_replaced_by("zero"),
         "not a regular file"),
    # Command-line values
    Case("cli", "zero epochs", train_with("--epochs", "0"), "--epochs must be at least 1"),
    Case("cli", "negative epochs", train_with("--epochs", "-3"), "--epochs must be at least 1"),
    Case("cli", "epochs not a number", train_with("--epochs", "ten"), "invalid int value", 2),
    Case("cli", "zero batch size", train_with("--batch-size", "0"), "--batch-size must be at"),
    Case("cli", "batch larger than the data set", train_with("--batch-size", "256"),
         "larger than the 64 training examples"),
    Case("cli", "unknown model", train_with("--model", "resnet50"), "unknown model 'resnet50'"),
    Case("cli", "unknown data set", train_with("--dataset", "imagenet"), "invalid choice", 2),
    Case("cli", "unknown preset", train_with("--preset", "fast"), "unknown preset 'fast'"),
    Case("cli", "input size the model cannot take",
         train_with("--model", "nin_d2l", "--batch-size", "32"),
         "cannot take input (1, 28, 28)"),
    Case("cli", "zero learning rate", train_with("--lr", "0"), "--lr must be a positive number"),
    Case("cli", "negative learning rate", train_with("--lr", "-0.1"), "--lr must be a positive"),
    Case("cli", "NaN learning rate", train_with("--lr", "nan"), "--lr must be a positive number"),
    Case("cli", "label smoothing of 1", train_with("--label-smoothing", "1"),
         "--label-smoothing must be in [0, 1)"),
    Case("cli", "negative momentum", train_with("--momentum", "-0.9"), "--momentum must be 0"),
    Case("cli", "learning rate beyond float32", train_with("--lr", "1e39"),
         "--lr must be a finite number, at most 3.4e+38"),
    Case("cli", "weight decay beyond float32", train_with("--weight-decay", "1e39"),
         "--weight-decay must be a finite number, at most"),
    Case("cli", "seed beyond 64 bits", train_with("--seed", str(2**70)), "--seed must be in"),
    Case("cli", "the meta device", train_with("--device", "meta"), "holds shapes, not data"),
    Case("cli", "model kwargs setting the input channels",
         train_with("--model-kwargs", '{"in_channels": 3}'), "cannot set in_channels"),
    Case("cli", "a hundred million 1×1 convolutions",
         train_with("--model-kwargs", '{"num_pointwise": 100000000}'), "must be from 0 to 16"),
    Case("cli", "a thousandfold wide network",
         train_with("--model-kwargs", '{"width": 1000}'), "width must be in (0, 16], got 1000"),
    Case("cli", "a network of no width",
         train_with("--model-kwargs", '{"width": 0}'), "width must be in (0, 16], got 0"),
    Case("cli", "a width of null",
         train_with("--model", "nin_fast", "--model-kwargs", '{"width": null}'),
         "width must be float, got None"),
    Case("cli", "model kwargs not a plain value",
         train_with("--model-kwargs", '{"dropout": [0.5]}'), "dropout must be float, got [0.5]"),
    Case("cli", "resize past any screen", train_with("--resize", "100000"),
         "--resize must be at most 4096"),
    Case("cli", "a training step larger than the memory",
         train_with("--model", "nin_d2l", "--resize", "4096", "--batch-size", "64"),
         "lower --batch-size or --resize"),
    Case("cli", "holdout as large as the split", train_with("--holdout", "64"),
         "--holdout must be in [0, 64)"),
    Case("cli", "negative checkpoint interval", train_with("--checkpoint-every", "-1"),
         "--checkpoint-every must be 0 or more"),
    Case("cli", "model keyword arguments not JSON", train_with("--model-kwargs", "{bn: no}"),
         "not a JSON object", 2),
    Case("cli", "unknown model keyword argument", train_with("--model-kwargs", '{"bn": false}'),
         "unexpected keyword argument 'bn'"),
    Case("cli", "a device this machine lacks", train_with("--device", "cuda:7"),
         "device 'cuda:7' is not usable here"),
    Case("cli", "output directory under a file", out_under_a_file, "cannot write to"),
    Case("cli", "disk full", disk_full, "No space left on device"),
    Case("cli", "output directory holds a run", run_exists, "already holds a run"),
    Case("cli", "output directory another nin process is training in", new_run_in_use,
         "is in use by another nin process (pid"),
    Case("cli", "a real full disk (a 256 kB tmpfs)", real_disk_full,
         "(No space left on device); check space"),
    Case("cli", "a run that diverges before its first checkpoint",
         train_with("--lr", "1e30", "--batch-size", "16"), "what it wrote is removed"),
    Case("cli", "--out name over the system's limit", long_name("--out"), "File name too long"),
    Case("cli", "--resume name over the system's limit", long_name("--resume"),
         "File name too long"),
    Case("cli", "--data-dir name over the system's limit", long_name("--data-dir"),
         "File name too long"),
    Case("cli", "eval of a name over the system's limit", long_name("eval"),
         "File name too long"),
    Case("cli", "predict with a name over the system's limit", long_name("predict"),
         "File name too long"),
    Case("cli", "--config file nested 200,000 deep", deep_file,
         "not valid JSON (nested too deeply"),
    Case("cli", "--model-kwargs nested 100,000 deep",
         train_with("--model-kwargs", "[" * 100_000 + "]" * 100_000), "not a JSON object", 2),
    Case("cli", "summary of an impossible input size", plain(
        "summary", "nin_d2l", "--input-size", "1", "20", "20"), "cannot take input (1, 20, 20)"),
    Case("cli", "resources at batch size 0", plain("resources", "nin_compact", "--batch-size", "0"),
         "--batch-size must be positive"),
    Case("cli", "unknown exercise", plain("exercises", "homework"), "unknown exercise 'homework'"),
    Case("cli", "unknown subcommand", plain("fit"), "invalid choice: 'fit'", 2),
    # Checkpoints
    Case("checkpoint", "missing checkpoint", plain("eval", "no/such/run"), "not found"),
    Case("checkpoint", "a crafted malicious pickle", pickle_checkpoint, "never loads"),
    Case("checkpoint", "a torch.save (zip) file", torch_save_checkpoint, "a pickle (torch.save)"),
    Case("checkpoint", "weights file cut short", edit_checkpoint(
        lambda run: truncate(run / "model.safetensors")), "not a readable safetensors file"),
    Case("checkpoint", "empty weights file", edit_checkpoint(
        lambda run: (run / "model.safetensors").write_bytes(b"")), "not a readable safetensors"),
    Case("checkpoint", "weights of another model", edit_checkpoint(other_model_weights),
         "weights of model 'nin_d2l', but the config says 'nin_compact'"),
    Case("checkpoint", "weights of other shapes", edit_checkpoint(other_shapes),
         "weights do not fit model 'nin_compact'"),
    Case("checkpoint", "config that is not JSON", edit_checkpoint(
        lambda run: (run / "config.json").write_text("{oops")), "not a valid nin config"),
    Case("checkpoint", "config missing a key", edit_checkpoint(drop_config_key),
         "missing or bad: 'dataset'"),
    Case("checkpoint", "config nested 200,000 deep", edit_checkpoint(deep_config),
         "nested too deeply"),
    Case("checkpoint", "config with a number of classes in quotes", edit_checkpoint(
        edit_config(num_classes="10")), "num_classes must be int, got '10'"),
    Case("checkpoint", "config with -1 input channels", edit_checkpoint(
        edit_config(in_channels=-1)), "in_channels must be from 1 to 1024"),
    Case("checkpoint", "weights that are NaN", edit_checkpoint(nan_weights),
         "holds NaN or infinite values"),
    Case("checkpoint", "float16 weights", edit_checkpoint(float16_weights),
         "is float16, but model 'nin_compact' keeps it in float32"),
    Case("checkpoint", "int8 weights", edit_checkpoint(int8_weights),
         "is int8, but model 'nin_compact' keeps it in float32"),
    Case("checkpoint", "a tensor named twice in the header", edit_checkpoint(duplicate_key),
         "twice"),
    Case("checkpoint", "missing config", edit_checkpoint(
        lambda run: (run / "config.json").unlink()), "config.json: not found"),
    Case("checkpoint", "images too small for the model", eval_too_small,
         "cannot take input (1, 4, 4)"),
    Case("checkpoint", "resume a directory with no checkpoint", resume(),
         "config.json: not found"),
    Case("checkpoint", "resume with changed settings", resume(("--lr", "1"), finished=True),
         "drop --lr"),
    Case("checkpoint", "resume a finished run", resume(finished=True),
         "already finished all 1 epochs"),
    Case("checkpoint", "resume from a damaged training state", damaged_state,
         "training state incomplete or does not fit this run"),
    Case("checkpoint", "resume after editing epochs in config.json", resume_edited,
         "saved under other settings than the run has now (epochs 1 → 3)"),
    Case("checkpoint", "resume from another run's last.safetensors", resume_another_run,
         "the training state of another run"),
    Case("checkpoint", "resume a run another nin process is training", resume_in_use,
         "is in use by another nin process (pid"),
    # Exports and reports
    Case("output", "export onto the run's own weights, with --force", export_to(
        lambda run: run / "model.safetensors", "--force"), "never overwrites"),
    Case("output", "export onto the run's config.json, with --force", export_to(
        lambda run: run / "config.json", "--force"), "part of a checkpoint"),
    Case("output", "export onto a directory", export_to(lambda run: run), "is a directory"),
    Case("output", "export onto a device", export_to(lambda run: Path(os.devnull)),
         "is a character device"),
    Case("output", "report over an existing file", report_over_a_file,
         "already exists; give --force"),
    Case("output", "SIGTERM during an export", sigterm_in_export, "nin: terminated (SIGTERM)",
         143),
]  # fmt: skip

# Every numeric setting of `nin train`, generated from TrainConfig so a new one is covered too:
# not a number, past 32 bits, NaN, infinite. Each gets its flag's one line before any work.
OWN_RULES = ("seed", "tta", "channels")  # each checked by its own rule, in the rows above
COUNTS = [n for n, (kind, _) in TYPES.items() if kind is int and n not in OWN_RULES]
RATES = [n for n, (kind, _) in TYPES.items() if kind is float]
CASES += [
    Case("values", f"--{flag(n)} {what}", train_with(f"--{flag(n)}", value), expect, status)
    for names, what, value, expect, status in (
        (COUNTS, "not a number", "many", "invalid int value", 2),
        (COUNTS, "past 32 bits", str(2**64), "must be at most", 1),
        (RATES, "NaN", "nan", "must be", 1),
        (RATES, "infinite", "inf", "must be", 1),
    )
    for n in names
]


def config_file(**values: object) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """`nin train --config FILE` on a tiny MNIST, FILE holding `values` as JSON."""

    def argv(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        (tmp / "settings.json").write_text(json.dumps(values))
        return train_with("--config", str(tmp / "settings.json"))(tmp, monkeypatch)

    return argv


# Every setting a config file may hold, given a list (a value of no setting's type); the case's
# own --dataset, --data-dir and --out win over the file's, so those three are left out.
CASES += [
    Case("values", f"config file: {n} is a list", config_file(**{n: [1, 2]}),
         "unknown preset" if n == "preset" else f"--{flag(n)} must be")
    for n in TYPES
    if n not in ("data_dir", "out", "dataset")
]  # fmt: skip
# Files nin did not write (special, endless, huge), saved runs, messages that echo the input:
# each kind gets one line, at once (issue 30).
MANY_KEYS = json.dumps({f"setting{i}": 1 for i in range(50_000)})
CASES += [
    Case("files", "--config /dev/zero", config_at(lambda tmp: Path("/dev/zero")),
         "a character device, not a regular file"),
    Case("files", "--config /dev/urandom", config_at(lambda tmp: Path("/dev/urandom")),
         "a character device, not a regular file"),
    Case("files", "--config a FIFO", config_at(lambda tmp: fifo(tmp / "settings.json")),
         "a named pipe, not a regular file"),
    Case("files", "--config a directory", config_at(lambda tmp: tmp), "a directory, not a"),
    Case("files", "--config of 100 MB", config_at(
        lambda tmp: sparse(tmp / "settings.json", 10**8)), "95.4 MiB, over the 1 MiB limit"),
    Case("files", "--config in YAML", config_at(lambda tmp: write(tmp / "s.yaml", "epochs: 3\n")),
         "--config reads JSON, or TOML from a .toml file"),
    Case("files", "a saved run's config.json is a FIFO", edit_checkpoint(
        replace_file("config.json", fifo)), "config.json: a named pipe, not a regular file"),
    Case("files", "a saved run's config.json is a directory", edit_checkpoint(
        replace_file("config.json", Path.mkdir)), "config.json: a directory, not a regular"),
    Case("files", "a saved run's config.json of 100 MB", edit_checkpoint(
        replace_file("config.json", lambda p: sparse(p, 10**8))), "over the 64 MiB limit"),
    Case("files", "a saved run's weights are a directory", edit_checkpoint(
        replace_file("model.safetensors", Path.mkdir)), "a directory, not a regular file"),
    Case("files", "an image folder of a FIFO, /dev/zero, dangling links, loops and bombs",
         train_folder(0, bad=True), "none of its 10 image files could be decoded"),
    Case("files", "--holdout larger than an image folder", train_folder(3, "--holdout", "10"),
         "--holdout 10 would take every one of its 6 training pictures"),
    Case("files", "an image folder of one picture a class", train_folder(1),
         "the validation split took every picture"),
    # A saved run is checked as training checks its settings, whoever wrote it.
    Case("checkpoint", "a saved run's resize of 100,000", edit_checkpoint(
        edit_config(resize=100_000)), "config.json: --resize must be at most 4096"),
    Case("checkpoint", "a saved run's resize of -1", edit_checkpoint(edit_config(resize=-1)),
         "config.json: --resize must be at least 1"),
    Case("checkpoint", "a saved run of a hundred million 1×1 convolutions", edit_checkpoint(
        edit_config(model_kwargs={"num_pointwise": 100_000_000})),
         "num_pointwise must be from 0 to 16"),
    Case("checkpoint", "predict with a saved run's resize of -1", predict_with(
        edit_config(resize=-1)), "--resize must be at least 1"),
    # The model's cost, whatever sets it: depth before it is built, then its parameters.
    Case("cli", "3,000 1×1 convolutions a block",
         train_with("--model-kwargs", '{"num_pointwise": 3000}'), "must be from 0 to 16"),
    Case("cli", "a network of 250 million parameters",
         train_with("--model-kwargs", '{"width": 16, "num_pointwise": 16}'),
         "has 251,745,418 parameters"),
    Case("cli", "dropout of NaN", train_with("--model-kwargs", '{"dropout": NaN}'),
         "dropout must be in [0, 1], got nan"),
    Case("cli", "weight decay of -Infinity", train_with("--weight-decay=-inf"),
         "--weight-decay must be 0 or more, got -inf"),
    Case("cli", "a 4,000-digit number of epochs", train_with("--epochs", "9" * 4000),
         "more characters"),
    Case("cli", "a model name of 900 kB", config_file(model="x" * 900_000),
         "unknown model 'xxx"),
    Case("cli", "50,000 unknown settings in a config file", config_at(
        lambda tmp: write(tmp / "many.json", MANY_KEYS)), "and 49,995 more"),
    Case("cli", "5,000 empty class folders", train_folder(2, empty=5000), "and 4,995 more"),
    Case("cli", "a NUL byte in a config file's name", config_file(data="pictures\u0000"),
         "--data holds a NUL byte"),
    # --force replaces an earlier export or report, never a run's own files.
    Case("output", "export onto the run's split.json, with --force", export_to(
        lambda run: write(run / "split.json", "{}"), "--force"), "--force replaces only those"),
    Case("output", "export onto the run's .lock, with --force", export_to(
        lambda run: write(run / ".lock", "123"), "--force"), "--force replaces only those"),
    Case("output", "report onto the run's split.json, with --force", lambda tmp, mp: [
        "report", str(checkpoint_dir(tmp)), "--out", str(write(tmp / "ckpt" / "split.json", "{}")),
        "--force"], "--force replaces only those"),
    Case("output", "export to a name with a NUL byte", export_to(lambda run: run / "a\0b.pt2"),
         "cannot write"),
]  # fmt: skip

MESSAGES: dict[str, str] = {}


@pytest.fixture(autouse=True)
def let_go() -> None:
    """Release what a case held (a lock, a mount, a signal handler) once it is done."""
    yield
    HELD.close()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.what}" for c in CASES])
def test_bad_input_gets_one_clear_line(case, tmp_path, monkeypatch, capsys):
    argv = case.argv(tmp_path, monkeypatch)
    capsys.readouterr()  # what setting the case up printed
    before = {p: content(p) for p in tmp_path.rglob("*")}
    status = main(argv) if case.status != 2 else exit_status(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == case.status, err
    assert len(lines) == 1, err
    assert lines[0].startswith("nin: error: " if case.status in (1, 2) else "nin: "), err
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in err
    # Nothing half-written: no temporary files, no new files at all, nothing of the user's
    # changed, and nothing unpickled.
    after = set(tmp_path.rglob("*"))
    assert not [p for p in after if p.name.endswith(".tmp")]
    assert after <= set(before), sorted(map(str, after - set(before)))
    assert {p: content(p) for p in after} == {p: before[p] for p in after}
    assert not (tmp_path / "pwned").exists()
    assert Path(os.devnull).is_char_device()
    message = lines[0].replace(str(tmp_path), "…")
    MESSAGES[f"{case.group}|{case.what}"] = re.sub(
        r"\(pid \d+\)", "(pid N)", re.sub(r"[\d.]+ GB free", "N GB free", message)
    )


def content(path: Path) -> bytes | str:
    """What a path holds, to compare: a file's bytes, else its kind."""
    if path.is_symlink() or not path.is_file():
        return "link" if path.is_symlink() else "dir" if path.is_dir() else "other"
    return path.read_bytes()


def exit_status(argv: list[str]) -> int:
    """The status of a command that argparse rejects (it exits instead of returning)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


GROUPS = {
    "data": "Data files",
    "files": "Files nin did not write: special, endless, huge; image folders",
    "cli": "Command-line values",
    "values": "Every numeric setting of nin train (generated from TrainConfig)",
    "checkpoint": "Checkpoints",
    "output": "Exports and reports",
}


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
    assert len({(c.group, c.what) for c in CASES}) == len(CASES)
    assert {c.group for c in CASES} <= set(GROUPS)  # every case has its place in the document


def render() -> str:
    """docs/reliability.md from the cases and the messages the test run saw."""
    lines = [
        "# Reliability: every bad input and the line it gets",
        "",
        "Generated by `NIN_WRITE_DOCS=1 pytest tests/test_reliability.py` from the test's own",
        "table (`CASES`); every row is a test that checks the exit status, that stderr is this",
        "one line, that no traceback is printed and that no file is left behind. `…` stands for",
        "the test's temporary directory. Exit status 1 is nin's own check, 2 a malformed",
        "command line.",
        "",
    ]
    for group, title in GROUPS.items():
        lines += [f"## {title}", "", "| input | exit | message |", "|---|---|---|"]
        for case in (c for c in CASES if c.group == group):
            message = MESSAGES[f"{group}|{case.what}"].replace("|", "\\|")
            lines.append(f"| {case.what} | {case.status} | `` {message} `` |")
        lines.append("")
    lines += [
        "## Elsewhere in the tests",
        "",
        "- The IDX reader is fuzzed with hypothesis (`tests/test_reliability.py`): any bytes",
        "  give a tensor or a `NinError`, never another exception.",
        "- A `nin train` killed with SIGKILL mid-epoch resumes to the same weights bit for bit",
        "  (`tests/test_resume.py`), in one process and under torchrun with two",
        "  (`tests/test_distributed.py`).",
        "- A run whose loss turns NaN, or sits at ln(classes) with chance accuracy, or collapses",
        "  to the same logits for every image stops with one line that names the last good",
        "  checkpoint (`tests/test_train.py`).",
        "- A run directory is locked (flock on RUN_DIR/.lock) while a run trains: a second",
        "  process, a real one, gets one line naming the first one's pid; a new run checks the",
        "  directory again once it holds the lock; a run that fails after its first checkpoint",
        "  keeps it and says `--resume`; the lock goes with the run, however it ends",
        "  (`tests/test_reliability.py`).",
        "- `nin serve`, started as a real process on 127.0.0.1 and sent real HTTP requests",
        "  (`tests/test_serve.py`): every hostile request gets a 4xx and one line (garbage",
        "  bodies, both length headers, chunked uploads, an upload over the limit, pixel bombs),",
        "  stalled sockets are cut, connections over the limit get 503, memory stays bounded",
        "  under parallel 7000×7000 PNGs, a model with NaN outputs is refused at start, and a",
        "  short load run gets no 5xx; the full load test is in [benchmarks](benchmarks.md).",
        "- SIGTERM sent from outside during an export leaves no temporary file; a real full",
        "  disk is one line from every writer, with nothing left behind",
        "  (`tests/test_reliability.py`, `tests/test_export.py`).",
        "",
    ]
    return "\n".join(lines)


def test_reliability_doc_is_generated_from_this_table():
    if len(MESSAGES) < len(CASES):
        pytest.skip("run the whole file: the document needs every case's message")
    text = render()
    if os.environ.get("NIN_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/reliability.md is stale: NIN_WRITE_DOCS=1 pytest this"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.booleans())
def test_idx_reader_never_fails_in_another_way(tmp_path_factory, data, compress):
    path = tmp_path_factory.mktemp("fuzz") / "file.gz"
    path.write_bytes(gzip.compress(data) if compress else data)
    try:
        tensor = read_idx(path)
    except NinError as e:
        assert "\n" not in str(e)
        return
    assert tensor.dtype == torch.uint8


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=4), st.randoms())
def test_idx_reader_reads_back_what_was_written(tmp_path_factory, dims, random):
    shape = tuple(dims)
    array = np.array(list(random.randbytes(int(np.prod(shape)))), dtype=np.uint8).reshape(shape)
    path = write_idx(tmp_path_factory.mktemp("idx") / "file.gz", array)
    assert np.array_equal(read_idx(path).numpy(), array)


def test_a_header_claiming_huge_dims_is_refused_without_allocating(tmp_path):
    path = tmp_path / "huge.gz"
    path.write_bytes(gz(idx_header(2**31, 2**31, 2**31)))
    with pytest.raises(NinError, match="need"):
        read_idx(path)


# --- Run directories: one process at a time, and what a failed run leaves


HOLDER = """
import sys
from pathlib import Path
from nin.rundir import lock_run_dir
with lock_run_dir(Path(sys.argv[1]), resume=True):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_gets_one_line(tmp_path, monkeypatch, capsys):
    run = trained(tmp_path, monkeypatch)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(["train", "--resume", str(run)]) == 1
        err = capsys.readouterr().err
        assert err == (
            f"nin: error: {run} is in use by another nin process (pid {holder.pid}); wait for "
            "it or choose another --out\n"
        )
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    # Once the other process is gone, the directory is free again (the run here is finished).
    assert main(["train", "--resume", str(run)]) == 1
    assert "already finished all 1 epochs" in capsys.readouterr().err
    assert not (run / ".lock").exists()


def test_a_new_run_checks_the_directory_again_once_it_holds_the_lock(tmp_path, monkeypatch, capsys):
    """Between the first look and the lock, another run took the directory and finished."""
    real = nin.train.prepare_run_dir
    other = {"model": "nin_compact", "note": "another run's"}

    def then_another_run(*args: object) -> Path:
        run_dir = real(*args)
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(other))
        return run_dir

    monkeypatch.setattr(nin.train, "prepare_run_dir", then_another_run)
    argv = train_with()(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(argv) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == other
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


def test_only_rank_0_locks(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    answers = iter([str(run), ""])  # rank 0's name for the directory, and its verdict: fine
    monkeypatch.setattr(nin.train, "broadcast_text", lambda text, world: next(answers))
    config = saved_config({"out": str(run)})
    with contextlib.ExitStack() as hold:
        assert nin.train.open_run_dir(config, World(rank=1, size=2), True, hold) == run
        assert list(run.iterdir()) == []  # no lock file: rank 0, another process, holds it
        with lock_run_dir(run):  # as it can while rank 1 runs
            assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_a_failed_run_lets_go_of_its_directory(tmp_path, monkeypatch, capsys):
    """The lock goes with the run however it ends, in this process too (flock belongs to the
    open file), and a run that failed before its first checkpoint leaves the --out free."""
    argv = train_with("--lr", "1e30", "--batch-size", "16")(tmp_path, monkeypatch)
    assert main(argv) == 1
    assert "the same --out works again" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with monkeypatch.context() as patched:
        patched.setattr(nin.train, "evaluate", interrupted)  # Ctrl-C at the first epoch's end
        assert main([("0.1" if a == "1e30" else a) for a in argv]) == 130
    assert not (tmp_path / "run").exists()  # an interrupted new run: removed too
    run = trained(tmp_path, monkeypatch)
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json",
        "curves.png",
        "last.safetensors",
        "metrics.jsonl",
        "model.safetensors",
    ]


def interrupted(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


def test_a_run_that_fails_after_its_first_checkpoint_is_kept(tmp_path, monkeypatch, capsys):
    argv = train_with("--lr", "1e30", "--batch-size", "16", "--checkpoint-every", "1")
    assert main(argv(tmp_path, monkeypatch)) == 1
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert len(err.strip().splitlines()) == 1
    assert err.strip().endswith(f"the run so far is kept (`nin train --resume {run}` continues it)")
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json",
        "last.safetensors",
        "metrics.jsonl",
    ]


def test_what_a_resume_may_change_is_left_out_of_the_settings_it_checks():
    from nin.checkpoint import CONFIG, METRICS, NOT_SETTINGS
    from nin.config import WHERE
    from nin.files import RUN_RECORDS

    assert set(WHERE) <= set(NOT_SETTINGS)
    assert RUN_RECORDS == (CONFIG, METRICS)


# --- Signals and full disks


EXPORT_UNTIL_TERMINATED = """
import sys, time
import nin.export
from nin.cli import main

def wait_for_sigterm(shape, batch):
    print("exporting", flush=True)
    time.sleep(60)

nin.export.sample_inputs = wait_for_sigterm
sys.exit(main(["export", sys.argv[1], "--format", "torch-export", "--out", sys.argv[2]]))
"""


def test_sigterm_from_outside_during_an_export_leaves_nothing(tmp_path):
    run = checkpoint_dir(tmp_path)
    out = tmp_path / "exports" / "model.pt2"
    out.parent.mkdir()
    victim = subprocess.Popen(
        [sys.executable, "-c", EXPORT_UNTIL_TERMINATED, str(run), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert victim.stdout.readline().strip() == "exporting"
    assert [p.name.endswith(".tmp") for p in out.parent.iterdir()] == [True]  # it is writing
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=60)
    assert victim.returncode == 143, err
    assert err == "nin: terminated (SIGTERM)\n"
    assert list(out.parent.iterdir()) == []


@pytest.fixture
def small(tmp_path) -> Path:
    """A 256 kB tmpfs: a real file system that fills up."""
    where = small_disk(tmp_path)
    yield where
    HELD.close()


def test_a_real_full_disk_is_one_line_and_leaves_nothing(small):
    big = {"weights": torch.zeros(1_000_000)}
    with pytest.raises(NinError, match=r"cannot write .* \(No space left on device\)") as e:
        save_tensors(small / "weights.safetensors", big, {})
    assert "\n" not in str(e.value)
    assert list(small.iterdir()) == []
