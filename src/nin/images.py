"""Image decoding with Pillow, shared by `nin predict`, `nin serve` and training on folders.

Reading is bounded: bytes and pixels are checked from the header before anything is decoded,
and a large image is decoded at reduced size (JPEG) or reduced right after decoding, so one
image costs at most a few bytes per pixel of the limit, whoever sent it. `to_pixels` then
turns it into the uint8 square a model takes, as the training images look.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nin.errors import NinError
from nin.files import open_file, read_file

MAX_BYTES = 20 * 2**20  # 20 MiB: far above any photo a phone takes, far below a memory problem
MAX_PIXELS = 50_000_000  # ~7000×7000; also stops decompression bombs before they decode
# The most one decode holds: the picture at 4 bytes a pixel, and a converted copy of it.
DECODE_BYTES = 8 * MAX_PIXELS
DECODE_SIDE = 256  # big images are decoded or reduced to about this long a side, not below it
# The first bytes of each format: a file that starts like one but will not open is damaged,
# which is worth saying (Pillow only says it cannot identify it).
SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class TooLarge(NinError):
    """An image over the byte or pixel limit (`nin serve` answers 413)."""


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


def open_image(
    path: str | os.PathLike,
    formats: tuple[str, ...] = ("PNG", "JPEG"),
    shrink_to: int | None = None,
) -> Image.Image:
    """Read an image file (see `read_image`): a regular file within MAX_BYTES, else one line."""
    data = read_file(Path(path), MAX_BYTES, "give a PNG or JPEG image")
    return read_image(data, str(path), formats, shrink_to=shrink_to)


def decode_side(side: int) -> int:
    """The side to decode a big picture at for a model of `side`: plenty for the final resize."""
    return max(DECODE_SIDE, 4 * side)


@contextmanager
def quiet_pillow() -> Iterator[None]:
    """Pillow's warnings (odd EXIF, palettes, decompression bombs) silenced: our checks speak."""
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
    scale, small = 1.0, image
    if max(image.size) > work:
        scale = max(image.size) / work
        size = (max(1, round(image.width / scale)), max(1, round(image.height / scale)))
        small = image.resize(size, Image.Resampling.BILINEAR)
    mask = np.asarray(small, dtype=np.float64) > border_mean(image) + 40  # a clear step up
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


def colour_channels(paths: list[Path]) -> int:
    """3 if any image is in colour, 1 if every one is grey (read from the headers only)."""
    for path in paths:
        try:  # a FIFO or a device is never read, a decompression bomb never decoded
            with open_file(path, MAX_BYTES, "") as f, quiet_pillow(), Image.open(f) as image:
                if image.mode == "P":  # a palette of greys only is grey
                    palette = np.asarray(image.getpalette() or [], dtype=np.int64).reshape(-1, 3)
                    if not (palette == palette[:, :1]).all():
                        return 3
                elif image.mode not in GREY_MODES:
                    return 3
        except (NinError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue  # decoding will skip it and say why
    return 1


def image_png(pixels: Any, scale: int = 1) -> bytes:
    """A uint8 (C, H, W) tensor as a PNG, enlarged `scale` times with sharp pixels."""
    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
