"""Checkpoints: weights and training state in safetensors beside a run's JSON config, written
atomically, loaded without ever unpickling anything.

A run directory (`nin.rundir`) holds `config.json`, `metrics.jsonl`, `model.safetensors` (the
final weights), and while it trains `last.safetensors` (everything a resume needs) and, with a
validation split, `best.safetensors` (the weights of the epoch with the best validation
accuracy). Each is one file, replaced atomically. A training state is the nested state dicts of
the run's pieces (model, optimizer, schedule, random states...): its tensors go into the
safetensors file, the rest into its JSON metadata, with the run's id and settings, so that a run
resumes only from its own state.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nin.config import CONFIG, FIX, MAX_PARAMETERS, MAX_RECORD_BYTES, parse_json, read_config
from nin.errors import NinError
from nin.files import atomic_path, open_file, read_file, write_json
from nin.models import create_model

WEIGHTS = "model.safetensors"
LAST = "last.safetensors"
BEST = "best.safetensors"
METRICS = "metrics.jsonl"
# The largest weights or training state nin reads: float32 weights, their gradients' momentum
# and lookahead's copy, of the largest model it builds, with room to spare.
MAX_WEIGHTS_BYTES = 16 * MAX_PARAMETERS
STATE_FORMAT = "nin-train-state-2"  # a training-state file: model tensors carry a "model." prefix
# What a resume may change about a run (config.WHERE, the directory's name), what it records
# besides its settings, and the process count (the training state says more about that): left
# out of the settings a training state must agree with.
NOT_SETTINGS = ("out", "data_dir", "device", "environment", "result", "run_id", "world_size")


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
    open_file(path, MAX_WEIGHTS_BYTES, FIX).close()  # a regular file of a sane size, or one line
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
                "NaN; use a checkpoint from before the run diverged (best.safetensors, which a "
                "run with a validation split keeps), or train again"
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
    if path.is_dir() and not weights_path.exists() and (run_dir / LAST).exists():
        done = len(read_history(run_dir))  # epochs its last checkpoint holds
        raise NinError(
            f"{run_dir}: a run that did not finish (it holds {LAST}, its checkpoint after epoch "
            f"{done} of {config.get('epochs', '?')}, but no {WEIGHTS}); continue it with "
            f"`nin train --resume {run_dir}`, or give {run_dir / LAST} to use its weights as "
            "they are now"
        )
    # read_config has built it once already (on the meta device): these settings build it.
    size = config["num_classes"], config["in_channels"]
    model = create_model(config["model"], *size, **config.get("model_kwargs", {}))
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


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (empty if it has none)."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    text = read_file(path, MAX_RECORD_BYTES, "was the file edited?").decode(errors="replace")
    try:
        rows = [parse_json(line) for line in text.splitlines() if line.strip()]
    except ValueError as e:
        raise NinError(f"{path}: not JSON lines ({e}); was the file edited?") from None
    if not all(isinstance(row, dict) and "epoch" in row for row in rows):
        raise NinError(f"{path}: a line is not an epoch's metrics; was the file edited?")
    return rows


def write_history(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl with `rows`, atomically."""
    with atomic_path(run_dir / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
