"""The bundled model on photo-like pictures: official test images pasted into larger canvases.

Each of N Fashion-MNIST test images (a fixed-seed sample) is inverted to a dark object and
pasted at a random position and scale (35-80% of the canvas's shorter side) into a light canvas
of random size (64-224 pixels a side): plain, noisy, or textured. The bundled model classifies
each canvas three ways: inverted but not cut to the object (`nin predict` before it cut), cut to
the object (`nin predict`), and by the exported graph (`nin export --images`, run in PyTorch:
the same operations the ONNX file holds). The section "photos" of docs/using.md and
results/photos/summary.json are written from it.

    python benchmarks/photos.py [--data-dir DIR] [--count 2000] [--seed 0]
    python benchmarks/photos.py --render   # the section again from results/photos/summary.json

Takes under a minute on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image
from report import fill, machine, read_json, script_parser, write_section

from nin import images, predict
from nin.data import load_split
from nin.export import WithPreprocessing
from nin.files import save_figure, write_json
from nin.plots import figure
from nin.pretrained import load_pretrained

BACKGROUNDS = ("plain", "noisy", "textured")
SAVED = Path("results/photos/summary.json")  # the figures behind the section


def canvas(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A light H×W canvas of `kind` with the 28×28 `image` (light on black) on it, dark."""
    h, w = rng.integers(64, 225, size=2)
    level = rng.uniform(180, 250)
    back = np.full((h, w), level)
    if kind in ("noisy", "textured"):
        back += rng.normal(0, 20 if kind == "noisy" else 8, (h, w))
    if kind == "textured":  # a few low-frequency waves, as cloth or wood grain
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 6.3)
            back += 12 * np.sin(fy * yy + fx * xx + phase)
    side = int(rng.uniform(0.35, 0.8) * min(h, w))
    obj = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    alpha = obj / 255.0  # the object darkens the canvas where the image was bright
    patch = back[top : top + side, left : left + side]
    back[top : top + side, left : left + side] = patch * (1 - alpha) + (255 - obj) * alpha
    return np.clip(back, 0, 255).round().astype(np.uint8)


def classify(pictures: list[np.ndarray], cut: bool) -> list[int]:
    """`nin predict`'s classes for each picture, cutting to the object or not (as before it cut)."""
    predictor = predict.load_predictor(bundled="fashion-mnist")
    uncut = mock.patch.object(images, "crop_to_object", lambda image, **_: image)
    with contextlib.nullcontext() if cut else uncut:
        return [predictor.predict(Image.fromarray(p), top_k=1).top[0][0] for p in pictures]


@torch.inference_mode()
def classify_graph(pictures: list[np.ndarray]) -> list[int]:
    """The classes the exported graph (`nin export --images`) gives, one picture at a time."""
    model, config = load_pretrained("fashion-mnist")
    graph = WithPreprocessing(model.eval(), config).eval()
    return [int(graph(torch.from_numpy(p)[None, :, :, None]).argmax()) for p in pictures]


def examples_figure(pictures: dict[str, list[np.ndarray]]) -> Any:
    """The first three canvases of each kind."""
    fig, _ = figure(7, 2.6)
    fig.clf()
    axes = fig.subplots(1, 3 * len(pictures))
    for i, (kind, ps) in enumerate(pictures.items()):
        for j in range(3):
            ax = axes[3 * i + j]
            ax.imshow(ps[j], cmap="gray", vmin=0, vmax=255)
            ax.set_title(kind, fontsize=7)
            ax.axis("off")
    return fig


def accuracy(classes: list[int], truth: np.ndarray) -> float:
    """The share of CLASSES equal to TRUTH."""
    return float((np.array(classes) == truth).mean())


def render(summary: dict[str, Any]) -> str:
    """The section "photos" from the figures in results/photos/summary.json."""
    rows = summary["accuracy"]
    table = "\n".join(
        f"| {way} | " + " | ".join(f"{100 * rows[k][way]:.1f}%" for k in BACKGROUNDS) + " |"
        for way in rows[BACKGROUNDS[0]]
    )
    original = 100 * summary["original_28x28"]
    return fill("photos", "section", **summary, original=original, table=table)


def report(page: Path) -> None:
    """The section "photos" of PAGE from the committed figures (`--render`)."""
    write_section(page, "photos", render(read_json(SAVED)))


def main() -> None:
    """Make the canvases, classify them three ways, write the section and the JSON."""
    parser = script_parser(__doc__, "docs/using.md")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", action="store_true", help=f"the section from {SAVED} only")
    args = parser.parse_args()
    if args.render:
        report(Path(args.out))
        print(f"wrote {args.out} from {SAVED}")
        return
    test_images, labels = load_split("fashion-mnist", "test", args.data_dir)
    rng = np.random.default_rng(args.seed)
    chosen = rng.choice(len(test_images), size=args.count, replace=False)
    truth = labels[chosen].numpy()
    plain = [test_images[i, 0].numpy() for i in chosen]
    rows, figures = {}, {}
    for kind in BACKGROUNDS:
        figures[kind] = pictures = [canvas(p, kind, rng) for p in plain]
        rows[kind] = {
            "no cut (inverted only)": accuracy(classify(pictures, False), truth),
            "nin predict (cut to the object)": accuracy(classify(pictures, True), truth),
            "nin export --images (in the graph)": accuracy(classify_graph(pictures), truth),
        }
        print(kind, rows[kind], flush=True)
    original = accuracy(classify(plain, True), truth)
    summary = {"count": args.count, "seed": args.seed, "machine": machine(), "accuracy": rows,
               "original_28x28": original}  # fmt: skip
    write_json(SAVED, summary)
    save_figure(examples_figure(figures), Path(args.out).parent / "photos.png")
    write_section(args.out, "photos", render(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
