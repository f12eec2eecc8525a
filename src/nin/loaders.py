"""Which images a run trains and evaluates on: a config and a split in, a `DeviceLoader` out,
for a built-in data set or a folder of your own images (`--data`)."""

from __future__ import annotations

from typing import Any

import torch

from nin.data import DeviceLoader, Preprocess, dataset_spec, load_split
from nin.device import memory_budget
from nin.distributed import World
from nin.errors import NinError
from nin.folders import load_folder

STREAM_WORKERS = 2  # DataLoader processes that read streamed batches from the disk


def make_loader(
    config: Any, split: str, device: torch.device, world: World | None = None
) -> DeviceLoader:
    """The loader of one split on `device` for a `nin.config.TrainConfig`: shuffled and
    augmented for train, plain otherwise.

    `split` is "train", "val" or "test". For a built-in data set, "val" is the last
    `config.holdout` training examples, which "train" then leaves out. Under torchrun each
    process gets its shard of every batch: `config.batch_size` is the global batch.
    """
    rank, size = (world.rank, world.size) if world else (0, 1)
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
        rank=rank,
        world_size=size,
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
