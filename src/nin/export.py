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
    images: bool = False  # the input is uint8 images of any size, preprocessed in the graph


def input_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of the float tensor the checkpoint's model takes."""
    side = Preprocess.for_run(config).side
    return (config["in_channels"], side, side)


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
    """The model behind the preprocessing of `nin predict`: uint8 images (batch, height, width,
    channels) of any size are padded to a square on black, resized to the model's side (bilinear,
    antialiased), scaled to [0, 1] and normalised, all inside the exported graph."""

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.model, preprocess = model, Preprocess.for_run(config)
        self.side, self.channels = preprocess.side, config["in_channels"]
        mean = preprocess.mean if preprocess.mean is not None else 0.0
        std = preprocess.std if preprocess.std is not None else 1.0
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        h, w = x.shape[-2], x.shape[-1]
        s = torch.sym_max(h, w)  # pad to a square, the picture in the middle, as ImageOps.pad
        top, left = (s - h) // 2, (s - w) // 2
        x = F.pad(x, (left, s - w - left, top, s - h - top))
        size = (self.side, self.side)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.model((x / 255 - self.mean) / self.std)


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
    check_out_path(path, force)  # before the export's work, and again before the rename
    model = model.cpu().float().eval()
    shape = input_shape(config)
    if images:
        model = WithPreprocessing(model, config).eval()
    export = export_onnx if fmt == "onnx" else export_program
    result = export(model, shape, path, config, lambda p: check_out_path(p, force))
    result.images = images
    return result


def check_differences(differences: dict[int, float], path: Path) -> None:
    """Refuse an export whose outputs stray from PyTorch's (called before the file is kept)."""
    worst = max(differences.values())
    if not worst < MAX_DIFFERENCE:  # `not <` also catches NaN
        raise NinError(
            f"{path}: the exported model's outputs differ from PyTorch's by {worst:.3g}; "
            "nothing was written; please report this with the checkpoint"
        )


def export_onnx(
    model: nn.Module,
    shape: tuple[int, ...],
    path: Path,
    config: dict[str, Any],
    check: Callable[[Path], None] | None = None,
) -> ExportResult:
    """ONNX with a dynamic batch dimension, metadata on its input, checked in onnxruntime."""
    try:
        import onnx
        import onnxruntime
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
    with atomic_path(path, check) as tmp, quiet():
        try:
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
            onnx.helper.set_model_props(proto, onnx_metadata(config, shape, model))
            onnx.save(proto, str(tmp))
            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            differences = {}
            with torch.no_grad():
                for n in CHECK_BATCHES:
                    x = model_inputs(model, shape, n)
                    (got,) = session.run(["logits"], {"images": x.numpy()})
                    differences[n] = (torch.from_numpy(got) - model(x)).abs().max().item()
        except Exception as e:  # the exporter and onnxruntime raise many types: one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NinError(f"ONNX export of {config['model']!r} failed ({reason})") from None
        check_differences(differences, path)
    return ExportResult(path, "onnx", shape, differences, f"onnxruntime {onnxruntime.__version__}")


def export_program(
    model: nn.Module,
    shape: tuple[int, ...],
    path: Path,
    config: dict[str, Any],
    check: Callable[[Path], None] | None = None,
) -> ExportResult:
    """A torch.export program (.pt2) with a dynamic batch dimension, reloaded and checked."""
    with atomic_path(path, check) as tmp, quiet():
        try:
            program = torch.export.export(
                model, (model_inputs(model, shape, 2),), dynamic_shapes=(input_dims(model),)
            )
        except Exception as e:  # as above: many exception types, one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NinError(f"torch.export of {config['model']!r} failed ({reason})") from None
        # Through memory: torch.export.save wants a name ending in .pt2, the temporary has not.
        buffer = io.BytesIO()
        extra = {"nin.json": json.dumps(onnx_metadata(config, shape, model))}
        torch.export.save(program, buffer, extra_files=extra)
        tmp.write_bytes(buffer.getvalue())
        buffer.seek(0)
        loaded = torch.export.load(buffer).module()
        differences = {}
        with torch.no_grad():
            for n in CHECK_BATCHES:
                x = model_inputs(model, shape, n)
                differences[n] = (loaded(x) - model(x)).abs().max().item()
        check_differences(differences, path)
    return ExportResult(path, "torch-export", shape, differences, f"torch {torch.__version__}")


def onnx_metadata(
    config: dict[str, Any], shape: tuple[int, ...], model: nn.Module | None = None
) -> dict[str, str]:
    """What a user of the exported file needs to prepare its input and read its output."""
    preprocess = Preprocess.for_run(config)
    given = "float32 (batch, {}, {}, {}): pixels / 255, then (x - mean) / std".format(*shape)
    if isinstance(model, WithPreprocessing):
        given = (
            f"uint8 (batch, height, width, {shape[0]}) of any size: padded to a square on black, "
            f"resized to {shape[1]}×{shape[2]}, scaled and normalised inside"
        )
    return {
        "nin.model": config["model"],
        "nin.dataset": config["dataset"],
        "nin.input": given,
        "nin.mean": json.dumps(preprocess.mean if preprocess.mean is not None else 0.0),
        "nin.std": json.dumps(preprocess.std if preprocess.std is not None else 1.0),
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
