"""Write a built-in data set's images as PNG files in class folders: the kind of folder
`nin train --data` takes, made from data you already have.

    python examples/make_image_folder.py cifar10 my-images --per-class 200
    nin train --data my-images --model nin_fast --epochs 3

Writes DIR/<class>/<index>.png from the test split (or --split train); with --with-test, also
DIR/train/<class>/ from the training split and DIR/test/<class>/ from the test split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from nin.data import dataset_spec, load_split


def write_split(dataset: str, split: str, out: Path, per_class: int, data_dir: str | None) -> int:
    """The first `per_class` images of each class of `split` as PNG files; returns how many."""
    images, labels = load_split(dataset, split, data_dir)
    classes = [name.replace("/", "-") for name in dataset_spec(dataset).classes]
    written = [0] * len(classes)
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        if written[label] >= per_class:
            continue
        folder = out / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(
            folder / f"{index:05d}.png"
        )
        written[label] += 1
    return sum(written)


def main() -> None:
    """Parse the command line and write the folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["fashion-mnist", "mnist", "cifar10"])
    parser.add_argument("out", type=Path, help="the folder to write (made if missing)")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--split", default="test", choices=["train", "test"])
    parser.add_argument("--with-test", action="store_true", help="write train/ and test/")
    parser.add_argument("--data-dir", help="data directory (default: $NIN_DATA_DIR)")
    args = parser.parse_args()
    if args.with_test:
        n = write_split(args.dataset, "train", args.out / "train", args.per_class, args.data_dir)
        n += write_split(args.dataset, "test", args.out / "test", args.per_class, args.data_dir)
    else:
        n = write_split(args.dataset, args.split, args.out, args.per_class, args.data_dir)
    print(f"wrote {n} images under {args.out}")


if __name__ == "__main__":
    main()
