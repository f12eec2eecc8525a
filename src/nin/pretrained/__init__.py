"""Bundled trained models: a run directory shipped inside the package, loadable offline."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from nin.errors import NinError

# name -> (folder beside this file, what it is). Each folder is a run directory of `nin train`
# (model.safetensors, config.json, metrics.jsonl), so `nin eval`, `nin report` and `nin export`
# take it as they are, plus metrics.json: the command that trained it, where, and its score.
PRETRAINED: dict[str, tuple[str, str]] = {
    "fashion-mnist": ("fashion-mnist", "nin_compact trained on Fashion-MNIST (preset compact)"),
}


def pretrained_dir(name: str) -> Path:
    """The folder of a bundled model, or a clear error listing the bundled names."""
    if name not in PRETRAINED:
        raise NinError(
            f"no bundled model {name!r}; bundled: {', '.join(sorted(PRETRAINED))} "
            "(or give a run directory written by `nin train`)"
        )
    # A package installed from a wheel or in place both keep data files on disk beside the code.
    folder = Path(str(resources.files("nin.pretrained") / PRETRAINED[name][0]))
    if not (folder / "model.safetensors").is_file():
        raise NinError(f"bundled model {name!r} is missing from {folder}; reinstall nin")
    return folder


def load_pretrained(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """The bundled model `name` and its config, as `load_checkpoint` returns them."""
    from nin.checkpoint import load_checkpoint

    return load_checkpoint(pretrained_dir(name))


def pretrained_for(model_name: str) -> str | None:
    """The bundled model built as registry model `model_name`, or None if none is."""
    import json

    for name, (folder, _) in sorted(PRETRAINED.items()):
        config = resources.files("nin.pretrained") / folder / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("model") == model_name:
            return name
    return None
