"""CIFAR-10: the official binary archive served locally, downloaded, checked, unpacked and read."""

import dataclasses
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from nin.cli import main
from nin.config import make_config
from nin.data import (
    CIFAR_RECORD,
    DATASETS,
    Preprocess,
    ensure_files,
    extract_tar,
    load_split,
    md5sum,
    read_cifar,
)
from nin.errors import NinError
from nin.loaders import DeviceLoader
from nin.models import create_model
from nin.train import train

from .conftest import SHARED_DATA

CIFAR10 = DATASETS["cifar10"]
TOP = CIFAR10.unpacks_to
ARCHIVE = CIFAR10.files["archive"][0]
RECORDS = 4  # per file in the small archive


def records(n: int, seed: int, max_label: int = 9) -> bytes:
    """`n` CIFAR records: a label byte, then 3072 pixel bytes."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) + seed) % (max_label + 1)
    pixels = rng.integers(0, 256, (n, CIFAR_RECORD - 1))
    return np.column_stack([labels, pixels]).astype(np.uint8).tobytes()


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def official_layout(tar: tarfile.TarFile) -> None:
    """The official archive's members, with RECORDS records per batch file."""
    add(tar, TOP, kind=tarfile.DIRTYPE)
    for i, name in enumerate(CIFAR10.split_files["train"] + CIFAR10.split_files["test"]):
        add(tar, f"{TOP}/{name}", records(RECORDS, i))
    add(tar, f"{TOP}/batches.meta.txt", "\n".join(CIFAR10.classes).encode() + b"\n")
    add(tar, f"{TOP}/readme.html", b"<html></html>")


def write_archive(path: Path, extra: tuple[str, bytes] | None = None) -> Path:
    """A small .tar.gz in the official layout, plus one `extra` member (name, type) if given."""
    with tarfile.open(path, "w:gz") as tar:
        official_layout(tar)
        if extra:
            add(tar, extra[0], kind=extra[1])
    return path


