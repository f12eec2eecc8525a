"""Prediction: image files in, top-k classes with probabilities out, as the checkpoint was trained.

An image is read with Pillow, turned into the model's channels, padded to a square (centred,
black background) and resized to the model's input; the checkpoint's own pipeline then scales
and normalises it (`Preprocess`, the code `nin train` and `nin eval` run).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from nin.data import Preprocess, dataset_spec
from nin.errors import NinError

MAX_BYTES = 20 * 2**20  # 20 MiB: far above any photo a phone takes, far below a memory problem
MAX_PIXELS = 50_000_000  # ~7000×7000; also stops decompression bombs before they decode
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Prediction:
    """The top classes of one image: (class index, class name, probability), best first."""

    source: str
    top: list[tuple[int, str, float]]
    inverted: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "path": self.source,
            "inverted": self.inverted,
            "top": [{"index": i, "class": c, "prob": p} for i, c, p in self.top],
        }


def read_image(
    data: bytes, name: str = "upload", formats: tuple[str, ...] = ("PNG", "JPEG")
) -> Image.Image:
    """Decode PNG/JPEG bytes into a Pillow image, refusing empty, huge or non-image input."""
    if not data:
        raise NinError(f"{name}: empty file; give a PNG or JPEG image")
    if len(data) > MAX_BYTES:
        raise NinError(
            f"{name}: {len(data) / 2**20:.1f} MiB is over the {MAX_BYTES // 2**20} MiB limit; "
            "give a smaller image"
        )
    try:
        with warnings.catch_warnings():  # our own pixel limit speaks, in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # JPEG includes phone photos with an MPF block (Pillow calls them MPO).
            image = Image.open(io.BytesIO(data), formats=formats)  # the header only
            if image.width * image.height > MAX_PIXELS:
                raise NinError(
                    f"{name}: {image.width}×{image.height} pixels is over the "
                    f"{MAX_PIXELS:,}-pixel limit; give a smaller image"
                )
            image.load()
    except Image.DecompressionBombError:
        raise NinError(
            f"{name}: over the {MAX_PIXELS:,}-pixel limit; give a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise NinError(f"{name}: not a {' or '.join(formats)} image") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt image data
        raise NinError(f"{name}: cannot decode the image ({e}); is the file complete?") from None
    return ImageOps.exif_transpose(image)  # photos from phones are often stored rotated


def open_image(path: str | os.PathLike, formats: tuple[str, ...] = ("PNG", "JPEG")) -> Image.Image:
    """Read an image file (see `read_image`), checking its size before reading it."""
    path = Path(path)
    if not path.is_file():  # a device, a FIFO or /dev/stdin would read forever
        raise NinError(f"{path}: not a regular file; give a PNG or JPEG image")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # read_image refuses anything over the limit
    except OSError as e:
        raise NinError(f"{path}: cannot be read ({e.strerror or e})") from None
    return read_image(data, str(path), formats)


def image_files(paths: list[str]) -> list[tuple[str, Path | NinError]]:
    """Each path, or the PNG/JPEG files inside each folder (sorted); errors in place of files."""
    found: list[tuple[str, Path | NinError]] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                found.append((name, NinError(f"{path}: folder holds no .png, .jpg or .jpeg")))
            found.extend((str(p), p) for p in inside)
        elif path.exists():
            found.append((name, path))
        else:
            found.append((name, NinError(f"{path}: not found")))
    return found


class Predictor:
    """A trained model with its input pipeline: images in, class probabilities out."""

    def __init__(self, model: nn.Module, config: dict[str, Any], device: str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.classes = dataset_spec(config["dataset"]).classes
        if len(self.classes) != config["num_classes"]:
            raise NinError(
                f"checkpoint has {config['num_classes']} classes but {config['dataset']} has "
                f"{len(self.classes)}; the config does not belong to these weights"
            )
        self.in_channels = config["in_channels"]
        if self.in_channels not in (1, 3):
            raise NinError(f"checkpoint expects {self.in_channels} channels; nin reads 1 or 3")
        # The checkpoint's own resizing and normalisation, as `nin eval` applies them.
        self.preprocess = Preprocess.for_run({**config, "channels_last": False})
        self.size = (self.preprocess.side, self.preprocess.side)

    def to_uint8(self, image: Image.Image, invert: bool | None = None) -> tuple[torch.Tensor, bool]:
        """(C, H, W) uint8 the model expects, and whether it was inverted.

        `invert` None inverts one-channel images with a light border: the training images
        are light objects on black, photos are usually dark objects on white.
        """
        mode = "L" if self.in_channels == 1 else "RGB"
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            # Transparent background becomes black, the training images' background.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        image = image.convert(mode)
        if invert is None:
            invert = mode == "L" and border_mean(image) > 127
        if invert:
            image = ImageOps.invert(image)
        image = ImageOps.pad(
            image, self.size[::-1], Image.Resampling.BILINEAR, color=0 if mode == "L" else (0,) * 3
        )
        array = np.asarray(image, dtype=np.uint8).reshape(*self.size, self.in_channels)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), invert

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (B, classes) for a uint8 batch (B, C, H, W)."""
        x = self.preprocess(batch.to(self.device))
        try:
            logits = self.model(x)
        except RuntimeError as e:
            raise NinError(
                f"model {self.config['model']!r} cannot take input {tuple(x.shape[1:])} "
                f"({str(e).splitlines()[0]}); the checkpoint's config does not fit its model"
            ) from None
        return logits.float().softmax(1).cpu()

    def predict(
        self, image: Image.Image, top_k: int = 5, invert: bool | None = None, source: str = ""
    ) -> Prediction:
        """The `top_k` classes of one image."""
        pixels, inverted = self.to_uint8(image, invert)
        return self.top(self.probabilities(pixels[None])[0], top_k, source, inverted)

    def top(self, probs: torch.Tensor, top_k: int, source: str, inverted: bool) -> Prediction:
        """The best `top_k` of one image's probabilities."""
        if top_k < 1:
            raise NinError(f"--top-k must be at least 1, got {top_k}")
        values, indices = probs.topk(min(top_k, len(self.classes)))
        top = [
            (i, self.classes[i], p) for i, p in zip(indices.tolist(), values.tolist(), strict=True)
        ]
        return Prediction(source, top, inverted)


