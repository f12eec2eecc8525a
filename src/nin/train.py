"""Training: presets, the training loop (d2l's train_ch6, made fast), and evaluation.

Read top to bottom: `TrainConfig` and `PRESETS` say what a run is, `train` runs it, `evaluate`
measures a model on the test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nin.checkpoint import (
    BEST,
    CONFIG,
    LAST,
    optimizer_scalars,
    optimizer_tensors,
    per_rank,
    read_config,
    restore_training,
    rng_tensors,
    save_checkpoint,
    save_state,
    save_tensors,
)
from nin.data import DeviceLoader, dataset_spec, load_split
from nin.distributed import (
    World,
    all_reduce,
    broadcast_buffers,
    broadcast_text,
    close_world,
    init_world,
)
from nin.errors import NinError
from nin.fast import TTA_LEVELS, Lookahead, init_whitening_, param_groups, tta_logits
from nin.files import atomic_path, no_empty_dirs_left, save_figure, write_json
from nin.models import count_parameters, create_model, model_info, xavier_init_


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved beside the checkpoint as config.json."""

    preset: str = "compact"
    model: str = "nin_compact"
    dataset: str = "fashion-mnist"
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 128
    resize: int | None = None  # square side to resize to on the device; None keeps 28×28
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # "constant", "onecycle" or "linear" (per step; see SCHEDULES)
    label_smoothing: float = 0.0
    flip: bool = False
    crop_padding: int = 0
    init: str = "default"  # "xavier" (d2l), "default" (PyTorch's), "whiten" (first conv: PCA)
    normalize: bool = False  # subtract the data set's mean, divide by its std
    amp: bool = False  # bfloat16 autocast where the device supports it
    channels_last: bool = False
    fused: bool = False  # one fused kernel for the SGD update of every parameter
    bias_lr_scale: float = 1.0  # lr multiplier of batch-norm shifts (their weight decay ÷ it)
    lookahead: int = 0  # steps between pulls towards the weights' running average; 0: off
    tta: int = 0  # test-time augmentation of the final evaluation: 0 none, 1 flip, 2 + shifts
    compile: bool = False  # torch.compile the model (pays off on GPUs; slower on 2 CPU cores)
    seed: int = 0
    device: str | None = None  # None: CUDA, then MPS, then CPU
    data_dir: str | None = None
    out: str | None = None  # None: runs/<time>-<preset>
    train_subset: int | None = None  # use the first N training examples
    holdout: int = 0  # the last N training examples become a validation split; test is not read
    collapse_steps: int = 100  # stop once every image has got the same logits this many steps
    stuck_steps: int = 2000  # stop once loss ≈ ln(classes) and accuracy ≈ chance this many steps
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0: at epoch ends only
    deterministic: bool = False  # deterministic algorithms only (bit-exact resume on CPU)
    test_subset: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, dict[str, Any]] = {
    # The chapter exactly: nin_d2l on 224×224, plain SGD at lr 0.1, Xavier init, pixels in [0, 1].
    "d2l": dict(model="nin_d2l", epochs=10, lr=0.1, batch_size=128, resize=224, init="xavier"),
    # The CPU default: the compact NiN at native 28×28 with a modern recipe (see README).
    "compact": dict(
        model="nin_compact",
        epochs=8,
        lr=0.2,
        batch_size=256,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        # Flips and translations cost 0.7 points of test accuracy at this budget (docs/recipe.md).
        flip=False,
        crop_padding=0,
        normalize=True,
        amp=True,
        channels_last=True,
    ),
    # The paper's CIFAR-10 run (Lin et al.; docs/results.md lists every departure): the authors'
    # network and solver, but per-channel normalisation instead of GCN + ZCA whitening, one-cycle
    # annealing instead of lr ÷10 on plateau, and Xavier init instead of Gaussian std 0.05 (with
    # which, as with PyTorch's default, a short run sat at chance: docs/results.md).
    "paper-cifar10": dict(
        model="nin_cifar",
        init="xavier",
        dataset="cifar10",
        epochs=300,
        lr=0.1,
        batch_size=128,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="onecycle",
        flip=True,  # the paper's augmented row (8.81%): translations and flips
        crop_padding=4,
        normalize=True,
    ),
    # A modern recipe on the authors' network, aimed at 93%: batch norm, one-cycle, smoothing.
    "cifar10": dict(
        model="nin_cifar",
        model_kwargs={"batch_norm": True},
        dataset="cifar10",
        epochs=100,
        lr=0.2,
        batch_size=256,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        flip=True,
        crop_padding=4,
        normalize=True,
        amp=True,
        channels_last=True,
    ),
    # CIFAR-10 in minutes on a CPU: airbench's recipe on a NiN (nin_fast). The choices were
    # made on a 5,000-image validation split carved from train; the epochs are the most that
    # fit 15 minutes on 2 CPU cores (docs/results.md).
    "cifar10-fast": dict(
        model="nin_fast",
        dataset="cifar10",
        init="whiten",
        epochs=9,
        lr=1.5,  # airbench's 11.5 per 1024 examples (summed loss), for a mean loss
        batch_size=1024,
        momentum=0.85,
        nesterov=True,
        weight_decay=0.0013,  # airbench's 0.0153 per 1024 examples, decoupled from the lr
        bias_lr_scale=64.0,
        schedule="linear",
        label_smoothing=0.2,
        flip=True,
        crop_padding=2,
        normalize=True,
        amp=True,
        channels_last=True,
        lookahead=5,
        tta=2,
    ),
    # The paper's MNIST run: its CIFAR structure with fewer maps (nin_mnist), the same solver
    # and departures as paper-cifar10; the paper used no augmentation on MNIST.
    "paper-mnist": dict(
        model="nin_mnist",
        init="xavier",
        dataset="mnist",
        epochs=100,
        lr=0.1,
        batch_size=128,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="onecycle",
        normalize=True,
    ),
    # MNIST on 2 CPU cores, aimed at 0.40% test error: the compact recipe plus 2-pixel
    # translations (no flips: mirrored digits are other digits); 8 epochs beat 4 on a 10,000-image
    # holdout (docs/results.md).
    "mnist": dict(
        model="nin_compact",
        dataset="mnist",
        epochs=8,
        lr=0.2,
        batch_size=256,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        crop_padding=2,
        normalize=True,
        amp=True,
        channels_last=True,
    ),
}