@pytest.fixture
def served(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 over a folder; yields (base URL, folder)."""
    root = tmp_path_factory.mktemp("served")

    def handler(*args, **kwargs):
        return QuietHandler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # A short poll interval: shutdown() waits up to one interval.
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", root
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def small_cifar(served, monkeypatch):
    """Serve an archive; the cifar10 spec then expects its md5 and RECORDS records a file."""
    url, root = served

    def serve(extra=None, md5=None):
        archive = write_archive(root / ARCHIVE, extra)
        spec = dataclasses.replace(
            CIFAR10,
            files={"archive": (ARCHIVE, md5 or md5sum(archive))},
            mirrors=(url,),
            records_per_file=RECORDS,
        )
        monkeypatch.setitem(DATASETS, "cifar10", spec)
        return archive

    return serve


def test_download_verify_unpack_load_train(small_cifar, tmp_path):
    small_cifar()
    paths = ensure_files("cifar10", tmp_path)
    folder = tmp_path / "cifar-10"
    assert {p.name for p in folder.iterdir()} == {ARCHIVE, TOP}  # no temporary left
    assert paths["train_5"] == folder / TOP / "data_batch_5.bin" and len(paths) == 6
    images, labels = load_split("cifar10", "train", tmp_path)
    assert images.shape == (5 * RECORDS, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels[:5].tolist() == [0, 1, 2, 3, 1]
    # The first record's pixels: R plane, then G, then B, each row by row.
    first = np.frombuffer(records(RECORDS, 0), np.uint8)[1:CIFAR_RECORD]
    assert np.array_equal(images[0].numpy().ravel(), first)
    assert load_split("cifar10", "test", tmp_path)[0].shape == (RECORDS, 3, 32, 32)

    # Unpacked already: a dead mirror is fine.
    (folder / ARCHIVE).unlink()
    assert ensure_files("cifar10", tmp_path, mirrors=("http://127.0.0.1:9/",)) == paths

    config = make_config(
        "cifar10", data_dir=str(tmp_path), epochs=1, batch_size=8, out=str(tmp_path / "run"),
        amp=False, channels_last=False, test_subset=4,
    )  # fmt: skip
    result = train(config, log=lambda line: None)
    assert result["train_examples"] == 5 * RECORDS and 0 <= result["test_acc"] <= 1


def test_wrong_checksum_is_refused_and_leaves_nothing(small_cifar, tmp_path):
    small_cifar(md5="0" * 32)
    with pytest.raises(NinError, match="checksum mismatch") as err:
        ensure_files("cifar10", tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cifar-10").exists()  # not even an empty folder


@pytest.mark.parametrize(
    "extra, why",
    [
        (("../x", tarfile.REGTYPE), "'..'"),
        ((f"{TOP}/../../x", tarfile.REGTYPE), "'..'"),
        (("/tmp/nin-cifar-test-x", tarfile.REGTYPE), "absolute"),
        ((f"{TOP}/link", tarfile.SYMTYPE), "link"),
        ((f"{TOP}/hard", tarfile.LNKTYPE), "link"),
        ((f"{TOP}/dev", tarfile.CHRTYPE), "device"),
        ((f"{TOP}/fifo", tarfile.FIFOTYPE), "fifo"),
        (("elsewhere.bin", tarfile.REGTYPE), "outside"),
        ((".", tarfile.DIRTYPE), "outside"),  # what `tar czf x.tgz .` starts with
    ],
)
def test_malicious_archives_are_refused_and_nothing_unpacked(small_cifar, tmp_path, extra, why):
    small_cifar(extra)
    with pytest.raises(NinError, match="refusing member") as err:
        ensure_files("cifar10", tmp_path)
    assert why in str(err.value) and "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "cifar-10").iterdir()] == [ARCHIVE]  # verified, unopened
    assert not (tmp_path / "x").exists() and not Path("/tmp/nin-cifar-test-x").exists()


def test_a_second_process_unpacking_the_same_archive_finds_it_done(small_cifar, tmp_path):
    from nin.data import extract_tar

    small_cifar()
    first = ensure_files("cifar10", tmp_path)  # downloads and unpacks
    archive = tmp_path / "cifar-10" / ARCHIVE
    assert archive.exists()
    # As a second torchrun process would, after the first renamed its folder into place:
    assert extract_tar(archive, tmp_path / "cifar-10", TOP) == tmp_path / "cifar-10" / TOP
    assert ensure_files("cifar10", tmp_path) == first


def test_a_broken_archive_leaves_nothing_half_unpacked(tmp_path):
    archive = write_archive(tmp_path / ARCHIVE)
    archive.write_bytes(archive.read_bytes()[:-200])
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(NinError, match="not a readable .tar.gz"):
        extract_tar(archive, dest, TOP)
    assert list(dest.iterdir()) == []


def test_bad_batch_files_get_one_line_errors(small_cifar, tmp_path):
    small_cifar()
    batch = ensure_files("cifar10", tmp_path)["train_3"]
    batch.write_bytes(batch.read_bytes()[:-1])
    with pytest.raises(NinError, match=f"holds {RECORDS * CIFAR_RECORD - 1} bytes") as err:
        load_split("cifar10", "train", tmp_path)
    assert str(batch) in str(err.value) and "\n" not in str(err.value)
    bad = bytearray(records(RECORDS, 0))
    bad[CIFAR_RECORD] = 10  # the second record's label
    batch.write_bytes(bytes(bad))
    with pytest.raises(NinError, match="label 10 out of range"):
        load_split("cifar10", "train", tmp_path)
    with pytest.raises(NinError, match="not found"):
        read_cifar(tmp_path / "missing.bin")


@pytest.fixture
def real_cifar() -> Path:
    if not (SHARED_DATA / "cifar-10" / TOP).is_dir():
        pytest.skip(f"real CIFAR-10 not found at {SHARED_DATA} (set NIN_TEST_DATA)")
    return SHARED_DATA


def test_real_cifar10_loads_and_normalises(real_cifar):
    for split, n in (("test", 10000), ("train", 50000)):
        images, labels = load_split("cifar10", split, real_cifar)
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
        assert torch.bincount(labels).tolist() == [n // 10] * 10
        if split == "test":
            assert labels[:4].tolist() == [3, 8, 8, 0]  # cat, ship, ship, airplane
    loader = DeviceLoader(
        images, labels, 10000, preprocess=Preprocess(mean=CIFAR10.mean, std=CIFAR10.std)
    )
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for x, _ in loader:
        total += x.double().sum((0, 2, 3))
        squares += x.double().pow(2).sum((0, 2, 3))
    pixels = len(labels) * 32 * 32
    mean = total / pixels
    std = (squares / pixels - mean**2).sqrt()
    # The spec's statistics are the train split's own, to 4 decimals.
    assert mean.abs().max() < 1e-3 and (std - 1).abs().max() < 1e-3


def test_nin_download_cifar10(small_cifar, tmp_path, capsys):
    small_cifar()
    assert main(["download", "cifar10", "--data-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0].startswith("ok  ") and lines[0].endswith("data_batch_1.bin")


@pytest.mark.parametrize("preset", ["paper-cifar10", "cifar10", "paper-mnist", "mnist"])
def test_paper_presets_build(preset):
    config = make_config(preset)
    spec = DATASETS[config.dataset]
    channels = 3 if config.dataset == "cifar10" else 1
    model = create_model(config.model, len(spec.classes), channels, **config.model_kwargs)
    side = 32 if channels == 3 else 28
    assert model.eval()(torch.zeros(2, channels, side, side)).shape == (2, 10)
