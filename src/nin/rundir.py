"""Run directories: where a run writes, checked before any expensive work, and locked while it
trains, so that a second nin process on the same directory stops with one line instead of
mixing its files in (and a new run that fails early leaves nothing behind)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from nin.checkpoint import LAST
from nin.config import CONFIG
from nin.errors import NinError
from nin.files import no_empty_dirs_left

LOCK = ".lock"  # held (flock) by the process training in the directory; holds its pid


def prepare_run_dir(out: str | None, preset: str, resume: bool) -> Path:
    """The run directory, checked writable (or, to resume, checkpointed) before any expensive
    work: a new runs/<time>-<preset> one unless `out` names it."""
    if resume:
        run_dir = Path(out or "")
        if not (run_dir / LAST).is_file():
            raise NinError(
                f"{run_dir / LAST}: not found; --resume takes a run directory that `nin train` "
                "has checkpointed (it writes last.safetensors at every epoch end)"
            )
        return run_dir
    run_dir = Path(out or new_run_dir(preset))
    problem = in_use(run_dir) or check_run_dir(run_dir)
    if problem:
        raise NinError(problem)
    return run_dir


def check_run_dir(run_dir: Path) -> str:
    """Why a new run cannot use `run_dir` ("" if it can); leaves nothing behind."""
    if (run_dir / LAST).exists():
        return (
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose "
            "another --out"
        )
    if (run_dir / CONFIG).exists():
        return (
            f"{run_dir} already holds a run that saved no checkpoint; delete it, or choose "
            "another --out"
        )
    probe = run_dir / ".write-test"
    # Leave nothing behind, not even an empty directory: the run makes it again when it writes.
    with no_empty_dirs_left(run_dir):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:  # a byte on disk: the directory takes files, has room
                f.write(b"\0")
                os.fsync(f.fileno())
        except OSError as e:
            return f"cannot write to {run_dir} ({e.strerror}); choose another --out"
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    return ""


def in_use(run_dir: Path) -> str:
    """Why another nin process holds `run_dir` ("" if none does); creates nothing."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no lock file (the usual case), or one this process cannot read
        return ""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return busy(run_dir, fd)
    except OSError:  # a file system without locks
        return ""
    finally:
        os.close(fd)
    return ""


def busy(run_dir: Path, fd: int) -> str:
    """The line for a run directory whose lock, open as `fd`, another process holds."""
    pid = os.pread(fd, 20, 0).decode(errors="replace").strip() or "unknown"
    return (
        f"{run_dir} is in use by another nin process (pid {pid}); wait for it or choose "
        "another --out"
    )


def acquire(path: Path) -> tuple[int | None, str]:
    """Lock file `path` (flock, exclusive, without waiting) and write this pid into it: its
    descriptor, or None and why not. A lock on a file its holder removed has been lost: then
    the new file at `path` is locked instead."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = busy(path.parent, fd)
            os.close(fd)
            return None, problem
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            return fd, ""  # a file system without locks: run unguarded, as before locks
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd, ""
        os.close(fd)
    return None, f"{path.parent} is in use by another nin process; choose another --out"


def release(fd: int | None, path: Path) -> None:
    """Remove the lock file, then unlock it (in that order, see `acquire`)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


@contextmanager
def lock_run_dir(run_dir: Path, resume: bool = False) -> Iterator[None]:
    """Hold RUN_DIR/.lock for the block, the life of a run: another process that tries gets
    one line. A new run checks once more, with the lock, that the directory is free, and if it
    fails before its first checkpoint it removes the files it wrote (so the same --out works
    again); one with a checkpoint is kept, and its message says how to continue it."""
    fd, problem, before = None, "", set()
    made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, problem = acquire(run_dir / LOCK)
        if fd is not None and not resume:  # a run may have begun here since we looked
            problem = check_run_dir(run_dir)
        before = set(os.listdir(run_dir))
    except OSError as e:
        problem = f"cannot write to {run_dir} ({e.strerror or e}); choose another --out"
    removed = True  # whether a failed run leaves nothing behind
    try:
        if problem:
            raise NinError(problem)
        yield
    except BaseException as e:
        if not resume and not problem:
            try:
                removed, outcome = clean_up(run_dir, before)
            except OSError:  # the run's own error is the one to report
                removed, outcome = False, ""
            if isinstance(e, NinError) and outcome and "--resume" not in str(e):
                raise NinError(f"{e}; {outcome}") from None
        raise
    else:
        removed = False
    finally:
        release(fd, run_dir / LOCK)
        for folder in made if removed else ():
            with contextlib.suppress(OSError):  # not empty: not ours to remove
                folder.rmdir()


def clean_up(run_dir: Path, before: set[str]) -> tuple[bool, str]:
    """After a new run failed: remove the files it wrote unless it saved a checkpoint. Whether
    it did remove them, and what the message adds ("" when the run had written nothing)."""
    if (run_dir / LAST).exists():
        return False, f"the run so far is kept (`nin train --resume {run_dir}` continues it)"
    wrote = [run_dir / name for name in set(os.listdir(run_dir)) - before - {LOCK}]
    for path in wrote:
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
    if not any(not p.name.endswith(".tmp") for p in wrote):
        return True, ""
    return True, "it had no checkpoint, so what it wrote is removed: the same --out works again"


def new_run_dir(preset: str) -> Path:
    """A fresh runs/<time>-<preset> directory name, never one an earlier run holds."""
    base = f"runs/{datetime.now():%Y%m%d-%H%M%S}-{preset}"
    candidates = (Path(base if i == 1 else f"{base}-{i}") for i in range(1, 1000))
    return next(p for p in candidates if not p.exists())
