"""Batches on the device: `DeviceLoader`, its augmentation, and `make_loader`, which picks the
images of a run's split (a built-in data set or a folder of your own images, `--data`).

The whole split is held as uint8 on the training device; every batch is gathered, converted,
resized, normalised and augmented there, in one go. There is no per-sample Python anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from nin.data import Preprocess, dataset_spec, load_split
from nin.device import memory_budget
from nin.errors import NinError
from nin.folders import load_folder

STREAM_WORKERS = 2  # DataLoader processes that read streamed batches from the disk


def make_loader(
    config: Any, split: str, device: torch.device, shard: tuple[int, int] = (0, 1)
) -> DeviceLoader:
    """The loader of one split on `device` for a `nin.config.TrainConfig`: shuffled and
    augmented for train, plain otherwise.

    `split` is "train", "val" or "test". For a built-in data set, "val" is the last
    `config.holdout` training examples, which "train" then leaves out. Under torchrun each
    process gets its `shard` (index, count) of every batch: `config.batch_size` is the global
    batch.
    """
    size = shard[1]
    if config.batch_size % size:
        raise NinError(
            f"--batch-size {config.batch_size} must divide evenly among the {size} "
            "processes (it is the global batch)"
        )
    if config.data:
        images, labels, classes, preprocess, note = folder_split(config, split, device)
    else:
        images, labels = builtin_split(config, split)
        classes = dataset_spec(config.dataset).classes
        preprocess, note = Preprocess.for_run(vars(config)), ""
    training = split == "train"
    subset = config.train_subset if training else config.test_subset if split == "test" else None
    cut = slice(None, subset)  # streamed images are cut on the disk, not read here
    images = images[cut] if isinstance(images, torch.Tensor) else images.subset(cut)
    labels = labels[cut]
    if training and config.batch_size > len(labels):
        raise NinError(
            f"--batch-size {config.batch_size} is larger than the {len(labels)} training "
            "examples; use a smaller --batch-size"
        )
    loader = DeviceLoader(
        images,
        labels,
        config.batch_size // size,
        device=device,
        shuffle=training,
        preprocess=preprocess,
        flip=config.flip and training,
        crop_padding=config.crop_padding if training else 0,
        rotate=config.rotate if training else 0.0,
        seed=config.seed,
        shard=shard,
        classes=classes,
        workers=STREAM_WORKERS,
    )
    loader.note = note
    return loader


def builtin_split(config: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of a built-in data set's split ("val": the last `holdout` of train)."""
    images, labels = load_split(
        config.dataset, "test" if split == "test" else "train", config.data_dir
    )
    if split == "test":
        return images, labels
    if not 0 <= config.holdout < len(labels):
        raise NinError(f"--holdout must be in [0, {len(labels)}), got {config.holdout}")
    keep = len(labels) - config.holdout
    return (images[keep:], labels[keep:]) if split == "val" else (images[:keep], labels[:keep])


def folder_split(config: Any, split: str, device: torch.device) -> tuple:
    """Images (on the device, or on the disk to stream), labels, class names, preprocessing
    and a note on where the images are kept, for one split of an image folder.

    The validation split is the val/ folder, or is carved from train (seeded, stratified);
    without a test/ folder, "test" is the validation split.
    """
    data = load_folder(config.data, config.resize, config.channels)
    train, val, _ = data.train_val(config.holdout, config.seed)
    index = {"train": train, "val": val, "test": data.split("test")}[split]
    fallback = split == "test" and not len(index)
    if fallback:
        index = val
    images = data.images.subset(index)
    side, channels = data.images.image_shape[1], data.images.image_shape[0]
    size = len(index) * channels * side * side
    budget = memory_budget(torch.device(device))
    stream = config.loader == "stream" or (config.loader == "auto" and size > budget)
    kept = "streamed from the disk cache" if stream else f"resident on {device}"
    note = "no test/ folder, so the validation split: " if fallback else ""
    note += f"{len(index):,} images ({size / 1e6:,.1f} MB) {kept}; budget {budget / 1e9:.1f} GB"
    if not stream:
        images = images.load()
    mean = std = None
    if config.normalize:
        mean, std = data.train_stats
    preprocess = Preprocess(side, mean, std, config.channels_last)
    return images, data.labels[index], data.classes, preprocess, note


