"""Every bad input gets one clear line and a non-zero exit: no traceback, no partial file.

CASES is the table of inputs; each runs through the real command line (in process, so a case
may simulate a full disk). The messages it gets are written to docs/reliability.md by
`NIN_WRITE_DOCS=1 pytest tests/test_reliability.py`, and a test checks that file is current.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nin.checkpoint import save_checkpoint, save_state
from nin.cli import main
from nin.data import DATASETS, read_idx
from nin.errors import NinError
from nin.models import create_model
from tests.conftest import REPO, checkpoint_config, write_idx

DOC = REPO / "docs" / "reliability.md"


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
    )
    return ["train", "--resume", str(run)]


def plain(*argv: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    """A command that needs no files."""
    return lambda tmp, monkeypatch: list(argv)


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
]  # fmt: skip
MESSAGES: dict[str, str] = {}


@pytest.mark.parametrize("case", CASES, ids=[f"{c.group}: {c.what}" for c in CASES])
def test_bad_input_gets_one_clear_line(case, tmp_path, monkeypatch, capsys):
    argv = case.argv(tmp_path, monkeypatch)
    capsys.readouterr()  # what setting the case up printed
    before = set(tmp_path.rglob("*"))
    status = main(argv) if case.status == 1 else exit_status(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == case.status, err
    assert len(lines) == 1 and lines[0].startswith("nin: error: "), err
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in err
    # Nothing half-written: no temporary files, no new files at all, and nothing unpickled.
    after = set(tmp_path.rglob("*"))
    assert not [p for p in after if p.name.endswith(".tmp")]
    assert after <= before, sorted(map(str, after - before))
    assert not (tmp_path / "pwned").exists()
    MESSAGES[f"{case.group}|{case.what}"] = lines[0].replace(str(tmp_path), "…")


def exit_status(argv: list[str]) -> int:
    """The status of a command that argparse rejects (it exits instead of returning)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30
    assert len({(c.group, c.what) for c in CASES}) == len(CASES)


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
    for group, title in (("data", "Data files"), ("cli", "Command-line values"),
                         ("checkpoint", "Checkpoints")):  # fmt: skip
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
