"""Serve: a local web page where a person uploads or draws an image and sees the top classes.

One plain HTML page (inline script and style, no frontend build) and one JSON endpoint,
POST /predict, on FastAPI + uvicorn; for an operator, GET /healthz (the process answers) and
GET /info (the model, its classes and input size, nin's version), and an access log line per
request on stderr. Bad uploads get 400 (not an image), 411/413 (no length,
too large) or 408 (too slow) with a readable one-line message that the page shows; the model
is never asked about them.

Whoever connects, the server's memory and time stay bounded:
- a request head must arrive within HEAD_TIMEOUT and fit in MAX_HEAD_BYTES (uvicorn's h11
  protocol times out neither a head nor a body by itself); of the connections that have waited
  over HEAD_GRACE for one, an address keeps HEADS_PER_CLIENT at most, and the oldest is closed
  to let a new one in when the server is full, so half-sent heads cannot hold every slot;
- a body must declare its length (no chunked bodies, never both headers), stay under the
  upload limit and keep flowing (BODY_IDLE_TIMEOUT, BODY_TIMEOUT); `RequestGuard` counts it
  before FastAPI's form parser sees a byte;
- at most MAX_CONNECTIONS connections are served (uvicorn answers 503 beyond), and at most
  DECODE_SLOTS images are decoded at once, each at most MAX_PIXELS and shrunk while decoding
  (`images.read_image`); a request that waits QUEUE_TIMEOUT for a slot gets 503.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
# run time, and those name classes imported inside create_app.
import asyncio
import errno
import html
import json
import logging
import socket
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from nin import __version__
from nin.data import data_name
from nin.errors import NinError
from nin.files import data_uri
from nin.images import MAX_BYTES, TooLarge, image_png, read_image
from nin.predict import NotFinite, Predictor

TOP_K = 5
EXTRA_FORM_BYTES = 64 * 1024  # multipart headers and boundaries around the file itself
# A 4096×4096 RGBA PNG takes ~130 MB to decode and shrink: the most one decode slot may hold.
MAX_PIXELS = 4096 * 4096
DECODE_SLOTS = 2  # images decoded and classified at once (this many × ~130 MB at worst)
QUEUE_TIMEOUT = 10.0  # seconds a request may wait for a decode slot before a 503
HEAD_TIMEOUT = 5.0  # seconds from connecting (or the last response) to a complete head
HEADS_PER_CLIENT = 8  # connections one address may hold waiting for a head (a browser opens ~6)
HEAD_GRACE = 1.0  # seconds a connection waits for its head before it may be closed to make room
BODY_IDLE_TIMEOUT = 10.0  # seconds an upload may pause
BODY_TIMEOUT = 30.0  # seconds a whole upload may take (20 MiB at 0.7 MB/s)
MAX_CONNECTIONS = 64  # uvicorn's limit_concurrency: connections and requests, 503 beyond
MAX_HEAD_BYTES = 16 * 1024  # request line and headers (h11's limit)
KEEP_ALIVE = 5  # seconds an idle keep-alive connection stays open
MAX_NAME = 100  # characters of an upload's file name echoed back
MAX_BODY = MAX_BYTES + EXTRA_FORM_BYTES  # the most a request body may hold
TOO_LARGE = f"the image is over the {MAX_BYTES // 2**20} MiB limit; give a smaller one"
STATUS = {TooLarge: 413, NotFinite: 422}  # an upload's NinError by kind; any other is a 400

Send = Callable[[dict], Awaitable[None]]


def require_serve_packages() -> None:
    """Fail with what to install when the `serve` extra is missing."""
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401 (FastAPI needs it for uploads)
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise NinError(
            f"nin serve needs fastapi, uvicorn and python-multipart ({e.name} is missing): "
            "pip install 'nin[serve]'"
        ) from None


async def reply(send: Send, status: int, message: str, close: bool = False) -> None:
    """Send a JSON error {"detail": message} as a whole response."""
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if close:  # the rest of the body is not worth reading
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def framing_refusal(method: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    """The status and message for a request whose body framing is refused, or None."""
    if sum(len(name) + len(value) + 4 for name, value in headers) > MAX_HEAD_BYTES:
        # h11 bounds a head that arrives in pieces; one that arrives whole is checked here.
        return 431, f"the request headers are over {MAX_HEAD_BYTES // 1024} KiB"
    lengths = [value for name, value in headers if name == b"content-length"]
    chunked = any(name == b"transfer-encoding" for name, _ in headers)
    if chunked and lengths:
        # Which one frames the body is what request smuggling plays on: neither is trusted.
        return 400, "send Content-Length or Transfer-Encoding, not both"
    if chunked or (method == "POST" and not lengths):
        # A body of no declared size would be read before its size is known: refused.
        return 411, "send the upload with a Content-Length (as browsers do)"
    if any(not v.strip().isdigit() or int(v) > MAX_BODY for v in lengths):
        return 413, TOO_LARGE
    return None


def log_request(client: tuple | None, request: str, status: int | str, started: float) -> None:
    """The access log: one line on stderr per request (address, method and path, status,
    milliseconds); never a header or a byte of the upload."""
    ms = 1000 * (time.monotonic() - started)
    address = client[0] if client else "-"
    print(f'{address} "{request}" {status} {ms:.0f} ms', file=sys.stderr, flush=True)


class RequestGuard:
    """ASGI middleware: bounds each request body in size and time before the app reads it, and
    logs each request once it is answered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Send) -> None:
        """Guard the request, then write its access log line."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.monotonic(), []

        async def noted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.guard(scope, receive, noted_send)
        finally:  # a path is cut and made printable: it is whatever the client sent
            request = f"{scope['method']} {clean_name(scope['path'])}"
            log_request(scope.get("client"), request, status[0] if status else "-", started)

    async def guard(self, scope: dict, receive: Callable, send: Send) -> None:
        """Refuse bad framing at once; cut a body that grows too large or stalls."""
        refusal = framing_refusal(scope["method"], scope["headers"])
        if refusal is not None:
            await reply(send, *refusal, close=True)
            return
        started = time.monotonic()
        state = {"received": 0, "body_done": False, "answered": False, "response": False}

        async def refuse(status: int, message: str) -> dict:
            """Answer for the app (if it has not answered) and tell it the client left."""
            if not state["response"] and not state["answered"]:
                await reply(send, status, message, close=True)
            state["answered"] = True
            return {"type": "http.disconnect"}

        async def guarded_receive() -> dict:
            if state["answered"]:
                return {"type": "http.disconnect"}
            if state["body_done"]:  # only a disconnect can come now: no deadline
                return await receive()
            wait = min(BODY_IDLE_TIMEOUT, BODY_TIMEOUT - (time.monotonic() - started))
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                slow = time.monotonic() - started >= BODY_TIMEOUT
                why = f"took over {BODY_TIMEOUT:g} s" if slow else f"stalled {wait:g} s"
                return await refuse(408, f"the upload {why}; send it again")
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["body_done"] = not message.get("more_body", False)
                if state["received"] > MAX_BODY:  # h11 keeps to Content-Length; in case
                    return await refuse(413, TOO_LARGE)
            return message

        async def guarded_send(message: dict) -> None:
            if state["answered"]:
                return  # the guard has answered this request already
            state["response"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["answered"]:
                raise  # a bug: uvicorn logs it and answers 500


def clean_name(filename: str | None) -> str:
    """An upload's file name made safe to echo in one line of a message."""
    name = "".join(c if c.isprintable() else "?" for c in (filename or "upload"))
    return name[:MAX_NAME] + ("…" if len(name) > MAX_NAME else "")


