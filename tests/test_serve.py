"""nin serve: the demo page end to end in headless Chromium, and a real `nin serve` process
against hostile clients (raw sockets), each refusal a 4xx/503 with one line, never a 500."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nin import serve
from nin.checkpoint import save_checkpoint
from nin.cli import main
from nin.data import dataset_spec, load_split
from nin.models import create_model
from nin.predict import NotFinite, load_predictor
from tests.browser import page  # noqa: F401 (a fixture)
from tests.conftest import REPO, SHARED_DATA, checkpoint_config

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

BOUNDARY = "nin-test-boundary"


@dataclass
class Server:
    """A `nin serve` process on 127.0.0.1:port, its stderr in a file."""

    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def alive(self) -> bool:
        """The process runs and GET / answers 200."""
        status, _ = exchange(self.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return self.process.poll() is None and status == 200

    def rss_mib(self, name: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"{name} not in /proc/{self.process.pid}/status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, *args: str, host: str = "127.0.0.1") -> Server:
    """Start `python -m nin serve ARGS --port P` and wait until it accepts connections."""
    port = free_port()
    with open(log, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "nin", "serve", *args, "--port", str(port), "--host", host],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
        )
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, f"nin serve exited: {log.read_text()}"
        assert time.monotonic() < deadline, "nin serve did not start in 90 s"
        try:
            socket.create_connection((host, port), timeout=1).close()
            return Server(port, process, log)
        except OSError:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """The bundled model served by a real `nin serve` process with its default limits."""
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    running = start_server(log, "--model", "fashion-mnist")
    yield running
    running.process.terminate()
    running.process.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()  # no 500 was ever answered


@pytest.fixture(scope="module")
def test_image(tmp_path_factory) -> tuple[Path, str]:
    """Fashion-MNIST test image 0 written as a PNG file, and its class name."""
    if not (SHARED_DATA / "fashion-mnist").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set NIN_TEST_DATA)")
    images, labels = load_split("fashion-mnist", "test", SHARED_DATA)
    path = tmp_path_factory.mktemp("serve") / "test-0.png"
    Image.fromarray(images[0, 0].numpy()).save(path)
    return path, dataset_spec("fashion-mnist").classes[int(labels[0])]


def exchange(port: int, data: bytes, timeout: float = 15, host: str = "127.0.0.1") -> tuple:
    """Send raw bytes, read until the server closes: (status, the JSON's detail or the text)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        if data:
            sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        return status, body.decode("utf-8", "replace")


def multipart(data: bytes, name: str = "x.png") -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(
    body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}", extra: str = ""
) -> bytes:
    """POST /predict with its Content-Length; the server closes after answering."""
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(width: int = 7000, height: int = 7000) -> bytes:
    """A 190-byte PNG that declares width×height RGBA pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "Traceback" not in message


# --- the page, in Chromium


def test_upload_real_image(server: Server, page, test_image, tmp_path: Path) -> None:  # noqa: F811
    path, truth = test_image
    page.goto(server.url)
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#results li")
    assert page.inner_text("#results li:first-child .class") == truth
    assert len(page.locator("#results li").all()) == 5
    assert page.evaluate("document.getElementById('seen').naturalWidth") == 28
    assert page.inner_text("#error") == ""
    page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)


def test_upload_text_file_shows_error(server: Server, page, tmp_path: Path) -> None:  # noqa: F811
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    page.goto(server.url)
    page.set_input_files("#file", str(text))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "not a PNG or JPEG image" in page.inner_text("#error")
    assert page.locator("#results li").count() == 0


def test_the_page_refuses_a_file_over_the_limit_itself(server: Server, page) -> None:  # noqa: F811
    """Uploading 21 MiB to be told 413 (or reset mid-upload) is pointless: the page says why."""
    page.goto(server.url)
    page.evaluate("classify(new Blob([new Uint8Array(21 * 2 ** 20)]), 'big.png')")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert page.inner_text("#error") == "big.png: over the 20 MiB limit; give a smaller image"


def test_drawing_is_classified(server: Server, page) -> None:  # noqa: F811
    page.goto(server.url)
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


# --- a real server against hostile requests

BAD_CRC_PNG = bytearray(huge_png_header(4, 4))
BAD_CRC_PNG[29] ^= 0xFF  # a byte of the IHDR chunk's checksum
TWO_FILES = multipart(b"a")[: -len(f"--{BOUNDARY}--\r\n")] + multipart(b"b")
FRAMING = f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
REFUSALS = [
    # (what, the raw request, status, a piece of the one-line message)
    ("empty file", post(multipart(b"")), 400, "x.png: empty file"),
    ("not an image", post(multipart(b"GIF89a not really")), 400, "not a PNG or JPEG image"),
    ("a PNG with a bad checksum", post(multipart(bytes(BAD_CRC_PNG))), 400,
     "x.png: a damaged PNG file (broken PNG file (bad header checksum in b'IHDR'))"),
    ("7000×7000 pixels in 190 bytes", post(multipart(huge_png_header(), "huge.png")), 413,
     "huge.png: 7000×7000 pixels is over the 16,777,216-pixel limit"),
    ("no form at all", post(b"{}", "application/json"), 400, "the form field 'file'"),
    ("a form without its boundary", post(multipart(b"x"), "multipart/form-data"), 400,
     "Missing boundary in multipart."),
    ("two files", post(TWO_FILES), 400, "Too many files"),
    ("a control character in the name", post(multipart(b"hello", "a\x07b\x1b.png")), 400,
     "a?b?.png: not a PNG or JPEG image"),
    ("a declared body over the limit", b"POST /predict HTTP/1.1\r\nHost: x\r\n" + FRAMING.encode()
     + b"Content-Length: 999999999999\r\n\r\n", 413, "over the 20 MiB limit"),
    ("Content-Length and chunked together", b"POST /predict HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n" + FRAMING.encode() + b"\r\n", 400,
     "send Content-Length or Transfer-Encoding, not both"),
    ("a chunked body", b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     + FRAMING.encode() + b"\r\n", 411, "send the upload with a Content-Length"),
    ("no Content-Length", b"POST /predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 411,
     "send the upload with a Content-Length"),
    ("headers over 16 KiB in one piece", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: "
     + b"a" * 20_000 + b"\r\n\r\n", 431, "the request headers are over 16 KiB"),
    ("not HTTP", b"\x00\x01\x02 garbage\r\n\r\n", 400, "Invalid HTTP request received."),
]  # fmt: skip


@pytest.mark.parametrize(("what", "request_bytes", "status", "message"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])  # fmt: skip
def test_hostile_requests_get_a_4xx_and_one_line(
    server: Server, what: str, request_bytes: bytes, status: int, message: str
) -> None:
    # Bodies over the limit or of unknown size are never sent: the answer comes from the head.
    got_status, detail = exchange(server.port, request_bytes)
    assert (got_status, message in detail, one_line(detail)) == (status, True, True), detail
    assert server.alive()


def test_an_upload_over_the_limit_is_read_no_further(server: Server) -> None:
    """A file 1 byte over 20 MiB in a body under the form's allowance: read, then 413."""
    from nin.images import MAX_BYTES

    status, detail = exchange(server.port, post(multipart(bytes(MAX_BYTES + 1))), timeout=30)
    assert status == 413 and detail == "the image is over the 20 MiB limit; give a smaller one"
    assert server.alive()


