"""nin predict: images in, top-k classes out, the same pipeline as training, bad files one line."""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from nin import images, predict
from nin.checkpoint import save_checkpoint
from nin.cli import main
from nin.data import Preprocess, dataset_spec, load_split
from nin.errors import NinError
from nin.loaders import DeviceLoader
from nin.models import create_model
from nin.predict import Predictor, load_predictor
from tests.conftest import checkpoint_config

CLASSES = dataset_spec("fashion-mnist").classes


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A run directory holding an untrained nin_compact."""
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_checkpoint(
        run, create_model("nin_compact", num_classes=10, in_channels=1), checkpoint_config()
    )
    return run


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def test_pipeline_matches_training(checkpoint: Path, tmp_path: Path) -> None:
    """A 28×28 PNG reaches the model exactly as the training loader prepares the same pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    path = write_png(tmp_path / "x.png", pixels)
    predictor = load_predictor(str(checkpoint))
    uint8, inverted = predictor.to_uint8(images.open_image(path), invert=False)
    assert not inverted
    assert torch.equal(uint8, torch.from_numpy(pixels)[None])
    spec = dataset_spec("fashion-mnist")
    loader = DeviceLoader(
        uint8[None],
        torch.zeros(1, dtype=torch.long),
        1,
        preprocess=Preprocess(28, spec.mean, spec.std),
    )
    with torch.no_grad():
        expected = predictor.model(loader.prepare(uint8[None])).softmax(1)[0]
    got = predictor.probabilities(uint8[None])[0]
    assert torch.allclose(got, expected, atol=1e-6)


def test_any_image_becomes_model_input(checkpoint: Path, tmp_path: Path) -> None:
    """RGB, RGBA, JPEG, non-square, large: each becomes (1, 28, 28) uint8 and gets 5 classes."""
    rng = np.random.default_rng(1)
    rgb = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(rgb)
    rgba = tmp_path / "cutout.png"
    Image.fromarray(rng.integers(0, 256, (40, 90, 4), dtype=np.uint8), "RGBA").save(rgba)
    predictor = load_predictor(str(checkpoint))
    for path in (rgb, rgba):
        uint8, _ = predictor.to_uint8(images.open_image(path))
        assert uint8.shape == (1, 28, 28) and uint8.dtype == torch.uint8
        result = predictor.predict(images.open_image(path), top_k=5, source=str(path))
        probs = [p for _, _, p in result.top]
        assert len(result.top) == 5 and probs == sorted(probs, reverse=True)
        assert all(name in CLASSES for _, name, _ in result.top)


def test_light_background_is_inverted(checkpoint: Path, tmp_path: Path) -> None:
    """A dark shape on white (a photo) is inverted to a light shape on black, as trained, and
    cut to the shape, which then fills the frame."""
    array = np.full((28, 28), 255, dtype=np.uint8)
    array[8:20, 8:20] = 0
    predictor = load_predictor(str(checkpoint))
    image = images.open_image(write_png(tmp_path / "photo.png", array))
    uint8, inverted = predictor.to_uint8(image)
    assert inverted and uint8[0, 14, 14] == 255 and uint8.float().mean() > 200
    assert not predictor.to_uint8(image, invert=False)[1]