class DeviceLoader:
    """Batches from a split held on the device as uint8, prepared there in batch.

    Each batch is gathered by index, (for training) rotated, translated and flipped at random, and
    preprocessed (`Preprocess`). The shuffling and augmentation draw from generators seeded
    with `seed`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        preprocess: Preprocess | None = None,
        flip: bool = False,
        crop_padding: int = 0,
        rotate: float = 0.0,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        classes: tuple[str, ...] = (),
        workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise NinError(f"batch size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # images streamed from disk stay there
        self.stream = not isinstance(self.images, torch.Tensor)
        self.labels = labels.to(self.device)
        self.classes, self.workers = classes, workers
        self.note = ""  # where the images are kept, when that was chosen
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.preprocess = preprocess or Preprocess()
        self.flip = flip
        self.crop_padding = crop_padding
        self.rotate = rotate
        self.shard, self.shards = shard
        # Every shard draws the same order and takes its own part of it; augmentation differs.
        self.order_generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator(device=self.device).manual_seed(
            seed + 1 + 1000 * self.shard
        )

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    @property
    def num_examples(self) -> int:
        """Number of examples this shard sees in one pass."""
        n = len(self.labels)
        if self.shuffle:  # training: every shard gets the same number of steps
            return n // self.shards
        return len(range(self.shard, n, self.shards))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()

    def batches(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over this shard, leaving out the first `skip` batches (a resume)."""
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.order_generator)
            order = order[: self.num_examples * self.shards]
        else:
            order = torch.arange(n)
        order = order[self.shard :: self.shards][skip * self.batch_size :]
        if self.stream:  # read from the disk by a DataLoader's workers
            read = batches_from_disk(self.images, order, self.batch_size, self.workers)
            for start, batch in zip(range(0, len(order), self.batch_size), read, strict=True):
                index = order[start : start + self.batch_size].to(self.device)
                yield self.prepare(batch), self.labels[index]
            return
        order = order.to(self.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.prepare(self.images[index]), self.labels[index]

    def prepare(self, batch: torch.Tensor, augment: bool = True) -> torch.Tensor:
        """uint8 (B, C, H, W) -> the model's input, augmented as configured (unless not
        `augment`)."""
        batch = batch.to(self.device, non_blocking=True)
        return self.preprocess(batch, self.augment if augment else None)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random rotations, translations and flips of [0, 1] pixels, as configured."""
        if self.rotate:
            x = random_rotate(x, self.rotate, self.augment_generator)
        if self.crop_padding:
            x = random_translate(x, self.crop_padding, self.augment_generator)
        if self.flip:
            x = random_flip(x, self.augment_generator)
        return x

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The augmentation generator's state (the order is redrawn per epoch by the run)."""
        return {"augment": self.augment_generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Put back a state from `state_dict`."""
        self.augment_generator.set_state(state["augment"])


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    mask = torch.rand(len(x), device=x.device, generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image by a random angle in [-degrees, degrees]."""
    turns = torch.rand(len(x), device=x.device, generator=generator) * 2 - 1
    return rotate(x, turns * math.radians(degrees))


def rotate(x: torch.Tensor, radians: torch.Tensor) -> torch.Tensor:
    """Rotate each image about its centre by its angle, bilinear; the corners brought in are
    zeros (the background of digits)."""
    b, _, h, w = x.shape
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    # The rotation in pixels, written in grid_sample's [-1, 1] coordinates (h/w keeps the angle
    # true on non-square images).
    theta = torch.stack([cos, -sin * h / w, zero, sin * w / h, cos, zero], 1).view(b, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), [b, 1, h, w], align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def random_translate(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding: shift each image by up to `padding` pixels each way."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    shifts = torch.randint(0, 2 * padding + 1, (2, b), device=x.device, generator=generator)
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = shifts[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing gathers (B, H, W, C); move channels back to dim 1.
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def batches_from_disk(
    images: torch.utils.data.Dataset, order: torch.Tensor, batch_size: int, workers: int
) -> Iterator[torch.Tensor]:
    """uint8 batches of `images` (a data set read from disk) in `order`, read by a
    DataLoader's worker processes."""
    index = [order[s : s + batch_size].tolist() for s in range(0, len(order), batch_size)]
    loader = torch.utils.data.DataLoader(
        images, batch_sampler=index, num_workers=workers, persistent_workers=False
    )
    yield from loader
