"""Writing files safely (every file nin writes appears whole or not at all), and the PNG
encoding of figures that files and HTML pages share (`nin.images` encodes images)."""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from nin.errors import NinError


@contextmanager
def atomic_path(path: Path, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    The temporary file is synced to disk before the rename and removed on any failure, so a
    crash, a full disk or an error inside the block never leaves a half-written `path`.
    `check(path)`, if given, runs again just before the rename (see `check_out_path`).
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file 0600: give it a new file's usual mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if check:  # what was at `path` may have changed during a long export
            check(path)
        os.replace(tmp, path)
    except OSError as e:
        raise NinError(
            f"cannot write {path} ({e.strerror or e}); check space and permissions"
        ) from None
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


KINDS = {  # what a path may be besides a regular file, by the stat test that finds it
    stat.S_ISDIR: "a directory",
    stat.S_ISLNK: "a symbolic link",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISFIFO: "a named pipe",
    stat.S_ISSOCK: "a socket",
}


def open_file(path: Path, limit: int, fix: str) -> BinaryIO:
    """Open a file nin did not write, to read: a regular file of at most `limit` bytes, else a
    one-line NinError ending in `fix`. Opened without waiting, so a FIFO never blocks, and
    checked once open, so a device, a socket or a directory is never read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise NinError(f"{path}: {why_unreadable(e)}; {fix}") from None
    found = os.fstat(fd)
    kind = next((name for test, name in KINDS.items() if test(found.st_mode)), "not regular")
    problem = "" if stat.S_ISREG(found.st_mode) else f"{kind}, not a regular file"
    if not problem and found.st_size > limit:
        problem = f"{found.st_size / 2**20:,.1f} MiB, over the {limit / 2**20:,.0f} MiB limit"
    if problem:
        os.close(fd)
        raise NinError(f"{path}: {problem}; {fix}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def why_unreadable(e: OSError | ValueError) -> str:
    """Why a file could not be opened, in a few words."""
    if isinstance(e, ValueError):
        return "a name with a NUL byte"
    if e.errno == errno.ELOOP:
        return "a symbolic link loop"
    return "not found" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror or e})"


def read_file(path: Path, limit: int, fix: str) -> bytes:
    """The bytes of a file nin did not write (see `open_file`)."""
    with open_file(path, limit, fix) as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew since it was opened
        raise NinError(f"{path}: over the {limit / 2**20:,.0f} MiB limit; {fix}")
    return data


def check_out_path(path: Path, force: bool = False, ours: tuple[str, bytes] = ("", b"")) -> None:
    """Refuse an output path (`--out`) whose file nin would destroy: anything but a regular
    file, or a checkpoint, always; any other existing file unless `force`, and even then
    unless it is of the kind the command writes (`ours`: its suffix and first bytes), so
    that no other file of a run (split.json, .lock) is ever replaced."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        reason = f"{str(path)!r} ({getattr(e, 'strerror', None) or e})"
        raise NinError(f"cannot write {reason}; choose another --out") from None
    kind = next((name for test, name in KINDS.items() if test(mode)), None)
    if kind or not stat.S_ISREG(mode):
        raise NinError(
            f"{path} is {kind or 'not a regular file'}, which nin never replaces; "
            "give --out a file name"
        )
    if is_checkpoint(path):
        raise NinError(
            f"{path} is part of a checkpoint, which nin never overwrites, not even with --force; "
            "choose another --out"
        )
    if not force:
        raise NinError(
            f"{path} already exists; give --force to replace it (an earlier export or report), "
            "or choose another --out"
        )
    suffix, magic = ours
    with open(path, "rb") as f:
        head = f.read(len(magic))
    if path.suffix != suffix or head != magic:
        raise NinError(
            f"{path} is not a {suffix} file nin wrote, and --force replaces only those (never "
            "a run's own files); choose another --out"
        )


# The files beside a run's weights that rebuild and describe it (checkpoint.CONFIG, METRICS).
RUN_RECORDS = ("config.json", "metrics.jsonl")


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is weights (a safetensors file) or a run's record beside them."""
    if is_safetensors(path):
        return True
    return path.name in RUN_RECORDS and any(map(is_safetensors, path.parent.glob("*.safetensors")))


def is_safetensors(path: Path) -> bool:
    """Whether `path` is named or looks like a safetensors file (a header length, then '{')."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") < size


@contextmanager
def no_empty_dirs_left(path: Path) -> Iterator[None]:
    """Around work that may create `path`'s missing folders: on leaving, remove those of them
    that are still empty (a failed step leaves no empty folders; a successful one keeps its)."""
    made = [d for d in (path, *path.parents) if not d.exists()]  # deepest first
    try:
        yield
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty, or not made after all
                folder.rmdir()


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def figure_png(fig: Any) -> bytes:
    """A matplotlib Figure, laid out, as PNG bytes."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Write a matplotlib Figure as a PNG file, atomically."""
    png = figure_png(fig)
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(png)


def data_uri(png: bytes) -> str:
    """PNG bytes as a data: URI, to inline in an <img>."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
