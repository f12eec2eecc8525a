"""Write the images the documentation uses, from the official Fashion-MNIST test split.

    python examples/make_examples.py [--data-dir DIR] [--out examples]

- test-0.png, test-1.png, test-2.png: test images 0-2 (an ankle boot, a pullover, a trouser),
  28×28 grey PNGs exactly as the data set has them.
- photo.jpg: a stand-in for a product photo: test image 18 (a bag) inverted to dark-on-light,
  enlarged to 112×112 and pasted on a 200×150 white background, saved as JPEG.
- notes.txt: a file that is not an image (the documentation's error example).

The files are committed, so the documented commands run without the data set; this script is
how they were made, and remakes them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageOps

from nin.data import load_split

TEST_IMAGES = (0, 1, 2)
PHOTO_IMAGE = 18  # a bag
NOTES = "Not an image: nin predict skips this file with one line and classifies the others.\n"


def write_examples(out: Path, data_dir: str | None = None) -> list[Path]:
    """Write the example files into `out`; returns their paths."""
    images, _ = load_split("fashion-mnist", "test", data_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in TEST_IMAGES:
        path = out / f"test-{index}.png"
        Image.fromarray(images[index, 0].numpy()).save(path)
        written.append(path)
    bag = ImageOps.invert(Image.fromarray(images[PHOTO_IMAGE, 0].numpy()))
    photo = Image.new("L", (200, 150), 255)
    photo.paste(bag.resize((112, 112), Image.Resampling.BICUBIC), (44, 19))
    path = out / "photo.jpg"
    photo.convert("RGB").save(path, quality=90)
    written.append(path)
    path = out / "notes.txt"
    path.write_text(NOTES)
    written.append(path)
    return written


def main() -> None:
    """Parse the command line and write the files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", help="data directory (default: $NIN_DATA_DIR or ~/.cache/nin)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent, help="default: examples/"
    )
    args = parser.parse_args()
    for path in write_examples(args.out, args.data_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
