import gzip
import http.server
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from nin.data import (
    DATASETS,
    DeviceLoader,
    download,
    ensure_files,
    load_split,
    md5sum,
    read_idx,
)
from nin.errors import NinError

from .conftest import write_idx

FASHION = DATASETS["fashion-mnist"]
LABELS_FILE, LABELS_MD5 = FASHION.files["test_labels"]


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
def server(tmp_path_factory, data_dir):
    """A real HTTP server on 127.0.0.1 serving the real Fashion-MNIST files."""
    root = tmp_path_factory.mktemp("served")
    for name, _ in FASHION.files.values():
        shutil.copy(data_dir / "fashion-mnist" / name, root / name)
    # Under /wrong/ every name serves another file's bytes.
    (root / "wrong").mkdir()
    names = [name for name, _ in FASHION.files.values()]
    for name, other in zip(names, names[1:] + names[:1], strict=True):
        shutil.copy(root / other, root / "wrong" / name)

    def handler(*args, **kwargs):
        return Handler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


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


@pytest.mark.parametrize(
    "where, message",
    [
        ("/wrong/", "checksum mismatch"),
        ("/missing/", "HTTP 404"),
        ("/truncated/", "download truncated"),
        ("down", "cannot connect"),
    ],
)
def test_download_failures_leave_nothing_behind(server, tmp_path, where, message):
    base = f"http://127.0.0.1:{closed_port()}/" if where == "down" else server + where
    dest = tmp_path / "cache" / LABELS_FILE
    with pytest.raises(NinError, match=message) as err:
        download(base + LABELS_FILE, dest, LABELS_MD5, timeout=10)
    assert "\n" not in str(err.value)
    assert list(dest.parent.iterdir()) == []
    # Through ensure_files the error also says where to put the file by hand.
    with pytest.raises(NinError, match="and put them in") as err:
        ensure_files("fashion-mnist", tmp_path / "cache", mirrors=(base,))
    assert message in str(err.value)
    assert list((tmp_path / "cache" / "fashion-mnist").iterdir()) == []


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
        images, torch.zeros(6, dtype=torch.long), 4, resize=224, mean=0.5, std=0.25
    )
    x, _ = next(iter(loader))
    assert x.shape == (4, 1, 224, 224) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 2.0))


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
