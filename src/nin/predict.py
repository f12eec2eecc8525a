"""Prediction: image files in, top-k classes with probabilities out, as the checkpoint was trained.

An image is read with Pillow (`nin.images`: bounded in bytes and pixels), turned into the
model's channels, padded to a square (centred, black background) and resized to the model's
input; the checkpoint's own pipeline then scales and normalises it (`Preprocess`, the code
`nin train` and `nin eval` run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from nin.data import Preprocess, classes_of
from nin.errors import NinError
from nin.images import decode_side, open_image, to_pixels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def image_files(paths: list[str]) -> list[tuple[str, Path | NinError]]:
    """Each path, or the PNG/JPEG files inside each folder (sorted); errors in place of files."""
    found: list[tuple[str, Path | NinError]] = []
    for name in paths:
        path = Path(name)
        if not path.is_dir():
            found.append((name, path if path.exists() else NinError(f"{path}: not found")))
            continue
        inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        found += [(str(p), p) for p in inside]
        if not inside:
            found.append((name, NinError(f"{path}: folder holds no .png, .jpg or .jpeg")))
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
        self.decode_side = decode_side(self.size[0])
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


def load_predictor(checkpoint: str | None = None, bundled: str | None = None) -> Predictor:
    """A Predictor from a run directory, or from a bundled model (`nin.pretrained`)."""
    from nin.checkpoint import load_checkpoint
    from nin.pretrained import load_pretrained

    if (checkpoint is None) == (bundled is None):
        raise NinError("give a CHECKPOINT or --model NAME (a bundled model): one of them")
    model, config = load_pretrained(bundled) if bundled else load_checkpoint(checkpoint)
    return Predictor(model, config)


def predict_files(
    predictor: Predictor, paths: list[str], top_k: int = 5, invert: bool | None = None
) -> list[Prediction | NinError]:
    """One Prediction per image file (folders expanded), or the error that file raised."""
    results: list[Prediction | NinError] = []
    for name, path in image_files(paths):
        try:
            if isinstance(path, NinError):
                raise path
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
