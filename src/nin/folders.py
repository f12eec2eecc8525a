"""Your own images: a folder with one subfolder per class, or train/ and val/ (and test/)
folders of that shape, decoded once with Pillow, cached as uint8 and served like the built-in
data sets.

Every image is made square (padded with black, as `nin predict` does), resized to the run's
side and stored as uint8 in a safetensors cache keyed by the files' names, sizes and times
and the side, so a second run starts in seconds. A file that cannot be used is skipped and
listed, never fatal; a folder that cannot be a data set is one clear error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from nin.device import memory_budget
from nin.errors import NinError, some
from nin.files import atomic_path
from nin.images import (
    DECODE_BYTES,
    colour_channels,
    decode_side,
    open_image,
    quiet_pillow,
    to_pixels,
)

SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1
VAL_FRACTION = 0.1  # carved from train, per class, where there is no val/ folder


@dataclass
class FolderData:
    """A decoded image folder: class names, and each split's images and labels."""

    root: Path
    classes: tuple[str, ...]
    images: CachedImages  # uint8 (N, C, side, side), every split's together, on disk
    labels: torch.Tensor  # int64 (N,)
    files: list[str]  # each image's path under `root`, in the order of `images`
    skipped: list[tuple[str, str]]  # (path under root, why)

    def split(self, name: str) -> torch.Tensor:
        """Indices of split `name`'s images: those under name/, or, without split folders,
        every image for "train"."""
        if any(f.startswith(("train/", "val/")) for f in self.files):
            chosen = [i for i, f in enumerate(self.files) if f.startswith(f"{name}/")]
        else:
            chosen = list(range(len(self.files))) if name == "train" else []
        return torch.tensor(chosen, dtype=torch.long)

    @functools.cached_property
    def train_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the training images (train/ or every image), in [0, 1]."""
        return channel_stats(self.images.subset(self.split("train")))

    def train_val(self, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Indices of the training and validation images, and whether validation was carved
        from train: the val/ folder if there is one, else a seeded, stratified `holdout`
        images (default: a tenth of each class)."""
        train, val = self.split("train"), self.split("val")
        if len(val):
            return train, val, False
        if holdout >= len(train):
            raise NinError(
                f"{self.root}: --holdout {holdout} would take every one of its {len(train)} "
                "training pictures for validation; give a smaller --holdout"
            )
        generator = torch.Generator().manual_seed(seed)
        labels = self.labels[train]
        fraction = holdout / len(train) if holdout else VAL_FRACTION
        carved = []
        for c in range(len(self.classes)):
            members = train[labels == c]
            members = members[torch.randperm(len(members), generator=generator)]
            carved.append(members[: max(1, round(fraction * len(members)))])
        val = torch.cat(carved).sort().values
        if len(val) == len(train):  # one picture a class: each is carved for validation
            raise NinError(
                f"{self.root}: the validation split took every picture (at least one a class); "
                "add pictures (two or more a class), or a val/ folder"
            )
        return train[~torch.isin(train, val)], val, True


