"""Checkpoints: weights in safetensors beside a JSON config, written atomically, loaded safely."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nin.errors import NinError
from nin.files import atomic_path, write_json
from nin.models import create_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# What `nin eval` needs from a config to rebuild the model and its input pipeline.
REQUIRED = ("model", "num_classes", "in_channels", "preset", "dataset", "resize", "normalize")


def save_checkpoint(run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Path:
    """Save `model`'s weights (safetensors) and the config that rebuilds it into `run_dir`."""
    with atomic_path(run_dir / WEIGHTS) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp), metadata={"model": config["model"]})
    write_json(run_dir / CONFIG, config)
    return run_dir / WEIGHTS


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved in a run directory (or at its model.safetensors) and its config."""
    path = Path(path)
    if not path.exists():
        raise NinError(f"{path}: not found; give a run directory written by `nin train`")
    run_dir = path if path.is_dir() else path.parent
    weights_path = path if path.is_file() else run_dir / WEIGHTS
    config_path = run_dir / CONFIG
    for needed in (weights_path, config_path):
        if not needed.is_file():
            raise NinError(f"{needed}: not found; give a run directory written by `nin train`")
    try:
        config = json.loads(config_path.read_text())
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise KeyError(", ".join(missing))
        model = create_model(
            config["model"],
            num_classes=config["num_classes"],
            in_channels=config["in_channels"],
            **config.get("model_kwargs", {}),
        )
    except (ValueError, KeyError, TypeError) as e:  # ValueError covers JSON and decode errors
        raise NinError(f"{config_path}: not a valid nin config (missing or bad: {e})") from None
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise NinError(f"{weights_path}: not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise NinError(
            f"{weights_path}: weights do not fit model {config['model']!r} ({first})"
        ) from None
    return model, config
