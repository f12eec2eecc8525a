"""Training: presets, the training loop (d2l's train_ch6, made fast), and evaluation.

Read top to bottom: `TrainConfig` and `PRESETS` say what a run is, `train` runs it, `evaluate`
measures a model on the test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
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

from nin.checkpoint import save_checkpoint
from nin.data import DeviceLoader, dataset_spec, load_split
from nin.errors import NinError
from nin.files import save_figure
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
    schedule: str = "constant"  # "constant" or "onecycle" (per step)
    label_smoothing: float = 0.0
    flip: bool = False
    crop_padding: int = 0
    init: str = "default"  # "xavier" (d2l) or "default" (PyTorch's)
    normalize: bool = False  # subtract the data set's mean, divide by its std
    amp: bool = False  # bfloat16 autocast where the device supports it
    channels_last: bool = False
    fused: bool = False  # one fused kernel for the SGD update of every parameter
    compile: bool = False  # torch.compile the model (pays off on GPUs; slower on 2 CPU cores)
    seed: int = 0
    device: str | None = None  # None: CUDA, then MPS, then CPU
    data_dir: str | None = None
    out: str | None = None  # None: runs/<time>-<preset>
    train_subset: int | None = None  # use the first N training examples
    holdout: int = 0  # the last N training examples become a validation split; test is not read
    collapse_steps: int = 100  # stop once every image has got the same logits this many steps
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
    # annealing instead of lr ÷10 on plateau, and PyTorch's init instead of Gaussian std 0.05.
    "paper-cifar10": dict(
        model="nin_cifar",
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
    # The paper's MNIST run: its CIFAR structure with fewer maps (nin_mnist), the same solver
    # and departures as paper-cifar10; the paper used no augmentation on MNIST.
    "paper-mnist": dict(
        model="nin_mnist",
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
    # translations (no flips: mirrored digits are other digits); epochs picked on a holdout.
    "mnist": dict(
        model="nin_compact",
        dataset="mnist",
        epochs=10,
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
        "PyTorch init not Gaussian 0.05"
    ),
    "cifar10": "nin_cifar with batch norm, one-cycle, label smoothing, flips + 4-pixel crops",
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
    config = TrainConfig(preset=preset, **values)
    model_info(config.model)
    dataset_spec(config.dataset)
    for name in ("holdout", "collapse_steps"):
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
    if config.schedule not in ("constant", "onecycle"):
        raise NinError(f"unknown schedule {config.schedule!r}; use 'constant' or 'onecycle'")
    return config


def pick_device(requested: str | None = None) -> tuple[torch.device, str]:
    """The device to train on, and why it was chosen: CUDA, then Apple MPS, then CPU."""
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


def make_loader(config: TrainConfig, split: str, device: torch.device) -> DeviceLoader:
    """The loader of one split on `device`: shuffled and augmented for train, plain otherwise.

    `split` is "train", "test", or "val": the last `config.holdout` training examples, which
    the "train" split then leaves out.
    """
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
    else:
        images, labels = images[: config.test_subset], labels[: config.test_subset]
    return DeviceLoader(
        images,
        labels,
        config.batch_size,
        device=device,
        shuffle=training,
        resize=config.resize,
        mean=spec.mean if config.normalize else None,
        std=spec.std if config.normalize else None,
        flip=config.flip and training,
        crop_padding=config.crop_padding if training else 0,
        seed=config.seed,
        channels_last=config.channels_last,
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


class CollapseWatch:
    """Spots the chapter's collapse: the same logits for every image, step after step.

    When the ReLU before global average pooling dies (or any whole ReLU layer), the network
    stops looking at its input: every image gets the same logits, accuracy sits at chance, the
    loss near ln(classes), and no gradient can revive it. The largest difference between any
    image's logits and the first image's is kept on the device and read once per `window`
    steps, so watching costs no host synchronisation per step.
    """

    def __init__(self, steps: int, device: torch.device, window: int = 50) -> None:
        self.steps = steps
        self.window = max(1, min(window, steps))
        self.spread = torch.zeros((), device=device)
        self.seen = 0
        self.flat = 0  # consecutive steps with the same logits for every image

    def update(self, logits: torch.Tensor) -> bool:
        """Record one step's logits; True once the run has been flat for `steps` steps."""
        if not self.steps:
            return False
        spread = (logits - logits[:1]).abs().amax().float()
        self.spread = torch.maximum(self.spread, spread)
        self.seen += 1
        if self.seen % self.window:
            return False
        self.flat = self.flat + self.window if self.spread.item() == 0 else 0
        self.spread.zero_()
        return self.flat >= self.steps

    def message(self, epoch: int, num_classes: int, lr: float) -> str:
        """What happened and what to try, in one line."""
        return (
            f"training collapsed in epoch {epoch}: every image has got the same logits for "
            f"the last {self.flat} steps, so accuracy is stuck at chance and the loss near "
            f"ln {num_classes} = {math.log(num_classes):.3f} (a ReLU layer, usually the one "
            "before global average pooling, died and cannot recover); try a lower --lr (now "
            f"{lr}), another --seed, or --preset compact (batch norm, no ReLU before pooling)"
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: DeviceLoader, num_classes: int, amp: bool = False
) -> torch.Tensor:
    """Confusion matrix (true class × predicted class) of `model` over `loader`."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=loader.device)
    for x, y in loader:
        with autocast(loader.device, amp):
            predicted = model(x).argmax(1)
        confusion += torch.bincount(y * num_classes + predicted, minlength=num_classes**2)
    return confusion.view(num_classes, num_classes).cpu()


def accuracy(confusion: torch.Tensor) -> float:
    """Overall accuracy from a confusion matrix."""
    return confusion.trace().item() / max(confusion.sum().item(), 1)


def train(config: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as `config` says; write checkpoint, metrics and curves.

    Returns the final metrics, the per-epoch history, the run directory and the trained model.
    """
    device, why = pick_device(config.device)
    log(
        f"nin: preset {config.preset} ({PRESET_NOTES[config.preset]}) on {device} ({why}); "
        f"{config.model} on {config.dataset}"
    )
    if config.preset == "d2l" and device.type == "cpu":
        log(
            "nin: note: the chapter's setting trains at about 30 images/s on 2 CPU cores "
            "(~5.5 hours for 10 epochs); it is meant for a GPU"
        )
    torch.manual_seed(config.seed)
    train_loader = make_loader(config, "train", device)
    # With a holdout, every accuracy during training is validation accuracy; test is untouched.
    eval_split = "val" if config.holdout else "test"
    eval_key = f"{eval_split}_acc"
    eval_loader = make_loader(config, eval_split, device)
    num_classes = len(dataset_spec(config.dataset).classes)
    in_channels = train_loader.images.shape[1]
    model = create_model(
        config.model, num_classes=num_classes, in_channels=in_channels, **config.model_kwargs
    )
    if config.init == "xavier":
        xavier_init_(model)
    place_model(model, device, config.channels_last)
    check_input_size(model, train_loader, config.model)

    run_dir = Path(config.out) if config.out else new_run_dir(config.preset)
    metrics_path = run_dir / "metrics.jsonl"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    except OSError as e:
        raise NinError(f"cannot write to {run_dir} ({e.strerror}); choose --out") from None

    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
        fused=config.fused or None,
    )
    # The compiled module shares the model's parameters: the checkpoint saves `model` itself.
    step_model = torch.compile(model) if config.compile else model
    scaler = grad_scaler(device, config.amp)
    steps = config.epochs * len(train_loader)
    scheduler = (
        # cycle_momentum=False: the momentum that runs is the one in the config.
        torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=steps, cycle_momentum=False
        )
        if config.schedule == "onecycle"
        else None
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    saved = {
        **dataclasses.asdict(config),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "parameters": count_parameters(model),
        "environment": environment(device),
    }
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    watch = CollapseWatch(config.collapse_steps, device)
    for epoch in range(1, config.epochs + 1):
        model.train()
        # Metrics accumulate on the device and are read once per epoch: no sync per step.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        start = time.perf_counter()
        # The bar shows on a terminal only (disable=None), so logs stay clean.
        bar = tqdm(train_loader, f"epoch {epoch}/{config.epochs}", leave=False, disable=None)
        for x, y in bar:
            logits = train_step(step_model, x, y, optimizer, loss_fn, config.amp, scaler)
            if scheduler:
                scheduler.step()
            # Report plain cross-entropy (as the chapter does), whatever the smoothing.
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            if watch.update(logits):
                raise NinError(watch.message(epoch, num_classes, config.lr))
        n = train_loader.num_examples
        train_loss, train_acc = loss_sum.item() / n, correct.item() / n
        seconds = time.perf_counter() - start
        train_seconds += seconds
        if not math.isfinite(train_loss):
            raise NinError(
                f"training diverged in epoch {epoch} (loss {train_loss}); "
                f"lower the learning rate (now --lr {config.lr})"
            )
        confusion = evaluate(model, eval_loader, num_classes, config.amp)
        row = {
            "epoch": epoch,
            "loss": train_loss,
            "train_acc": train_acc,
            eval_key: accuracy(confusion),
            "examples_per_sec": n / seconds,
            "epoch_seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log(
            f"epoch {epoch}/{config.epochs}: loss {train_loss:.3f}, train acc {train_acc:.3f}, "
            f"{eval_split} acc {row[eval_key]:.3f}, {row['examples_per_sec']:.1f} examples/sec"
        )

    final = history[-1]
    speed = config.epochs * train_loader.num_examples / train_seconds
    saved["result"] = {
        "loss": final["loss"],
        "train_acc": final["train_acc"],
        eval_key: final[eval_key],
        "examples_per_sec": speed,
        "train_seconds": train_seconds,
        "per_class_acc": per_class_accuracy(confusion),
    }
    save_checkpoint(run_dir, model, saved)
    plot_curves(history, run_dir / "curves.png", title=f"{config.model}, preset {config.preset}")
    log(f"saved {run_dir / 'model.safetensors'}, metrics.jsonl, curves.png")
    # The chapter's closing line.
    log(
        f"loss {final['loss']:.3f}, train acc {final['train_acc']:.3f}, "
        f"{eval_split} acc {final[eval_key]:.3f}, {speed:.1f} examples/sec on {device}"
    )
    return {
        **saved["result"],
        "device": str(device),
        "run_dir": str(run_dir),
        "history": history,
        "train_examples": train_loader.num_examples,
        "model": model,
    }


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
