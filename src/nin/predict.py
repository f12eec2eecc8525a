"""Prediction: image files in, top-k classes with probabilities out, as the checkpoint was trained.

An image is read with Pillow, turned into the model's channels, padded to a square (centred,
black background) and resized to the model's input; the checkpoint's own pipeline then scales
and normalises it (`Preprocess`, the code `nin train` and `nin eval` run).

Reading is bounded: bytes and pixels are checked from the header before anything is decoded,
and a large image is decoded at reduced size (JPEG) or reduced right after decoding, so one
image costs at most a few bytes per pixel of the limit, whoever sent it.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn

from nin.data import Preprocess, classes_of
from nin.errors import NinError

MAX_BYTES = 20 * 2**20  # 20 MiB: far above any photo a phone takes, far below a memory problem
MAX_PIXELS = 50_000_000  # ~7000×7000; also stops decompression bombs before they decode
DECODE_SIDE = 256  # big images are decoded or reduced to about this long a side, not below it
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The first bytes of each format: a file that starts like one but will not open is damaged,
# which is worth saying (Pillow only says it cannot identify it).
SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


class TooLarge(NinError):
    """An image over the byte or pixel limit (`nin serve` answers 413)."""


class NotFinite(NinError):
    """The model's output for an image is NaN or infinite (`nin serve` answers 422)."""


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
    data: bytes,
    name: str = "upload",
    formats: tuple[str, ...] = ("PNG", "JPEG"),
    max_pixels: int | None = None,
    shrink_to: int | None = None,
) -> Image.Image:
    """Decode PNG/JPEG bytes into a Pillow image, refusing empty, huge or non-image input.

    `max_pixels` defaults to MAX_PIXELS. With `shrink_to`, a larger image is decoded at 1/2,
    1/4 or 1/8 scale (JPEG) and reduced by a whole factor, its longer side kept at least that.
    """
    if not data:
        raise NinError(f"{name}: empty file; give a PNG or JPEG image")
    if len(data) > MAX_BYTES:
        raise TooLarge(
            f"{name}: {len(data) / 2**20:.1f} MiB is over the {MAX_BYTES // 2**20} MiB limit; "
            "give a smaller image"
        )
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        with quiet_pillow():
            # JPEG includes phone photos with an MPF block (Pillow calls them MPO).
            image = Image.open(io.BytesIO(data), formats=formats)  # the header only
            if image.width * image.height > limit:
                raise TooLarge(
                    f"{name}: {image.width}×{image.height} pixels is over the {limit:,}-pixel "
                    "limit; give a smaller image"
                )
            if shrink_to:  # JPEG decodes at reduced size; other formats ignore this
                image.draft(image.mode, draft_size(image.size, shrink_to))
            image.load()
            if shrink_to:
                image = shrink(image, shrink_to)
            return ImageOps.exif_transpose(image)  # photos from phones are often stored rotated
    except NinError:
        raise
    except Image.DecompressionBombError:
        raise TooLarge(f"{name}: over the {limit:,}-pixel limit; give a smaller image") from None
    except UnidentifiedImageError:
        raise NinError(unidentified(data, name, formats)) from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow's plugins raise many types on crafted files
        raise NinError(f"{name}: cannot decode the image ({e}); is the file complete?") from None


@contextmanager
def quiet_pillow() -> Iterator[None]:
    """Pillow's warnings (odd EXIF, decompression bombs) silenced: our own checks speak."""
    # Not thread-safe (warnings filters are global); `nin serve` also filters them for good.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def unidentified(data: bytes, name: str, formats: tuple[str, ...]) -> str:
    """Why Pillow could not open `data`: a damaged file of one of `formats`, or another kind."""
    for fmt in formats:
        if fmt in SIGNATURES and data.startswith(SIGNATURES[fmt]):
            try:  # the plugin's own reason, which Image.open swallows
                Image.OPEN[fmt][0](io.BytesIO(data), "")
                reason = "unreadable header"
            except Exception as e:  # whatever the plugin raised is the reason
                reason = str(e) or type(e).__name__
            if reason == "not identified by this driver":  # Pillow's words for "no size"
                reason = "no image size in its header"
            return f"{name}: a damaged {fmt} file ({reason})"
    return f"{name}: not a {' or '.join(formats)} image"