def test_stalled_connections_are_cut(server: Server) -> None:
    """Silence, half a head, half a body: each gets a 408 and its socket closed, in ~5 s
    without a head, in ~10 s for a body."""
    head = post(multipart(b"\x89PNG" + bytes(1000)))
    stalls = {
        "nothing": b"",
        "half a head": b"POST /predict HTTP/1.1\r\nHost: x\r\n",
        "half a body": head[: len(head) - 500],
    }
    answers: dict[str, tuple] = {}

    def stall(what: str, data: bytes) -> None:
        start = time.monotonic()
        answers[what] = (*exchange(server.port, data, timeout=30), time.monotonic() - start)

    threads = [threading.Thread(target=stall, args=item) for item in stalls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)
    head_timeout = f"the request head took over {serve.HEAD_TIMEOUT:g} s; send it again"
    body_timeout = f"the upload stalled {serve.BODY_IDLE_TIMEOUT:g} s; send it again"
    assert answers["nothing"][:2] == (408, head_timeout)
    assert answers["half a head"][:2] == (408, head_timeout)
    assert answers["half a body"][:2] == (408, body_timeout)
    heads = [answers["nothing"][2], answers["half a head"][2]]
    assert all(serve.HEAD_TIMEOUT - 1 < s < serve.HEAD_TIMEOUT + 4 for s in heads), answers
    assert 9 < answers["half a body"][2] < 14, answers
    assert server.alive()


