"""Training: d2l's train_ch6, made fast and resumable.

Read top to bottom: `train` sets a run up, loops over epochs and steps, and saves the result.
What a run is comes from `nin.config` (settings) and `nin.presets` (recipes); `RunState` is
where it stands, saved in every checkpoint so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    WEIGHTS,
    load_state,
    lock_run_dir,
    prepare_run_dir,
    read_config,
    run_id,
    save_checkpoint,
    save_state,
    save_tensors,
    write_history,
)
from nin.config import WHERE, TrainConfig, flag, saved_config
from nin.data import DeviceLoader
from nin.device import (
    autocast,
    environment,
    grad_scaler,
    memory_budget,
    pick_device,
    place_model,
)
from nin.distributed import (
    World,
    all_gather,
    all_reduce,
    broadcast_buffers,
    close_world,
    init_world,
)
from nin.errors import NinError
from nin.evaluate import Evaluation, evaluate
from nin.fast import TTA_LEVELS, Lookahead, init_whitening_, param_groups
from nin.files import atomic_path, save_figure, write_json
from nin.folders import load_folder
from nin.loaders import make_loader
from nin.models import check_input, count_parameters, create_model, xavier_init_
from nin.plots import curves_figure
from nin.presets import PRESETS
from nin.resources import training_bytes
from nin.watch import TrainingWatch


class RunState:
    """Where a run stands: epoch and steps done in it, the history, this epoch's running sums,
    and every random state (per process). `state_dict` is collective under torchrun."""

    def __init__(self, loader: DeviceLoader, world: World) -> None:
        self.epoch, self.step = 1, 0  # `step` batches of `epoch` are done
        self.history: list[dict[str, Any]] = []  # one row per finished epoch
        self.epoch_seconds = 0.0  # spent on this epoch before the checkpoint resumed from
        self.best_acc = -1.0
        self.resumed_at = 0.0  # seconds the run had taken when this process took it over
        self.loss_sum = torch.zeros((), device=loader.device)
        self.correct = torch.zeros((), dtype=torch.long, device=loader.device)
        self.order = loader.order_generator.get_state()  # at this epoch's start: redrawn
        self.loader, self.world = loader, world

    @property
    def elapsed(self) -> float:
        """Seconds the run had taken by its last finished epoch (0 for a new run)."""
        return self.history[-1].get("elapsed_seconds", 0.0) if self.history else 0.0

    def state_dict(self) -> dict[str, Any]:
        """Everything here, with every process's sums and random states (one list per rank)."""
        mine = {
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "torch": torch.get_rng_state(),
            "loader": self.loader.state_dict(),
        }
        if self.loader.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.loader.device)
        flat = {k: v for k, v in mine.items() if k != "loader"} | mine["loader"]
        gathered = {k: all_gather(v, self.world) for k, v in flat.items()}
        ranks = [{k: v[r] for k, v in gathered.items()} for r in range(self.world.size)]
        keys = ("epoch", "step", "history", "epoch_seconds", "best_acc", "order")
        return {k: getattr(self, k) for k in keys} | {
            "ranks": ranks,
            "world_size": self.world.size,
            "device_type": self.loader.device.type,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict`, saved by as many processes on the same kind of device."""
        if state["world_size"] != self.world.size:
            raise NinError(
                f"saved by {state['world_size']} processes; resume it with the same number "
                f"(now {self.world.size}), so each process gets its own random state back"
            )
        device = self.loader.device
        if state["device_type"] != device.type:
            raise NinError(
                f"saved on {state['device_type']}; resume it on {state['device_type']} too "
                f"(--device), since random states do not carry over to {device.type}"
            )
        for key in ("epoch", "step", "history", "epoch_seconds", "best_acc", "order"):
            setattr(self, key, state[key])
        self.resumed_at = self.elapsed
        mine = state["ranks"][self.world.rank]
        self.loss_sum.copy_(mine["loss_sum"])
        self.correct.copy_(mine["correct"])
        torch.set_rng_state(mine["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], device)
        self.loader.load_state_dict(mine)


@dataclass
class Run:
    """Everything a training run works with, made by `start_run`."""

    config: TrainConfig
    dir: Path
    world: World
    device: torch.device
    log: Callable[[str], None]
    began: float  # time.perf_counter() at the start of this process's part of the run
    train_loader: DeviceLoader
    eval_loader: DeviceLoader
    eval_key: str  # "val_acc" with a holdout (the test split is not read), else "test_acc"
    model: nn.Module
    step_model: nn.Module  # the model as the step calls it: DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    lookahead: Lookahead | None
    watch: TrainingWatch
    state: RunState
    record: dict[str, Any]  # the config.json: settings, data shape, environment, result
    evaluation: Evaluation | None = None  # of the last epoch this process finished
    on_epoch: Callable[[dict[str, Any]], None] | None = None  # called with each epoch's row

    def stateful(self) -> dict[str, Any]:
        """The pieces a checkpoint saves and a resume restores, each with a state_dict."""
        pieces = {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "lookahead": self.lookahead,
            "watch": self.watch,
            "run": self.state,
        }
        return {k: v for k, v in pieces.items() if v is not None}


def train(
    config: TrainConfig,
    log: Callable[[str], None] = print,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict:
    """Train as `config` says, checkpointing as it goes; with `resume`, continue the run saved in
    `config.out` exactly where its last checkpoint left it.

    `log` gets each line the run prints; `on_epoch` gets each finished epoch's metrics (the row
    metrics.jsonl holds: loss, train_acc, test_acc or val_acc, examples_per_sec, ...), to plot
    them live as d2l's Animator does. Returns the final metrics, the per-epoch history, the run
    directory and the trained model. Under torchrun every process calls this; rank 0 alone logs,
    calls `on_epoch` and writes files.
    """
    with contextlib.ExitStack() as hold:  # start_run locks the run directory in it, to the end
        run = start_run(config, log, resume, hold)
        run.on_epoch = on_epoch
        return train_epochs(run)


def train_epochs(run: Run) -> dict:
    """The epochs of a run `start_run` set up, then `finish_run`; returns what `train` does."""
    config = run.config
    model, optimizer, scheduler, lookahead = run.model, run.optimizer, run.scheduler, run.lookahead
    watch, state, loader = run.watch, run.state, run.train_loader
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for epoch in range(state.epoch, config.epochs + 1):
        model.train()
        skip, state.step = state.step, 0
        loader.order_generator.set_state(state.order)  # this epoch's order, drawn again
        start = time.perf_counter() - state.epoch_seconds
        # The bar shows on a terminal only (disable=None), so logs stay clean.
        bar = tqdm(
            loader.batches(skip),
            f"epoch {epoch}/{config.epochs}",
            total=len(loader),
            initial=skip,
            leave=False,
            disable=None if run.world.main else True,
        )
        for step, (x, y) in enumerate(bar, start=skip + 1):
            logits = train_step(run.step_model, x, y, optimizer, loss_fn, config.amp, run.scaler)
            if scheduler:
                scheduler.step()
            global_step = (epoch - 1) * len(loader) + step
            if lookahead:
                lookahead.step(model, global_step)
            # Sums stay on the device: the watch reads them once per window, never per step.
            batch_loss = F.cross_entropy(logits.float(), y, reduction="sum")  # unsmoothed
            batch_correct = (logits.argmax(1) == y).sum()
            state.loss_sum += batch_loss
            state.correct += batch_correct
            if watch.update(logits, batch_loss, batch_correct):
                raise watch.error(epoch, config.lr, run.dir / LAST)
            every = config.checkpoint_every
            if every and global_step % every == 0 and step < len(loader):
                state.step, state.epoch_seconds = step, time.perf_counter() - start
                checkpoint(run, epoch)
        end_epoch(run, epoch, time.perf_counter() - start)
    return finish_run(run)


def start_run(
    config: TrainConfig, log: Callable[[str], None], resume: bool, hold: contextlib.ExitStack
) -> Run:
    """Set a run up: the processes, its directory, the data on the device, the model and the
    optimizer; on a resume, everything as the last checkpoint left it."""
    began = time.perf_counter()
    world = init_world(config.device)
    log = log if world.main else no_log
    run_dir = prepare_run_dir(config.out, config.preset, world, resume)
    hold.enter_context(lock_run_dir(run_dir, world, resume))  # released when `train` ends
    device, why = pick_device(config.device, world)
    log(introduction(config, device, why, world))
    if config.deterministic:  # cuBLAS refuses deterministic mode without a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(config.deterministic)
    torch.manual_seed(config.seed)
    # With a holdout or an image folder, every accuracy is validation accuracy: the test split
    # is not read.
    eval_split = "val" if config.holdout or config.data else "test"
    train_loader = make_loader(config, "train", device, world)
    eval_loader = make_loader(config, eval_split, device, world)
    if config.data:
        note_folder(config, run_dir, world.main, resume, log, train_loader.note)
    num_classes = len(train_loader.classes)
    check_memory(config, train_loader, num_classes, device)
    model = build_model(config, train_loader, num_classes)
    if world.active:  # the same weights everywhere (DDP broadcasts them), other dropout masks
        torch.manual_seed(config.seed + 1000 * world.rank)
    optimizer = torch.optim.SGD(
        param_groups(model, config.lr, config.weight_decay, config.bias_lr_scale, config.paper_lr),
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        fused=config.fused or None,
    )
    total_steps = config.epochs * len(train_loader)
    run = Run(
        config=config,
        dir=run_dir,
        world=world,
        device=device,
        log=log,
        began=began,
        train_loader=train_loader,
        eval_loader=eval_loader,
        eval_key=f"{eval_split}_acc",
        model=model,
        step_model=wrap_model(model, device, world, config.compile),
        optimizer=optimizer,
        scheduler=lr_scheduler(optimizer, config.schedule, total_steps),
        scaler=grad_scaler(device, config.amp),
        lookahead=Lookahead(model, config.lookahead, total_steps) if config.lookahead else None,
        watch=TrainingWatch(config.collapse_steps, config.stuck_steps, num_classes, device, world),
        state=RunState(train_loader, world),
        record={
            **dataclasses.asdict(config),
            "out": str(run_dir),
            "run_id": run_id(run_dir, world, resume),
            "num_classes": num_classes,
            "classes": list(train_loader.classes),
            "in_channels": train_loader.images.shape[1],
            **folder_stats(config, train_loader),
            "parameters": count_parameters(model),
            "environment": environment(device),
            "world_size": world.size,
        },
    )
    if resume:
        restore(run)
        log(f"nin: resuming {run_dir} at epoch {run.state.epoch}, step {run.state.step}")
    elif world.main:
        write_json(run_dir / CONFIG, run.record)
    if world.main:  # the log holds exactly the epochs the checkpoint holds: none twice or lost
        write_history(run_dir, run.state.history)
    return run


def end_epoch(run: Run, epoch: int, seconds: float) -> None:
    """The epoch's row (the chapter's loss, train and eval accuracy, examples/sec), the best
    weights so far, a checkpoint, and the line the chapter prints."""
    state, world, key = run.state, run.world, run.eval_key
    n = run.train_loader.num_examples * world.size
    loss = all_reduce(state.loss_sum, world).item() / n
    train_acc = all_reduce(state.correct, world).item() / n
    state.loss_sum.zero_(), state.correct.zero_()
    if run.watch.poll():  # it has seen every batch's loss, so a non-finite one too
        raise run.watch.error(epoch, run.config.lr, run.dir / LAST)
    broadcast_buffers(run.model, world)  # every process evaluates rank 0's model
    eval_start = time.perf_counter()
    num_classes = run.record["num_classes"]
    run.evaluation = evaluate(run.model, run.eval_loader, num_classes, run.config.amp, world=world)
    accuracy = run.evaluation.accuracy
    row = {
        "epoch": epoch,
        "loss": loss,
        "train_acc": train_acc,
        key: accuracy,
        "examples_per_sec": n / seconds,
        "epoch_seconds": seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        # Since the run began (setup included), counting only time spent running it.
        "elapsed_seconds": state.resumed_at + time.perf_counter() - run.began,
        "lr": run.optimizer.param_groups[0]["lr"],
    }
    state.history.append(row)
    state.epoch, state.step, state.epoch_seconds = epoch + 1, 0, 0.0
    state.order = run.train_loader.order_generator.get_state()  # the next epoch's order
    if world.main:
        write_history(run.dir, state.history)
        if accuracy > state.best_acc:
            state.best_acc = accuracy
            meta = {"model": run.config.model, "epoch": str(epoch), key: str(accuracy)}
            save_tensors(run.dir / BEST, run.model.state_dict(), meta)
    checkpoint(run, epoch)
    if run.on_epoch and world.main:
        run.on_epoch(dict(row))
    run.log(
        f"epoch {epoch}/{run.config.epochs}: loss {loss:.3f}, train acc {train_acc:.3f}, "
        f"{key.replace('_', ' ')} {accuracy:.3f}, {n / seconds:.1f} examples/sec"
    )


def finish_run(run: Run) -> dict:
    """The final evaluation (with test-time augmentation if asked), the weights, config.json
    with the result, the curves, and the chapter's closing line."""
    config, history, key, world = run.config, run.state.history, run.eval_key, run.world
    evaluation = run.evaluation
    # Again with test-time augmentation, or if killed after the last checkpoint but before these
    # files.
    if evaluation is None or config.tta:
        broadcast_buffers(run.model, world)
        num_classes = run.record["num_classes"]
        evaluation = evaluate(run.model, run.eval_loader, num_classes, config.amp, config.tta,
                              world=world)  # fmt: skip
    train_seconds = sum(row["epoch_seconds"] for row in history)
    examples = run.train_loader.num_examples * world.size
    speed = len(history) * examples / train_seconds
    run.record["result"] = result = {
        "wall_seconds": run.state.resumed_at + time.perf_counter() - run.began,
        "loss": history[-1]["loss"],
        "train_acc": history[-1]["train_acc"],
        key: evaluation.accuracy,
        "examples_per_sec": speed,
        "train_seconds": train_seconds,
        "per_class_acc": evaluation.per_class,
        "tta": config.tta,
        f"{key}_no_tta": history[-1][key],
    }
    if world.main:  # the weights are finite: the last checkpoint checked them before saving
        save_checkpoint(run.dir, run.model, run.record)
        title = f"{config.model}, preset {config.preset}"
        save_figure(curves_figure(history, title), run.dir / "curves.png")
    run.log(f"saved {run.dir / WEIGHTS}, metrics.jsonl, curves.png")
    tta = f" (test-time augmentation: {TTA_LEVELS[config.tta]})" if config.tta else ""
    run.log(  # the chapter's closing line
        f"loss {result['loss']:.3f}, train acc {result['train_acc']:.3f}, "
        f"{key.replace('_', ' ')} {result[key]:.3f}{tta}, {speed:.1f} examples/sec on {run.device}"
    )
    close_world(world)
    return {
        **result,
        "device": str(run.device),
        "run_dir": str(run.dir),
        "history": history,
        "train_examples": examples,
        "model": run.model,
    }


def note_folder(
    config: TrainConfig, run_dir: Path, main: bool, resume: bool, log: Callable, note: str
) -> None:
    """Say how an image folder was read (and what was skipped: all of it in skipped.txt);
    save the validation split carved from it (split.json), or check a resumed run's."""
    data = load_folder(config.data, config.resize, config.channels)
    log(f"nin: {config.data}: {len(data.classes)} classes; training images: {note}")
    if data.skipped:
        names = ", ".join(name for name, _ in data.skipped[:3])
        more = ", ..." if len(data.skipped) > 3 else ""
        log(f"nin: skipped {len(data.skipped)} unusable files ({names}{more}): see skipped.txt")
        if main:
            with atomic_path(run_dir / "skipped.txt") as tmp:
                tmp.write_text("".join(f"{name}\t{why}\n" for name, why in data.skipped))
    _, val, carved = data.train_val(config.holdout, config.seed)
    split = {"val": [data.files[i] for i in val.tolist()]} if carved else {}
    saved = run_dir / "split.json"
    if resume and saved.is_file() and json.loads(saved.read_text()) != split:
        raise NinError(
            f"{config.data}: its images changed since {run_dir} began, so the validation split "
            "would differ; restore them, or start a new run with another --out"
        )
    if split and main and not resume:
        write_json(saved, split)


def folder_stats(config: TrainConfig, loader: DeviceLoader) -> dict[str, Any]:
    """What a run on an image folder must save to preprocess new images as it trained."""
    if not config.data:
        return {}
    return {"mean": loader.preprocess.mean, "std": loader.preprocess.std}


def introduction(config: TrainConfig, device: torch.device, why: str, world: World) -> str:
    """The first line a run logs: the preset, the device and why, the model and data."""
    note = PRESETS[config.preset].note if config.preset in PRESETS else "a saved config"
    line = (
        f"nin: preset {config.preset} ({note}) on {device} ({why}); "
        f"{config.model} on {config.data or config.dataset}"
    )
    if world.active:
        line += f"; {world.size} processes, global batch {config.batch_size}"
    if config.preset == "d2l" and device.type == "cpu":
        line += (
            "\nnin: note: the chapter's setting trains at about 30 images/s on 2 CPU cores "
            "(~5.5 hours for 10 epochs); it is meant for a GPU"
        )
    return line


def check_memory(
    config: TrainConfig, loader: DeviceLoader, num_classes: int, device: torch.device
) -> None:
    """Refuse, before allocating it, a training step that cannot fit in the free memory."""
    side = loader.preprocess.side or loader.images.shape[-1]
    size = (loader.images.shape[1], side, side)
    optimizer = "momentum" if config.momentum else "sgd"
    kwargs = {"num_classes": num_classes, **config.model_kwargs}
    try:
        need = training_bytes(config.model, size, loader.batch_size, optimizer, **kwargs)
    except RuntimeError:  # the model cannot take this size: `build_model` says so
        return
    free = 2 * memory_budget(device)
    if need > free:
        raise NinError(
            f"training {config.model} on {side}×{side} images in batches of {loader.batch_size} "
            f"needs about {need / 1e9:.1f} GB (`nin resources` shows where), but {device} has "
            f"{free / 1e9:.1f} GB free; lower --batch-size or --resize"
        )


def build_model(config: TrainConfig, loader: DeviceLoader, num_classes: int) -> nn.Module:
    """The config's model, initialised as it says, on the loader's device, checked to take its
    images."""
    model = create_model(
        config.model,
        num_classes=num_classes,
        in_channels=loader.images.shape[1],
        **config.model_kwargs,
    )
    if config.init == "xavier":
        xavier_init_(model)
    elif config.init == "whiten":  # from (at most) 5,000 training images, as airbench does
        init_whitening_(model, loader.prepare(loader.images[:5000], augment=False))
    place_model(model, loader.device, config.channels_last)
    check_input(model, loader.prepare(loader.images[:1], augment=False), config.model)
    return model


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


def checkpoint(run: Run, epoch: int) -> None:
    """Save every piece's state to last.safetensors (collective; rank 0 writes), never weights
    from after a divergence."""
    if run.watch.poll(run.model):
        raise run.watch.error(epoch, run.config.lr, run.dir / LAST)
    state = {k: v.state_dict() for k, v in run.stateful().items()}
    if run.world.main:
        save_state(run.dir / LAST, run.config.model, state, run.record)


def restore(run: Run) -> None:
    """Load last.safetensors into every piece of the run; temporary files of a save the kill
    cut short go."""
    path = run.dir / LAST
    state = load_state(path, run.config.model, run.record)
    if state["run"]["epoch"] > run.config.epochs and (run.dir / WEIGHTS).exists():
        raise NinError(f"{run.dir}: this run has already finished all {run.config.epochs} epochs")
    try:
        for key, piece in run.stateful().items():
            piece.load_state_dict(state[key])
    except NinError as e:
        raise NinError(f"{path}: {e}") from None
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError) as e:
        raise NinError(
            f"{path}: training state incomplete or does not fit this run ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); start a new run with another --out"
        ) from None
    if run.world.main:
        for leftover in run.dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)


def resume_config(run_dir: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The saved config of a run to resume; only where it runs (`data_dir`, `device`) may change."""
    saved = read_config(Path(run_dir))
    changed = sorted(
        k for k, v in overrides.items() if k not in WHERE and v != saved.get(k, object())
    )
    if changed:
        flags = ", ".join("--" + flag(k) for k in changed)
        raise NinError(
            f"--resume continues {run_dir} with its saved settings; drop {flags} (only "
            "--data-dir and --device may change), or start a new run with another --out"
        )
    here = {k: v for k, v in overrides.items() if k in WHERE}
    return saved_config({**saved, "out": str(run_dir)}, **here)


def wrap_model(model: nn.Module, device: torch.device, world: World, compile: bool) -> nn.Module:
    """The module the training step calls: DistributedDataParallel across processes and/or
    torch.compile'd; it shares `model`'s parameters, so checkpoints save `model` itself."""
    if world.active:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if compile else model


def no_log(message: str) -> None:
    """The log of every process but rank 0: silent."""
