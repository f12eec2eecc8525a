"""nin serve: the demo page end to end in headless Chromium, and its refusals over HTTP."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nin import predict
from nin.cli import main
from nin.data import dataset_spec, load_split
from nin.predict import load_predictor
from tests.browser import page  # noqa: F401 (a fixture)
from tests.conftest import SHARED_DATA

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The page of the bundled model, served by uvicorn in a thread on a free port."""
    import uvicorn

    from nin.serve import create_app

    app = create_app(load_predictor(bundled="fashion-mnist"), "fashion-mnist")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture(scope="module")
def test_image(tmp_path_factory) -> tuple[Path, str]:
    """Fashion-MNIST test image 0 written as a PNG file, and its class name."""
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set NIN_TEST_DATA)")
    images, labels = load_split("fashion-mnist", "test", SHARED_DATA)
    path = tmp_path_factory.mktemp("serve") / "test-0.png"
    Image.fromarray(images[0, 0].numpy()).save(path)
    return path, dataset_spec("fashion-mnist").classes[int(labels[0])]


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "predict", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(data: bytes, name: str = "x.png") -> tuple[bytes, str]:
    boundary = "nin-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_upload_real_image(url: str, page, test_image, tmp_path: Path) -> None:  # noqa: F811
    path, truth = test_image
    page.goto(url)
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#results li")
    assert page.inner_text("#results li:first-child .class") == truth
    assert len(page.locator("#results li").all()) == 5
    assert page.evaluate("document.getElementById('seen').naturalWidth") == 28
    assert page.inner_text("#error") == ""
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)


def test_upload_text_file_shows_error(url: str, page, tmp_path: Path) -> None:  # noqa: F811
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    page.goto(url)
    page.set_input_files("#file", str(text))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "not a PNG or JPEG image" in page.inner_text("#error")
    assert page.locator("#results li").count() == 0


def test_drawing_is_classified(url: str, page) -> None:  # noqa: F811
    page.goto(url)
    box = page.locator("#canvas").bounding_box()
    page.mouse.move(box["x"] + 90, box["y"] + 40)
    page.mouse.down()
    for x, y in ((90, 240), (190, 240), (190, 40)):
        page.mouse.move(box["x"] + x, box["y"] + y, steps=5)
    page.mouse.up()
    page.click("#classify-drawing")
    page.wait_for_selector("#results li")
    names = page.locator("#results li .class").all_inner_texts()
    assert len(names) == 5 and set(names) <= set(dataset_spec("fashion-mnist").classes)


def test_refusals_are_400_and_413_never_500(url: str, monkeypatch) -> None:
    status, body = post(url, *multipart(b""))
    assert status == 400 and "empty file" in body["detail"]
    status, body = post(url, *multipart(b"GIF89a not really"))
    assert status == 400 and "not a PNG or JPEG" in body["detail"]
    status, body = post(url, b"{}", "application/json")
    assert status == 400 and "form field 'file'" in body["detail"]
    monkeypatch.setattr(predict, "MAX_BYTES", 1000)
    status, body = post(url, *multipart(np.zeros(5000, np.uint8).tobytes()))
    assert status == 413 and "limit" in body["detail"]  # read, then refused
    status, body = post(url, *multipart(np.zeros(200_000, np.uint8).tobytes()))
    assert status == 413 and "limit" in body["detail"]  # refused by its declared length


def test_cli_errors(monkeypatch, capsys) -> None:
    assert main(["serve"]) == 1
    assert "give a CHECKPOINT or --model" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "fashion-mnist", "--port", str(port)]) == 1
        assert "pick another --port" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", "fashion-mnist"]) == 1
    assert "pip install 'nin[serve]'" in capsys.readouterr().err


def test_a_chunked_upload_is_refused_before_its_body_is_read() -> None:
    import asyncio

    from nin.serve import create_app

    app = create_app(load_predictor(bundled="fashion-mnist"), "fashion-mnist")
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
        "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
        "headers": [(b"transfer-encoding", b"chunked"),
                    (b"content-type", b"multipart/form-data; boundary=x")],
    }  # fmt: skip
    sent = []

    async def receive() -> dict:
        raise AssertionError("the body was read")

    async def send(message: dict) -> None:
        sent.append(message)

    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    worker = threading.Thread(target=lambda: asyncio.run(app(scope, receive, send)))
    worker.start()
    worker.join(30)
    assert sent[0]["status"] == 411
    assert b"Content-Length" in b"".join(m.get("body", b"") for m in sent)