def test_connections_over_the_limit_get_503(server: Server) -> None:
    # Connections that have waited under HEAD_GRACE are not closed to make room.
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(64)]
    try:
        time.sleep(serve.HEAD_GRACE / 2)  # until the server has accepted every one
        status, detail = exchange(server.port, post(multipart(b"x")))
        assert (status, detail) == (503, "Service Unavailable")
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    assert server.alive()


def test_half_sent_heads_from_one_address_cannot_hold_every_slot(server: Server) -> None:
    """64 connections from one address that never finish their heads: another client is
    served at once, and the next connection from that address leaves it HEADS_PER_CLIENT."""
    half = b"GET / HTTP/1.1\r\nHost: x\r\n"

    def attack() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), 10, ("127.0.0.2", 0))
        sock.sendall(half)
        return sock

    held = []
    try:
        held += [attack() for _ in range(64)]
        time.sleep(serve.HEAD_GRACE + 0.5)
        start = time.monotonic()
        status, _ = exchange(
            server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status == 200 and time.monotonic() - start < 2
        held.append(attack())
        time.sleep(0.5)
        closed = 0
        for sock in held:
            sock.settimeout(0.1)
            with contextlib.suppress(OSError):
                closed += sock.recv(100).startswith(b"HTTP/1.1 408")
        assert closed == 65 - serve.HEADS_PER_CLIENT - 1  # the newest has not waited yet
    finally:
        for sock in held:
            sock.close()
    assert server.alive()


def test_health_info_and_the_access_log(server: Server) -> None:
    import nin

    request = b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, body = exchange(server.port, request % b"/healthz")
    assert (status, json.loads(body) if isinstance(body, str) else body) == (200, {"status": "ok"})
    status, body = exchange(server.port, request % b"/info")
    info = json.loads(body)
    assert status == 200 and info["version"] == nin.__version__
    assert (info["name"], info["model"], info["data"]) == ("fashion-mnist", "nin_compact",
                                                          "fashion-mnist")  # fmt: skip
    assert info["classes"][-1] == "ankle boot" and len(info["classes"]) == 10
    assert info["input"] == {"channels": 1, "height": 28, "width": 28}
    # One line per request on stderr: address, method and path, status, milliseconds.
    exchange(server.port, post(multipart(b"not an image", "secret.png")))
    exchange(server.port, request % b"/no%1Bsuch")  # a control character, unquoted
    time.sleep(0.2)
    log = server.log.read_text()
    assert re.search(r'^127\.0\.0\.1 "GET /healthz" 200 \d+ ms$', log, re.M), log
    assert re.search(r'^127\.0\.0\.1 "GET /info" 200 \d+ ms$', log, re.M), log
    assert re.search(r'^127\.0\.0\.1 "POST /predict" 400 \d+ ms$', log, re.M), log
    assert re.search(r'^127\.0\.0\.1 "GET /no\?such" 404 \d+ ms$', log, re.M), log
    assert "secret" not in log and "not an image" not in log


def test_memory_stays_bounded_under_parallel_big_pngs(server: Server) -> None:
    """8 uploads of a 4096×4096 RGBA PNG at once (64 MiB each decoded): two decode at a time,
    each shrunk as it decodes, so the server grows by ~2 × 130 MB, not 8 × 1 GB."""
    stripes = np.zeros((4096, 4096, 4), np.uint8)
    stripes[::8] = 255
    body = post(multipart(image_bytes(stripes, "RGBA"), "big.png"))
    rss_before = server.rss_mib()
    Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # VmHWM from here
    answers = []

    def upload() -> None:
        answers.append(exchange(server.port, body, timeout=60))

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    growth = server.rss_mib("VmHWM") - rss_before
    assert len(answers) == 8 and all(s in (200, 503) for s, _ in answers), answers
    assert sum(s == 200 for s, _ in answers) >= 2
    assert growth < 400, f"the server grew by {growth:.0f} MiB"
    assert server.alive()


def test_a_short_load_run_gets_no_5xx(server: Server) -> None:
    """benchmarks/serve_load.py for a few seconds: every request answered, none with a 5xx."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        serve_load = importlib.import_module("serve_load")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    result = serve_load.run_load(server.port, duration=4, clients=4, seed=1)
    assert len(result.outcomes) >= 8
    assert result.server_errors() == []
    assert {o.kind for o in result.outcomes} >= {"small-png", "garbage-file"}
    assert server.alive()


# --- start-up


def test_cli_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    assert main(["serve"]) == 1
    assert "give a CHECKPOINT or --model" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "fashion-mnist", "--port", str(port)]) == 1
        assert capsys.readouterr().err == (
            f"nin: error: port {port} is in use on 127.0.0.1; pick another --port\n"
        )
    args = ["serve", "--model", "fashion-mnist", "--host", "192.0.2.1", "--port", "8000"]
    assert main(args) == 1  # a documentation address: no machine has it
    assert "--host 192.0.2.1 is not an address of this machine" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--model", "fashion-mnist"]) == 1
    assert "pip install 'nin[serve]'" in capsys.readouterr().err


def test_an_ipv6_host_is_served(tmp_path: Path) -> None:
    try:
        socket.socket(socket.AF_INET6).close()
        socket.getaddrinfo("::1", 80, socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 on this machine")
    running = start_server(tmp_path / "stderr.log", "--model", "fashion-mnist", host="::1")
    try:
        request = b"GET / HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n"
        status, text = exchange(running.port, request, host="::1")
        assert status == 200 and "fashion-mnist" in text
    finally:
        running.process.terminate()
        running.process.wait(30)
    assert serve.url_of("::1", 8000) == "http://[::1]:8000/"


def test_a_model_with_nan_outputs_is_refused_at_start(tmp_path: Path, monkeypatch, capsys) -> None:
    def started(*args, **kwargs) -> None:
        raise AssertionError("the server started")  # rather than serve until killed

    monkeypatch.setattr(serve, "serve", started)
    run = tmp_path / "overflow"
    model = create_model("nin_compact")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e30)  # finite weights; the activations overflow to inf, then NaN
    save_checkpoint(run, model, checkpoint_config())
    assert main(["serve", str(run), "--port", str(free_port())]) == 1
    assert capsys.readouterr().err == (
        "nin: error: model 'nin_compact' gives NaN or infinite outputs for a blank image; the "
        "checkpoint's weights are broken (retrain, or use an earlier checkpoint)\n"
    )


# --- the guard and the endpoint in one process (timeouts shortened, failures injected)


def http_scope(headers: list[tuple[bytes, bytes]]) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
        "root_path": "", "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
        "headers": headers,
    }  # fmt: skip


async def call(app, body: bytes, pieces: int = 1, pause: float = 0.0) -> tuple:
    """One POST through the ASGI app, its body in `pieces` with `pause` s between them:
    (status, the message or the JSON answer)."""
    headers = [
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    size = -(-len(body) // pieces)
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    sent: list[dict] = []

    async def receive() -> dict:
        if not chunks:
            await asyncio.sleep(3600)  # the client is gone quiet
        await asyncio.sleep(pause)
        piece = chunks.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(chunks)}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(http_scope(headers), receive, send)
    answer = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return sent[0]["status"], answer.get("detail", answer)


def run_async(coroutine):
    """Run in a thread of its own: Playwright's sync API keeps an event loop in this one."""
    box = {}
    worker = threading.Thread(target=lambda: box.update(value=asyncio.run(coroutine)))
    worker.start()
    worker.join(60)
    return box["value"]


@pytest.fixture(scope="module")
def predictor():
    return load_predictor(bundled="fashion-mnist")


def test_a_chunked_upload_is_refused_before_its_body_is_read(predictor) -> None:
    app = serve.create_app(predictor, "fashion-mnist")
    headers = [(b"transfer-encoding", b"chunked"), (b"content-length", b"10")]
    sent = []

    async def receive() -> dict:
        raise AssertionError("the body was read")

    async def send(message: dict) -> None:
        sent.append(message)

    run_async(app(http_scope(headers), receive, send))
    assert sent[0]["status"] == 400
    assert b"not both" in b"".join(m.get("body", b"") for m in sent)


def test_a_slow_body_is_cut_by_its_deadline(predictor, monkeypatch) -> None:
    """A body that keeps trickling (never idle for long) still ends at BODY_TIMEOUT."""
    monkeypatch.setattr(serve, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(serve, "BODY_IDLE_TIMEOUT", 0.3)
    app = serve.create_app(predictor, "fashion-mnist")
    body = multipart(bytes(100))
    assert run_async(call(app, body, pieces=20, pause=0.1)) == (
        408, "the upload took over 0.5 s; send it again"
    )  # fmt: skip
    assert run_async(call(app, body, pieces=2, pause=0.4)) == (
        408, "the upload stalled 0.3 s; send it again"
    )  # fmt: skip


def test_a_body_longer_than_declared_is_cut(predictor, monkeypatch) -> None:
    """h11 keeps to Content-Length; should a server not, the guard still counts the bytes."""
    app = serve.create_app(predictor, "fashion-mnist")
    headers = [
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
        (b"content-length", b"10"),
    ]
    pieces = 40  # 40 MiB in all, twice the limit
    sent = []

    async def receive() -> dict:
        nonlocal pieces
        pieces -= 1
        form_head = multipart(b"").split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        data = bytes(2**20) if pieces < 39 else form_head  # then zeros as the file, 1 MiB a go
        return {"type": "http.request", "body": data, "more_body": pieces > 0}

    async def send(message: dict) -> None:
        sent.append(message)

    run_async(app(http_scope(headers), receive, send))
    assert sent[0]["status"] == 413 and pieces > 0  # answered before the rest was read
    assert b"over the 20 MiB limit" in b"".join(m.get("body", b"") for m in sent)


def test_a_full_queue_answers_503_and_model_failures_are_not_500(predictor, monkeypatch) -> None:
    monkeypatch.setattr(serve, "DECODE_SLOTS", 1)
    monkeypatch.setattr(serve, "QUEUE_TIMEOUT", 0.3)
    image = np.zeros((28, 28), np.uint8)
    image[5:20, 10:18] = 200
    png = multipart(image_bytes(image))
    slow = threading.Event()
    original = predictor.probabilities

    def probabilities(batch):
        slow.wait(5)  # holds the one slot until released
        return original(batch)

    monkeypatch.setattr(predictor, "probabilities", probabilities)
    app = serve.create_app(predictor, "fashion-mnist")

    async def two_at_once() -> list:
        first = asyncio.create_task(call(app, png))
        await asyncio.sleep(0.1)
        second = await call(app, png)
        slow.set()
        return [await first, second]

    (first, _), second = run_async(two_at_once())
    assert first == 200
    assert second == (503, "the server is busy with other images; try again")

    # A fresh app for each event loop below: asyncio objects stay with the loop they met.
    def overflow(batch):
        raise NotFinite("model 'nin_compact' gives NaN or infinite outputs for this image")

    monkeypatch.setattr(predictor, "probabilities", overflow)
    app = serve.create_app(predictor, "fashion-mnist")
    assert run_async(call(app, png))[0] == 422

    def out_of_memory(batch):
        raise MemoryError

    monkeypatch.setattr(predictor, "probabilities", out_of_memory)
    app = serve.create_app(predictor, "fashion-mnist")
    status, detail = run_async(call(app, png))
    assert (status, detail) == (
        503,
        "the server ran out of memory for this image; try a smaller one",
    )


def image_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()