def border_mean(image: Image.Image) -> float:
    """Mean of a one-channel image's outermost rows and columns."""
    a = np.asarray(image, dtype=np.float64)
    return float(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]).mean())


def load_predictor(checkpoint: str | None = None, bundled: str | None = None) -> Predictor:
    """A Predictor from a run directory, or from a bundled model (`nin.pretrained`)."""
    from nin.checkpoint import load_checkpoint
    from nin.pretrained import load_pretrained

    if (checkpoint is None) == (bundled is None):
        raise NinError("give either a CHECKPOINT or --model NAME (a bundled model), not both")
    model, config = load_pretrained(bundled) if bundled else load_checkpoint(checkpoint)
    return Predictor(model, config)


def predict_files(
    predictor: Predictor, paths: list[str], top_k: int = 5, invert: bool | None = None
) -> list[Prediction | NinError]:
    """One Prediction per image file (folders expanded), or the error that file raised."""
    results: list[Prediction | NinError] = []
    for name, path in image_files(paths):
        if isinstance(path, NinError):
            results.append(path)
            continue
        try:
            results.append(predictor.predict(open_image(path), top_k, invert, source=name))
        except NinError as e:
            results.append(e)
    return results


def format_prediction(prediction: Prediction) -> str:
    """The text the CLI prints for one image."""
    note = "  (inverted: light background)" if prediction.inverted else ""
    width = max(len(c) for _, c, _ in prediction.top)
    lines = [f"{prediction.source}{note}"]
    lines += [f"  {c:<{width}}  {p:.3f}" for _, c, p in prediction.top]
    return "\n".join(lines)
