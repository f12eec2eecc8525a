"""Settings: `TrainConfig`, the one source of what a run is.

Every field carries its help text; `nin train`'s flags are generated from the fields, a preset
(`nin.presets`) is a few fields changed, and a saved config (a run's config.json, or a JSON or
TOML file of your own) rebuilds the same config.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:
    import tomllib
except ImportError:  # Python 3.10: JSON configs only
    tomllib = None

from nin.data import DATASETS, dataset_spec
from nin.errors import NinError, cut, some
from nin.fast import TTA_LEVELS
from nin.files import read_file
from nin.models import count_parameters, create_model, model_info
from nin.presets import PRESETS
from nin.resources import leaf_rows, summarize

CONFIG = "config.json"  # a run directory's settings and record
FIX = "give a run directory written by `nin train`, or one of its .safetensors files"
# What `nin eval` needs from a config to rebuild the model and its input pipeline.
REQUIRED = ("model", "num_classes", "in_channels", "preset", "dataset", "resize", "normalize")
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
# The most bytes a file of settings may hold: a --config file; a run's config.json, which
# also names an image folder's classes (up to 100,000 of them).
MAX_SETTINGS_BYTES, MAX_RECORD_BYTES = 2**20, 64 * 2**20
SCHEDULES = ("constant", "onecycle", "linear")
INITS = ("default", "xavier", "whiten")


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A config field with its help text (and argparse extras such as `choices`)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help, **flag})
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved beside the checkpoint as config.json."""

    preset: str = setting("compact", "the recipe to start from")
    model: str = setting("nin_compact", "a registered model (see `nin models`)")
    dataset: str = setting("fashion-mnist", "the data set", choices=sorted(DATASETS))
    data: str | None = setting(
        None,
        "a folder of your own images instead of --dataset: one subfolder per class, or train/ "
        "and val/ (and test/) folders of those",
        metavar="DIR",
    )
    channels: int | None = setting(
        None, "with --data: 1 (grey) or 3 (colour); default: from the images", choices=(1, 3)
    )
    finetune: str | None = setting(
        None,
        "start from trained weights: a bundled model (fashion-mnist or cifar10) or a run "
        "directory; its network, size and channels are kept, its class maps made anew, its "
        "body frozen for the first epoch, the learning rate a tenth of the preset's",
        metavar="NAME_OR_RUN",
    )
    loader: str = setting(
        "auto",
        "with --data: keep the images on the device (resident), read each batch from the disk "
        "cache (stream), or resident when they take under half the free memory (auto)",
        choices=("auto", "resident", "stream"),
    )
    epochs: int = setting(10, "passes over the training set")
    lr: float = setting(0.1, "learning rate (the peak, with a schedule)")
    batch_size: int = setting(128, "examples per step (the global batch under torchrun)")
    resize: int | None = setting(None, "resize images to this square side on the device")
    momentum: float = setting(0.0, "SGD momentum")
    nesterov: bool = setting(False, "Nesterov momentum")
    weight_decay: float = setting(0.0, "L2 penalty")
    schedule: str = setting(
        "constant",
        "learning rate per step: constant, onecycle (cosine) or linear (airbench's triangle)",
        choices=SCHEDULES,
    )
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing")
    flip: bool = setting(False, "mirror a random half of each training batch")
    crop_padding: int = setting(0, "translate training images by up to N pixels (random crop)")
    rotate: float = setting(0.0, "rotate training images by up to N degrees either way, at random")
    init: str = setting(
        "default",
        "weights: PyTorch's, Xavier (the chapter's), or a whitened first layer (airbench)",
        choices=INITS,
    )
    normalize: bool = setting(False, "subtract the data set's mean, divide by its std")
    amp: bool = setting(False, "bfloat16 autocast where the device supports it")
    channels_last: bool = setting(False, "channels-last memory format")
    fused: bool = setting(False, "one fused kernel for the SGD update of every parameter")
    bias_lr_scale: float = setting(1.0, "lr multiplier of batch-norm shifts (their wd ÷ it)")
    paper_lr: bool = setting(
        False, "the authors' multipliers: biases at 2× lr without weight decay (and cccp6 at 0.1×)"
    )
    lookahead: int = setting(
        0, "pull the weights towards their running average every N steps (0: off)"
    )
    tta: int = setting(
        0,
        "test-time augmentation of the final evaluation: 0 none, 1 flip, 2 flip + shifts, 3 shifts",
        choices=tuple(TTA_LEVELS),
    )
    compile: bool = setting(False, "torch.compile the model (pays off on GPUs)")
    seed: int = setting(0, "seeds the weights, the data order and augmentation")
    device: str | None = setting(None, "cuda, mps or cpu (default: the best available)")
    data_dir: str | None = setting(None, "data directory (default: $NIN_DATA_DIR or ~/.cache/nin)")
    out: str | None = setting(None, "run directory (default: runs/<time>-<preset>)")
    train_subset: int | None = setting(None, "train on the first N examples only")
    holdout: int = setting(
        0, "validate on the last N training examples instead of reading the test split"
    )
    collapse_steps: int = setting(
        100, "stop once every image has got the same logits this many steps (0: never)"
    )
    stuck_steps: int = setting(
        2000, "stop once the loss has sat at ln(classes) with chance accuracy this many steps"
    )
    checkpoint_every: int = setting(0, "also checkpoint every N steps (0: at epoch ends only)")
    deterministic: bool = setting(False, "deterministic algorithms only (exact resume)")
    test_subset: int | None = setting(None, "evaluate on the first N test examples only")
    model_kwargs: dict[str, Any] = setting(
        {}, "keyword arguments of the model, e.g. '{\"batch_norm\": false}'", metavar="JSON"
    )


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _base(hint: Any) -> tuple[type, bool]:
    """The type of a field's annotation without its None, and whether None is allowed."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1:  # X | None
        return args[0], True
    return typing.get_origin(hint) or hint, False


# Each field's type (int, float, str, bool or dict) and whether it may be None.
TYPES = {name: _base(hint) for name, hint in typing.get_type_hints(TrainConfig).items()}
# What only says where a run runs: a resumed or re-evaluated run may change these.
WHERE = ("data_dir", "device")
# What `nin train` adds to a config.json beside the settings (ignored when one is read back).
RUN_RECORD = (
    "num_classes", "in_channels", "parameters", "environment", "world_size", "result", "run_id",
    "classes", "mean", "std",  # an image folder's, saved with its run
)  # fmt: skip


def make_config(preset: str = "compact", scale_lr: bool = False, **overrides: Any) -> TrainConfig:
    """A preset's config with `overrides` (those not None) applied, checked for sense.

    `scale_lr` applies the linear scaling rule (Goyal et al., 2017) to a changed batch size:
    the preset's learning rate times new batch / preset batch, unless an lr is given too.
    """
    if not isinstance(preset, str) or preset not in PRESETS:  # a config file may hold anything
        raise NinError(f"unknown preset {cut(repr(preset))}; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[preset].settings
    given = {k: v for k, v in overrides.items() if v is not None}
    values = {**base, **given}
    if scale_lr and "lr" not in given and type(given.get("batch_size")) is int:
        lr, batch = base.get("lr", TrainConfig.lr), base.get("batch_size", TrainConfig.batch_size)
        values["lr"] = lr * given["batch_size"] / batch
    # A preset's model kwargs are its model's: on top of them when that model is kept, dropped
    # with it when another is given.
    kept = values.get("model", TrainConfig.model) == base.get("model", TrainConfig.model)
    kwargs = given.get("model_kwargs", {})
    if isinstance(kwargs, dict):  # else check_config says what it must be
        values["model_kwargs"] = {**(base.get("model_kwargs", {}) if kept else {}), **kwargs}
    return check_config(TrainConfig(preset=preset, **values))


def saved_config(saved: dict[str, Any], **here: Any) -> TrainConfig:
    """The config a saved run (its config.json) was trained with, checked; `here` (those not
    None) changes where it runs now, such as `data_dir`, `device` or `test_subset`."""
    values = {k: v for k, v in saved.items() if k in FIELDS}
    return check_config(
        TrainConfig(**{**values, **{k: v for k, v in here.items() if v is not None}})
    )


def read_config(run_dir: Path) -> dict[str, Any]:
    """The config.json of a run directory, checked as a training run's config is (the keys
    that rebuild its model, every value in its range, the model within its cost): whoever
    handed out the run directory, loading it takes bounded time and memory."""
    path = run_dir / CONFIG
    text = read_file(path, MAX_RECORD_BYTES, FIX)
    try:
        config = parse_json(text)
        if not isinstance(config, dict):
            raise TypeError("not a JSON object")
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise KeyError(", ".join(missing))
        check_types(config)
    except (ValueError, KeyError, TypeError) as e:  # ValueError covers JSON and decode errors
        raise NinError(f"{path}: not a valid nin config (missing or bad: {cut(str(e))})") from None
    try:
        saved_config(config)
        kwargs = config.get("model_kwargs", {})
        size = config["in_channels"], config["resize"]
        check_model(config["model"], kwargs, config["num_classes"], *size)
    except NinError as e:
        raise NinError(f"{path}: {e}; {FIX}") from None
    return config


def check_types(config: dict[str, Any]) -> None:
    """Raise TypeError unless the keys that rebuild the model have their types and ranges."""
    for key, types in REQUIRED_TYPES.items():
        if key not in config:  # model_kwargs, which is optional; the rest were checked
            continue
        value = config[key]
        if type(value) not in types:  # `type`, not isinstance: True is no number of classes
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise TypeError(f"{key} must be {names}, got {cut(repr(value))}")
        if key in LIMITS and not 1 <= value <= LIMITS[key]:
            raise TypeError(f"{key} must be from 1 to {LIMITS[key]}, got {value!r}")


def parse_json(text: str | bytes, **options: Any) -> Any:
    """`json.loads`, where nesting too deep to parse is a ValueError like any other bad JSON."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a JSON or TOML file (a run's config.json will do), as field values."""
    path = Path(path)
    form = "TOML" if path.suffix == ".toml" else "JSON"
    text = read_file(path, MAX_SETTINGS_BYTES, "--config takes a JSON or TOML file of settings")
    if form == "TOML" and tomllib is None:
        raise NinError(f"{path}: TOML needs Python 3.11 or later; give a JSON file")
    try:
        values = tomllib.loads(text.decode()) if form == "TOML" else parse_json(text)
    except (ValueError, RecursionError) as e:  # JSON, TOML, decoding errors; too deep nesting
        raise NinError(
            f"{path}: not valid {form} ({cut(str(e))}); --config reads JSON, or TOML from a "
            ".toml file"
        ) from None
    if not isinstance(values, dict):
        raise NinError(f'{path}: not a table of settings; write {{"epochs": 3, ...}}')
    unknown = sorted(set(values) - set(FIELDS) - set(RUN_RECORD))
    if unknown:
        names = some(map(repr, unknown))
        raise NinError(f"{path}: unknown settings {names}; see `nin train --help`")
    return {k: v for k, v in values.items() if k in FIELDS}


