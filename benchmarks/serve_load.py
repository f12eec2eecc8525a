"""Load test of `nin serve`: concurrent clients mixing good images, big PNGs, slow senders and
garbage for a fixed time, against a real server on 127.0.0.1.

Reports requests/s, p50/p99 latency per kind of request, every status seen, the server's idle
and peak RSS, and the count of 5xx answers (the goal is none: a hostile request gets a 4xx, and
only real overload a 503). The result goes between `<!-- begin serve-load -->` and
`<!-- end serve-load -->` in --out (docs/benchmarks.md by default), so a rerun replaces it.

    python benchmarks/serve_load.py --duration 45 --clients 16
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from report import fill, machine, today, write_section

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "nin-load-boundary"
# How often each kind of request comes up (mostly real uploads), and the answer it should get.
WEIGHTS = {
    "small-png": 8,  # a 28×28 drawing
    "photo-jpeg": 4,  # a 1600×1200 photo, decoded at 1/4 scale
    "big-png": 1,  # 4096×4096 RGBA, at the serving pixel limit: the costliest decode
    "huge-png": 2,  # a 7000×7000 header: refused before any pixel is decoded
    "garbage-file": 2,  # random bytes as the upload
    "garbage-http": 1,  # random bytes instead of HTTP: refused by the HTTP parser
    "both-lengths": 1,  # Content-Length and Transfer-Encoding: refused before the body
    "slow-sender": 1,  # half a body, then silence: cut once the body stalls
}
EXPECTED = dict(zip(WEIGHTS, (200, 200, 200, 413, 400, 400, 400, 408), strict=True))


@dataclass
class Outcome:
    """One request: its kind, the status (0: no answer), the seconds it took."""

    kind: str
    status: int
    seconds: float
    detail: str = ""


@dataclass
class LoadResult:
    """Everything a run measured."""

    duration: float
    clients: int
    elapsed: float = 0.0  # from the first request to the last answer
    outcomes: list[Outcome] = field(default_factory=list)
    rss_idle_mib: float = 0.0
    rss_peak_mib: float = 0.0

    def server_errors(self) -> list[Outcome]:
        """Answers of 500 and up, or none at all (a reset or a hang)."""
        return [o for o in self.outcomes if o.status >= 500 or o.status == 0]


def multipart(data: bytes, name: str) -> bytes:
    """A form with one file field, as a browser sends it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post(body: bytes) -> bytes:
    """A POST /predict with its Content-Length; the connection closes after the answer."""
    return (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=" + BOUNDARY.encode() + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    """An image file's bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height RGBA pixels and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def payloads() -> dict[str, bytes]:
    """The bytes each kind of request sends (the slow sender sends half of its own)."""
    rng = np.random.default_rng(0)
    drawing = np.zeros((28, 28), np.uint8)
    drawing[6:22, 9:19] = 220
    y, x = np.mgrid[0:1200, 0:1600]
    photo = np.dstack([(x // 7) % 256, (y // 5) % 256, ((x + y) // 9) % 256]).astype(np.uint8)
    big = np.zeros((4096, 4096, 4), np.uint8)
    big[::8, :, :] = 255  # stripes: a quick PNG to write that is still 64 MiB decoded
    small_png = post(multipart(encoded(Image.fromarray(drawing), "PNG"), "drawing.png"))
    return {
        "small-png": small_png,
        "photo-jpeg": post(multipart(encoded(Image.fromarray(photo), "JPEG"), "photo.jpg")),
        "big-png": post(multipart(encoded(Image.fromarray(big, "RGBA"), "PNG"), "big.png")),
        "huge-png": post(multipart(png_header_only(7000, 7000), "huge.png")),
        "garbage-file": post(multipart(rng.bytes(5000), "garbage.png")),
        "garbage-http": rng.bytes(2000) + b"\r\n\r\n",
        "both-lengths": b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        "slow-sender": small_png,
    }


def exchange(port: int, kind: str, data: bytes, deadline: float) -> Outcome:
    """Send one request of `kind` and read the answer until the server closes."""
    start = time.monotonic()
    # A request started in time may finish late; only a slow sender is cut at the deadline.
    timeout = max(0.5, min(30.0, deadline - start)) if kind == "slow-sender" else 30.0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(data[: len(data) // 2] if kind == "slow-sender" else data)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    except TimeoutError:  # socket.timeout is TimeoutError since Python 3.10
        # Only a slow sender may still be waiting when the run ends; anything else hung.
        status = -1 if kind == "slow-sender" and time.monotonic() >= deadline - 0.1 else 0
        return Outcome(kind, status, time.monotonic() - start, "no answer")
    except OSError as e:
        return Outcome(kind, 0, time.monotonic() - start, f"connection: {e}")
    seconds = time.monotonic() - start
    head, _, body = reply.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return Outcome(kind, 0, seconds, f"not HTTP: {reply[:60]!r}")
    try:
        detail = json.loads(body).get("detail", "")
    except (ValueError, AttributeError):
        detail = body.decode("latin-1")[:80]
    return Outcome(kind, status, seconds, detail)


def rss_mib(pid: int, field_name: str) -> float:
    """A process's VmRSS or VmHWM in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_load(
    port: int, duration: float, clients: int, pid: int | None = None, seed: int = 0
) -> LoadResult:
    """`clients` threads send a weighted mix of requests to 127.0.0.1:`port` for `duration` s."""
    data = payloads()
    result = LoadResult(duration, clients)
    if pid is not None:
        result.rss_idle_mib = rss_mib(pid, "VmRSS")
        with contextlib.suppress(OSError):  # reset the peak to this run's ("5" clears VmHWM)
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    started = time.monotonic()
    deadline = started + duration
    lock = threading.Lock()

    def client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        kinds = [k for k, w in WEIGHTS.items() for _ in range(w)]
        while time.monotonic() < deadline:
            kind = rng.choice(kinds)
            outcome = exchange(port, kind, data[kind], deadline)
            if outcome.status != -1:  # a slow sender the run's end cut short: not a result
                with lock:
                    result.outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration + 60)
    result.elapsed = time.monotonic() - started
    if pid is not None:
        result.rss_peak_mib = rss_mib(pid, "VmHWM")
    return result


def free_port() -> int:
    """A port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, log: Path) -> subprocess.Popen:
    """`python -m nin serve --model fashion-mnist --port PORT`, once it accepts connections."""
    with open(log, "w") as err:
        server = subprocess.Popen(
            [sys.executable, "-m", "nin", "serve", "--model", "fashion-mnist", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=REPO,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"nin serve exited with {server.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("nin serve did not start within 120 s")


def percentile(values: list[float], q: float) -> str:
    """The q-th percentile in milliseconds, or a dash."""
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "–"


def render(result: LoadResult, settings: str, busy: str) -> str:
    """The markdown section."""
    rows = []
    for kind in WEIGHTS:
        times = [o.seconds for o in result.outcomes if o.kind == kind]
        seen = Counter(o.status for o in result.outcomes if o.kind == kind)
        statuses = ", ".join(f"{s}×{n}" for s, n in sorted(seen.items()))
        rows.append(
            f"| {kind} ({WEIGHTS[kind]}) | {EXPECTED[kind]} | {len(times)} | {statuses or '–'} | "
            f"{percentile(times, 50)} | {percentile(times, 99)} |"
        )
    quick = [o.seconds for o in result.outcomes if o.kind != "slow-sender"]
    rows.append(
        f"| all but slow senders | | {len(quick)} | | {percentile(quick, 50)} | "
        f"{percentile(quick, 99)} |"
    )
    # Answers of 500 and up, or none at all (a reset or a hang).
    errors = result.server_errors()
    return fill(
        "serve_load",
        "section",
        settings=settings,
        date=today(),
        machine=machine(),
        busy=busy,
        rows="\n".join(rows),
        result=result,
        answered=len(result.outcomes),
        rate=len(result.outcomes) / result.elapsed,
        errors=len(errors),
        which=", ".join(f"{o.kind} {o.status}" for o in errors[:5]) or "goal: 0",
    )


def main() -> None:
    """Start a server, load it, print the section and write it to --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=45.0, help="seconds (default 45)")
    parser.add_argument("--clients", type=int, default=16, help="client threads (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=str(REPO / "docs" / "benchmarks.md"), help="markdown file to update"
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if not 0 < args.duration <= 600 or not 0 < args.clients <= 48:
        parser.error("--duration must be in (0, 600] and --clients in 1..48")
    load = os.getloadavg()[0]
    busy = fill("serve_load", "busy" if load > 0.5 else "idle", load=load, cores=os.cpu_count())
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"nin-serve-load-{port}.log"
    server = start_server(port, log)
    try:
        result = run_load(port, args.duration, args.clients, server.pid, args.seed)
    finally:
        server.terminate()
        server.wait(30)
    settings = (
        f"python benchmarks/serve_load.py --duration {args.duration:g} --clients {args.clients}"
    )
    text = render(result, settings, busy)
    if "Traceback" in log.read_text():
        text += "\n- The server logged a traceback: see the run's log."
    print(text)
    if not args.no_write:
        write_section(args.out, "serve-load", text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