class CachedImages(torch.utils.data.Dataset):
    """Some images of a cache file, read one at a time from disk: a data set for a
    DataLoader (streaming), which also answers the few slices a run needs (its first images)."""

    def __init__(self, path: Path, shape: tuple[int, ...], rows: torch.Tensor | None = None):
        self.path, self.image_shape = path, tuple(shape[1:])
        self.rows = torch.arange(shape[0]) if rows is None else rows
        self.device = torch.device("cpu")
        self._file = None

    @property
    def shape(self) -> torch.Size:
        """(N, C, side, side), as a tensor's."""
        return torch.Size((len(self.rows), *self.image_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # each DataLoader worker opens its own

    def __getitem__(self, key: int | slice | torch.Tensor) -> torch.Tensor:
        if self._file is None:
            self._file = safe_open(str(self.path), framework="pt")
        images = self._file.get_slice("images")
        rows = self.rows[key]
        batch = [images[r : r + 1] for r in rows.reshape(-1).tolist()]
        if not batch:
            return torch.zeros((0, *self.image_shape), dtype=torch.uint8)
        found = torch.cat(batch)
        return found[0] if rows.ndim == 0 else found

    def subset(self, index: torch.Tensor | slice) -> CachedImages:
        """The images at `index`, still on disk."""
        return CachedImages(self.path, (0, *self.image_shape), self.rows[index])

    def load(self) -> torch.Tensor:
        """Every image, read into memory at once."""
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor("images")[self.rows]

    def to(self, device: torch.device | str) -> CachedImages:
        """Streamed images stay on the disk; batches move to the device one at a time."""
        return self


def find_images(root: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """The class names and every image file under `root` (path under root, class index)."""
    if not root.is_dir():
        raise NinError(f"{root}: not a folder; --data takes a folder of class folders")
    split_folders = [s for s in SPLITS if (root / s).is_dir()]
    if split_folders and "train" not in split_folders:
        raise NinError(f"{root}: has {'/'.join(split_folders)}/ but no train/ folder")
    tops = [root / s for s in split_folders] if split_folders else [root]
    class_names = sorted({d.name for top in tops for d in top.iterdir() if d.is_dir()})
    classes = tuple(c for c in class_names if not c.startswith("."))
    if len(classes) < 2:
        raise NinError(
            f"{tops[0]}: {len(classes)} class folder{'s' if len(classes) != 1 else ''}; a "
            "classifier needs at least two (one subfolder of images per class)"
        )
    found = []
    for top in tops:
        for label, name in enumerate(classes):
            # Other files too (regular, not hidden): decoding skips them and lists why.
            files = sorted(
                p for p in (top / name).rglob("*")
                if p.suffix.lower() in SUFFIXES or (not p.name.startswith(".") and p.is_file())
            )  # fmt: skip
            found += [(str(p.relative_to(root)), label) for p in files]
    return classes, found


def decode(path: Path, channels: int, side: int) -> np.ndarray:
    """One image file as uint8 (channels, side, side); a bad file is a NinError naming why.
    A big picture is decoded at reduced size where its format allows (JPEG), else reduced at
    once, as `nin predict` and `nin serve` do."""
    with quiet_pillow():  # Pillow's EXIF and palette notes are not the user's
        image = open_image(path, FORMATS, shrink_to=decode_side(side))
        return to_pixels(image, channels, side)[0].transpose(2, 0, 1)


def cache_key(root: Path, found: list[tuple[str, int]], channels: int, side: int) -> str:
    """A digest of the files (names, sizes, modification times), the channels and the side."""
    digest = hashlib.sha256(f"{CACHE_VERSION} {channels} {side}".encode())
    for name, label in found:
        try:
            st = (root / name).stat()
        except OSError:  # a dangling link, a loop: decoding skips it and says why
            st = (root / name).lstat()
        digest.update(f"\n{name}\0{label}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def cache_dir() -> Path:
    """Where decoded folders are cached: $NIN_CACHE_DIR, else ~/.cache/nin/folders."""
    chosen = os.environ.get("NIN_CACHE_DIR") or Path.home() / ".cache" / "nin" / "folders"
    return Path(chosen).expanduser()


@functools.lru_cache(maxsize=2)  # a run's train and val loaders share one read
def load_folder(root: str, side: int, channels: int | None = None) -> FolderData:
    """The images under `root`, decoded at `side`×`side` (grey or colour from the data unless
    `channels` says), from the cache when the files have not changed."""
    path = Path(root).expanduser()
    classes, found = find_images(path)
    if not found:
        raise NinError(f"{path}: no image files ({', '.join(sorted(SUFFIXES))}) in its folders")
    # Keyed by the channels asked for (0: from the data), so a cached folder's files are not
    # opened again to tell grey from colour.
    cache = cache_dir() / f"{path.name}-{cache_key(path, found, channels or 0, side)}.safetensors"
    read = read_cache(cache, len(classes), channels, side)
    if read is None:  # none yet, or one cut short or not of this folder's shape: decode again
        channels = channels or colour_channels([path / name for name, _ in found])
        write_cache(cache, path, classes, found, channels, side)
        read = read_cache(cache, len(classes), channels, side)
    if read is None:
        raise NinError(f"{cache}: the cache just written cannot be read back; delete it")
    meta, labels, images = read
    data = FolderData(path, classes, images, labels, meta["files"], meta["skipped"])
    check_classes(data)
    return data


def read_cache(
    cache: Path, classes: int, channels: int | None, side: int
) -> tuple[dict, torch.Tensor, CachedImages] | None:
    """A cache file's metadata, labels and images, or None if it is missing, damaged or not of
    the shape asked for (it is rebuilt then: the cache, not the settings, is wrong)."""
    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = json.loads(f.metadata()["nin"])
            labels = f.get_tensor("labels")
            shape = tuple(f.get_slice("images").get_shape())
        rows, files = len(labels), len(meta["files"])
        ok = len(shape) == 4 and shape[0] == rows == files and shape[2:] == (side, side)
        ok = ok and shape[1] in ((channels,) if channels else (1, 3)) and labels.ndim == 1
        ok = ok and labels.dtype == torch.long and bool(((labels >= 0) & (labels < classes)).all())
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None
    return (meta, labels, CachedImages(cache, shape)) if ok else None


def decode_workers() -> int:
    """Images decoded at once: one a core, at most as many as half the free memory holds."""
    return max(1, min(os.cpu_count() or 1, memory_budget(torch.device("cpu")) // DECODE_BYTES))


def write_cache(
    cache: Path, root: Path, classes: tuple[str, ...], found: list, channels: int, side: int
) -> None:
    """Decode every image (in threads: Pillow decodes outside the GIL) into the cache file."""
    from safetensors.torch import save_file

    def one(item: tuple[str, int]) -> np.ndarray | str:
        try:
            return decode(root / item[0], channels, side)
        except (NinError, OSError) as e:
            return str(e).removeprefix(f"{root / item[0]}: ") or type(e).__name__

    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        results = list(
            tqdm(pool.map(one, found), f"decoding {root.name}", len(found), disable=None)
        )
    kept = [(item, r) for item, r in zip(found, results, strict=True) if not isinstance(r, str)]
    skipped = [(item[0], r) for item, r in zip(found, results, strict=True) if isinstance(r, str)]
    if not kept:
        raise NinError(f"{root}: none of its {len(found)} image files could be decoded")
    images = torch.from_numpy(np.ascontiguousarray(np.stack([r for _, r in kept])))
    labels = torch.tensor([item[1] for item, _ in kept], dtype=torch.long)
    meta = {"classes": classes, "files": [item[0] for item, _ in kept], "skipped": skipped}
    with atomic_path(cache) as tmp:
        save_file({"images": images, "labels": labels}, str(tmp), {"nin": json.dumps(meta)})


def check_classes(data: FolderData) -> None:
    """One clear error for a class left without a usable training image."""
    counts = torch.bincount(data.labels[data.split("train")], minlength=len(data.classes))
    empty = [c for c, n in zip(data.classes, counts.tolist(), strict=True) if n == 0]
    if empty:
        raise NinError(
            f"{data.root}: no usable training image in class folder(s) {some(empty)}; "
            "add images or remove the folder"
        )


def channel_stats(images: torch.Tensor | CachedImages) -> tuple[tuple[float, ...], ...]:
    """Per-channel mean and std of uint8 images, as fractions of 255 (in chunks)."""
    total, squares, count = 0.0, 0.0, 0
    for start in range(0, len(images), 4096):
        x = images[start : start + 4096].double().div(255)
        total = total + x.sum((0, 2, 3))
        squares = squares + x.pow(2).sum((0, 2, 3))
        count += x[:, 0].numel()
    mean = total / count
    std = (squares / count - mean**2).clamp(min=1e-12).sqrt()
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())