def check_config(config: TrainConfig) -> TrainConfig:
    """`config`, once every field is of its type and in its range; else a one-line error."""
    for name, (kind, optional) in TYPES.items():  # a value read from a file may be anything
        value = getattr(config, name)
        if kind is float and type(value) is int:
            if abs(value) > FLOAT32_MAX:  # past what a float holds: float() would overflow
                raise NinError(f"--{flag(name)} must be a finite number, got {cut(str(value))}")
            setattr(config, name, value := float(value))
        if type(value) is not kind and not (value is None and optional):
            raise NinError(f"--{flag(name)} must be {kind.__name__}, got {cut(repr(value))}")
        if kind is str and value and "\0" in value:  # no file name holds one
            raise NinError(f"--{flag(name)} holds a NUL byte, which no name may hold")
    try:
        model_info(config.model)
    except ValueError as e:  # the registry's own line: unknown model, and the known ones
        raise NinError(cut(str(e), 400)) from None
    spec = dataset_spec(config.dataset)
    if config.data and config.resize is None:  # an image folder is decoded at the model's size
        config.resize = model_info(config.model).input_size[-1]
    if config.channels not in (None, 1, 3):
        raise NinError(f"--channels must be 1 or 3, got {config.channels}")
    if config.loader not in ("auto", "resident", "stream"):
        raise NinError(f"unknown --loader {config.loader!r}; choose auto, resident or stream")
    for name, known in (("schedule", SCHEDULES), ("init", INITS), ("tta", tuple(TTA_LEVELS))):
        if getattr(config, name) not in known:
            choices = ", ".join(map(str, known))
            value = cut(repr(getattr(config, name)))
            raise NinError(f"unknown --{name} {value}; choose one of: {choices}")
    check_ranges(config)
    if config.data:  # the folder says how many classes and channels; the model's are used here
        check_model(config.model, config.model_kwargs, None, config.channels, config.resize)
    else:
        channels = len(spec.mean) if isinstance(spec.mean, tuple) else 1
        side = config.resize or spec.side
        check_model(config.model, config.model_kwargs, len(spec.classes), channels, side)
    return config