def create_app(predictor: Predictor, name: str) -> Any:
    """The FastAPI app: GET / is the page, POST /predict classifies one uploaded image."""
    require_serve_packages()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    # Warnings filters are global and the decode threads would race over catch_warnings:
    # in a server, Pillow's notes (odd EXIF, big images) are never shown.
    warnings.filterwarnings("ignore", module=r"PIL\.")
    # The multipart parser logs every malformed body it sees: the 400 says it already.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    app = FastAPI(title="nin", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard)
    slots = asyncio.Semaphore(DECODE_SLOTS)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        """The demo page."""
        return render_page(predictor, name)

    @app.post("/predict")
    async def classify(request: Request) -> JSONResponse:
        """Top 5 classes of one uploaded image, or a 4xx/503 with a readable message."""
        status, body = await answer(request, predictor, slots)
        return JSONResponse(body, status_code=status)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers (the model was checked when it loaded)."""
        return {"status": "ok"}

    about = info(predictor, name)

    @app.get("/info")
    def served() -> dict[str, Any]:
        """What is served: the model, its classes, its input size, nin's version."""
        return about

    return app


def info(predictor: Predictor, name: str) -> dict[str, Any]:
    """What GET /info answers: the name served, the model and what it was trained on, its
    classes, the input it takes (channels, height, width) and nin's version."""
    config = predictor.config
    return {
        "name": Path(name).name or name,  # a run directory's name, not where it lies
        "model": config["model"],
        "data": data_name(config),
        "classes": list(predictor.classes),
        "input": {"channels": predictor.in_channels, "height": predictor.size[0],
                  "width": predictor.size[1]},
        "version": __version__,
    }  # fmt: skip


