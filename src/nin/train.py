"""Training: d2l's train_ch6, made fast and resumable, in the shape of torchvision's reference
script.

Read `train` top to bottom: set-up (the run directory, the device, the data, the model and its
`TrainState`), then per epoch `train_one_epoch` and `end_epoch` (evaluate, record, checkpoint),
then `finish`. What a run is comes from `nin.config` (settings) and `nin.presets` (recipes);
`TrainState` is everything a checkpoint saves, so a resumed run continues bit for bit. Under
torchrun (DDP), the process's rank and the world size appear here and in `nin.distributed` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nin.checkpoint import (
    BEST,
    LAST,
    WEIGHTS,
    load_state,
    load_weights,
    save_checkpoint,
    save_state,
    save_tensors,
    write_history,
)
from nin.config import (
    CONFIG,
    FIELDS,
    MAX_RECORD_BYTES,
    WHERE,
    TrainConfig,
    flag,
    parse_json,
    read_config,
    saved_config,
)
from nin.data import data_name, dataset_spec
from nin.device import autocast, environment, grad_scaler, memory_budget, pick_device, place_model
from nin.distributed import (
    World,
    all_gather,
    all_reduce,
    broadcast_buffers,
    broadcast_text,
    close_world,
    init_world,
    world_device,
)
from nin.errors import NinError
from nin.evaluate import Evaluation, check_input, evaluate
from nin.fast import TTA_LEVELS, Lookahead, init_whitening_, lr_scheduler, param_groups
from nin.files import atomic_path, read_file, save_figure, write_json
from nin.folders import load_folder
from nin.loaders import DeviceLoader, make_loader
from nin.models import count_parameters, create_model, xavier_init_
from nin.plots import curves_figure
from nin.presets import PRESETS
from nin.pretrained import finetune_config, freeze_body, load_body
from nin.resources import training_bytes
from nin.rundir import lock_run_dir, prepare_run_dir
from nin.watch import TrainingWatch

PROGRESS = ("epoch", "step", "history", "epoch_seconds", "best_acc", "order")
PROGRESS_SECONDS = 30.0  # how often a run logs its progress when its output is not a terminal
MIN_STEPS = 4  # the fewest steps an epoch of a folder run takes (its batch size is cut to fit)


class TrainState:
    """Everything a checkpoint saves and a resume restores: the pieces with a state dict (model,
    optimizer, schedule, loss scaler, lookahead, watch), where the run stands (epoch and steps
    done in it, the history, this epoch's running sums, the best validation accuracy) and, per
    process, every random state."""

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        loader: DeviceLoader,
        world: World,
        began: float,
    ) -> None:
        total_steps = config.epochs * len(loader)
        self.model, self.loader, self.world = model, loader, world
        self.optimizer = torch.optim.SGD(
            param_groups(model, config.lr, config.weight_decay, config.bias_lr_scale,
                         config.paper_lr),
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            fused=config.fused or None,
        )  # fmt: skip
        self.scheduler = lr_scheduler(self.optimizer, config.schedule, total_steps)
        self.scaler = grad_scaler(loader.device, config.amp)
        lookahead = config.lookahead
        self.lookahead = Lookahead(model, lookahead, total_steps) if lookahead else None
        self.watch = TrainingWatch(
            config.collapse_steps, config.stuck_steps, len(loader.classes), loader.device,
            lambda t, op="sum": all_reduce(t, world, op),  # its sums over every process
        )  # fmt: skip
        self.epoch, self.step = 1, 0  # `step` batches of `epoch` are done
        self.history: list[dict[str, Any]] = []  # one row per finished epoch
        self.epoch_seconds = 0.0  # spent on this epoch before the checkpoint resumed from
        self.best_acc = -1.0  # the best validation accuracy so far
        self.began = began  # time.perf_counter() when this process's part of the run began
        self.resumed_at = 0.0  # seconds the run had taken when this process took it over
        self.loss_sum = torch.zeros((), device=loader.device)
        self.correct = torch.zeros((), dtype=torch.long, device=loader.device)
        self.order = loader.order_generator.get_state()  # at this epoch's start: redrawn

    @property
    def elapsed(self) -> float:
        """Seconds the run had taken by its last finished epoch (0 for a new run)."""
        return self.history[-1].get("elapsed_seconds", 0.0) if self.history else 0.0

    def pieces(self) -> dict[str, Any]:
        """The objects with a state dict, by the name a checkpoint keeps them under."""
        pieces = dict(model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                      scaler=self.scaler, lookahead=self.lookahead, watch=self.watch)  # fmt: skip
        return {k: v for k, v in pieces.items() if v is not None}

    def state_dict(self) -> dict[str, Any]:
        """Every piece's state, the progress, and every process's sums and random states (one
        list per rank): collective under torchrun."""
        mine = {"loss_sum": self.loss_sum, "correct": self.correct, "torch": torch.get_rng_state()}
        if self.loader.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.loader.device)
        mine |= self.loader.state_dict()
        gathered = {k: all_gather(v, self.world) for k, v in mine.items()}
        ranks = [{k: v[r] for k, v in gathered.items()} for r in range(self.world.size)]
        run = {k: getattr(self, k) for k in PROGRESS} | {
            "ranks": ranks, "world_size": self.world.size, "device_type": self.loader.device.type
        }  # fmt: skip
        return {k: v.state_dict() for k, v in self.pieces().items()} | {"run": run}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back a `state_dict`, saved by as many processes on the same kind of device."""
        run, device = state["run"], self.loader.device
        if run["world_size"] != self.world.size:
            raise NinError(
                f"saved by {run['world_size']} processes; resume it with the same number "
                f"(now {self.world.size}), so each process gets its own random state back"
            )
        if run["device_type"] != device.type:
            raise NinError(
                f"saved on {run['device_type']}; resume it on {run['device_type']} too "
                f"(--device), since random states do not carry over to {device.type}"
            )
        for key, piece in self.pieces().items():
            piece.load_state_dict(state[key])
        for key in PROGRESS:
            setattr(self, key, run[key])
        self.resumed_at = self.elapsed
        mine = run["ranks"][self.world.rank]
        self.loss_sum.copy_(mine["loss_sum"])
        self.correct.copy_(mine["correct"])
        torch.set_rng_state(mine["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], device)
        self.loader.load_state_dict(mine)


@dataclasses.dataclass(frozen=True)
class Run:
    """What every stage of a run shares: its settings, its directory, its record (config.json),
    the split it is evaluated on ("val" or "test") and its log."""

    config: TrainConfig
    dir: Path
    record: dict[str, Any]
    split: str
    log: Callable[[str], None]


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
    began = time.perf_counter()
    world = init_world(config.device)
    if config.finetune and not resume:  # the source's network, size and channels
        config = finetune_config(config)
    log = log if world.main else no_log
    with contextlib.ExitStack() as hold:  # the run directory's lock, held to the end
        run_dir = open_run_dir(config, world, resume, hold)
        device, why = world_device(world, config.device) or pick_device(config.device)
        log(introduction(config, device, why, world.size))
        if config.deterministic:  # cuBLAS refuses deterministic mode without a fixed workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(config.deterministic)
        torch.manual_seed(config.seed)
        if config.data and not resume:
            config = fit_batch_size(config, world.size, log)
        # With a holdout or an image folder, every accuracy is validation accuracy: the test
        # split is not read.
        split = "val" if config.holdout or config.data else "test"
        train_loader = make_loader(config, "train", device, (world.rank, world.size))
        eval_loader = make_loader(config, split, device, (world.rank, world.size))
        if config.data:
            note_folder(config, run_dir, world.main, resume, log, train_loader.note)
        check_memory(config, train_loader, device)
        model = build_model(config, train_loader, len(train_loader.classes))
        if config.finetune and not resume:
            load_body(model, config.finetune, len(train_loader.classes))
        if world.active:  # the same weights everywhere (DDP broadcasts them), other dropout masks
            torch.manual_seed(config.seed + 1000 * world.rank)
        step_model = wrap_model(model, device, world, config.compile)  # before any copy of it
        state = TrainState(config, model, train_loader, world, began)
        record = run_record(config, run_dir, train_loader, model, device, world, resume)
        run = Run(config, run_dir, record, split, log)
        begin_or_resume(state, run, resume)
        evaluation = None
        for epoch in range(state.epoch, config.epochs + 1):
            seconds = train_one_epoch(step_model, state, run, epoch)
            evaluation = end_epoch(state, eval_loader, run, epoch, seconds, on_epoch)
        return finish(state, eval_loader, run, evaluation)


def train_one_epoch(step_model: nn.Module, state: TrainState, run: Run, epoch: int) -> float:
    """One pass over the training split, from the step a resume left it at; its seconds. Where
    the output is not a terminal (no bar), a line of progress every PROGRESS_SECONDS."""
    config = run.config
    loader, model, optimizer = state.loader, state.model, state.optimizer
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    if config.finetune:  # the new class maps learn alone first
        freeze_body(model, len(loader.classes), frozen=epoch == 1 and config.epochs > 1)
    skip, state.step = state.step, 0
    loader.order_generator.set_state(state.order)  # this epoch's order, drawn again
    start = time.perf_counter() - state.epoch_seconds
    # The bar shows on a terminal only (disable=None), so logs stay clean: they get lines.
    bar = tqdm(loader.batches(skip), f"epoch {epoch}/{config.epochs}", total=len(loader),
               initial=skip, leave=False, disable=None if state.world.main else True)  # fmt: skip
    lines, here = state.world.main and not sys.stdout.isatty(), time.perf_counter()
    noted = here
    for step, (x, y) in enumerate(bar, start=skip + 1):
        logits = train_step(step_model, x, y, optimizer, loss_fn, config.amp, state.scaler)
        if state.scheduler:
            state.scheduler.step()
        global_step = (epoch - 1) * len(loader) + step
        if state.lookahead:
            state.lookahead.step(model, global_step)
        # Sums stay on the device: the watch reads them once per window, never per step.
        batch_loss = F.cross_entropy(logits.float(), y, reduction="sum")  # unsmoothed
        batch_correct = (logits.argmax(1) == y).sum()
        state.loss_sum += batch_loss
        state.correct += batch_correct
        if state.watch.update(logits, batch_loss, batch_correct):
            raise state.watch.error(epoch, config.lr, run.dir / LAST)
        if lines and time.perf_counter() - noted >= PROGRESS_SECONDS:
            noted = time.perf_counter()
            done = step - skip
            images = done * loader.batch_size * state.world.size
            run.log(progress(config, epoch, step, len(loader), done, images, noted - here))
        every = config.checkpoint_every
        if every and global_step % every == 0 and step < len(loader):
            state.step, state.epoch_seconds = step, time.perf_counter() - start
            checkpoint(state, epoch, run)
    return time.perf_counter() - start


def progress(
    config: TrainConfig, epoch: int, step: int, steps: int, done: int, images: int, seconds: float
) -> str:
    """A progress line: the epoch and step, the pace since this epoch began here (`done` steps
    of `images` images in `seconds`) and the training time left at it (evaluations aside)."""
    left = seconds / done * (steps - step + (config.epochs - epoch) * steps)
    when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return (
        f"epoch {epoch}/{config.epochs}: step {step}/{steps}, {images / seconds:.1f} images/s, "
        f"about {when} left"
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


def evaluate_run(
    state: TrainState, loader: DeviceLoader, config: TrainConfig, tta: int = 0
) -> Evaluation:
    """Evaluate rank 0's model (its batch-norm statistics on every process) on every process's
    shard of `loader`; the confusion matrix sums them all."""
    broadcast_buffers(state.model, state.world)
    num_classes = len(state.loader.classes)
    evaluation = evaluate(state.model, loader, num_classes, config.amp, tta)
    evaluation.confusion = all_reduce(evaluation.confusion, state.world)
    return evaluation


def end_epoch(
    state: TrainState,
    eval_loader: DeviceLoader,
    run: Run,
    epoch: int,
    seconds: float,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> Evaluation:
    """The epoch's row (the chapter's loss, train and eval accuracy, examples/sec), the best
    weights on validation so far, a checkpoint, and the line the chapter prints."""
    config, world, key = run.config, state.world, f"{run.split}_acc"
    n = state.loader.num_examples * world.size
    loss = all_reduce(state.loss_sum, world).item() / n
    train_acc = all_reduce(state.correct, world).item() / n
    state.loss_sum.zero_(), state.correct.zero_()
    if state.watch.poll():  # it has seen every batch's loss, so a non-finite one too
        raise state.watch.error(epoch, config.lr, run.dir / LAST)
    eval_start = time.perf_counter()
    evaluation = evaluate_run(state, eval_loader, config)
    accuracy = evaluation.accuracy
    row = {
        "epoch": epoch, "loss": loss, "train_acc": train_acc, key: accuracy,
        "examples_per_sec": n / seconds, "epoch_seconds": seconds,
        "eval_seconds": time.perf_counter() - eval_start,
        # Since the run began (setup included), counting only time spent running it.
        "elapsed_seconds": state.resumed_at + time.perf_counter() - state.began,
        "lr": state.optimizer.param_groups[0]["lr"],
    }  # fmt: skip
    state.history.append(row)
    state.epoch, state.step, state.epoch_seconds = epoch + 1, 0, 0.0
    state.order = state.loader.order_generator.get_state()  # the next epoch's order
    if world.main:
        write_history(run.dir, state.history)
        # Picked on validation only: an artifact picked by test accuracy would be test-chosen.
        if run.split == "val" and accuracy > state.best_acc:
            state.best_acc = accuracy
            meta = {"model": config.model, "epoch": str(epoch), key: str(accuracy)}
            save_tensors(run.dir / BEST, state.model.state_dict(), meta)
    checkpoint(state, epoch, run)
    if on_epoch and world.main:
        on_epoch(dict(row))
    run.log(
        f"epoch {epoch}/{config.epochs}: loss {loss:.3f}, train acc {train_acc:.3f}, "
        f"{key.replace('_', ' ')} {accuracy:.3f}, {n / seconds:.1f} examples/sec"
    )
    return evaluation


def finish(
    state: TrainState, eval_loader: DeviceLoader, run: Run, evaluation: Evaluation | None
) -> dict:
    """The final evaluation (with test-time augmentation if asked), the weights (a folder run's
    best epoch on validation, else the last), config.json with the result, the curves, the
    closing line and, if the result is no better than guessing, a line that says so."""
    config, run_dir, record, log, key = run.config, run.dir, run.record, run.log, f"{run.split}_acc"
    history, world, device = state.history, state.world, state.loader.device
    chosen = history[-1]
    if config.data and run.split == "val":  # every process reads the file rank 0 wrote
        chosen = max(history, key=lambda row: row[key])  # the first best, as best.safetensors
        if chosen is not history[-1]:
            load_weights(state.model, run_dir / BEST, config.model)
            evaluation = None
    # Again with test-time augmentation, or if killed after the last checkpoint but before these
    # files.
    if evaluation is None or config.tta:
        evaluation = evaluate_run(state, eval_loader, config, config.tta)
    train_seconds = sum(row["epoch_seconds"] for row in history)
    examples = state.loader.num_examples * world.size
    speed = len(history) * examples / train_seconds
    record["result"] = result = {
        "wall_seconds": state.resumed_at + time.perf_counter() - state.began,
        "epoch": chosen["epoch"],  # whose weights are the result
        "loss": chosen["loss"],
        "train_acc": chosen["train_acc"],
        key: evaluation.accuracy,
        "examples_per_sec": speed,
        "train_seconds": train_seconds,
        "per_class_acc": evaluation.per_class,
        "tta": config.tta,
        f"{key}_no_tta": chosen[key],
    }
    if world.main:  # the weights are finite: the last checkpoint checked them before saving
        save_checkpoint(run_dir, state.model, record)
        title = f"{config.model}, preset {config.preset}"
        save_figure(curves_figure(history, title), run_dir / "curves.png")
    log(f"saved {run_dir / WEIGHTS}, metrics.jsonl, curves.png")
    log(closing_line(result, key, config, str(device)))
    warning = chance_warning(evaluation, key, config.lr)
    if warning:
        log(warning)
    close_world(world)
    return {**result, "device": str(device), "run_dir": str(run_dir), "history": history,
            "train_examples": examples, "model": state.model}  # fmt: skip


def closing_line(result: dict[str, Any], key: str, config: TrainConfig, device: str) -> str:
    """The chapter's closing line, led by the result: which accuracy, of which epoch's weights,
    and what test-time augmentation added to it."""
    name, plain = key.replace("_", " "), result[f"{key}_no_tta"]
    weights = "the last epoch's weights"
    if config.data and key == "val_acc":
        weights = f"epoch {result['epoch']}'s weights, the best on validation"
    tta = ", no test-time augmentation"
    if config.tta:
        tta = (
            f", with test-time augmentation ({TTA_LEVELS[config.tta]}: "
            f"{result[key] - plain:+.3f} on {plain:.3f} without)"
        )
    return (
        f"result: {name} {result[key]:.3f} of {weights}{tta}; loss {result['loss']:.3f}, "
        f"train acc {result['train_acc']:.3f}, {result['examples_per_sec']:.1f} examples/sec "
        f"on {device}"
    )


def chance_warning(evaluation: Evaluation, key: str, lr: float) -> str:
    """A line if the accuracy is within two standard errors (or 0.01) of guessing, that is of
    always answering the commonest class (1 / classes when they are balanced); else ""."""
    counts = evaluation.confusion.sum(1)
    n = max(int(counts.sum()), 1)
    guess = counts.max().item() / n
    if evaluation.accuracy > guess + max(2 * math.sqrt(guess * (1 - guess) / n), 0.01):
        return ""
    name = key.replace("_", " ")
    return (
        f"nin: this model is no better than guessing: {name} {evaluation.accuracy:.3f} on {n} "
        f"images is within chance of the {guess:.3f} that always answering the commonest class "
        f"scores; try more epochs (--epochs), more pictures a class, or a lower --lr (now {lr:g})"
    )


def open_run_dir(
    config: TrainConfig, world: World, resume: bool, hold: contextlib.ExitStack
) -> Path:
    """The run directory, checked and locked (for as long as `hold` lasts) by rank 0 before any
    expensive work; every process gets its name and the verdict, so all of them stop together."""
    name, problem = "", ""
    if world.main:
        try:
            name = str(prepare_run_dir(config.out, config.preset, resume))
            hold.enter_context(lock_run_dir(Path(name), resume))
        except NinError as e:
            problem = str(e)
    name, problem = broadcast_text(name, world), broadcast_text(problem, world)
    if problem:
        raise NinError(problem)
    return Path(name)


def begin_or_resume(state: TrainState, run: Run, resume: bool) -> None:
    """A new run writes its config.json; a resumed one loads last.safetensors into its state
    (temporary files of a save the kill cut short go). Either way metrics.jsonl then holds
    exactly the epochs the checkpoint holds: none twice or lost."""
    main, config, run_dir, record = state.world.main, run.config, run.dir, run.record
    if not resume:
        if main:
            write_json(run_dir / CONFIG, record)
            write_history(run_dir, state.history)
        return
    path = run_dir / LAST
    saved = load_state(path, config.model, record)
    if saved["run"]["epoch"] > config.epochs and (run_dir / WEIGHTS).exists():
        raise NinError(f"{run_dir}: this run has already finished all {config.epochs} epochs")
    try:
        state.load_state_dict(saved)
    except NinError as e:
        raise NinError(f"{path}: {e}") from None
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, IndexError) as e:
        raise NinError(
            f"{path}: training state incomplete or does not fit this run ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); start a new run with another --out"
        ) from None
    if main:
        for leftover in run_dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        write_history(run_dir, state.history)
    run.log(f"nin: resuming {run_dir} at epoch {state.epoch}, step {state.step}")


def checkpoint(state: TrainState, epoch: int, run: Run) -> None:
    """Save the state to last.safetensors (collective; rank 0 writes), never weights from after
    a divergence."""
    if state.watch.poll(state.model):
        raise state.watch.error(epoch, run.config.lr, run.dir / LAST)
    saved = state.state_dict()
    if state.world.main:
        save_state(run.dir / LAST, run.config.model, saved, run.record)


def run_record(
    config: TrainConfig,
    run_dir: Path,
    loader: DeviceLoader,
    model: nn.Module,
    device: torch.device,
    world: World,
    resume: bool,
) -> dict[str, Any]:
    """The run's config.json: its settings, the data's shape, the environment (later the
    result), and its id: a new one (the same on every process), or the one it began with."""
    run_id = (
        read_config(run_dir).get("run_id") if resume else broadcast_text(uuid.uuid4().hex, world)
    )
    folder = {"mean": loader.preprocess.mean, "std": loader.preprocess.std} if config.data else {}
    return {
        **dataclasses.asdict(config),
        "out": str(run_dir),
        "run_id": run_id,
        "num_classes": len(loader.classes),
        "classes": list(loader.classes),
        "in_channels": loader.images.shape[1],
        **folder,  # what a run on an image folder needs to preprocess new images as it trained
        "parameters": count_parameters(model),
        "environment": environment(device),
        "world_size": world.size,
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
    if resume and os.path.lexists(saved) and read_split(saved) != split:
        raise NinError(
            f"{config.data}: its images changed since {run_dir} began, so the validation split "
            "would differ; restore them, or start a new run with another --out"
        )
    if split and main and not resume:
        write_json(saved, split)


def read_split(path: Path) -> Any:
    """A resumed folder run's split.json, read as a file nin did not write."""
    fix = "it is not the split.json nin wrote; start a new run with another --out"
    try:
        return parse_json(read_file(path, MAX_RECORD_BYTES, fix))
    except ValueError:  # JSON and decoding errors
        raise NinError(f"{path}: not valid JSON; {fix}") from None


def introduction(config: TrainConfig, device: torch.device, why: str, processes: int) -> str:
    """The first line a run logs: the network, the data and the image size it trains on, for
    how many epochs, the preset (its note if the run keeps its network and data), the device
    and why."""
    side = config.resize or dataset_spec(config.dataset).side
    recipe = f"preset {config.preset}'s recipe"
    if config.preset not in PRESETS:
        recipe = "a saved config"
    elif not config.data and all(getattr(config, k) == preset_value(config, k) for k in
                                 ("model", "dataset")):  # fmt: skip
        recipe = f"preset {config.preset}, {PRESETS[config.preset].note}"
    line = (
        f"nin: {config.model} on {data_name(vars(config))} at {side}×{side}, {config.epochs} "
        f"epoch{'s' if config.epochs != 1 else ''} ({recipe}) on {device} ({why})"
    )
    if processes > 1:
        line += f"; {processes} processes, global batch {config.batch_size}"
    if config.preset == "d2l" and device.type == "cpu":
        line += (
            "\nnin: note: the chapter's setting trains at about 30 images/s on 2 CPU cores "
            "(~5.5 hours for 10 epochs); it is meant for a GPU"
        )
    return line


def preset_value(config: TrainConfig, name: str) -> Any:
    """What the run's preset sets setting `name` to (the default where it sets nothing)."""
    preset = PRESETS.get(config.preset)
    return preset.settings.get(name, FIELDS[name].default) if preset else None


def fit_batch_size(config: TrainConfig, processes: int, log: Callable[[str], None]) -> TrainConfig:
    """A folder run's config, the preset's batch size cut (to the largest power of two that
    does) where an epoch would otherwise take fewer than MIN_STEPS steps, said in one line; a
    batch size given (another than the preset's) is kept."""
    if config.batch_size != preset_value(config, "batch_size"):
        return config
    train_index, _, _ = load_folder(config.data, config.resize, config.channels).train_val(
        config.holdout, config.seed
    )
    examples = min(len(train_index), config.train_subset or len(train_index))
    if config.batch_size * MIN_STEPS <= examples:
        return config
    fits = max(2, processes, 2 ** int(math.log2(max(1, examples // MIN_STEPS))))
    fits = min(fits, examples)
    log(
        f"nin: batches of {fits}, not {config.batch_size}: {examples} training images make "
        f"{math.ceil(examples / fits)} steps an epoch (--batch-size to choose)"
    )
    return dataclasses.replace(config, batch_size=fits)


def check_memory(config: TrainConfig, loader: DeviceLoader, device: torch.device) -> None:
    """Refuse, before allocating it, a training step that cannot fit in the free memory."""
    side = loader.preprocess.side or loader.images.shape[-1]
    size = (loader.images.shape[1], side, side)
    optimizer = "momentum" if config.momentum else "sgd"
    kwargs = {"num_classes": len(loader.classes), **config.model_kwargs}
    try:
        need = training_bytes(config.model, size, loader.batch_size, optimizer, **kwargs)
    except (RuntimeError, ValueError):  # the model cannot take this size: `build_model` says so
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
        try:
            init_whitening_(model, loader.prepare(loader.images[:5000], augment=False))
        except ValueError as e:
            raise NinError(f"{e}: use --init default") from None
    place_model(model, loader.device, config.channels_last)
    check_input(model, loader.prepare(loader.images[:1], augment=False), config.model)
    return model


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
