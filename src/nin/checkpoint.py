"""Checkpoints: weights and training state in safetensors beside a JSON config, written
atomically, loaded without ever unpickling anything.

A run directory holds `config.json`, `model.safetensors` (the final weights), and while it
trains `last.safetensors` (everything a resume needs) and `best.safetensors` (the weights of
the epoch with the best evaluation accuracy). Each is one file, so each is replaced atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nin.errors import NinError
from nin.files import atomic_path, write_json
from nin.models import create_model

WEIGHTS = "model.safetensors"
LAST = "last.safetensors"
BEST = "best.safetensors"
CONFIG = "config.json"
STATE_FORMAT = "nin-train-state"  # a training-state file: model tensors carry a "model." prefix
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
    if metadata.get("format") == STATE_FORMAT:
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


def save_state(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write a training-state file: the model's weights, other tensors, and JSON state."""
    everything = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **tensors}
    metadata = {
        "format": STATE_FORMAT,
        "model": state["model"],
        "state": json.dumps(state, allow_nan=False),
    }
    save_tensors(path, everything, metadata)


def load_state(path: Path, model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a training-state file into `model`; returns its other tensors and its JSON state."""
    tensors, metadata = load_weights(model, path, name)
    if metadata.get("format") != STATE_FORMAT:
        raise NinError(f"{path}: holds weights only, no training state to resume from")
    try:
        state = json.loads(metadata["state"])
    except (KeyError, ValueError):
        raise NinError(f"{path}: its training state is missing or not JSON") from None
    return {k: v for k, v in tensors.items() if not k.startswith("model.")}, state
