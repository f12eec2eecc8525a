"""Run directories and checkpoints: weights and training state in safetensors beside a JSON
config, written atomically, loaded without ever unpickling anything.

A run directory holds `config.json`, `metrics.jsonl`, `model.safetensors` (the final weights),
and while it trains `last.safetensors` (everything a resume needs) and `best.safetensors` (the
weights of the epoch with the best evaluation accuracy). Each is one file, replaced atomically.
A training state is the nested state dicts of the run's pieces (model, optimizer, schedule,
random states...): its tensors go into the safetensors file, the rest into its JSON metadata,
with the run's id and settings, so that a run resumes only from its own state.

While a run trains, it holds a lock on its directory (`lock_run_dir`): a second nin process on
the same directory stops with one line instead of mixing its files in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nin.distributed import World, broadcast_text
from nin.errors import NinError
from nin.files import atomic_path, no_empty_dirs_left, write_json
from nin.models import create_model

WEIGHTS = "model.safetensors"
LAST = "last.safetensors"
BEST = "best.safetensors"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
STATE_FORMAT = "nin-train-state-2"  # a training-state file: model tensors carry a "model." prefix
# What `nin eval` needs from a config to rebuild the model and its input pipeline.
REQUIRED = ("model", "num_classes", "in_channels", "preset", "dataset", "resize", "normalize")
FIX = "give a run directory written by `nin train`, or one of its .safetensors files"
LOCK = ".lock"  # held (flock) by the process training in the directory; holds its pid
# What a resume may change about a run (config.WHERE, the directory's name), what it records
# besides its settings, and the process count (RunState says more about that): left out of the
# settings a training state must agree with.
NOT_SETTINGS = ("out", "data_dir", "device", "environment", "result", "run_id", "world_size")
# Every type a config.json's keys that rebuild the model may hold, and the range of numbers.
REQUIRED_TYPES = {
    "model": (str,),
    "num_classes": (int,),
    "in_channels": (int,),
    "preset": (str,),
    "dataset": (str,),
    "resize": (int, type(None)),
    "normalize": (bool,),
    "model_kwargs": (dict,),
}
LIMITS = {"num_classes": 100_000, "in_channels": 1024}  # a larger model would not fit memory


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` (moved to the CPU) and string `metadata` as one safetensors file,
    atomically; a failed write (a full disk) is one line and leaves nothing."""
    with atomic_path(path) as tmp:
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        try:
            save_file(cpu, str(tmp), metadata=metadata)
        except SafetensorError as e:  # not an OSError, even for ENOSPC: "... os error 28"
            code = re.search(r"os error (\d+)", str(e))
            reason = os.strerror(int(code.group(1))) if code else str(e).strip().splitlines()[0]
            raise NinError(f"cannot write {path} ({reason}); check space and permissions") from None
    return path


def parse_json(text: str | bytes, **options: Any) -> Any:
    """`json.loads`, where nesting too deep to parse is a ValueError like any other bad JSON."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("nested too deeply") from None


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An `object_pairs_hook` that refuses a key given twice (json.loads keeps the last)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(key)
        seen[key] = value
    return seen


def check_header(path: Path) -> None:
    """Refuse a safetensors header that names a tensor twice: the reader keeps one of them
    silently, and another reader may keep the other. A header that does not parse is left to
    safetensors to describe."""
    with open(path, "rb") as f:
        head, size = f.read(8), os.fstat(f.fileno()).st_size
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < length <= min(size - 8, 100_000_000):  # safetensors' own header limit
            return
        header = f.read(length)
    try:
        parse_json(header, object_pairs_hook=unique_keys)
    except DuplicateKeyError as e:
        raise NinError(
            f"{path}: its header names {e.args[0]!r} twice, so readers may load different "
            f"tensors from it; it is not loaded; {FIX}"
        ) from None
    except ValueError:
        return


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything else is a one-line error."""
    if not path.is_file():
        raise NinError(f"{path}: not found; {FIX}")
    try:
        check_header(path)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        with open(path, "rb") as f:
            head = f.read(2)
        # torch.save files are zip archives or raw pickles: say so instead of a parse error.
        if head == b"PK" or head[:1] == b"\x80":
            raise NinError(
                f"{path}: a pickle (torch.save) file, which nin never loads because unpickling "
                "can run arbitrary code; load it yourself if you trust it and save the "
                "state_dict with safetensors"
            ) from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NinError(f"{path}: not a readable safetensors file ({reason}); {FIX}") from None
    return tensors, metadata


