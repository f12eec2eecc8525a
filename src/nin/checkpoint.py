"""Checkpoints: weights and training state in safetensors beside a JSON config, written
atomically, loaded without ever unpickling anything.

A run directory holds `config.json`, `model.safetensors` (the final weights), and while it
trains `last.safetensors` (everything a resume needs) and `best.safetensors` (the weights of
the epoch with the best evaluation accuracy). Each is one file, so each is replaced atomically.
The last part of this file gathers a run's state (optimizer, random states, per process) into
tensors and JSON, and puts it back on a resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nin.data import DeviceLoader
from nin.distributed import World, all_gather
from nin.errors import NinError
from nin.files import atomic_path, write_json
from nin.models import create_model

if TYPE_CHECKING:
    from nin.fast import Lookahead
    from nin.train import TrainingWatch

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


def rng_tensors(loader: DeviceLoader, device: torch.device, world: World) -> dict:
    """Every process's random states (torch, CUDA, augmentation), keyed by name and rank."""
    mine = {"torch": torch.get_rng_state(), "augment": loader.augment_generator.get_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    return {k: v for name, t in mine.items() for k, v in per_rank(f"rng.{name}", t, world).items()}


def per_rank(name: str, t: torch.Tensor, world: World) -> dict[str, torch.Tensor]:
    """Every process's `t`, keyed <name>.<rank>: what each must get back on a resume."""
    return {f"{name}.{rank}": value for rank, value in enumerate(all_gather(t, world))}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter tensors (momentum buffers), keyed optimizer.<i>.<name>."""
    return {
        f"optimizer.{i}.{name}": value
        for i, slots in optimizer.state_dict()["state"].items()
        for name, value in slots.items()
        if isinstance(value, torch.Tensor)
    }


def optimizer_scalars(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The rest of the optimizer's state, as JSON: param groups and non-tensor slots."""
    state = optimizer.state_dict()
    return {
        "param_groups": state["param_groups"],
        "slots": {
            str(i): {k: v for k, v in slots.items() if not isinstance(v, torch.Tensor)}
            for i, slots in state["state"].items()
        },
    }


def restore_training(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    loader: DeviceLoader,
    watch: TrainingWatch,
    world: World,
    name: str,
    epochs: int,
    lookahead: Lookahead | None = None,
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Load a training-state file into every piece of the run; returns the progress, this
    process's partial-epoch sums, and the order generator's state at the epoch's start."""
    tensors, state = load_state(path, model, name)
    if state.get("world_size", 1) != world.size:
        raise NinError(
            f"{path}: saved by {state.get('world_size', 1)} processes; resume it with the same "
            f"number (now {world.size}), so each process gets its own random state back"
        )
    saved_on, device = state.get("device_type"), loader.device.type
    if saved_on != device:
        raise NinError(
            f"{path}: saved on {saved_on}; resume it on {saved_on} too (--device), since random "
            f"states do not carry over to {device}"
        )
    if state.get("epoch", 0) > epochs and (path.parent / WEIGHTS).exists():
        raise NinError(f"{path.parent}: this run has already finished all {epochs} epochs")
    rank = world.rank
    try:
        slots: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, i, slot = key.split(".", 2)
                slots.setdefault(int(i), {})[slot] = value
        for i, rest in state["optimizer"]["slots"].items():
            slots.setdefault(int(i), {}).update(rest)
        groups = state["optimizer"]["param_groups"]
        optimizer.load_state_dict({"state": slots, "param_groups": groups})
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(tensors[f"rng.torch.{rank}"])
        if device == "cuda":
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], loader.device)
        loader.augment_generator.set_state(tensors[f"rng.augment.{rank}"])
        watch.flat, watch.stuck = state["watch"]["flat"], state["watch"]["stuck"]
        if lookahead is not None:
            lookahead.load_state_dict(tensors)
        sums = (tensors[f"progress.loss_sum.{rank}"], tensors[f"progress.correct.{rank}"])
        keys = ("epoch", "step", "history", "epoch_seconds", "best_acc")
        progress = {k: state[k] for k in keys}
        order = tensors["rng.order"]
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise NinError(
            f"{path}: training state incomplete or does not fit this run ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); start a new run with another --out"
        ) from None
    return progress, sums, order
