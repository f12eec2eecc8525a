"""Run directories and checkpoints: weights and training state in safetensors beside a JSON
config, written atomically, loaded without ever unpickling anything.

A run directory holds `config.json`, `metrics.jsonl`, `model.safetensors` (the final weights),
and while it trains `last.safetensors` (everything a resume needs) and `best.safetensors` (the
weights of the epoch with the best evaluation accuracy). Each is one file, replaced atomically.
A training state is the nested state dicts of the run's pieces (model, optimizer, schedule,
random states...): its tensors go into the safetensors file, the rest into its JSON metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` (moved to the CPU) and string `metadata` as one safetensors file,
    atomically."""
    with atomic_path(path) as tmp:
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(cpu, str(tmp), metadata=metadata)
    return path


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; anything else is a one-line error."""
    if not path.is_file():
        raise NinError(f"{path}: not found; {FIX}")
    try:
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
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise KeyError(", ".join(missing))
    except (ValueError, KeyError, TypeError) as e:  # ValueError covers JSON and decode errors
        raise NinError(f"{path}: not a valid nin config (missing or bad: {e})") from None
    return config


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
    return everything, metadata


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


def save_state(path: Path, name: str, state: dict[str, Any]) -> None:
    """Write a training state (nested state dicts, `state["model"]` the weights of model
    `name`): tensors into the safetensors file by their path, everything else as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    metadata = {
        "format": STATE_FORMAT,
        "model": name,
        "state": json.dumps(skeleton, allow_nan=False),
    }
    save_tensors(path, tensors, metadata)


def load_state(path: Path, name: str) -> dict[str, Any]:
    """The nested state dicts `save_state` wrote for model `name`."""
    tensors, metadata = read_tensors(path)
    if metadata.get("format") != STATE_FORMAT:
        why = "weights only" if "format" not in metadata else "an older nin's training state"
        raise NinError(
            f"{path}: holds {why}, no training state this nin can resume from; its weights "
            "still load (`nin eval`), or start a new run with another --out"
        )
    if metadata.get("model") != name:
        raise NinError(f"{path}: state of model {metadata.get('model')!r}, not {name!r}")
    try:
        return _join(json.loads(metadata["state"]), tensors)
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
    problem = broadcast_text(check_run_dir(run_dir) if world.main else "", world)
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
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise NinError(f"{path}: not JSON lines ({e}); was the file edited?") from None
    if not all(isinstance(row, dict) and "epoch" in row for row in rows):
        raise NinError(f"{path}: a line is not an epoch's metrics; was the file edited?")
    return rows


def write_history(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `rows`, atomically."""
    with atomic_path(run_dir / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
