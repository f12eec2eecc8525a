"""Shared test helpers: the real data in ../shared/data, and an IDX writer."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# CI and developers have the real data beside the checkout; NIN_TEST_DATA may point elsewhere.
SHARED_DATA = Path(os.environ.get("NIN_TEST_DATA", REPO.parent / "shared" / "data"))


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as a gzipped IDX file (the format's big-endian header, then bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return path


def checkpoint_config(**changes: object) -> dict:
    """The keys a run directory's config.json needs: nin_compact on Fashion-MNIST, changed."""
    config = {
        "model": "nin_compact",
        "num_classes": 10,
        "in_channels": 1,
        "preset": "compact",
        "dataset": "fashion-mnist",
        "resize": None,
        "normalize": True,
    }
    return {**config, **changes}


@pytest.fixture
def data_dir() -> Path:
    """The directory holding the real fashion-mnist/ and mnist/ folders."""
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set NIN_TEST_DATA)")
    return SHARED_DATA


def png_header(width: int, height: int) -> bytes:
    """A PNG that says it is width×height grey pixels and holds none: a decompression bomb's
    header, all a reader needs to be fooled."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def unusable(folder: Path) -> None:
    """Every kind of file an image folder may hold that is no picture and must not hang."""
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (folder / "dangling.png").symlink_to(folder / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "bomb.png").write_bytes(png_header(20_000, 20_000))
