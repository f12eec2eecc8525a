"""Checkpoints: weights in safetensors beside a JSON config, written atomically, loaded safely."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nin.errors import NinError
from nin.models import create_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


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
        model = create_model(
            config["model"],
            num_classes=config["num_classes"],
            in_channels=config["in_channels"],
            **config.get("model_kwargs", {}),
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise NinError(f"{config_path}: not a valid nin config ({e})") from None
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