PRESET_NOTES = {
    "d2l": "the chapter's exact setting: nin_d2l at 224×224, plain SGD, lr 0.1, batch 128",
    "compact": "the default: compact NiN at 28×28, modern recipe; --preset d2l is the chapter's",
    "paper-cifar10": (
        "the paper's CIFAR-10 net and solver (SGD 0.1, momentum 0.9, wd 1e-4, batch 128); "
        "departures: per-channel normalisation not GCN+ZCA, one-cycle not ÷10 on plateau, "
        "Xavier init not Gaussian 0.05"
    ),
    "cifar10": (
        "nin_cifar with batch norm, one-cycle, label smoothing, flips + 4-pixel crops, 100 "
        "epochs; aimed at 93% on a GPU, never run to the end (not measured)"
    ),
    "cifar10-fast": (
        "nin_fast with airbench's tricks (whitened first layer, lookahead, test-time flips "
        "and shifts), 9 epochs: 91.9% on CIFAR-10 in about 14 minutes on 2 CPU cores"
    ),
    "paper-mnist": "the paper's MNIST net (nin_mnist) and solver, departures as paper-cifar10",
    "mnist": "compact NiN on MNIST, one-cycle, label smoothing, 2-pixel translations",
}


def make_config(preset: str = "compact", scale_lr: bool = False, **overrides: Any) -> TrainConfig:
    """A preset's config with `overrides` (those not None) applied, checked for sense.

    `scale_lr` applies the linear scaling rule (Goyal et al., 2017) to a changed batch size:
    the preset's learning rate times new batch / preset batch, unless --lr is given too.
    """
    if preset not in PRESETS:
        raise NinError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if scale_lr and overrides.get("lr") is None and overrides.get("batch_size"):
        base = PRESETS[preset].get("batch_size", TrainConfig.batch_size)
        values["lr"] = PRESETS[preset].get("lr", TrainConfig.lr) * values["batch_size"] / base
    if overrides.get("model_kwargs"):  # on top of the preset's, not instead of them
        values["model_kwargs"] = {
            **PRESETS[preset].get("model_kwargs", {}),
            **overrides["model_kwargs"],
        }
    config = TrainConfig(preset=preset, **values)
    model_info(config.model)
    try:
        with torch.device("meta"):  # builds the model without allocating its weights
            create_model(config.model, **config.model_kwargs)
    except (TypeError, ValueError) as e:
        raise NinError(f"--model-kwargs do not fit {config.model!r} ({e})") from None
    dataset_spec(config.dataset)
    for name in ("holdout", "collapse_steps", "stuck_steps", "checkpoint_every"):
        if getattr(config, name) < 0:
            raise NinError(
                f"--{name.replace('_', '-')} must be 0 or more, got {getattr(config, name)}"
            )
    for name in ("epochs", "batch_size", "resize", "train_subset", "test_subset"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise NinError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise NinError(f"--lr must be a positive number, got {config.lr}")
    for name in ("momentum", "weight_decay"):
        if not getattr(config, name) >= 0:
            raise NinError(
                f"--{name.replace('_', '-')} must be 0 or more, got {getattr(config, name)}"
            )
    if not 0 <= config.label_smoothing < 1:
        raise NinError(f"--label-smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.schedule not in SCHEDULES:
        known = ", ".join(SCHEDULES)
        raise NinError(f"unknown schedule {config.schedule!r}; choose one of: {known}")
    if config.init not in INITS:
        raise NinError(f"unknown init {config.init!r}; choose one of: {', '.join(INITS)}")
    if config.tta not in TTA_LEVELS:
        raise NinError(f"--tta must be 0, 1 or 2, got {config.tta}")
    if not config.bias_lr_scale > 0 or not math.isfinite(config.bias_lr_scale):
        raise NinError(f"--bias-lr-scale must be a positive number, got {config.bias_lr_scale}")
    return config


SCHEDULES = ("constant", "onecycle", "linear")
INITS = ("default", "xavier", "whiten")


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate schedule: None (constant), one-cycle (cosine, 30% warm-up),
    or linear (airbench's: from 0.2× up to the peak over 23% of the steps, down to 0.07×)."""
    if schedule == "constant":
        return None
    peaks = [group["lr"] for group in optimizer.param_groups]
    # cycle_momentum=False: the momentum that runs is the one in the config.
    shape = (
        dict(pct_start=0.23, anneal_strategy="linear", div_factor=5, final_div_factor=0.2 / 0.07)
        if schedule == "linear"
        else {}
    )
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=peaks, total_steps=total_steps, cycle_momentum=False, **shape
    )


def resume_config(run_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The saved config of a run to resume; only where it runs (`data_dir`, `device`) may change."""
    saved = read_config(Path(run_dir))
    changed = sorted(
        k for k, v in overrides.items() if k not in RESUMABLE and v != saved.get(k, object())
    )
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise NinError(
            f"--resume continues {run_dir} with its saved settings; drop {flags} (only "
            "--data-dir and --device may change), or start a new run with another --out"
        )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in fields}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**{**values, "out": str(run_dir)})


RESUMABLE = ("data_dir", "device")


def pick_device(
    requested: str | None = None, world: World | None = None
) -> tuple[torch.device, str]:
    """The device to train on, and why it was chosen: CUDA, then Apple MPS, then CPU.

    Under torchrun each process takes the GPU of its local rank.
    """
    if world and world.active and not requested and torch.cuda.is_available():
        return torch.device("cuda", world.local_rank), f"local rank {world.local_rank}"
    if requested:
        try:
            device = torch.device(requested)
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as e:
            raise NinError(f"device {requested!r} is not usable here ({e})") from None
        return device, "as requested"
    if torch.cuda.is_available():
        return torch.device("cuda"), "a CUDA GPU was found"
    if torch.backends.mps.is_available():
        return torch.device("mps"), "an Apple GPU was found"
    return torch.device("cpu"), "no CUDA or MPS device found"


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type: bfloat16 on CPUs and recent GPUs, float16 on GPUs without bfloat16."""
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        try:  # emulated bfloat16 (V100, T4) is slow: those GPUs get float16
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older PyTorch has no such argument
            native = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float16
    return None


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast (see `amp_dtype`) when enabled; a no-op elsewhere."""
    dtype = amp_dtype(device)
    if not (enabled and dtype):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """Loss scaling for float16 autocast, where small gradients would underflow; a pass-through
    otherwise (bfloat16 has float32's range)."""
    return torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)


def make_loader(
    config: TrainConfig, split: str, device: torch.device, world: World | None = None
) -> DeviceLoader:
    """The loader of one split on `device`: shuffled and augmented for train, plain otherwise.

    `split` is "train", "test", or "val": the last `config.holdout` training examples, which
    the "train" split then leaves out. Under torchrun each process gets its shard of every
    batch: `config.batch_size` is the global batch.
    """
    world = world or World()
    if config.batch_size % world.size:
        raise NinError(
            f"--batch-size {config.batch_size} must divide evenly among the {world.size} "
            "processes (it is the global batch)"
        )
    spec = dataset_spec(config.dataset)
    images, labels = load_split(
        config.dataset, "test" if split == "test" else "train", config.data_dir
    )
    if split != "test" and not 0 <= config.holdout < len(labels):
        raise NinError(f"--holdout must be in [0, {len(labels)}), got {config.holdout}")
    training = split == "train"
    if split == "val":
        images, labels = images[-config.holdout :], labels[-config.holdout :]
    elif training:
        keep = len(labels) - config.holdout
        images, labels = images[:keep][: config.train_subset], labels[:keep][: config.train_subset]
        if config.batch_size > len(labels):
            raise NinError(
                f"--batch-size {config.batch_size} is larger than the {len(labels)} training "
                "examples; use a smaller --batch-size"
            )
    else:
        images, labels = images[: config.test_subset], labels[: config.test_subset]
    return DeviceLoader(
        images,
        labels,
        config.batch_size // world.size,
        device=device,
        shuffle=training,
        resize=config.resize,
        mean=spec.mean if config.normalize else None,
        std=spec.std if config.normalize else None,
        flip=config.flip and training,
        crop_padding=config.crop_padding if training else 0,
        seed=config.seed,
        channels_last=config.channels_last,
        rank=world.rank,
        world_size=world.size,
    )


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move `model` to `device`, in channels-last memory format when the config asks for it."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def check_input_size(model: nn.Module, loader: DeviceLoader, model_name: str) -> None:
    """Fail fast, before training, if the model cannot take the loader's images."""
    x = loader.prepare(loader.images[:1])
    try:
        with torch.no_grad():
            model.eval()(x)
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise NinError(
            f"model {model_name!r} cannot take input {tuple(x.shape[1:])} ({reason}); "
            "use --resize 224 for nin_d2l, or pick a model for this size"
        ) from None


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    amp: bool,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch; returns the batch's logits, detached, for metrics."""
    with autocast(x.device, amp):
        logits = model(x)
        loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skips the step if the scaled gradients overflowed
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return logits.detach()


class TrainingWatch:
    """Spots a failed run early: a non-finite loss, a collapse, or a loss stuck at chance.

    Collapse is the chapter's failure: when the ReLU before global average pooling dies (or
    any whole ReLU layer), every image gets the same logits, accuracy sits at chance, the loss
    near ln(classes), and no gradient can revive it. A run can also be stuck there without
    identical logits. The watch keeps its sums on the device and reads them once per `window`
    steps (or when `poll` is called before a checkpoint), so it costs no sync per step.
    """

    def __init__(
        self,
        collapse_steps: int,
        stuck_steps: int,
        num_classes: int,
        device: torch.device,
        world: World | None = None,
        window: int = 50,
    ) -> None:
        self.collapse_steps, self.stuck_steps = collapse_steps, stuck_steps
        self.num_classes = num_classes
        self.world = world or World()
        self.window = max(1, min([window, *(s for s in (collapse_steps, stuck_steps) if s)]))
        # Since the last poll: largest spread of logits; loss sum, correct, non-finite losses.
        self.spread = torch.zeros((), device=device)
        self.sums = torch.zeros(3, device=device)
        self.pending = 0  # steps since the last poll
        self.count = 0  # examples since the last poll
        self.flat = 0  # consecutive steps with the same logits for every image
        self.stuck = 0  # consecutive steps with loss ≈ ln(classes) and accuracy ≈ chance
        self.reason = ""

    def update(self, logits: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor) -> bool:
        """Record one step (logits, summed loss, correct count); True once the run has failed."""
        spread = (logits - logits[:1]).abs().amax().float()
        torch.maximum(self.spread, spread, out=self.spread)
        self.sums[0] += loss_sum
        self.sums[1] += correct
        self.sums[2] += ~torch.isfinite(loss_sum)
        self.pending += 1
        self.count += len(logits)
        return self.pending >= self.window and self.poll()

    def poll(self, model: nn.Module | None = None) -> bool:
        """Read the sums since the last poll (one sync); True once the run has failed.

        Given `model`, also check its weights are finite: a step can blow them up after its
        loss was computed, and no checkpoint may hold such weights.
        """
        if self.pending:
            spread = all_reduce(self.spread, self.world, "max").item()
            count = torch.tensor([float(self.count)], device=self.sums.device)
            sums = all_reduce(torch.cat([self.sums, count]), self.world)
            loss, correct, nonfinite, count = sums.tolist()
            steps, self.pending, self.count = self.pending, 0, 0
            self.spread.zero_(), self.sums.zero_()
            chance = math.log(self.num_classes)
            self.flat = self.flat + steps if spread == 0 else 0
            stuck = abs(loss / count - chance) < 0.05 and correct / count < 1.5 / self.num_classes
            self.stuck = self.stuck + steps if stuck else 0
            if nonfinite or not math.isfinite(loss):
                self.reason = "diverged"
            elif self.collapse_steps and self.flat >= self.collapse_steps:
                self.reason = "collapsed"
            elif self.stuck_steps and self.stuck >= self.stuck_steps:
                self.reason = "stuck"
        if model is not None and not self.reason:
            blown = torch.stack([~p.isfinite().all() for p in model.parameters()]).sum()
            if all_reduce(blown, self.world).item():
                self.reason = "diverged"
        return bool(self.reason)

    def state(self) -> dict[str, Any]:
        """The counters a resume needs (call `poll` first)."""
        return {"flat": self.flat, "stuck": self.stuck}

    def message(self, epoch: int, lr: float, kept: str) -> str:
        """What happened, what was kept, and what to try, in one line."""
        ln = f"ln {self.num_classes} = {math.log(self.num_classes):.3f}"
        what = {
            "diverged": "the loss became infinite or NaN (the weights blew up)",
            "collapsed": f"every image has got the same logits for the last {self.flat} steps, "
            f"so accuracy is stuck at chance and the loss near {ln} (a ReLU layer, usually the "
            "one before global average pooling, died and cannot recover)",
            "stuck": f"the loss has stayed at {ln} with accuracy at chance for {self.stuck} steps",
        }[self.reason]
        fix = f"try a lower --lr (now {lr}) or another --seed"
        if self.reason != "diverged":
            fix += ", or --preset compact (batch norm, no ReLU before pooling)"
        return f"training {self.reason} in epoch {epoch}: {what}; {kept}; {fix}"


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: DeviceLoader, num_classes: int, amp: bool = False, tta: int = 0
) -> torch.Tensor:
    """Confusion matrix (true class × predicted class) of `model` over `loader`, with test-time
    augmentation at level `tta` (see `tta_logits`)."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=loader.device)
    for x, y in loader:
        with autocast(loader.device, amp):
            predicted = tta_logits(model, x, tta).argmax(1)
        confusion += torch.bincount(y * num_classes + predicted, minlength=num_classes**2)
    return confusion.view(num_classes, num_classes).cpu()


def accuracy(confusion: torch.Tensor) -> float:
    """Overall accuracy from a confusion matrix."""
    return confusion.trace().item() / max(confusion.sum().item(), 1)


def train(config: TrainConfig, log: Callable[[str], None] = print, resume: bool = False) -> dict:
    """Train as `config` says, checkpointing as it goes; with `resume`, continue the run saved in
    `config.out` exactly where its last checkpoint left it.

    Returns the final metrics, the per-epoch history, the run directory and the trained model.
    Under torchrun every process calls this; rank 0 alone logs and writes files.
    """
    began = time.perf_counter()
    world = init_world(config.device)
    if not world.main:
        log = no_log
    run_dir = prepare_run_dir(config, world, resume)
    device, why = pick_device(config.device, world)
    log(
        f"nin: preset {config.preset} ({PRESET_NOTES[config.preset]}) on {device} ({why}); "
        f"{config.model} on {config.dataset}"
        + (f"; {world.size} processes, global batch {config.batch_size}" if world.active else "")
    )
    if config.preset == "d2l" and device.type == "cpu":
        log(
            "nin: note: the chapter's setting trains at about 30 images/s on 2 CPU cores "
            "(~5.5 hours for 10 epochs); it is meant for a GPU"
        )
    if config.deterministic:  # cuBLAS refuses deterministic mode without a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(config.deterministic)
    torch.manual_seed(config.seed)
    train_loader = make_loader(config, "train", device, world)
    # With a holdout, every accuracy during training is validation accuracy; test is untouched.
    eval_split = "val" if config.holdout else "test"
    eval_key = f"{eval_split}_acc"
    eval_loader = make_loader(config, eval_split, device, world)
    num_classes = len(dataset_spec(config.dataset).classes)
    in_channels = train_loader.images.shape[1]
    model = create_model(
        config.model, num_classes=num_classes, in_channels=in_channels, **config.model_kwargs
    )
    if config.init == "xavier":
        xavier_init_(model)
    elif config.init == "whiten":  # from (at most) 5,000 training images, as airbench does
        init_whitening_(model, train_loader.prepare(train_loader.images[:5000], augment=False))
    place_model(model, device, config.channels_last)
    check_input_size(model, train_loader, config.model)
    if world.active:  # the same weights everywhere (DDP broadcasts them), other dropout masks
        torch.manual_seed(config.seed + 1000 * world.rank)

    optimizer = torch.optim.SGD(
        param_groups(model, config.lr, config.weight_decay, config.bias_lr_scale),
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        fused=config.fused or None,
    )
    step_model = wrap_model(model, device, world, config.compile)
    scaler = grad_scaler(device, config.amp)
    steps_per_epoch = len(train_loader)
    total_steps = config.epochs * steps_per_epoch
    scheduler = lr_scheduler(optimizer, config.schedule, total_steps)
    lookahead = Lookahead(model, config.lookahead, total_steps) if config.lookahead else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    saved = {
        **dataclasses.asdict(config),
        "out": str(run_dir),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "parameters": count_parameters(model),
        "environment": environment(device),
        "world_size": world.size,
    }
    watch = TrainingWatch(config.collapse_steps, config.stuck_steps, num_classes, device, world)
    # Where the run stands: epoch and batches done in it, and sums that span a checkpoint.
    progress: dict[str, Any] = {
        "epoch": 1,
        "step": 0,
        "history": [],
        "epoch_seconds": 0.0,
        "best_acc": -1.0,
    }
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    order_state = train_loader.order_generator.get_state()
    elapsed = 0.0  # seconds spent on the run before a resume
    if resume:
        progress, sums, order_state = restore_training(
            run_dir / LAST,
            model,
            optimizer,
            scheduler,
            scaler,
            train_loader,
            watch,
            world,
            config.model,
            config.epochs,
            lookahead,
        )
        loss_sum.copy_(sums[0]), correct.copy_(sums[1])
        log(f"nin: resuming {run_dir} at epoch {progress['epoch']}, step {progress['step']}")
        if progress["history"]:
            elapsed = progress["history"][-1].get("elapsed_seconds", 0.0)
        if world.main:  # temporary files of a save the kill cut short
            for leftover in run_dir.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)
    elif world.main:
        write_json(run_dir / CONFIG, saved)
    metrics_path = run_dir / "metrics.jsonl"
    if world.main:  # the log holds exactly the epochs the checkpoint holds: none twice or lost
        with atomic_path(metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in progress["history"]))

    def checkpoint(epoch: int, step: int) -> None:
        """Save everything a resume needs to last.safetensors (collective; rank 0 writes)."""
        if watch.poll(model):  # never save weights from after a divergence
            fail(epoch)
        tensors = {
            **per_rank("progress.loss_sum", loss_sum, world),
            **per_rank("progress.correct", correct, world),
            "rng.order": order_state,
            **rng_tensors(train_loader, device, world),
            **optimizer_tensors(optimizer),
            **(lookahead.state_dict() if lookahead else {}),
        }
        state = {
            **progress,
            "epoch": epoch,
            "step": step,
            "model": config.model,
            "world_size": world.size,
            "device_type": device.type,
            "optimizer": optimizer_scalars(optimizer),
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict(),
            "watch": watch.state(),
        }
        if world.main:
            save_state(run_dir / LAST, model, tensors, state)

    def fail(epoch: int) -> None:
        last = run_dir / LAST
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
        raise NinError(watch.message(epoch, config.lr, kept))

    confusion = None
    for epoch in range(progress["epoch"], config.epochs + 1):
        model.train()
        skip, progress["step"] = progress["step"], 0
        train_loader.order_generator.set_state(order_state)  # this epoch's order, drawn again
        start = time.perf_counter() - progress["epoch_seconds"]
        # The bar shows on a terminal only (disable=None), so logs stay clean.
        bar = tqdm(
            train_loader.batches(skip),
            f"epoch {epoch}/{config.epochs}",
            total=steps_per_epoch,
            initial=skip,
            leave=False,
            disable=None if world.main else True,
        )
        for step, (x, y) in enumerate(bar, start=skip + 1):
            logits = train_step(step_model, x, y, optimizer, loss_fn, config.amp, scaler)
            if scheduler:
                scheduler.step()
            global_step = (epoch - 1) * steps_per_epoch + step
            if lookahead:
                lookahead.step(model, global_step)
            # Report plain cross-entropy (as the chapter does), whatever the smoothing.
            batch_loss = F.cross_entropy(logits.float(), y, reduction="sum")
            batch_correct = (logits.argmax(1) == y).sum()
            loss_sum += batch_loss
            correct += batch_correct
            if watch.update(logits, batch_loss, batch_correct):
                fail(epoch)
            every = config.checkpoint_every
            if every and global_step % every == 0 and step < steps_per_epoch:
                progress["epoch_seconds"] = time.perf_counter() - start
                checkpoint(epoch, step)
        n = train_loader.num_examples * world.size
        train_loss = all_reduce(loss_sum, world).item() / n
        train_acc = all_reduce(correct, world).item() / n
        seconds = time.perf_counter() - start
        loss_sum.zero_(), correct.zero_()
        if watch.poll():  # it has seen every batch's loss, so a non-finite one too
            fail(epoch)
        broadcast_buffers(model, world)  # every process evaluates rank 0's model
        eval_start = time.perf_counter()
        confusion = all_reduce(evaluate(model, eval_loader, num_classes, config.amp), world)
        row = {
            "epoch": epoch,
            "loss": train_loss,
            "train_acc": train_acc,
            eval_key: accuracy(confusion),
            "examples_per_sec": n / seconds,
            "epoch_seconds": seconds,
            "eval_seconds": time.perf_counter() - eval_start,
            # Since the run began (setup included), counting only time spent running it.
            "elapsed_seconds": elapsed + time.perf_counter() - began,
            "lr": optimizer.param_groups[0]["lr"],
        }
        progress["history"].append(row)
        progress["epoch_seconds"] = 0.0
        if world.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if row[eval_key] > progress["best_acc"]:
                progress["best_acc"] = row[eval_key]
                save_tensors(
                    run_dir / BEST,
                    model.state_dict(),
                    {"model": config.model, "epoch": str(epoch), eval_key: str(row[eval_key])},
                )
        order_state = train_loader.order_generator.get_state()  # the next epoch's order
        checkpoint(epoch + 1, 0)
        log(
            f"epoch {epoch}/{config.epochs}: loss {train_loss:.3f}, train acc {train_acc:.3f}, "
            f"{eval_split} acc {row[eval_key]:.3f}, {row['examples_per_sec']:.1f} examples/sec"
        )

    # Evaluated again with test-time augmentation, or if killed after its last checkpoint
    # but before the final files.
    if confusion is None or config.tta:
        broadcast_buffers(model, world)
        confusion = evaluate(model, eval_loader, num_classes, config.amp, config.tta)
        confusion = all_reduce(confusion, world)
    history = progress["history"]
    final = {**history[-1], eval_key: accuracy(confusion)}
    train_seconds = sum(row["epoch_seconds"] for row in history)
    speed = len(history) * train_loader.num_examples * world.size / train_seconds
    saved["result"] = {
        "wall_seconds": elapsed + time.perf_counter() - began,
        "loss": final["loss"],
        "train_acc": final["train_acc"],
        eval_key: final[eval_key],
        "examples_per_sec": speed,
        "train_seconds": train_seconds,
        "per_class_acc": per_class_accuracy(confusion),
        "tta": config.tta,
        f"{eval_key}_no_tta": history[-1][eval_key],
    }
    if world.main:  # the weights are finite: the last checkpoint checked them before saving
        save_checkpoint(run_dir, model, saved)
        title = f"{config.model}, preset {config.preset}"
        plot_curves(history, run_dir / "curves.png", title=title)
    log(f"saved {run_dir / 'model.safetensors'}, metrics.jsonl, curves.png")
    # The chapter's closing line.
    tta = f" (test-time augmentation: {TTA_LEVELS[config.tta]})" if config.tta else ""
    log(
        f"loss {final['loss']:.3f}, train acc {final['train_acc']:.3f}, "
        f"{eval_split} acc {final[eval_key]:.3f}{tta}, {speed:.1f} examples/sec on {device}"
    )
    close_world(world)
    return {
        **saved["result"],
        "device": str(device),
        "run_dir": str(run_dir),
        "history": history,
        "train_examples": train_loader.num_examples * world.size,
        "model": model,
    }


def no_log(message: str) -> None:
    """The log of every process but rank 0: silent."""


def prepare_run_dir(config: TrainConfig, world: World, resume: bool) -> Path:
    """The run directory, checked writable before any expensive work.

    Rank 0 checks; every process gets its verdict, so all of them stop together on a problem.
    """
    if resume:
        run_dir = Path(config.out or "")
        if not (run_dir / LAST).is_file():
            raise NinError(
                f"{run_dir / LAST}: not found; --resume takes a run directory that `nin train` "
                "has checkpointed (it writes last.safetensors at every epoch end)"
            )
        return run_dir
    chosen = str(config.out) if config.out else str(new_run_dir(config.preset))
    run_dir = Path(broadcast_text(chosen, world))
    problem = check_run_dir(run_dir) if world.main else ""
    problem = broadcast_text(problem, world)
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


def wrap_model(model: nn.Module, device: torch.device, world: World, compile: bool) -> nn.Module:
    """The module the training step calls: DistributedDataParallel across processes and/or
    torch.compile'd; it shares `model`'s parameters, so checkpoints save `model` itself."""
    if world.active:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model


def new_run_dir(preset: str) -> Path:
    """A fresh runs/<time>-<preset> directory name, never one an earlier run holds."""
    base = f"runs/{datetime.now():%Y%m%d-%H%M%S}-{preset}"
    candidates = (Path(base if i == 1 else f"{base}-{i}") for i in range(1, 1000))
    return next(p for p in candidates if not p.exists())


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Accuracy of each true class (recall), from a confusion matrix."""
    totals = confusion.sum(1).clamp(min=1)
    return (confusion.diag() / totals).tolist()


def environment(device: torch.device) -> dict[str, Any]:
    """Where a run ran: versions, machine and device, saved with its config."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def cpu_name() -> str:
    """The processor's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """The chapter's Animator as a file: loss, train acc and test acc per epoch."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(5, 3.5), dpi=120)
    ax = fig.subplots()
    keys = [k for k in ("loss", "train_acc", "val_acc", "test_acc") if k in history[0]]
    for key, style in zip(keys, ("-", "--", "-.", ":"), strict=False):
        ax.plot(
            epochs, [row[key] for row in history], style, marker="o", label=key.replace("_", " ")
        )
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, max(epochs) + 0.5)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
