"""Serve: a local web page where a person uploads or draws an image and sees the top classes.

One plain HTML page (inline script and style, no frontend build) and one JSON endpoint,
POST /predict, on FastAPI + uvicorn. Bad uploads get 400 (not an image) or 413 (too large)
with a readable message that the page shows; the model is never asked about them.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at
# run time, and those name classes imported inside create_app.
import html
import socket
from importlib import resources
from typing import Any

from nin import predict
from nin.errors import NinError
from nin.files import data_uri, image_png
from nin.predict import Predictor

TOP_K = 5
EXTRA_FORM_BYTES = 64 * 1024  # multipart headers and boundaries around the file itself


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


def create_app(predictor: Predictor, name: str) -> Any:
    """The FastAPI app: GET / is the page, POST /predict classifies one uploaded image."""
    require_serve_packages()
    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="nin", docs_url=None, redoc_url=None, openapi_url=None)
    too_large = f"the image is over the {predict.MAX_BYTES // 2**20} MiB limit; give a smaller one"

    @app.middleware("http")
    async def refuse_huge_bodies(request: Request, call_next):
        """Refuse a body too large, or of no declared size, before anything reads it."""
        # Before the multipart parser spools the body anywhere: the declared size is enough.
        declared = request.headers.get("content-length", "")
        if request.method == "POST" and not declared.isdigit():
            # A chunked body has no declared size and would be spooled whole: refuse it.
            message = "send the upload with a Content-Length (as browsers do)"
            return JSONResponse({"detail": message}, status_code=411)
        if declared.isdigit() and int(declared) > predict.MAX_BYTES + EXTRA_FORM_BYTES:
            return JSONResponse({"detail": too_large}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def missing_file(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A request without the form field: 400 with what to send, not FastAPI's 422."""
        return JSONResponse({"detail": "send one image as the form field 'file'"}, 400)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        """The demo page."""
        return render_page(predictor, name)

    @app.post("/predict")
    def classify(file: UploadFile = File(...)) -> JSONResponse:  # noqa: B008 (FastAPI's way)
        """Top 5 classes of one uploaded image, or 400/413 with a readable message."""
        # A plain def: FastAPI runs it in a worker thread, so the model never blocks the loop.
        data = file.file.read(predict.MAX_BYTES + 1)
        if len(data) > predict.MAX_BYTES:
            return JSONResponse({"detail": too_large}, status_code=413)
        label = file.filename or "upload"
        try:
            image = predict.read_image(data, label)
            pixels, inverted = predictor.to_uint8(image)
            probs = predictor.probabilities(pixels[None])[0]
            result = predictor.top(probs, TOP_K, label, inverted)
        except NinError as e:
            return JSONResponse({"detail": str(e)}, status_code=400)
        return JSONResponse({**result.as_dict(), "input_png": data_uri(image_png(pixels))})

    return app


def check_port(host: str, port: int) -> None:
    """Fail with one line, before uvicorn starts, if the port cannot be used."""
    if not 0 < port < 65536:
        raise NinError(f"--port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise NinError(
                f"cannot listen on {host}:{port} ({e.strerror}); pick another --port"
            ) from None


def serve(predictor: Predictor, name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the page until Ctrl+C."""
    import uvicorn

    app = create_app(predictor, name)
    check_port(host, port)
    print(f"nin: serving {name} at http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


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
    return page.replace("{{NOTE}}", html.escape(note))