def check_ranges(config: TrainConfig) -> TrainConfig:
    """`config`, once every number is in its range; else a one-line error."""
    counts = ("holdout", "collapse_steps", "stuck_steps", "checkpoint_every", "crop_padding")
    for name in (*counts, "momentum", "weight_decay", "lookahead"):
        if not getattr(config, name) >= 0:  # `not >=` also catches NaN
            raise NinError(f"--{flag(name)} must be 0 or more, got {getattr(config, name)}")
    for name in ("epochs", "batch_size", "resize", "train_subset", "test_subset"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise NinError(f"--{flag(name)} must be at least 1, got {value}")
    if not 0 <= config.seed < 2**63:
        raise NinError(f"--seed must be in [0, 2**63), got {config.seed}")
    for name in ("resize", "crop_padding"):  # a padded batch is allocated whole
        if (getattr(config, name) or 0) > MAX_SIDE:
            raise NinError(
                f"--{flag(name)} must be at most {MAX_SIDE}, got {getattr(config, name)}"
            )
    for name, (kind, _) in TYPES.items():  # counts past 32 bits overflow the device's integers
        value = getattr(config, name)
        if kind is int and name != "seed" and value is not None and value > MAX_COUNT:
            raise NinError(f"--{flag(name)} must be at most {MAX_COUNT:,}, got {cut(f'{value:,}')}")
    for name in ("lr", "bias_lr_scale"):
        if not getattr(config, name) > 0:
            raise NinError(f"--{flag(name)} must be a positive number, got {getattr(config, name)}")
    for name in ("lr", "weight_decay", "momentum", "bias_lr_scale"):
        if not abs(getattr(config, name)) <= FLOAT32_MAX:  # a larger one is infinite on the device
            raise NinError(
                f"--{flag(name)} must be a finite number, at most {FLOAT32_MAX:.3g}, got "
                f"{getattr(config, name)}"
            )
    if not 0 <= config.rotate <= 180:
        raise NinError(f"--rotate must be in [0, 180] degrees, got {config.rotate}")
    if not 0 <= config.label_smoothing < 1:
        raise NinError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    return config


MAX_COUNT = 2**31 - 1  # every count-like setting (epochs, steps, examples, pixels)
MAX_SIDE = 4096  # --resize: past this, one image's activations alone outgrow most machines
FLOAT32_MAX = 3.4028234663852886e38
MAX_WIDTH = 16  # nin_compact's width: its parameters grow with the square, 78 M at 16
# What a model may cost, so that anything accepted builds, loads and trains in bounded time and
# memory: checked on the meta device (no weights allocated) for every model nin builds.
MAX_DEPTH = 16  # a `num_*` count of layers (1×1 convolutions a block): the paper has 2
MAX_PARAMETERS = 100_000_000  # 13× the largest preset (nin_imagenet); 1.6 GB with SGD's state
MAX_FLOPS = 10**12  # forward FLOPs an image at the input size: 650× nin_d2l's at 224×224
RANGES = {  # model keyword arguments with a range of their own: (the range in words, its test)
    "width": (f"in (0, {MAX_WIDTH}]", lambda v: 0 < v <= MAX_WIDTH),
    "dropout": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "num_": (f"from 0 to {MAX_DEPTH}", lambda v: 0 <= v <= MAX_DEPTH),  # checked before building
}


def check_model(
    name: str,
    kwargs: dict[str, Any],
    num_classes: int | None = None,
    in_channels: int | None = None,
    side: int | None = None,
) -> None:
    """The one check of a model nin builds, whatever gave its settings (flags, a config file,
    a run's config.json, torch.hub): its keyword arguments, then its parameters and its FLOPs
    an image at `side` (default: the model's input size), counted on the meta device."""
    check_model_kwargs(name, kwargs)
    info = model_info(name)
    side = side or info.input_size[-1]
    size = (in_channels or info.input_size[0], side, side)
    try:
        with torch.device("meta"):  # builds the model without allocating its weights
            model = create_model(name, num_classes, in_channels, **kwargs)
    except (TypeError, ValueError) as e:
        raise NinError(f"--model-kwargs do not fit {name!r} ({cut(str(e), 200)})") from None
    try:
        flops = sum(row.flops for row in leaf_rows(summarize(model, size)))
    except RuntimeError:  # the model cannot take this size: where it is used, that is said
        flops = 0
    params = count_parameters(model)
    if params > MAX_PARAMETERS or flops > MAX_FLOPS:
        raise NinError(
            f"model {name!r} so configured has {params:,} parameters and takes {flops:.2g} "
            f"FLOPs an image of {'×'.join(map(str, size))}; nin builds up to "
            f"{MAX_PARAMETERS:,} parameters and {MAX_FLOPS:.0e} FLOPs; lower its width, its depth "
            "(num_pointwise) or the input size"
        )


def check_model_kwargs(model: str, kwargs: dict[str, Any]) -> None:
    """Model keyword arguments are plain values of the builder's types (where its signature
    says), in their ranges (RANGES), and not what the data sets."""
    params = inspect.signature(model_info(model).build).parameters
    for key, value in kwargs.items():
        default = params[key].default if key in params else None
        if isinstance(default, bool | int | float | str) and not fits(value, type(default)):
            kind = type(default).__name__
            raise NinError(f"--model-kwargs {key} must be {kind}, got {cut(repr(value))}")
        if key in ("num_classes", "in_channels"):
            raise NinError(f"--model-kwargs cannot set {key}: the data does")
        if not isinstance(value, bool | int | float | str | None):
            raise NinError(f"--model-kwargs {key} must be a number, a string or true/false")
        words, test = RANGES.get("num_" if key.startswith("num_") else key, ("", None))
        if test and not (fits(value, float) and test(value)):
            raise NinError(f"--model-kwargs {key} must be {words}, got {cut(repr(value))}")
        if isinstance(value, float) and not math.isfinite(value):
            raise NinError(f"--model-kwargs {key} must be a finite number, got {value}")


def fits(value: Any, kind: type) -> bool:
    """Whether a JSON value is of `kind` (an int will do for a float; a bool is no number)."""
    if kind is bool or isinstance(value, bool):
        return isinstance(value, bool) and kind is bool
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def flag(name: str) -> str:
    """The command-line flag of a field, without its dashes: batch_size -> batch-size."""
    return name.replace("_", "-")
