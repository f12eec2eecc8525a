import gzip
import http.server
import math
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from nin.data import (
    DATASETS,
    DatasetSpec,
    Preprocess,
    download,
    ensure_files,
    load_split,
    md5sum,
    read_idx,
)
from nin.errors import NinError
from nin.loaders import DeviceLoader, rotate

from .conftest import write_idx

FASHION = DATASETS["fashion-mnist"]


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(5,), dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i.gz", images)).numpy(), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l.gz", labels)).numpy(), labels)


def test_read_idx_rejects_bad_files(tmp_path):
    good = write_idx(tmp_path / "good.gz", np.zeros((2, 3, 3), np.uint8))
    raw = gzip.decompress(good.read_bytes())
    cases = {
        "magic": gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]),
        "dims": gzip.compress(raw[:-1]),  # one byte short of what the dims promise
        "header": gzip.compress(raw[:6]),
        "notgzip": b"this is not gzip data at all",
        "truncated": good.read_bytes()[:20],
    }
    messages = {"magic": "bad magic", "dims": "need", "header": "truncated",
                "notgzip": "gzip", "truncated": "gzip"}  # fmt: skip
    for name, content in cases.items():
        path = tmp_path / f"{name}.gz"
        path.write_bytes(content)
        with pytest.raises(NinError, match=messages[name]) as err:
            read_idx(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(NinError, match="not found"):
        read_idx(tmp_path / "missing.gz")


def test_real_fashion_mnist(data_dir):
    paths = ensure_files("fashion-mnist", data_dir)  # present with the right md5: no download
    assert {p.name for p in paths.values()} == {f for f, _ in FASHION.files.values()}
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_split("fashion-mnist", split, data_dir)
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
        assert torch.bincount(labels).tolist() == [n // 10] * 10
    assert labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def test_real_mnist(data_dir):
    images, labels = load_split("mnist", "test", data_dir)
    assert images.shape == (10000, 1, 28, 28)
    assert torch.bincount(labels)[:3].tolist() == [980, 1135, 1032]


def test_mismatched_files_are_refused(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    bad = write_idx(folder / FASHION.files["train_images"][0], np.zeros((3, 28, 28), np.uint8))
    before = bad.read_bytes()
    with pytest.raises(NinError, match="wrong checksum"):
        ensure_files("fashion-mnist", tmp_path, mirrors=("http://127.0.0.1:9/",))
    assert bad.read_bytes() == before  # never silently replaced


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; paths under /truncated/ promise more bytes than they send."""

    def do_GET(self):
        if self.path.startswith("/truncated/"):
            body = (Path(self.directory) / self.path.split("/")[-1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 over a folder; yields (base URL, folder)."""
    root = tmp_path_factory.mktemp("served")
    (root / "wrong").mkdir()

    def handler(*args, **kwargs):
        return Handler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(served, data_dir):
    """The server above, serving the real Fashion-MNIST files; /wrong/ swaps their bytes."""
    url, root = served
    names = [name for name, _ in FASHION.files.values()]
    for name, other in zip(names, names[1:] + names[:1], strict=True):
        shutil.copy(data_dir / "fashion-mnist" / name, root / name)
        shutil.copy(data_dir / "fashion-mnist" / other, root / "wrong" / name)
    return url


def test_download_success_then_cached(server, tmp_path):
    paths = ensure_files("fashion-mnist", tmp_path, mirrors=(server + "/",))
    for key, (name, md5) in FASHION.files.items():
        assert paths[key] == tmp_path / "fashion-mnist" / name and md5sum(paths[key]) == md5
    # A second call must not download: a dead mirror is fine when the files are there.
    assert ensure_files("fashion-mnist", tmp_path, mirrors=("http://127.0.0.1:9/",)) == paths
    assert sorted(p.name for p in (tmp_path / "fashion-mnist").iterdir()) == sorted(
        name for name, _ in FASHION.files.values()
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAILURES = [
    ("/wrong/", "checksum mismatch"),
    ("/missing/", "HTTP 404"),
    ("/truncated/", "download truncated"),
    ("down", "cannot connect"),
]


@pytest.mark.parametrize("where, message", FAILURES)
def test_download_failures_leave_nothing_behind(served, tmp_path, where, message):
    url, root = served
    good = write_idx(root / "labels.gz", np.arange(200, dtype=np.uint8))
    write_idx(root / "wrong" / "labels.gz", np.zeros(200, dtype=np.uint8))
    base = f"http://127.0.0.1:{closed_port()}/" if where == "down" else url + where
    dest = tmp_path / "cache" / "labels.gz"
    with pytest.raises(NinError, match=message) as err:
        download(base + "labels.gz", dest, md5sum(good), timeout=10)
    assert "\n" not in str(err.value)
    assert list(dest.parent.iterdir()) == []
    assert download(url + "/labels.gz", dest, md5sum(good)) == dest  # the same call, served well
    assert md5sum(dest) == md5sum(good) and dest.stat().st_mode & 0o044  # readable by others


@pytest.mark.parametrize("where, message", FAILURES)
def test_failed_data_set_download_says_where_to_put_files(server, tmp_path, where, message):
    base = f"http://127.0.0.1:{closed_port()}/" if where == "down" else server + where
    with pytest.raises(NinError, match="and put them in") as err:
        ensure_files("fashion-mnist", tmp_path, mirrors=(base,))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "fashion-mnist").exists()  # not even an empty folder


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A synthetic IDX data set registered as 'tiny', written by the test: (data dir, writer)."""
    folder = tmp_path / "tiny"
    folder.mkdir()

    def write(train_n=30, train_labels=30, test_n=10, max_label=2):
        arrays = {
            "train_images": np.random.default_rng(0).integers(0, 256, (train_n, 28, 28)),
            "train_labels": np.arange(train_labels) % (max_label + 1),
            "test_images": np.zeros((test_n, 28, 28)),
            "test_labels": np.arange(test_n) % 3,
        }
        files = {}
        for key, array in arrays.items():
            path = write_idx(folder / f"{key}.gz", array.astype(np.uint8))
            files[key] = (path.name, md5sum(path))
        spec = DatasetSpec("tiny", files, ("http://127.0.0.1:9/",), ("a", "b", "c"), 0.5, 0.5)
        monkeypatch.setitem(DATASETS, "tiny", spec)

    return tmp_path, write


def test_load_split_reads_a_data_set(tiny):
    root, write = tiny
    write()
    images, labels = load_split("tiny", "train", root)
    assert images.shape == (30, 1, 28, 28) and labels.tolist()[:4] == [0, 1, 2, 0]


@pytest.mark.parametrize(
    "counts, message",
    [
        (dict(train_labels=29), "29 labels for 30 images"),
        (dict(max_label=5), "label 5 out of range"),
    ],
)
def test_load_split_refuses_files_that_disagree(tiny, counts, message):
    root, write = tiny
    write(**counts)
    with pytest.raises(NinError, match=message):
        load_split("tiny", "train", root)
    assert load_split("tiny", "test", root)[0].shape == (10, 1, 28, 28)  # the other split is fine


def small_split(n=10):
    images = torch.arange(n * 4, dtype=torch.uint8).reshape(n, 1, 2, 2)
    return images, torch.arange(n) % 3


def test_loader_covers_every_example_once_per_epoch():
    images, labels = small_split()
    loader = DeviceLoader(images, labels, batch_size=4, shuffle=True, seed=1)
    seen = torch.cat([y for _, y in loader])
    assert len(loader) == 3 and len(seen) == 10
    xs = torch.cat([x for x, _ in loader])
    assert sorted((xs.flatten(1)[:, 0] * 255).round().long().tolist()) == list(range(0, 40, 4))


def test_loader_order_is_seeded():
    images, labels = small_split()

    def order(seed):
        return [y.tolist() for _, y in DeviceLoader(images, labels, 3, shuffle=True, seed=seed)]

    assert order(5) == order(5)
    assert order(5) != order(6)


def test_loader_resizes_and_normalises_in_batch():
    images = torch.full((6, 1, 28, 28), 255, dtype=torch.uint8)
    loader = DeviceLoader(
        images, torch.zeros(6, dtype=torch.long), 4, preprocess=Preprocess(224, 0.5, 0.25)
    )
    x, _ = next(iter(loader))
    assert x.shape == (4, 1, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 2.0))


def test_rotate_turns_images_about_their_centre():
    square = torch.rand(3, 1, 7, 7)
    quarter = rotate(square, torch.full((3,), math.pi / 2))
    assert torch.allclose(quarter, torch.rot90(square, 1, (2, 3)), atol=1e-5)
    # On a non-square image a quarter turn moves a point 4 pixels right of the centre to 4
    # pixels from it vertically (not 4 × height/width).
    wide = torch.zeros(1, 1, 9, 15)
    wide[0, 0, 4, 11] = 1.0
    moved = rotate(wide, torch.tensor([math.pi / 2]))[0, 0]
    assert torch.allclose(moved[0, 7], torch.tensor(1.0), atol=1e-5)  # row 4 - 4, column 7
    assert torch.allclose(moved.sum(), torch.tensor(1.0), atol=1e-5)


def test_random_rotations_stay_within_the_angle():
    # One bright pixel 3 to the right of the centre of 9×9: its angle after the augmentation.
    images = torch.zeros(256, 1, 9, 9, dtype=torch.uint8)
    images[:, 0, 4, 7] = 255
    turned, _ = next(iter(DeviceLoader(images, torch.zeros(256).long(), 256, rotate=30.0)))
    rows, cols = torch.meshgrid(torch.arange(9.0) - 4, torch.arange(9.0) - 4, indexing="ij")
    mass = turned[:, 0].flatten(1).sum(1)
    y = (turned[:, 0] * rows).flatten(1).sum(1) / mass
    x = (turned[:, 0] * cols).flatten(1).sum(1) / mass
    degrees = torch.atan2(y, x).rad2deg()
    assert degrees.abs().max() <= 31 and degrees.min() < -20 and degrees.max() > 20


def test_augmentation_flips_and_translates():
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    flipped, _ = next(iter(DeviceLoader(images, torch.zeros(64).long(), 64, flip=True)))
    plain = images.float() / 255
    is_flipped = (flipped == plain.flip(3)).flatten(1).all(1)
    is_same = (flipped == plain).flatten(1).all(1)
    assert (is_flipped | is_same).all() and 10 < is_flipped.sum() < 54
    moved, _ = next(iter(DeviceLoader(images, torch.zeros(64).long(), 64, crop_padding=2)))
    assert moved.shape == plain.shape
    # Each image is its original shifted by at most 2 pixels, zeros filling in.
    for i in range(8):
        padded = torch.nn.functional.pad(plain[i], (2, 2, 2, 2))
        windows = [padded[:, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(moved[i], w) for w in windows)