def test_cli_text_and_json(checkpoint: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        write_png(folder / f"{i}.png", np.full((28, 28), 40 * i))
    (folder / "notes.txt").write_text("not looked at: folders give their images only")
    assert main(["predict", str(checkpoint), str(folder), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count(".png") == 2 and len(out.strip().splitlines()) == 2 * (1 + 3)
    assert main(["predict", str(checkpoint), str(folder / "0.png"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in rows[0]["top"]][0] in CLASSES
    assert len(rows[0]["top"]) == 5
    assert sum(r["prob"] for r in rows[0]["top"]) <= 1 + 1e-6


def test_bad_files_one_line_each_rest_go_on(
    checkpoint: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    good = write_png(tmp_path / "good.png", np.zeros((28, 28)))
    bad = tmp_path / "bad"
    bad.mkdir()
    text = bad / "notes.png"
    text.write_text("hello, not an image")
    empty = bad / "empty.jpg"
    empty.write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64))
    truncated = bad / "truncated.png"
    truncated.write_bytes(write_png(bad / "noise.png", noise).read_bytes()[:200])
    (bad / "noise.png").unlink()
    big = write_png(bad / "big.png", np.zeros((300, 300)))
    gif = bad / "anim.gif"
    Image.new("L", (28, 28)).save(gif)
    (tmp_path / "no-images").mkdir()
    monkeypatch.setattr(images, "MAX_PIXELS", 200 * 200)
    paths = [text, empty, truncated, big, gif, bad / "missing.png", tmp_path / "no-images", good]
    assert main(["predict", str(checkpoint), *map(str, paths)]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 8 and all(line.startswith("nin: error: ") for line in errors)
    joined = "\n".join(errors)
    for expected in ("notes.png: not a PNG or JPEG", "empty file", "cannot decode", "pixel limit"):
        assert expected in joined
    assert "anim.gif: not a PNG or JPEG" in joined
    assert "missing.png: not found" in joined and "holds no .png" in joined
    assert errors[-1] == f"nin: error: 7 of {len(paths)} inputs failed (see above)"
    assert captured.out.startswith(str(good)) and len(captured.out.splitlines()) == 6


def test_special_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(NinError, match="not a regular file"):
            images.open_image(path)


def test_phone_jpegs_with_an_mpf_block_are_read(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    image = Image.new("RGB", (40, 30), "white")
    image.save(path, format="MPO", save_all=True, append_images=[Image.new("RGB", (40, 30))])
    assert Image.open(path).format == "MPO"
    image = images.open_image(path)
    assert image.size == (40, 30)


def test_byte_limit(tmp_path: Path, monkeypatch) -> None:
    path = write_png(tmp_path / "x.png", np.zeros((64, 64)))
    monkeypatch.setattr(images, "MAX_BYTES", 10)
    with pytest.raises(NinError, match="MiB limit"):
        images.open_image(path)
    with pytest.raises(NinError, match="MiB limit"):
        images.read_image(path.read_bytes())


def test_checkpoint_mismatch(tmp_path: Path, capsys) -> None:
    image = write_png(tmp_path / "x.png", np.zeros((28, 28)))
    run = tmp_path / "seven"
    save_checkpoint(
        run, create_model("nin_compact", num_classes=7), checkpoint_config(num_classes=7)
    )
    assert main(["predict", str(run), str(image)]) == 1
    assert "7 classes but fashion-mnist has 10" in capsys.readouterr().err
    # A config whose input size its model cannot take: refused once, before any image.
    run = tmp_path / "small"
    save_checkpoint(run, create_model("nin_compact"), checkpoint_config(resize=6))
    assert main(["predict", str(run), str(image), str(image)]) == 1
    err = capsys.readouterr().err
    assert "cannot take input" in err and err.count("nin: error:") == 1
    assert main(["predict", str(tmp_path / "nowhere"), str(image)]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["predict", str(image)]) == 1
    assert "give a CHECKPOINT and at least one image" in capsys.readouterr().err


def test_resize_config_is_used(tmp_path: Path) -> None:
    """A model trained with --resize gets images of that size."""
    run = tmp_path / "run"
    model = create_model("nin_compact")
    save_checkpoint(run, model, checkpoint_config(resize=32, normalize=False))
    predictor = load_predictor(str(run))
    uint8, _ = predictor.to_uint8(Image.new("L", (50, 20)))
    assert uint8.shape == (1, 32, 32)
    assert predictor.preprocess(uint8[None]).shape == (1, 1, 32, 32)


def test_bundled_model_classifies_test_images(data_dir: Path, tmp_path: Path, capsys) -> None:
    """`--model fashion-mnist` reads real test images (as PNG files) right."""
    images, labels = load_split("fashion-mnist", "test", data_dir)
    paths = [write_png(tmp_path / f"{i:02d}.png", images[i, 0].numpy()) for i in range(40)]
    assert main(["predict", "--model", "fashion-mnist", *map(str, paths), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    predicted = [row["top"][0]["index"] for row in rows]
    assert not any(row["inverted"] for row in rows)
    correct = sum(p == int(y) for p, y in zip(predicted, labels[:40], strict=True))
    assert correct >= 34  # the bundled model scores about 0.93


def test_unknown_bundled_model(tmp_path: Path, capsys) -> None:
    assert main(["predict", "--model", "imagenet", str(tmp_path)]) == 1
    assert "no bundled model 'imagenet'; bundled: cifar10, fashion-mnist" in capsys.readouterr().err
    with pytest.raises(NinError, match="one of them"):
        load_predictor("run", "fashion-mnist")
    assert isinstance(Predictor, type)


def test_bundled_files_are_package_data() -> None:
    """Every bundled file matches pyproject's package-data, so wheels carry it."""
    tomllib = pytest.importorskip("tomllib")
    from importlib import resources

    from nin.pretrained import PRETRAINED

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["nin.pretrained"]
    for folder, _ in PRETRAINED.values():
        root = Path(str(resources.files("nin.pretrained")))
        files = sorted(p.relative_to(root) for p in (root / folder).iterdir())
        names = [f.name for f in files]
        assert names == ["config.json", "metrics.json", "metrics.jsonl", "model.safetensors"]
        assert all(any(f.match(g) for g in globs) for f in files)
        assert sum((root / f).stat().st_size for f in files) < 4_000_000  # nin_fast: 3.6 MB


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_damaged_files_are_called_damaged() -> None:
    """A PNG with a bad checksum, or a JPEG with a broken header, is damaged, not 'not a PNG'."""
    png = bytearray(encoded(Image.new("L", (20, 20), 128), "PNG"))
    png[29] ^= 0xFF  # a byte of the IHDR chunk's CRC
    with pytest.raises(NinError) as bad_crc:
        images.read_image(bytes(png), "x.png")
    assert str(bad_crc.value) == (
        "x.png: a damaged PNG file (broken PNG file (bad header checksum in b'IHDR'))"
    )
    jpeg = encoded(Image.new("RGB", (20, 20)), "JPEG")
    with pytest.raises(NinError, match=r"^x.jpg: a damaged JPEG file \(.+\)$"):
        images.read_image(jpeg[:20], "x.jpg")
    with pytest.raises(NinError, match=r"^x: not a PNG or JPEG image$"):
        images.read_image(b"GIF89a not really", "x")


def test_pillow_warnings_never_reach_the_user() -> None:
    """An EXIF block whose tag points past its end makes Pillow warn; nin reads it silently."""
    tiff = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", 2)
    tiff += struct.pack(">HHII", 0x0112, 3, 1, 6 << 16)  # orientation 6: rotated
    tiff += struct.pack(">HHII", 0x010E, 2, 1000, 200) + b"\x00" * 4  # 1000 bytes past the end
    data = encoded(Image.new("RGB", (20, 10)), "JPEG", exif=b"Exif\x00\x00" + tiff)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        image = images.read_image(data, "phone.jpg")
    assert [str(w.message) for w in seen] == []
    assert image.size == (10, 20)  # the orientation still applies


def test_big_images_are_decoded_small(checkpoint: Path) -> None:
    """A big JPEG decodes at 1/8 scale, a big PNG is reduced at once; the model input barely
    changes (what `nin serve` relies on to bound each request's memory)."""
    predictor = load_predictor(str(checkpoint))
    side = predictor.decode_side
    # Smooth content (a gradient with a shape), as photos are: noise would alias differently.
    y, x = np.mgrid[0:1500, 0:3000]
    base = ((x + y) * 255 // 4500).astype(np.uint8)
    base[400:1100, 900:2100] = 255 - base[400:1100, 900:2100]
    rgba = np.dstack([base, base[::-1], base[:, ::-1], np.full_like(base, 255)])
    rgba[:, :300, 3] = 0  # a transparent margin: black once composited
    cases = {
        "JPEG": encoded(Image.fromarray(rgba[..., :3]), "JPEG", quality=95),
        "PNG": encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
    }
    for fmt, data in cases.items():
        small = images.read_image(data, fmt, shrink_to=side)
        full = images.read_image(data, fmt)
        assert full.size == (3000, 1500) and side <= max(small.size) < 2 * side
        a = predictor.to_uint8(small, invert=False)[0].int()
        b = predictor.to_uint8(full, invert=False)[0].int()
        assert (a - b).abs().max() <= 12 and (a - b).abs().float().mean() < 1.5, fmt


def test_pixel_limit_is_read_from_the_header() -> None:
    """A 7000×7000 PNG header over a lower limit is refused before a pixel is decoded."""
    header = struct.pack(">IIBBBBB", 7000, 7000, 8, 6, 0, 0, 0)  # RGBA, 8 bits
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
    data += png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    with pytest.raises(images.TooLarge, match="7000×7000 pixels is over the 16,000,000-pixel"):
        images.read_image(data, "big.png", max_pixels=16_000_000)
    with pytest.raises(NinError, match="cannot decode"):  # under 50 Mpx: decoding finds no data
        images.read_image(data, "big.png")


class BreaksOnInk(nn.Module):
    """A model whose outputs are finite for a blank image and NaN for any other."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits + torch.where(x.amax() > x.amin(), float("nan"), 0.0)


def test_non_finite_outputs_are_refused(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """NaN is never printed: refused at load if a blank image gives it, else for that image."""
    image = write_png(tmp_path / "x.png", np.random.default_rng(0).integers(0, 256, (28, 28)))
    run = tmp_path / "overflow"
    model = create_model("nin_compact")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e30)  # finite weights whose activations overflow to inf, then NaN
    save_checkpoint(run, model, checkpoint_config())
    assert main(["predict", str(run), str(image)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "nin: error: model 'nin_compact' gives NaN or infinite outputs for a blank image; the "
        "checkpoint's weights are broken (retrain, or use an earlier checkpoint)\n"
    )
    predictor = load_predictor(str(checkpoint))
    fragile = Predictor(BreaksOnInk(predictor.model), predictor.config)  # passes the blank check
    with pytest.raises(predict.NotFinite, match="NaN or infinite outputs for this image"):
        fragile.predict(images.open_image(image))


def test_16_bit_and_palette_images_survive_shrinking(checkpoint: Path) -> None:
    """Modes Pillow cannot reduce directly (16-bit grey, palette, 1-bit) are converted first."""
    predictor = load_predictor(str(checkpoint))
    grey16 = Image.fromarray(np.full((1200, 900), 30000, dtype=np.uint16))
    palette = Image.new("RGB", (1200, 900), (200, 10, 10)).convert("P")
    palette.info["transparency"] = 0
    for image in (grey16, palette, Image.new("1", (1200, 900), 1)):
        data = encoded(image, "PNG")
        small = images.read_image(data, image.mode, shrink_to=predictor.decode_side)
        assert max(small.size) < 2 * predictor.decode_side
        assert predictor.to_uint8(small, invert=False)[0].shape == (1, 28, 28)


@functools.cache
def fuzz_predictor() -> Predictor:
    """An untrained nin_compact (hypothesis reruns a test too often for a fixture)."""
    return Predictor(create_model("nin_compact"), checkpoint_config())


SEEDS = {
    "png": encoded(Image.new("RGBA", (40, 30), (10, 200, 30, 128)), "PNG"),
    "jpeg": encoded(Image.new("RGB", (40, 30), "white"), "JPEG"),
    "grey": encoded(Image.new("L", (600, 300), 90), "PNG"),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(SEEDS)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(0, 10_000),
)
@example("png", [(11, 5)], 0)  # an IHDR chunk 5 bytes long: Pillow raises ValueError
def test_damaged_bytes_give_an_image_or_one_line(seed: str, flips, cut: int) -> None:
    """Any corruption of a real PNG/JPEG: an image the pipeline takes, or a NinError; never
    another exception (which `nin serve` would answer with a 500)."""
    data = bytearray(SEEDS[seed])
    for at, value in flips:
        data[at % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    predictor = fuzz_predictor()
    try:
        image = images.read_image(data, "fuzz", shrink_to=predictor.decode_side)
        predictor.to_uint8(image)
    except NinError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz: ")


def test_an_uncropped_photo_is_cut_to_its_object(data_dir: Path) -> None:
    """A dark object small and off-centre on a white page (a phone photo of a garment) is
    inverted, cut to the object and padded, as Fashion-MNIST's images were made: the bundled
    model then reads such photos nearly as well as the test images (without the cut: 14%)."""
    images, labels = load_split("fashion-mnist", "test", str(data_dir))
    predictor = load_predictor(bundled="fashion-mnist")
    right = 0
    for i in range(60):
        garment = Image.fromarray(255 - images[i, 0].numpy()).resize((112, 112))
        photo = Image.new("L", (400, 260), 255)
        photo.paste(garment, (30 + 3 * i, 40 + i))
        result = predictor.predict(photo, top_k=1)
        assert result.inverted
        right += result.top[0][0] == labels[i].item()
    assert right / 60 > 0.8