def draft_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """The size to ask Pillow's draft for so that the longer side stays at least `side`."""
    longer = max(size)
    return max(1, size[0] * side // longer), max(1, size[1] * side // longer)


def shrink(image: Image.Image, side: int) -> Image.Image:
    """`image` reduced by the largest whole factor that keeps its longer side at least `side`."""
    factor = max(image.size) // side
    if factor < 2:
        return image
    if image.mode == "PA" or "transparency" in image.info:
        # Reducing RGBA (and LA) averages alpha-weighted colour, as compositing on black would.
        image = image.convert("RGBA")  # (not called on RGBA itself: that would copy it)
    elif image.mode.startswith("I;16"):
        image = image.convert("I")  # reduce takes 32-bit but not 16-bit integers
    elif image.mode in ("1", "P"):
        image = image.convert("L" if image.mode == "1" else "RGB")
    return image.reduce(factor)


def open_image(
    path: str | os.PathLike,
    formats: tuple[str, ...] = ("PNG", "JPEG"),
    shrink_to: int | None = None,
) -> Image.Image:
    """Read an image file (see `read_image`), checking its size before reading it."""
    path = Path(path)
    if not path.is_file():  # a device, a FIFO or /dev/stdin would read forever
        raise NinError(f"{path}: not a regular file; give a PNG or JPEG image")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)  # read_image refuses anything over the limit
    except OSError as e:
        raise NinError(f"{path}: cannot be read ({e.strerror or e})") from None
    return read_image(data, str(path), formats, shrink_to=shrink_to)


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
        self.classes = classes_of(config)
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
        # Big images are read at a few times the model's side: plenty for the final resize.
        self.decode_side = max(DECODE_SIDE, 4 * self.size[0])
        self.check_blank()

    def check_blank(self) -> None:
        """Refuse, before any image, a model that cannot take its input or gives NaN or inf."""
        blank = torch.zeros(1, self.in_channels, *self.size, dtype=torch.uint8)
        try:
            self.probabilities(blank)
        except NotFinite:
            raise NinError(
                f"model {self.config['model']!r} gives NaN or infinite outputs for a blank "
                "image; the checkpoint's weights are broken (retrain, or use an earlier checkpoint)"
            ) from None

    def to_uint8(self, image: Image.Image, invert: bool | None = None) -> tuple[torch.Tensor, bool]:
        """(C, H, W) uint8 the model expects, and whether it was inverted.

        `invert` None inverts one-channel images with a light border for a model trained on a
        built-in data set: its images are light objects on black, photos are usually dark
        objects on white. A model trained on your own images sees them as they are.
        """
        if invert is None and self.config.get("data"):
            invert = False
        array, inverted = to_pixels(image, self.in_channels, self.size[0], invert)
        return torch.from_numpy(array.copy()).permute(2, 0, 1), inverted

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
        probs = logits.float().softmax(1).cpu()
        if not torch.isfinite(probs).all():  # JSON has no NaN, and a NaN class is no answer
            raise NotFinite(
                f"model {self.config['model']!r} gives NaN or infinite outputs for this image "
                "(its weights overflow on it)"
            )
        return probs

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


def to_pixels(
    image: Image.Image, channels: int, side: int, invert: bool | None = False
) -> tuple[np.ndarray, bool]:
    """A Pillow image as uint8 (side, side, channels), and whether it was inverted:
    transparency on black (the training images' background), 16-bit grey scaled to 8 bits,
    inverted (None: if grey with a light border) and then cut to the object, padded to a square
    with black, resized."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if image.mode.startswith("I") or image.mode == "F":  # 16-bit or float grey
        a = np.asarray(image, dtype=np.float64)
        a = a / 257 if image.mode != "F" else a
        image = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L")
    mode = "L" if channels == 1 else "RGB"
    image = image.convert(mode)
    if invert is None:
        invert = mode == "L" and border_mean(image) > 127
    if invert:  # a photo of a dark object on a light background: the object, light on black
        image = crop_to_object(ImageOps.invert(image), work=4 * side)
    fill = 0 if mode == "L" else (0, 0, 0)
    image = ImageOps.pad(image, (side, side), Image.Resampling.BILINEAR, color=fill)
    return np.asarray(image, dtype=np.uint8).reshape(side, side, channels), invert


def crop_to_object(image: Image.Image, work: int = 112, margin: float = 0.04) -> Image.Image:
    """A grey image (object light on a dark background) cut to the object's bounding box plus a
    small margin, as Fashion-MNIST's images were made: the object fills the frame.

    The box is found on the image shrunk (antialiased) to at most `work` pixels a side, so noise
    and texture in the background average out, as in `nin export --images`'s graph.
    """
    scale = max(image.size) / work if max(image.size) > work else 1.0
    small = image.resize((max(1, round(image.width / scale)), max(1, round(image.height / scale))),
                         Image.Resampling.BILINEAR) if scale > 1 else image  # fmt: skip
    a = np.asarray(small, dtype=np.float64)
    mask = a > border_mean(image) + 40  # brighter than the background by a clear step
    if mask.sum() < 0.01 * mask.size:  # nothing stands out: leave the picture as it is
        return image
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    pad = round(margin * max(rows[-1] - rows[0], cols[-1] - cols[0]))
    box = (cols[0] - pad, rows[0] - pad, cols[-1] + 1 + pad, rows[-1] + 1 + pad)
    return image.crop(tuple(round(v * scale) for v in box))  # outside the image: black


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
            image = open_image(path, shrink_to=predictor.decode_side)
            results.append(predictor.predict(image, top_k, invert, source=name))
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