async def answer(
    request: Any, predictor: Predictor, slots: asyncio.Semaphore
) -> tuple[int, dict[str, Any]]:
    """The status and JSON of one POST /predict: the top classes, or {"detail": why not}."""
    import anyio
    from starlette.datastructures import UploadFile  # what request.form() gives
    from starlette.requests import ClientDisconnect

    try:
        # One file and a few fields: the parser spools the file (1 MiB in memory at most).
        async with request.form(max_files=1, max_fields=8, max_part_size=64 * 1024) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return 400, {"detail": "send one image as the form field 'file'"}
            label = clean_name(upload.filename)
            try:
                await asyncio.wait_for(slots.acquire(), QUEUE_TIMEOUT)
            except asyncio.TimeoutError:
                return 503, {"detail": "the server is busy with other images; try again"}
            try:
                data = await upload.read(MAX_BYTES + 1)
                if len(data) > MAX_BYTES:
                    return 413, {"detail": TOO_LARGE}
                # The model and Pillow run in a thread, so they never block the loop.
                return 200, await anyio.to_thread.run_sync(classify_upload, predictor, data, label)
            finally:
                slots.release()
    except ClientDisconnect:  # the guard cut the body, or the client left
        return 400, {"detail": "the upload was cut short"}
    except NinError as e:
        return STATUS.get(type(e), 400), {"detail": str(e)}
    except MemoryError:
        return 503, {"detail": "the server ran out of memory for this image; try a smaller one"}


