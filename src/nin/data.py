"""Data sets: download and verify the official files, read them, and preprocess their images.

MNIST and Fashion-MNIST come as gzipped IDX files; CIFAR-10 as the official binary archive, which
is unpacked safely and read as fixed-size records (never the pickled version: nothing downloaded
is ever unpickled).

`Preprocess` turns uint8 images into what a model takes, the same way in training, evaluation,
prediction, serving and export. Batches come from `nin.loaders`.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import math
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nin.errors import NinError
from nin.files import atomic_path, no_empty_dirs_left, open_file

IDX_DTYPES = {0x08: torch.uint8}
MAX_IDX_BYTES = 1 << 30  # the largest official IDX file unpacks to 47 MB; also any data file's cap
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # one label byte, then the R, G and B planes
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its files with their md5, where to fetch them, and its statistics.

    An IDX data set lists its four .gz files. An archive data set (CIFAR-10) lists one archive
    under the key "archive", names the folder it unpacks to, and the record files of each split.
    """

    name: str
    files: dict[str, tuple[str, str]]  # key -> (file name, md5)
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    mean: float | tuple[float, ...]  # of train pixels in [0, 1]; one per channel for colour
    std: float | tuple[float, ...]
    side: int = 28  # images are side×side pixels
    folder: str = ""  # under the data root; "" means `name`
    unpacks_to: str = ""  # the archive's one top folder; "" for loose IDX files
    split_files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # in the archive
    records_per_file: int = 0  # fixed-size records in each split file


