"""Export: a checkpoint as an ONNX file or a torch.export program, checked against PyTorch.

Both take the model's float input after normalisation, (batch, C, H, W) with any batch size, and
return logits. The ONNX file records what to feed it (size, mean, std, class names) in its
metadata. Every export is run once more and its outputs compared with the PyTorch model's.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nin.data import Preprocess, classes_of
from nin.errors import NinError
from nin.files import atomic_path, check_out_path

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
# The first bytes of each: an ONNX model starts with its IR version's field, a .pt2 is a zip.
MAGIC = {"onnx": b"\x08", "torch-export": b"PK\x03\x04"}
CHECK_BATCHES = (1, 3)  # 1 and a size the export never saw: the batch dimension must be free
MAX_DIFFERENCE = 1e-3  # float32 reorderings stay far below this; a wrong graph does not


@dataclass
class ExportResult:
    """Where the export went and how far its outputs are from PyTorch's, per batch size."""

    path: Path
    format: str
    input_shape: tuple[int, ...]
    differences: dict[int, float]
    checked_with: str
    images: bool  # the input is uint8 images of any size, preprocessed in the graph


def normalisation(config: dict[str, Any]) -> tuple[int, Any, Any]:
    """The side of the model's input, and the mean and std it is normalised with (0 and 1
    when it is not)."""
    preprocess = Preprocess.for_run(config)
    mean, std = preprocess.mean, preprocess.std
    return preprocess.side, 0.0 if mean is None else mean, 1.0 if std is None else std


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' chatter (torchvision ops it skips, deprecations): not the user's."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def sample_inputs(shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """Seeded normal inputs, the scale of normalised images."""
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(batch))


class WithPreprocessing(nn.Module):
    """The model behind the preprocessing of `nin predict`, all inside the exported graph: uint8
    images (batch, height, width, channels) of any size are padded to a square on black, resized
    to the model's side (bilinear, antialiased), scaled to [0, 1] and normalised.

    For a grey model trained on a built-in data set (light objects on black), as `nin predict`
    does: a picture whose border is light (mean > 127) is inverted and cut to the object (the
    pixels brighter than the inverted border by 40, plus a 4% margin) before that. The cut is
    found on the picture padded and resized to WORK× the side, and resampled from it (CROP_SAMPLES²
    bilinear samples averaged per pixel), so every shape in the graph after the first resize is
    fixed.
    """

    WORK = 4  # the working resolution of the cut, in multiples of the model's side
    CROP_SAMPLES = 4  # samples per output pixel and axis when resampling the cut (antialiasing)

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.channels = model, config["in_channels"]
        self.side, mean, std = normalisation(config)
        # As `nin predict`: only grey pictures for a model of a built-in data set are inverted.
        self.photos = self.channels == 1 and not config.get("data")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if not self.photos:
            return self.model((self.square(x, self.side) / 255 - self.mean) / self.std)
        edges = [x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]]
        border = torch.cat(edges, dim=2).mean(dim=(1, 2))  # (B,), as predict's border_mean
        invert = border > 127
        x = torch.where(invert[:, None, None, None], 255 - x, x)
        plain = self.square(x, self.side)
        cut, found = self.cut_to_object(self.square(x, self.WORK * self.side), 255 - border + 40)
        crop = (invert & found)[:, None, None, None]
        return self.model((torch.where(crop, cut, plain) / 255 - self.mean) / self.std)

    @staticmethod
    def square(x: torch.Tensor, side: int) -> torch.Tensor:
        """Pad to a square on black, the picture in the middle (as ImageOps.pad), and resize."""
        h, w = x.shape[-2], x.shape[-1]
        s = torch.sym_max(h, w)
        top, left = (s - h) // 2, (s - w) // 2
        x = F.pad(x, (left, s - w - left, top, s - h - top))
        return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)

    def cut_to_object(
        self, x: torch.Tensor, threshold: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (1, S, S) picture cut to its object's box plus a margin, squared on black and
        resampled to the model's side; and whether an object was found (≥ 1% of the pixels)."""
        size = x.shape[-1]
        mask = x[:, 0] > threshold[:, None, None]  # (B, S, S)
        found = mask.float().mean(dim=(1, 2)) >= 0.01
        index = torch.arange(size, dtype=torch.float32, device=x.device)

        def extent(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            first = torch.where(hit, index, float(size)).amin(dim=1)
            last = torch.where(hit, index, -1.0).amax(dim=1)
            return first, last

        y0, y1 = extent(mask.any(dim=2))
        x0, x1 = extent(mask.any(dim=1))
        pad = torch.round(0.04 * torch.maximum(y1 - y0, x1 - x0))
        x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + 1 + pad, y1 + 1 + pad
        side = torch.maximum(x1 - x0, y1 - y0).clamp(min=1)
        left = x0 - torch.floor((side - (x1 - x0)) / 2)  # centred in its square, as ImageOps.pad
        top = y0 - torch.floor((side - (y1 - y0)) / 2)
        n = self.side * self.CROP_SAMPLES
        steps = (torch.arange(n, dtype=torch.float32, device=x.device) + 0.5) / n
        # Pixel-edge coordinates in the working picture, then grid_sample's [-1, 1].
        gx = (left[:, None] + steps[None] * side[:, None]) * 2 / size - 1  # (B, n)
        gy = (top[:, None] + steps[None] * side[:, None]) * 2 / size - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return F.avg_pool2d(sampled, self.CROP_SAMPLES), found


def model_inputs(model: nn.Module, shape: tuple[int, ...], batch: int) -> torch.Tensor:
    """Seeded inputs for `model`: normalised floats, or uint8 images of a size per batch."""
    if not isinstance(model, WithPreprocessing):
        return sample_inputs(shape, batch)
    size = (batch, model.side + 7 * batch, model.side + 3 * batch, model.channels)
    return torch.randint(
        0, 256, size, dtype=torch.uint8, generator=torch.Generator().manual_seed(batch)
    )


def input_dims(model: nn.Module) -> dict[int, Any]:
    """The dynamic dimensions of the input: the batch, and the picture's size for images."""
    dims = {0: torch.export.Dim("batch", min=1, max=65536)}
    if isinstance(model, WithPreprocessing):
        dims |= {
            1: torch.export.Dim("height", min=1, max=8192),
            2: torch.export.Dim("width", min=1, max=8192),
        }
    return dims


def export_model(
    model: nn.Module,
    config: dict[str, Any],
    path: Path,
    fmt: str = "onnx",
    force: bool = False,
    images: bool = False,
) -> ExportResult:
    """Write `model` to `path` in format `fmt` (see FORMATS) and check it against PyTorch;
    an existing file at `path` is replaced only with `force`, and never a checkpoint. With
    `images`, the file takes uint8 pictures of any size (see `WithPreprocessing`)."""
    if fmt not in FORMATS:
        raise NinError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    ours = (FORMATS[fmt], MAGIC[fmt])  # what --force may replace: an earlier export
    check_out_path(path, force, ours)  # before the export's work, and again before the rename
    if fmt == "onnx":
        require_onnx()
    model = model.cpu().float().eval()
    side, _, _ = normalisation(config)
    shape = (config["in_channels"], side, side)
    if images:
        model = WithPreprocessing(model, config).eval()
    export = export_onnx if fmt == "onnx" else export_program
    with atomic_path(path, lambda p: check_out_path(p, force, ours)) as tmp, quiet():
        try:
            run, checked_with = export(model, shape, tmp, onnx_metadata(config, model))
            differences = compare(run, model, shape)
        except OSError:
            raise  # writing failed: atomic_path says so
        except Exception as e:  # the exporters and onnxruntime raise many types: one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = "ONNX export" if fmt == "onnx" else "torch.export"
            raise NinError(f"{what} of {config['model']!r} failed ({reason})") from None
        worst = max(differences.values())
        if not worst < MAX_DIFFERENCE:  # `not <` also catches NaN
            raise NinError(
                f"{path}: the exported model's outputs differ from PyTorch's by {worst:.3g}; "
                "nothing was written; please report this with the checkpoint"
            )
    return ExportResult(path, fmt, shape, differences, checked_with, images)


def require_onnx() -> None:
    """Fail with what to install when ONNX export cannot run here."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401 (the exporter of torch >= 2.5 needs it)
    except ImportError as e:
        raise NinError(
            f"--format onnx needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
            "pip install 'nin[export]'"
        ) from None
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise NinError(
            f"--format onnx needs torch >= 2.5 (its dynamo exporter); this is torch "
            f"{torch.__version__}: upgrade torch, or use --format torch-export"
        )


@torch.no_grad()
def compare(run: Callable, model: nn.Module, shape: tuple[int, ...]) -> dict[int, float]:
    """The largest absolute difference of `run`'s outputs from `model`'s, per batch size."""
    differences = {}
    for n in CHECK_BATCHES:
        x = model_inputs(model, shape, n)
        differences[n] = (run(x) - model(x)).abs().max().item()
    return differences


def export_onnx(
    model: nn.Module, shape: tuple[int, ...], tmp: Path, metadata: dict[str, str]
) -> tuple[Callable, str]:
    """ONNX with dynamic input dimensions and `metadata`, written to `tmp`; how to run it in
    onnxruntime, and which version that is."""
    import onnx
    import onnxruntime

    torch.onnx.export(
        model,
        (model_inputs(model, shape, 2),),
        str(tmp),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=(input_dims(model),),
        external_data=False,  # one self-contained file
        dynamo=True,  # the default from torch 2.9; 2.5 to 2.8 need it said
        verbose=False,
    )
    proto = onnx.load(str(tmp))
    onnx.helper.set_model_props(proto, metadata)
    onnx.save(proto, str(tmp))
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])

    return run, f"onnxruntime {onnxruntime.__version__}"


def export_program(
    model: nn.Module, shape: tuple[int, ...], tmp: Path, metadata: dict[str, str]
) -> tuple[Callable, str]:
    """A torch.export program (.pt2) with dynamic input dimensions and `metadata`, written to
    `tmp`; the program reloaded, and the torch version."""
    program = torch.export.export(
        model, (model_inputs(model, shape, 2),), dynamic_shapes=(input_dims(model),)
    )
    # Through memory: torch.export.save wants a name ending in .pt2, the temporary has not.
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={"nin.json": json.dumps(metadata)})
    tmp.write_bytes(buffer.getvalue())
    buffer.seek(0)
    return torch.export.load(buffer).module(), f"torch {torch.__version__}"


def onnx_metadata(config: dict[str, Any], model: nn.Module) -> dict[str, str]:
    """What a user of the exported file needs to prepare its input and read its output."""
    side, mean, std = normalisation(config)
    channels = config["in_channels"]
    given = f"float32 (batch, {channels}, {side}, {side}): pixels / 255, then (x - mean) / std"
    if isinstance(model, WithPreprocessing):
        cut = "a light-bordered picture inverted and cut to its object, " if model.photos else ""
        given = (
            f"uint8 (batch, height, width, {channels}) of any size: {cut}padded to a square on "
            f"black, resized to {side}×{side}, scaled and normalised inside"
        )
    return {
        "nin.model": config["model"],
        "nin.dataset": config["dataset"],
        "nin.input": given,
        "nin.mean": json.dumps(mean),
        "nin.std": json.dumps(std),
        "nin.classes": json.dumps(list(classes_of(config))),
    }


def default_out(checkpoint: str, fmt: str) -> Path:
    """model.onnx / model.pt2 in the checkpoint's run directory."""
    path = Path(checkpoint)
    run_dir = path if path.is_dir() else path.parent
    return run_dir / f"model{FORMATS[fmt]}"


def format_result(result: ExportResult) -> str:
    """The lines `nin export` prints."""
    size = result.path.stat().st_size / 1e6
    shape = "×".join(map(str, result.input_shape))
    diffs = ", ".join(f"{d:.2g} (batch {n})" for n, d in result.differences.items())
    given = f"float32 batch×{shape}, normalised"
    if result.images:
        given = f"uint8 batch×height×width×{result.input_shape[0]} pictures of any size"
    return (
        f"wrote {result.path} ({result.format}, {size:.1f} MB): input {given}; output logits\n"
        f"checked with {result.checked_with}: max abs difference from PyTorch {diffs}"
    )