def classify_upload(predictor: Predictor, data: bytes, label: str) -> dict[str, Any]:
    """Decode, check and classify one upload (in a worker thread), with the model's input."""
    image = read_image(data, label, max_pixels=MAX_PIXELS, shrink_to=predictor.decode_side)
    pixels, inverted = predictor.to_uint8(image)
    result = predictor.top(predictor.probabilities(pixels[None])[0], TOP_K, label, inverted)
    return {**result.as_dict(), "input_png": data_uri(image_png(pixels))}


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (IPv4 or IPv6), or one line saying why it cannot be."""
    if not 0 < port < 65536:
        raise NinError(f"--port must be in 1..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        message = f"--host {host}: not an address or name this machine knows ({reason})"
        raise NinError(message) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        reasons = {
            errno.EADDRINUSE: f"port {port} is in use on {host}; pick another --port",
            errno.EACCES: f"cannot listen on port {port} (permission denied: ports below 1024 "
            "need privileges); pick another --port",
            errno.EADDRNOTAVAIL: f"--host {host} is not an address of this machine; use "
            "127.0.0.1, ::1, 0.0.0.0 (every IPv4 address) or :: (every address)",
        }
        reason = reasons.get(e.errno, f"cannot listen on {host}:{port} ({e.strerror or e})")
        raise NinError(reason) from None
    sock.set_inheritable(True)
    return sock


def url_of(host: str, port: int) -> str:
    """http://host:port/, with an IPv6 address in brackets."""
    # Only an IPv6 address has a colon: a name with one would not have been bound.
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class HeadDeadline:
    """For uvicorn's h11 protocol: closes a connection whose request head does not arrive
    within HEAD_TIMEOUT, answering 408, and the oldest waiting one of an address that holds
    over HEADS_PER_CLIENT or of a server about to be full (mixed in by `head_timeout_protocol`,
    which gives each server its own `waiting`)."""

    head_timer: asyncio.TimerHandle | None = None
    since = 0.0  # when the clock started
    waiting: dict  # every connection waiting for a head, oldest first (a dict as ordered set)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the clock for the first head."""
        super().connection_made(transport)  # type: ignore[misc]
        self.arm()

    def data_received(self, data: bytes) -> None:
        """Stop the clock once a head is complete (a request is running)."""
        super().data_received(data)  # type: ignore[misc]
        if self.in_request():
            self.disarm()

    def on_response_complete(self) -> None:
        """Start the clock for the next head, unless a pipelined one already came."""
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and not self.in_request():
            self.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """No clock for a closed connection."""
        self.disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def in_request(self) -> bool:
        """Whether a request's head has come and its response has not ended."""
        return self.cycle is not None and not self.cycle.response_complete

    def arm(self) -> None:
        """Start (or restart) the clock for a head, and make room (`make_room`)."""
        self.disarm()
        self.head_timer = self.loop.call_later(HEAD_TIMEOUT, self.head_timed_out)
        self.since, self.waiting[self] = time.monotonic(), None
        self.make_room()

    def make_room(self) -> None:
        """Close, oldest first, connections that have waited over HEAD_GRACE for a head: this
        address's beyond HEADS_PER_CLIENT, then as many as let this one in under
        MAX_CONNECTIONS (uvicorn answers 503 at the limit)."""
        now = time.monotonic()
        stale = [c for c in self.waiting if now - c.since > HEAD_GRACE]
        mine = [c for c in stale if (c.client or ("",))[0] == (self.client or ("",))[0]]
        for c in mine[: max(0, len(mine) - HEADS_PER_CLIENT)]:
            c.head_timed_out(f"over {HEADS_PER_CLIENT} connections from one address wait")
        live = sum(not c.transport.is_closing() for c in self.connections)
        stale = [c for c in stale if not c.transport.is_closing()]
        for c in stale[: max(0, live - MAX_CONNECTIONS + 1)]:
            c.head_timed_out("the server is full and this connection waited longest")

    def disarm(self) -> None:
        """Stop the clock."""
        self.waiting.pop(self, None)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self, why: str = "") -> None:
        """Answer 408 and close, unless a request got going meanwhile."""
        self.disarm()
        if self.transport.is_closing() or self.in_request():
            return
        why = why or f"the request head took over {HEAD_TIMEOUT:g} s"
        log_request(self.client, "-", 408, self.since)
        # Written by hand: h11 cannot send a response to a request it has not parsed.
        body = json.dumps({"detail": f"{why}; send it again"}).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


def head_timeout_protocol() -> type:
    """uvicorn's h11 protocol with a deadline on each request head, answered with a 408."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return type("HeadTimeoutProtocol", (HeadDeadline, H11Protocol), {"waiting": {}})


def serve(predictor: Predictor, name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the page until Ctrl+C."""
    import uvicorn

    app = create_app(predictor, name)
    sock = listening_socket(host, port)
    config = uvicorn.Config(
        app,
        log_level="warning",
        http=head_timeout_protocol(),
        ws="none",  # the page needs no WebSocket
        lifespan="off",
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=KEEP_ALIVE,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        server_header=False,
    )
    print(f"nin: serving {name} at {url_of(host, port)} (Ctrl+C to stop)", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


def render_page(predictor: Predictor, name: str) -> str:
    """The demo page: upload or draw, then the top classes with probabilities."""
    config = predictor.config
    about = (
        f"{config['model']} trained on {config['dataset']} ({len(predictor.classes)} classes: "
        f"{', '.join(predictor.classes)})"
    )
    note = (
        f"{config['dataset']} images are light on a black background: pictures with a light "
        "background are inverted for the model; "
        if config.get("in_channels") == 1
        else ""
    )
    page = (resources.files("nin") / "templates" / "serve.html").read_text(encoding="utf-8")
    page = page.replace("{{NAME}}", html.escape(name)).replace("{{ABOUT}}", html.escape(about))
    page = page.replace("{{MAX_BYTES}}", str(MAX_BYTES))
    page = page.replace("{{MAX_MIB}}", str(MAX_BYTES // 2**20))
    return page.replace("{{NOTE}}", html.escape(note))