CIFAR10 = DatasetSpec(
    name="cifar10",
    files={"archive": ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")},
    mirrors=("https://www.cs.toronto.edu/~kriz/",),
    classes=CIFAR10_CLASSES,
    # Measured on the 50,000 training images (tests/test_cifar.py checks them).
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    side=CIFAR_SIDE,
    folder="cifar-10",
    unpacks_to="cifar-10-batches-bin",
    split_files={
        "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test": ("test_batch.bin",),
    },
    records_per_file=10000,
)


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        files={
            "train_images": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        classes=FASHION_MNIST_CLASSES,
        mean=0.2860,
        std=0.3530,
    ),
    "mnist": DatasetSpec(
        name="mnist",
        files={
            "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        # The original site often refuses downloads; PyTorch's mirror serves the same bytes.
        mirrors=(
            "http://yann.lecun.com/exdb/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ),
        classes=tuple(str(d) for d in range(10)),
        mean=0.1307,
        std=0.3081,
    ),
    "cifar10": CIFAR10,
}


def classes_of(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The class names of a saved run: its own (an image folder's), or its data set's."""
    return tuple(config.get("classes") or dataset_spec(config["dataset"]).classes)


def data_name(config: Mapping[str, Any]) -> str:
    """What a run trains on, in a word: its image folder's name, or its data set's."""
    folder = config.get("data")
    return Path(folder).expanduser().absolute().name if folder else config["dataset"]


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a known data set, or a clear error listing the known names."""
    if name not in DATASETS:
        raise NinError(f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Where data sets live: `data_dir`, else $NIN_DATA_DIR, else ~/.cache/nin."""
    chosen = data_dir or os.environ.get("NIN_DATA_DIR") or Path.home() / ".cache" / "nin"
    return Path(chosen).expanduser()


def md5sum(path: Path) -> str:
    """Hex md5 of a data file, read in chunks (a FIFO or a device is refused, never read)."""
    digest = hashlib.md5()
    with open_file(path, MAX_IDX_BYTES, "delete it and run again to download it") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest` atomically, checked against `md5`; on any failure no file is left."""
    with atomic_path(dest) as tmp:
        digest = fetch(url, tmp, timeout)
        if digest != md5:
            raise NinError(
                f"{url}: checksum mismatch (md5 {digest}, expected {md5}); "
                "the download is corrupt or not the official file"
            )
    return dest


def fetch(url: str, path: Path, timeout: float) -> str:
    """Stream `url` into `path` and return its md5; network failures become one-line errors."""
    digest = hashlib.md5()
    try:
        with open(path, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = int(response.headers.get("Content-Length") or -1)
            received = 0
            name = url.rsplit("/", 1)[-1]
            total = expected if expected >= 0 else None
            # disable=None: a progress bar on a terminal only.
            with tqdm(total=total, desc=name, unit="B", unit_scale=True, disable=None) as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise NinError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise NinError(f"{url}: cannot connect ({e.reason}); are you offline?") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, bad responses
        raise NinError(f"{url}: download failed ({type(e).__name__}: {e})") from None
    if expected >= 0 and received != expected:
        raise NinError(f"{url}: download truncated ({received} of {expected} bytes)")
    return digest.hexdigest()


def ensure_files(
    name: str,
    data_dir: str | os.PathLike | None = None,
    mirrors: tuple[str, ...] | None = None,
    splits: tuple[str, ...] = ("train", "test"),
) -> dict[str, Path]:
    """Paths of a data set's files for `splits`, downloading those that are missing.

    A file already present with the right md5 is used as is; one with the wrong md5 is an error
    (it is never silently replaced). Keys are "<split>_..." ("train_images", "train_1", ...).
    An archive data set whose folder is already unpacked is used as is, archive or not.
    """
    spec = dataset_spec(name)
    root = data_root(data_dir)
    folder = root / (spec.folder or name)
    had = root.exists(), folder.exists()
    try:
        return _ensure(spec, folder, mirrors or spec.mirrors, splits)
    except NinError as e:
        given = (
            "--data-dir" if data_dir else "NIN_DATA_DIR" if os.environ.get("NIN_DATA_DIR") else ""
        )
        if given and not had[0]:
            raise NinError(f"{e} ({given} names {root}, which does not exist: a typo?)") from None
        if given and not had[1]:
            raise NinError(f"{e} ({given} names {root}, which holds no {folder.name}/)") from None
        raise


def _ensure(
    spec: DatasetSpec, folder: Path, mirrors: tuple[str, ...], splits: tuple[str, ...]
) -> dict[str, Path]:
    if spec.unpacks_to:
        return _ensure_unpacked(spec, folder, mirrors, splits)
    paths = {}
    for key, (filename, md5) in spec.files.items():
        if key.split("_")[0] not in splits:
            continue
        path = folder / filename
        if path.exists():
            _check_md5(path, md5)
        else:
            _download_from_mirrors(path, md5, mirrors, "four .gz files")
        paths[key] = path
    return paths


def _check_md5(path: Path, md5: str) -> None:
    try:
        actual = md5sum(path)
    except OSError as e:
        raise NinError(f"{path}: cannot be read ({e.strerror}); fix or delete it") from None
    if actual != md5:
        raise NinError(
            f"{path}: wrong checksum (corrupt, truncated or not the official file); "
            "delete it and run again to download a fresh copy"
        )


def _ensure_unpacked(
    spec: DatasetSpec, folder: Path, mirrors: tuple[str, ...], splits: tuple[str, ...]
) -> dict[str, Path]:
    unpacked = folder / spec.unpacks_to
    if not unpacked.is_dir():
        filename, md5 = spec.files["archive"]
        archive = folder / filename
        if archive.exists():
            _check_md5(archive, md5)
        else:
            _download_from_mirrors(archive, md5, mirrors, f"archive {filename}")
        extract_tar(archive, folder, spec.unpacks_to)
    paths = {}
    for split in splits:
        for i, filename in enumerate(spec.split_files[split], 1):
            path = unpacked / filename
            if not path.is_file():
                raise NinError(
                    f"{path}: file not found; delete {unpacked} and run again to unpack it afresh"
                )
            paths[f"{split}_{i}"] = path
    return paths


def _download_from_mirrors(path: Path, md5: str, mirrors: tuple[str, ...], what: str) -> None:
    reasons = []
    with no_empty_dirs_left(path.parent):
        for base in mirrors:
            try:
                download(base.rstrip("/") + "/" + path.name, path, md5)
                return
            except NinError as e:
                reasons.append(str(e))
    raise NinError(
        f"could not download {path.name} ({'; '.join(reasons)}). Download the data set's {what} "
        f"from {mirrors[0]} and put them in {path.parent}/, or point --data-dir or "
        f"NIN_DATA_DIR at a directory holding {path.parent.name}/{path.name}"
    )


def extract_tar(archive: Path, dest: Path, top: str) -> Path:
    """Unpack `archive` (.tar.gz) and move its folder `top` into `dest`; returns `dest / top`.

    Every member is checked before anything is written: only plain files and folders under
    `top`, no absolute paths, no `..`, no links or devices. The members go to a temporary folder
    that is renamed into place, so a failure never leaves a half-unpacked `top`.
    """
    fix = "delete it and run again to download a fresh copy"
    tmp = None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                why = _unsafe(member, top)
                if why:
                    raise NinError(
                        f"{archive}: refusing member {member.name!r} ({why}); "
                        f"it is not the official archive, {fix}"
                    )
            tmp = Path(tempfile.mkdtemp(prefix=f".{top}.", suffix=".tmp", dir=dest))
            # filter="data" is tarfile's own guard (Python 3.12, backported); ours above is
            # stricter and runs on every version.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
        if not (tmp / top).is_dir():
            raise NinError(f"{archive}: holds no folder {top}/; {fix}")
        try:
            os.replace(tmp / top, dest / top)
        except OSError:
            if not (dest / top).is_dir():  # else another process (torchrun) unpacked it first
                raise
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise NinError(f"{archive}: not a readable .tar.gz ({e}); {fix}") from None
    except OSError as e:
        raise NinError(f"cannot unpack {archive} into {dest} ({e.strerror or e})") from None
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest / top


def _unsafe(member: tarfile.TarInfo, top: str) -> str:
    """Why an archive member must not be unpacked, or "" if it is safe."""
    name = member.name
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or ":" in name.split("/")[0]:
        return "an absolute path"
    if ".." in path.parts or ".." in name.split("\\"):
        return "a path with '..'"
    if member.issym() or member.islnk():
        return "a link"
    if not (member.isfile() or member.isdir()):
        return "a device, fifo or other special file"
    if not path.parts or path.parts[0] != top:  # "." or "" has no parts
        return f"outside {top}/"
    return ""


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read a gzipped IDX file (big-endian header, uint8 payload) into a uint8 tensor."""
    path = Path(path)
    fix = "delete it and run again to download a fresh copy"
    try:
        with open_file(path, MAX_IDX_BYTES, fix) as raw, gzip.open(raw, "rb") as f:
            data = f.read(MAX_IDX_BYTES + 1)  # a gzip bomb stops here
        if len(data) > MAX_IDX_BYTES:
            raise NinError(f"{path}: unpacks to over {MAX_IDX_BYTES >> 20} MiB; {fix}")
    except FileNotFoundError:
        raise NinError(f"{path}: file not found") from None
    except (gzip.BadGzipFile, EOFError, zlib.error, OSError) as e:
        raise NinError(f"{path}: not a readable gzip file ({e}); {fix}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise NinError(f"{path}: not an IDX file of unsigned bytes (bad magic number); {fix}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise NinError(f"{path}: IDX header is truncated; {fix}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise NinError(
            f"{path}: IDX dims {dims} need {expected} bytes but the file holds {len(data)}; {fix}"
        )
    if expected == header:  # a zero dim: torch.frombuffer refuses an empty buffer
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def read_cifar(
    path: str | os.PathLike, records: int = 0, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a CIFAR binary batch into images (N, 3, 32, 32) uint8 and labels (N,) int64.

    Each record is one label byte and 3072 pixel bytes (the R, G, B planes, rows in order).
    `records` is the number the file must hold (0: any whole number).
    """
    path = Path(path)
    fix = f"delete {path.parent} and run again to unpack a fresh copy"
    try:
        with open_file(path, MAX_IDX_BYTES, fix) as f:
            size = os.fstat(f.fileno()).st_size  # checked before reading
            expected = records * CIFAR_RECORD
            if (records and size != expected) or not size or size % CIFAR_RECORD:
                need = f"{expected} bytes" if records else f"a multiple of {CIFAR_RECORD} bytes"
                raise NinError(f"{path}: holds {size} bytes, not {need} of CIFAR records; {fix}")
            data = np.fromfile(f, dtype=np.uint8)
    except FileNotFoundError:
        raise NinError(f"{path}: file not found") from None
    except OSError as e:
        raise NinError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    data = data.reshape(-1, CIFAR_RECORD)
    labels = data[:, 0]
    if labels.max() >= num_classes:
        raise NinError(f"{path}: label {labels.max()} out of range (0-{num_classes - 1}); {fix}")
    images = data[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def load_split(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, H, W) uint8 and labels (N,) int64 of the `train` or `test` split."""
    if split not in ("train", "test"):
        raise NinError(f"unknown split {split!r}; use 'train' or 'test'")
    spec = dataset_spec(name)
    paths = ensure_files(name, data_dir, splits=(split,))
    if spec.unpacks_to:
        parts = [read_cifar(p, spec.records_per_file, len(spec.classes)) for p in paths.values()]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    images = read_idx(paths[f"{split}_images"])
    labels = read_idx(paths[f"{split}_labels"])
    if images.ndim != 3 or labels.ndim != 1:
        raise NinError(
            f"{paths[f'{split}_images']}: expected images (N, H, W) and labels (N,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}; the files do not belong together"
        )
    if len(images) != len(labels):
        raise NinError(
            f"{paths[f'{split}_labels']}: {len(labels)} labels for {len(images)} images; "
            "the image and label files do not belong together"
        )
    if len(labels) and int(labels.max()) >= len(spec.classes):
        raise NinError(f"{paths[f'{split}_labels']}: label {int(labels.max())} out of range")
    return images.unsqueeze(1), labels.long()


@dataclass(frozen=True)
class Preprocess:
    """uint8 images -> the float tensor a model takes: scaled to [0, 1], resized to `side`,
    normalised, channels-last. One object for training, evaluation, predict, serve and export."""

    side: int | None = None  # square side to resize to; None keeps the images' size
    mean: float | tuple[float, ...] | None = None  # one value, or one per channel
    std: float | tuple[float, ...] | None = None
    channels_last: bool = False

    @classmethod
    def for_run(cls, config: Mapping[str, Any]) -> Preprocess:
        """The preprocessing of a run, from its config (a config.json, or `vars(TrainConfig)`)."""
        if config.get("data"):  # an image folder: its run saved its own statistics
            mean, std, side = config.get("mean"), config.get("std"), config["resize"]
        else:
            spec = dataset_spec(config["dataset"])
            mean, std, side = spec.mean, spec.std, config.get("resize") or spec.side
        normalize = bool(config.get("normalize"))
        mean, std = (tuple(v) if isinstance(v, list) else v for v in (mean, std))  # from JSON
        return cls(
            side,
            mean if normalize else None,
            std if normalize else None,
            bool(config.get("channels_last")),
        )

    def __call__(
        self, batch: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float (B, C, side, side); `augment` runs on [0, 1] pixels."""
        x = batch.float().div_(255)
        if augment is not None:
            x = augment(x)
        if self.side and (x.shape[-2], x.shape[-1]) != (self.side, self.side):
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear")
        if self.mean is not None and self.std is not None:
            x = x.sub_(channel_values(self.mean, x.device)).div_(channel_values(self.std, x.device))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


@functools.cache
def channel_values(values: float | tuple[float, ...], device: torch.device) -> torch.Tensor:
    """One value, or one per channel, as a (1, C, 1, 1) tensor on `device`, made once.

    Cached so that no batch pays a host-to-device copy (a sync on GPUs) for its statistics.
    """
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)
