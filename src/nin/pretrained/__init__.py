"""Bundled trained models: a run directory shipped inside the package, loadable offline."""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from nin.config import read_config
from nin.data import Preprocess, dataset_spec
from nin.errors import NinError

# name -> (folder beside this file, what it is). Each folder is a run directory of `nin train`
# (model.safetensors, config.json, metrics.jsonl), so `nin eval`, `nin report` and `nin export`
# take it as they are, plus metrics.json: the command that trained it, where, and its score.
PRETRAINED: dict[str, tuple[str, str]] = {
    "fashion-mnist": ("fashion-mnist", "nin_compact trained on Fashion-MNIST (preset compact)"),
    "cifar10": ("cifar10", "nin_fast trained on CIFAR-10 (preset cifar10-fast)"),
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


# --- Fine-tuning: a new run that starts from trained weights ----------------------------------

# The fine-tuning run's learning rate: its preset's times this (chosen on validation folders:
# docs/folders.md). The body is frozen for the first epoch, while the new class map learns.
FINETUNE_LR = 0.1


def source_path(source: str) -> Path:
    """Where the trained model --finetune names is: a bundled model's folder, or the run
    directory (or one of its .safetensors files) given."""
    if source in PRETRAINED:
        return pretrained_dir(source)
    if not Path(source).exists():
        raise NinError(
            f"--finetune {source!r:.200}: no such run directory, and no bundled model of that "
            f"name (bundled: {', '.join(sorted(PRETRAINED))})"
        )
    return Path(source)


def finetune_config(config: Any) -> Any:
    """CONFIG (a TrainConfig) set to fine-tune its --finetune source: the source's network, input
    size and channels, no initialisation of its own, the learning rate times FINETUNE_LR."""
    path = source_path(config.finetune)
    saved = read_config(path if path.is_dir() else path.parent)  # its settings, not its weights
    channels = 3 if isinstance(dataset_spec(config.dataset).mean, tuple) else 1
    if not config.data and channels != saved["in_channels"]:  # a folder is read to fit instead
        raise NinError(
            f"--finetune {config.finetune!r:.200} takes {saved['in_channels']}-channel images, "
            f"{config.dataset} has {channels}; fine-tune on a folder of its pictures (--data)"
        )
    return dataclasses.replace(
        config, model=saved["model"], model_kwargs=saved.get("model_kwargs", {}),
        resize=Preprocess.for_run(saved).side, channels=saved["in_channels"], init="default",
        lr=config.lr * FINETUNE_LR,
    )  # fmt: skip


def class_map(model: nn.Module, num_classes: int) -> list[str]:
    """Names of the modules that make the class maps: from the first of the convolutions that
    end the network at `num_classes` channels (only the last, in nin_fast) to the end."""
    names = [name for name, _ in model.named_modules() if name]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    start = len(convs) - 1
    while start > 0 and model.get_submodule(convs[start - 1]).out_channels == num_classes:
        start -= 1
    first = names.index(convs[start])
    return [n for n in names[first:] if not any(n.startswith(f"{p}.") for p in names[first:])]


def is_body(name: str, head: list[str]) -> bool:
    """Whether the parameter or buffer NAME is outside the modules HEAD names."""
    return not any(name == h or name.startswith(f"{h}.") for h in head)


def load_body(model: nn.Module, source: str, num_classes: int) -> None:
    """MODEL takes the source's trained weights (its batch-norm statistics too), all but its
    class maps, which stay as initialised: they learn the new classes."""
    from nin.checkpoint import load_checkpoint

    trained, saved = load_checkpoint(source_path(source))
    head = class_map(trained, saved["num_classes"])
    body = {k: v for k, v in trained.state_dict().items() if is_body(k, head)}
    mine = model.state_dict()
    for key, value in body.items():
        if key not in mine or mine[key].shape != value.shape:
            raise NinError(f"--finetune {source!r:.200}: its {key} does not fit this network")
        mine[key].copy_(value)
    if len(body) != len([k for k in mine if is_body(k, class_map(model, num_classes))]):
        raise NinError(f"--finetune {source!r:.200}: its body does not match this network's")


def freeze_body(model: nn.Module, num_classes: int, frozen: bool) -> None:
    """Stop (or restart) training every weight outside the class maps."""
    head = class_map(model, num_classes)
    for name, parameter in model.named_parameters():
        if is_body(name, head):
            parameter.requires_grad_(not frozen)