def save_checkpoint(run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Path:
    """Save `model`'s weights (safetensors) and the config that rebuilds it into `run_dir`."""
    save_tensors(run_dir / WEIGHTS, model.state_dict(), {"model": config["model"]})
    write_json(run_dir / CONFIG, config)
    return run_dir / WEIGHTS


def read_config(run_dir: Path) -> dict[str, Any]:
    """The config.json of a run directory, checked for the keys that rebuild its model."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise NinError(f"{path}: not found; {FIX}")
    try:
        config = parse_json(path.read_text())
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise KeyError(", ".join(missing))
        check_types(config)
    except (ValueError, KeyError, TypeError) as e:  # ValueError covers JSON and decode errors
        raise NinError(f"{path}: not a valid nin config (missing or bad: {e})") from None
    return config


def check_types(config: dict[str, Any]) -> None:
    """Raise TypeError unless the keys that rebuild the model have their types and ranges."""
    for key, types in REQUIRED_TYPES.items():
        if key not in config:  # model_kwargs, which is optional; the rest were checked
            continue
        value = config[key]
        if type(value) not in types:  # `type`, not isinstance: True is no number of classes
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise TypeError(f"{key} must be {names}, got {value!r}")
        if key in LIMITS and not 1 <= value <= LIMITS[key]:
            raise TypeError(f"{key} must be from 1 to {LIMITS[key]}, got {value!r}")


def build_model(config: dict[str, Any], where: Path) -> nn.Module:
    """The registry model a config describes, with fresh weights."""
    try:
        return create_model(
            config["model"],
            num_classes=config["num_classes"],
            in_channels=config["in_channels"],
            **config.get("model_kwargs", {}),
        )
    except (TypeError, ValueError) as e:
        raise NinError(f"{where}: config cannot build model {config['model']!r} ({e})") from None


def load_weights(
    model: nn.Module, path: Path, name: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a weights or training-state file into `model`; returns all its tensors and metadata."""
    everything, metadata = read_tensors(path)
    tensors = everything
    if metadata.get("format", "").startswith("nin-train-state"):  # every version
        tensors = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    saved_for = metadata.get("model")
    if saved_for and saved_for != name:
        raise NinError(f"{path}: weights of model {saved_for!r}, but the config says {name!r}")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise NinError(
            f"{path}: weights do not fit model {name!r} ({lines[1] if len(lines) > 1 else e})"
        ) from None
    check_weights(tensors, model, path, name)
    return everything, metadata


def check_weights(
    tensors: dict[str, torch.Tensor], model: nn.Module, path: Path, name: str
) -> None:
    """Refuse weights of another dtype than the model's (load_state_dict would convert them
    silently) or that hold NaN or infinity (every prediction would be NaN)."""
    expected = model.state_dict()
    for key, tensor in tensors.items():
        want = expected[key].dtype
        if tensor.dtype != want:
            raise NinError(
                f"{path}: {key} is {str(tensor.dtype)[6:]}, but model {name!r} keeps it in "
                f"{str(want)[6:]}; nin loads weights only in the type they were trained in, "
                "never converted silently"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NinError(
                f"{path}: {key} holds NaN or infinite values, so every prediction would be "
                "NaN; use a checkpoint from before the run diverged (best.safetensors), or "
                "train again"
            )


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved in a run directory (or at one of its .safetensors files) and its
    config."""
    path = Path(path)
    if not path.exists():
        raise NinError(f"{path}: not found; {FIX}")
    run_dir = path if path.is_dir() else path.parent
    weights_path = path if path.is_file() else run_dir / WEIGHTS
    config = read_config(run_dir)
    model = build_model(config, run_dir / CONFIG)
    load_weights(model, weights_path, config["model"])
    return model, config


def save_state(
    path: Path, name: str, state: dict[str, Any], record: dict[str, Any] | None = None
) -> None:
    """Write a training state (nested state dicts, `state["model"]` the weights of model
    `name`): tensors into the safetensors file by their path, everything else as JSON, with
    the run's id and settings from `record` (its config.json) for `load_state` to check."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    metadata = {
        "format": STATE_FORMAT,
        "model": name,
        "state": json.dumps(skeleton, allow_nan=False),
    }
    if record is not None:
        metadata["run"] = json.dumps(run_identity(record))
    save_tensors(path, tensors, metadata)


def run_identity(record: dict[str, Any]) -> dict[str, Any]:
    """A run's id and the settings a training state of it must agree with, as JSON values."""
    settings = {k: v for k, v in record.items() if k not in NOT_SETTINGS}
    return {"run_id": record.get("run_id"), "settings": json.loads(json.dumps(settings))}


def check_same_run(path: Path, metadata: dict[str, str], record: dict[str, Any]) -> None:
    """Refuse a training state saved by another run, or under settings other than the run's
    config.json says now (an edited config.json would resume with a mismatched schedule)."""
    ours = run_identity(record)
    try:
        saved = parse_json(metadata["run"]) if "run" in metadata else {}
        theirs, settings = saved.get("run_id"), saved.get("settings")
    except (ValueError, AttributeError):
        raise NinError(f"{path}: its run id and settings are not readable JSON") from None
    if ours["run_id"] is not None and theirs != ours["run_id"]:
        raise NinError(
            f"{path}: the training state of another run (its run id is not the one in this "
            f"run's {CONFIG}); a run resumes only from its own {LAST}: put that back, or start "
            "a new run with another --out"
        )
    if isinstance(settings, dict) and settings != ours["settings"]:
        now = ours["settings"]
        changed = sorted(k for k in settings.keys() | now.keys() if settings.get(k) != now.get(k))
        shown = ", ".join(f"{k} {settings.get(k)!r} → {now.get(k)!r}" for k in changed[:3])
        raise NinError(
            f"{path}: saved under other settings than the run has now ({shown}"
            f"{', ...' if len(changed) > 3 else ''}); was its {CONFIG} edited, or its data "
            "changed? --resume continues a run as it began: put them back, or start a new run "
            "with another --out"
        )


def load_state(path: Path, name: str, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The nested state dicts `save_state` wrote for model `name`, checked to be of the run
    `record` (its config.json) describes."""
    tensors, metadata = read_tensors(path)
    if metadata.get("format") != STATE_FORMAT:
        why = "weights only" if "format" not in metadata else "an older nin's training state"
        raise NinError(
            f"{path}: holds {why}, no training state this nin can resume from; its weights "
            "still load (`nin eval`), or start a new run with another --out"
        )
    if metadata.get("model") != name:
        raise NinError(f"{path}: state of model {metadata.get('model')!r}, not {name!r}")
    if record is not None:
        check_same_run(path, metadata, record)
    try:
        return _join(parse_json(metadata["state"]), tensors)
    except (KeyError, ValueError, TypeError):
        raise NinError(f"{path}: its training state is missing or not JSON") from None


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, its tensors moved into `tensors` under their path ("optimizer.state.0")."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"$tensor": path}
    if isinstance(value, dict):
        items = [
            [k, _split(v, f"{path}.{k}" if path else str(k), tensors)] for k, v in value.items()
        ]
        if all(isinstance(k, str) for k in value):
            return dict(items)
        return {"$items": items}  # keys that JSON would turn into strings (the optimizer's ints)
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Undo `_split`."""
    if isinstance(value, dict):
        if "$tensor" in value:
            return tensors[value["$tensor"]]
        if "$items" in value:
            return {k: _join(v, tensors) for k, v in value["$items"]}
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def prepare_run_dir(out: str | None, preset: str, world: World, resume: bool) -> Path:
    """The run directory, checked writable (or, to resume, checkpointed) before any expensive
    work. Rank 0 checks; every process gets its verdict, so all of them stop together."""
    if resume:
        run_dir = Path(out or "")
        if not (run_dir / LAST).is_file():
            raise NinError(
                f"{run_dir / LAST}: not found; --resume takes a run directory that `nin train` "
                "has checkpointed (it writes last.safetensors at every epoch end)"
            )
        return run_dir
    run_dir = Path(broadcast_text(str(out or new_run_dir(preset)), world))
    problem = broadcast_text(
        (in_use(run_dir) or check_run_dir(run_dir)) if world.main else "", world
    )
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
def lock_run_dir(run_dir: Path, world: World, resume: bool = False) -> Iterator[None]:
    """Hold RUN_DIR/.lock for the block, the life of a run: another process that tries gets
    one line. Rank 0 locks (every process gets its verdict). A new run checks once more, with
    the lock, that the directory is free, and if it fails before its first checkpoint it
    removes the files it wrote (so the same --out works again); one with a checkpoint is
    kept, and its message says how to continue it."""
    fd, problem, made, before = None, "", [], set()
    if world.main:
        made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd, problem = acquire(run_dir / LOCK)
            if fd is not None and not resume:  # a run may have begun here since we looked
                problem = check_run_dir(run_dir)
            before = set(os.listdir(run_dir))
        except OSError as e:
            problem = f"cannot write to {run_dir} ({e.strerror or e}); choose another --out"
    problem = broadcast_text(problem, world)
    removed = True  # whether a failed run leaves nothing behind
    try:
        if problem:
            raise NinError(problem)
        yield
    except BaseException as e:
        if world.main and not resume and not problem:
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


def run_id(run_dir: Path, world: World, resume: bool) -> str | None:
    """This run's id: a new one for a new run (the same on every process), else the one in its
    config.json (None for a run an older nin began)."""
    if resume:
        return read_config(run_dir).get("run_id")
    return broadcast_text(uuid.uuid4().hex, world)


def new_run_dir(preset: str) -> Path:
    """A fresh runs/<time>-<preset> directory name, never one an earlier run holds."""
    base = f"runs/{datetime.now():%Y%m%d-%H%M%S}-{preset}"
    candidates = (Path(base if i == 1 else f"{base}-{i}") for i in range(1, 1000))
    return next(p for p in candidates if not p.exists())


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (empty if it has none)."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    try:
        rows = [parse_json(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise NinError(f"{path}: not JSON lines ({e}); was the file edited?") from None
    if not all(isinstance(row, dict) and "epoch" in row for row in rows):
        raise NinError(f"{path}: a line is not an epoch's metrics; was the file edited?")
    return rows


def write_history(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `rows`, atomically."""
    with atomic_path(run_dir / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
