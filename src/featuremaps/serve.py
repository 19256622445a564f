"""A local web app to explore the layers of a model on an image (``featuremaps serve``).

The page (plain HTML and JavaScript shipped in the package, nothing from a CDN) lets you
pick a model and an image, lists the layers with their shapes, and shows a channel grid,
an enlarged channel with its colorbar and an overlay on the input, and the PCA picture
of each layer. The server answers with PNG pictures drawn by :mod:`featuremaps.render`.

Activations are computed once per (model, weights, image) and kept in a bounded LRU
cache; a layer that is not cached yet is captured on first use. A capture runs as a job
whose progress the page polls.

Safety: the server binds to 127.0.0.1 by default and accepts only loopback ``Host``
headers (against DNS rebinding); uploads are size- and pixel-limited and must decode
as JPEG, PNG, WebP, BMP, TIFF or GIF; uploads live in memory under their content hash
and no request value is ever used as a file path; model specs that run code
(``package.module:factory``, TorchScript files) are refused unless the server was
started with ``allow_code_models=True``.

Example:
    >>> app = create_app()  # then: uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .capture import LayerInfo, capture, list_layers, resolve_layers
from .errors import FeatureMapsError, LayerError, suggest
from .images import SAMPLES, preprocess, sample_image, to_rgb
from .models import LoadedModel, available_models, load_model
from .pipeline import predictions_note, top_predictions
from .reduce import (
    Norm,
    Scaling,
    _symlog,
    apply_scaling,
    channel_stats,
    compute_scaling,
    pca_rgb,
)
from .render import colorize, colormap_lut, overlay, pca_picture, render_grid, upsample
from .report import asset

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.middleware.trustedhost import TrustedHostMiddleware
except ImportError as _exc:  # pragma: no cover - exercised without the extra only
    _MISSING: ImportError | None = _exc
    BaseModel = object  # type: ignore[assignment,misc]

    def Field(*args: Any, **kwargs: Any) -> Any:  # type: ignore[no-redef]
        return None
else:
    _MISSING = None

log = logging.getLogger("featuremaps.serve")

DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
"""Largest accepted upload in bytes."""
DEFAULT_MAX_PIXELS = 40_000_000
"""Largest accepted image in pixels (width times height)."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
"""Formats an upload may have; others (EPS, PDF, ...) are never opened."""
WEIGHTS = {"default": "DEFAULT", "none": "none"}
CMAPS = ("viridis", "magma", "inferno", "plasma", "cividis", "gray", "RdBu_r", "coolwarm", "jet")
_MULTIPART_SLACK = 64 * 1024
_TIMM_NAME = re.compile(r"timm:[A-Za-z0-9_.\-]{1,120}")
_CODE_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit", ".py")


def _require() -> None:
    if _MISSING is not None:
        raise FeatureMapsError(
            f"the viewer needs FastAPI and uvicorn ({_MISSING}): pip install 'featuremaps[serve]'"
        )


class ApiError(Exception):
    """An error answered with an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- bounded caches --------------------------------------------------------------------------

V = TypeVar("V")


class LRU(Generic[V]):
    """A thread-safe LRU map bounded by item count and by total size.

    The most recently added item is never evicted, so one item larger than the byte
    bound still fits (alone).
    """

    def __init__(
        self, max_items: int, max_bytes: int | None = None, size: Callable[[V], int] | None = None
    ) -> None:
        if max_items < 1:
            raise FeatureMapsError("a cache holds at least one item")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size = size or (lambda v: 0)
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._evict()

    def refresh(self) -> None:
        """Evict again after an item grew."""
        with self._lock:
            self._evict()

    def _evict(self) -> None:
        while len(self._items) > 1 and (
            len(self._items) > self.max_items
            or (self.max_bytes is not None and self.nbytes() > self.max_bytes)
        ):
            self._items.popitem(last=False)

    def nbytes(self) -> int:
        return sum(self._size(v) for v in self._items.values())

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


# -- state ------------------------------------------------------------------------------------


@dataclass
class Job:
    """A capture running in the background; the page polls it for progress."""

    id: str
    capture_id: str
    status: str = "queued"  # queued, running, done, error
    phase: str = "waiting for the previous capture"
    step: int = 0
    steps: int = 4
    message: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def advance(self, phase: str, step: int) -> None:
        self.status, self.phase, self.step = "running", phase, step

    def to_dict(self) -> dict[str, Any]:
        end = self.finished if self.finished is not None else time.monotonic()
        return {
            "job_id": self.id,
            "capture_id": self.capture_id,
            "status": self.status,
            "phase": self.phase,
            "step": self.step,
            "steps": self.steps,
            "message": self.message,
            "elapsed": round(end - self.started, 2),
        }


@dataclass
class CaptureEntry:
    """The activations of one (model, weights, image), with what the page shows of it."""

    id: str
    spec: str
    weights: str
    image_id: str
    weights_desc: str
    pretrained: bool
    preprocess: str
    x: torch.Tensor
    display: np.ndarray
    layers: list[LayerInfo]
    stages: list[str]
    predictions: list[dict[str, Any]] | None
    classifier: bool = False
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    pngs: dict[tuple[Any, ...], tuple[bytes, str]] = field(default_factory=dict)

    @property
    def layer_names(self) -> dict[str, LayerInfo]:
        return {info.name: info for info in self.layers}

    def nbytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in self.maps.values())
        pngs = sum(len(data) + len(note) for data, note in self.pngs.values())
        return tensors + self.x.numel() * 4 + self.display.nbytes + pngs

    def keep(self, key: tuple[Any, ...], data: bytes, note: str = "") -> None:
        """Remember a rendered picture (and its metadata); the oldest go past 48."""
        self.pngs[key] = (data, note)
        while len(self.pngs) > 48:
            self.pngs.pop(next(iter(self.pngs)))


def _capture_id(spec: str, weights: str, image_id: str) -> str:
    return hashlib.sha256(f"{spec}\0{weights}\0{image_id}".encode()).hexdigest()[:20]


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode uploaded bytes as an RGB image, refusing other formats and huge pictures.

    Raises:
        ApiError: 413 when too many pixels, 415 when the bytes are not an image of an
            accepted format.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            if img.width * img.height > max_pixels:
                raise ApiError(
                    413,
                    f"image is {img.width}×{img.height} pixels; the limit is "
                    f"{max_pixels / 1e6:.0f} megapixels. Downscale it first.",
                )
            img.load()
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, f"image too large to decode safely ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(
            415,
            "the upload is not a readable image (accepted: JPEG, PNG, WebP, BMP, TIFF, GIF)",
        ) from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not stop us; orientation is then as stored
        pass
    return to_rgb(img)


def _has_cached_weights(name: str) -> bool:
    """Whether torchvision's pretrained weights of ``name`` are on disk already."""
    from torch.hub import get_dir
    from torchvision.models import get_model_weights

    try:
        url = get_model_weights(name).DEFAULT.url
    except Exception:
        return False
    return (Path(get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


def _ticks(s: Scaling, n: int = 5) -> list[float]:
    """Values at evenly spaced points of the colour scale of the first channel."""
    lo, hi = float(s.vmin[0]), float(s.vmax[0])
    fr = np.linspace(0.0, 1.0, n)
    if s.norm == "log" and lo > 0 and hi > 0:
        vals = 10.0 ** (np.log10(lo) + fr * (np.log10(hi) - np.log10(lo)))
    elif s.norm == "symlog":
        lin = float(s.linthresh[0])
        y0, y1 = _symlog(np.array([lo, hi]), lin)
        y = y0 + fr * (y1 - y0)
        vals = np.sign(y) * lin * (10.0 ** np.abs(y) - 1.0)
    else:
        vals = lo + fr * (hi - lo)
    return [float(f"{v:.6g}") for v in vals]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Engine:
    """Models, uploads, captures and jobs of one server, each in a bounded cache.

    Args:
        allow_code_models: accept ``package.module:factory`` and TorchScript specs.
        max_upload_bytes: largest upload.
        max_pixels: largest image in pixels.
        cache_entries: captures kept (one per model, weights and image).
        cache_bytes: total size of the kept activations.
        model_cache: loaded models kept.
        device: where models run.
    """

    def __init__(
        self,
        *,
        allow_code_models: bool = False,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache_entries: int = 8,
        cache_bytes: int = 1 << 30,
        model_cache: int = 2,
        device: str = "cpu",
    ) -> None:
        self.allow_code_models = allow_code_models
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.device = torch.device(device)
        self.images: LRU[Image.Image] = LRU(32, 256 << 20, lambda im: im.width * im.height * 3)
        self.captures: LRU[CaptureEntry] = LRU(cache_entries, cache_bytes, CaptureEntry.nbytes)
        self.models: LRU[LoadedModel] = LRU(model_cache)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self._jobs_lock = threading.Lock()
        self._models_lock = threading.Lock()
        self._compute = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featuremaps-job")
        self._model_names: list[str] | None = None
        self._pretrained: dict[str, bool] | None = None

    # -- configuration --------------------------------------------------------------------

    def model_names(self) -> list[str]:
        if self._model_names is None:
            self._model_names = available_models()
        return self._model_names

    def config(self) -> dict[str, Any]:
        if self._pretrained is None:
            names = self.model_names()
            self._pretrained = {n: n == names[0] or _has_cached_weights(n) for n in names}
        return {
            "models": [{"name": n, "pretrained": p} for n, p in self._pretrained.items()],
            "default_model": self.model_names()[0],
            "samples": list(SAMPLES),
            "cmaps": list(CMAPS),
            "norms": ["linear", "log", "symlog"],
            "orders": ["index", "top"],
            "scales": ["channel", "layer"],
            "allow_code_models": self.allow_code_models,
            "max_upload_bytes": self.max_upload_bytes,
        }

    def check_spec(self, spec: str, weights: str) -> tuple[str, str]:
        """Validate a model spec and weights from a request; return them normalized.

        Raises:
            ApiError: 403 for code specs when they are not allowed, 400 otherwise.
        """
        spec = spec.strip()
        w = WEIGHTS.get(weights.strip().lower())
        if w is None:
            raise ApiError(
                400,
                f"weights {weights!r}: the viewer takes DEFAULT (pretrained) or none "
                "(random); weight files are not read from requests",
            )
        if spec in self.model_names() or _TIMM_NAME.fullmatch(spec):
            return spec, w
        runs_code = (
            ":" in spec or "/" in spec or "\\" in spec or spec.lower().endswith(_CODE_SUFFIXES)
        )
        if runs_code:
            if not self.allow_code_models:
                raise ApiError(
                    403,
                    f"model spec {spec!r} runs code (package.module:factory or a TorchScript "
                    "file); this server refuses such specs. Start it with "
                    "`featuremaps serve --allow-code-models` to allow them.",
                )
            return spec, w
        raise ApiError(
            400,
            f"unknown model {spec!r}.{suggest(spec, self.model_names())} Choose a name from "
            "the list, or timm:NAME.",
        )

    # -- images ---------------------------------------------------------------------------

    def add_image(self, data: bytes) -> dict[str, Any]:
        """Decode and keep an uploaded image under its content hash."""
        if not data:
            raise ApiError(400, "empty upload: send the image file")
        if len(data) > self.max_upload_bytes:
            raise ApiError(413, self.too_large())
        image_id = hashlib.sha256(data).hexdigest()[:24]
        img = self.images.get(image_id)
        if img is None:
            img = decode_image(data, self.max_pixels)
            self.images.put(image_id, img)
        return {"image_id": image_id, "width": img.width, "height": img.height}

    def too_large(self) -> str:
        return f"upload too large: the limit is {self.max_upload_bytes / 1e6:.1f} MB"

    def add_sample(self, name: str) -> dict[str, Any]:
        if name not in SAMPLES:
            raise ApiError(404, f"no sample {name!r}; samples: {', '.join(SAMPLES)}")
        return self.add_image(sample_image(name).read_bytes())

    def image(self, image_id: str) -> Image.Image:
        img = self.images.get(image_id)
        if img is None:
            raise ApiError(
                404, "image not found (uploads are kept for a while only); upload it again"
            )
        return img

    # -- models and captures --------------------------------------------------------------

    def model(self, spec: str, weights: str) -> LoadedModel:
        key = f"{spec}\0{weights}"
        with self._models_lock:
            loaded = self.models.get(key)
            if loaded is None:
                loaded = load_model(spec, weights)
                loaded.module.to(self.device)
                self.models.put(key, loaded)
            return loaded

    def start_capture(self, spec: str, weights: str, image_id: str) -> Job:
        """Queue a capture (or return the finished or running one for the same input)."""
        spec, weights = self.check_spec(spec, weights)
        img = self.image(image_id)
        cid = _capture_id(spec, weights, image_id)
        with self._jobs_lock:
            for job in self.jobs.values():
                if job.capture_id == cid and job.status in ("queued", "running"):
                    return job
            job = Job(uuid.uuid4().hex[:16], cid)
            self.jobs[job.id] = job
            while len(self.jobs) > 200:
                self.jobs.popitem(last=False)
        if self.captures.get(cid) is not None:
            job.status, job.phase, job.step = "done", "cached", job.steps
            job.finished = time.monotonic()
            return job
        self._executor.submit(self._run, job, spec, weights, image_id, img)
        return job

    def job(self, job_id: str) -> Job:
        with self._jobs_lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}")
        return job

    def _run(self, job: Job, spec: str, weights: str, image_id: str, img: Image.Image) -> None:
        try:
            job.advance("loading the model", 1)
            loaded = self.model(spec, weights)
            job.advance("preprocessing the image", 2)
            x = preprocess(img, loaded.preprocess)[None].to(self.device)
            with self._compute:
                job.advance("listing the layers (one forward pass)", 3)
                probe = list_layers(loaded.module, x)
                spatial = [i for i in probe if i.shape is not None]
                if not spatial:
                    raise LayerError(f"{spec} has no layer with a spatial (B, C, H, W) output")
                try:
                    stages = resolve_layers(loaded.module, "stages", probe)
                except LayerError:
                    stages = [spatial[-1].name]
                job.advance("capturing the stages", 4)
                predict = loaded.is_imagenet_classifier and loaded.pretrained
                fm = capture(loaded.module, x, stages, full_forward=predict)
            preds = None
            if predict and isinstance(fm.output, torch.Tensor) and fm.output.ndim == 2:
                preds = top_predictions(fm.output[0], loaded.categories or [])
            entry = CaptureEntry(
                id=job.capture_id,
                spec=spec,
                weights=weights,
                image_id=image_id,
                weights_desc=loaded.weights,
                pretrained=loaded.pretrained,
                preprocess=loaded.preprocess.describe(),
                x=x.cpu(),
                display=_display(x, loaded),
                layers=spatial,
                stages=stages,
                predictions=preds,
                classifier=loaded.is_imagenet_classifier,
                maps={name: fm[name][0] for name in fm},
            )
            self.captures.put(entry.id, entry)
            job.status, job.phase, job.step = "done", "done", job.steps
        except FeatureMapsError as exc:
            job.status, job.message = "error", str(exc)
        except Exception as exc:
            log.exception("capture failed")
            job.status = "error"
            job.message = f"unexpected error: {exc.__class__.__name__}: {exc}"
        finally:
            job.finished = time.monotonic()

    def capture_entry(self, capture_id: str) -> CaptureEntry:
        entry = self.captures.get(capture_id)
        if entry is None:
            raise ApiError(404, "this capture is no longer cached; press Capture again")
        return entry

    def layer_map(self, entry: CaptureEntry, layer: str) -> torch.Tensor:
        """The ``(C, H, W)`` map of a layer, captured now if it was not yet."""
        t = entry.maps.get(layer)
        if t is not None:
            return t
        known = entry.layer_names
        if layer not in known:
            raise ApiError(404, f"unknown layer {layer!r}.{suggest(layer, known)}")
        loaded = self.model(entry.spec, entry.weights)
        with self._compute:
            fm = capture(loaded.module, entry.x.to(self.device), [layer])
        t = fm[layer][0]
        entry.maps[layer] = t
        self.captures.refresh()
        return t

    def layer_stats(self, entry: CaptureEntry, layer: str) -> dict[str, np.ndarray]:
        stats = entry.stats.get(layer)
        if stats is None:
            stats = channel_stats(self.layer_map(entry, layer))
            entry.stats[layer] = stats
        return stats

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _display(x: torch.Tensor, loaded: LoadedModel) -> np.ndarray:
    from .images import display_image

    return display_image(x[0].cpu(), loaded.preprocess)


# -- rendering helpers ------------------------------------------------------------------------


def _channel(t: torch.Tensor, channel: int) -> np.ndarray:
    c = int(t.shape[0])
    if not 0 <= channel < c:
        raise ApiError(404, f"channel {channel} out of range: this layer has {c} (0..{c - 1})")
    return t[channel].detach().to("cpu", torch.float32).numpy()[None]


def _scaled(m: np.ndarray, norm: str) -> tuple[np.ndarray, Scaling]:
    s = compute_scaling(m, _norm(norm), per_channel=True)
    return apply_scaling(m, s)[0], s


def _norm(norm: str) -> Norm:
    if norm not in ("linear", "log", "symlog"):
        raise ApiError(400, f"norm {norm!r}: use linear, log or symlog")
    return norm  # type: ignore[return-value]


def _cmap(cmap: str) -> str:
    try:
        colormap_lut(cmap)
    except FeatureMapsError as exc:
        raise ApiError(400, str(exc)) from exc
    return cmap


def _floats(a: np.ndarray) -> list[float | None]:
    return [float(f"{v:.6g}") if np.isfinite(v) else None for v in np.asarray(a, np.float64)]


# -- the app ----------------------------------------------------------------------------------

if _MISSING is None:

    class CaptureRequest(BaseModel):
        """Body of ``POST /api/captures``."""

        model: str = Field(min_length=1, max_length=300)
        weights: str = Field(default="DEFAULT", max_length=20)
        image_id: str = Field(min_length=1, max_length=64)


_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def create_app(
    allow_code_models: bool = False,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache_entries: int = 8,
    cache_bytes: int = 1 << 30,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    device: str = "cpu",
) -> FastAPI:
    """Build the viewer's FastAPI application.

    Args:
        allow_code_models: accept model specs that run code (``package.module:factory``,
            TorchScript files). Off by default: anyone who can reach the page could
            otherwise run code on this machine.
        max_upload_bytes: largest upload in bytes (larger ones get 413).
        max_pixels: largest image in pixels (larger ones get 413).
        cache_entries: captures kept in memory (LRU).
        cache_bytes: total size of kept activations (LRU).
        allowed_hosts: accepted ``Host`` header names (``"*"``: any).
        device: where models run (``cpu``, ``cuda``, ``mps``).

    Returns:
        The app; ``app.state.engine`` holds the caches.

    Raises:
        FeatureMapsError: FastAPI is not installed (extra ``featuremaps[serve]``).

    Example:
        >>> from fastapi.testclient import TestClient
        >>> client = TestClient(create_app(), base_url="http://127.0.0.1")
        >>> client.get("/api/config").status_code
        200
    """
    _require()
    engine = Engine(
        allow_code_models=allow_code_models,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        cache_entries=cache_entries,
        cache_bytes=cache_bytes,
        device=device,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(
        title="featuremaps viewer",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.engine = engine
    hosts = list(allowed_hosts)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    html_page = asset("templates/viewer.html")
    script = asset("static/viewer.js")
    style = asset("static/common.css") + asset("static/viewer.css")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(FeatureMapsError)
    async def _fm_error(request: Request, exc: FeatureMapsError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > engine.max_upload_bytes + _MULTIPART_SLACK:
            return JSONResponse({"detail": engine.too_large()}, 413)
        origin = request.headers.get("origin")
        if origin and request.method not in ("GET", "HEAD") and "*" not in hosts:
            host = re.sub(r"^[a-z]+://", "", origin).split("/")[0].rsplit(":", 1)[0]
            if host not in hosts:
                return JSONResponse({"detail": f"cross-origin request from {origin} refused"}, 403)
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", _CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # -- page and assets ---------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(html_page)

    @app.get("/static/viewer.js")
    def viewer_js() -> Response:
        return Response(script, media_type="text/javascript; charset=utf-8")

    @app.get("/static/viewer.css")
    def viewer_css() -> Response:
        return Response(style, media_type="text/css; charset=utf-8")

    # -- configuration and images ------------------------------------------------------

    @app.get("/api/config")
    def config() -> dict[str, Any]:
        return engine.config()

    @app.post("/api/images")
    async def upload(request: Request) -> JSONResponse:
        data = await _read_upload(request, engine)
        from starlette.concurrency import run_in_threadpool

        result = await run_in_threadpool(engine.add_image, data)
        return JSONResponse(result, status_code=201)

    @app.post("/api/samples/{name}")
    def sample(name: str) -> dict[str, Any]:
        return engine.add_sample(name)

    @app.get("/api/images/{image_id}/thumb.jpg")
    def thumb(image_id: str) -> Response:
        img = engine.image(image_id).copy()
        img.thumbnail((160, 160))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg")

    # -- captures ------------------------------------------------------------------------

    @app.post("/api/captures")
    def start(req: CaptureRequest) -> JSONResponse:
        job = engine.start_capture(req.model, req.weights, req.image_id)
        return JSONResponse(job.to_dict(), status_code=200 if job.status == "done" else 202)

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str) -> dict[str, Any]:
        return engine.job(job_id).to_dict()

    @app.get("/api/captures/{capture_id}")
    def summary(capture_id: str) -> dict[str, Any]:
        e = engine.capture_entry(capture_id)
        note = None
        if e.predictions is None:
            note = predictions_note(e.classifier, e.pretrained)
        stages = set(e.stages)
        return {
            "capture_id": e.id,
            "model": e.spec,
            "weights": e.weights_desc,
            "preprocess": e.preprocess,
            "input_size": [int(e.display.shape[0]), int(e.display.shape[1])],
            "predictions": e.predictions,
            "predictions_note": note,
            "stages": e.stages,
            "layers": [
                {
                    "name": i.name,
                    "type": i.module_type,
                    "shape": list(i.shape or ()),
                    "stride": list(i.stride) if i.stride else None,
                    "stage": i.name in stages,
                    "captured": i.name in e.maps,
                }
                for i in e.layers
            ],
        }

    @app.get("/api/captures/{capture_id}/input.png")
    def input_png(capture_id: str) -> Response:
        e = engine.capture_entry(capture_id)
        return _png_response(_png(Image.fromarray(e.display)))

    @app.get("/api/captures/{capture_id}/layer")
    def layer_info(capture_id: str, layer: str = Query(max_length=300)) -> dict[str, Any]:
        e = engine.capture_entry(capture_id)
        t = engine.layer_map(e, layer)
        stats = engine.layer_stats(e, layer)
        info = e.layer_names[layer]
        dead = stats["dead"]
        return {
            "name": layer,
            "type": info.module_type,
            "shape": list(t.shape),
            "stride": list(info.stride) if info.stride else None,
            "channels": int(t.shape[0]),
            "dead_count": int(dead.sum()),
            "dead_share": float(dead.mean()),
            "layer_min": float(stats["min"].min()),
            "layer_mean": float(stats["mean"].mean()),
            "layer_max": float(stats["max"].max()),
            "min": _floats(stats["min"]),
            "mean": _floats(stats["mean"]),
            "max": _floats(stats["max"]),
            "dead": [bool(v) for v in dead],
        }

    @app.get("/api/captures/{capture_id}/grid.png")
    def grid_png(
        capture_id: str,
        layer: str = Query(max_length=300),
        cmap: str = Query("viridis", max_length=40),
        norm: str = "linear",
        order: str = "index",
        scale: str = "channel",
        max_maps: int = Query(64, ge=1, le=256),
        map_size: int = Query(64, ge=8, le=256),
    ) -> Response:
        e = engine.capture_entry(capture_id)
        if order not in ("index", "top"):
            raise ApiError(400, f"order {order!r}: use index or top")
        if scale not in ("channel", "layer"):
            raise ApiError(400, f"scale {scale!r}: use channel or layer")
        key = ("grid", layer, cmap, norm, order, scale, max_maps, map_size)
        hit = e.pngs.get(key)
        if hit is None:
            t = engine.layer_map(e, layer)
            grid = render_grid(
                t,
                max_maps=max_maps,
                norm=_norm(norm),
                cmap=_cmap(cmap),
                order=order,
                scale=scale,
                labels=True,
                colorbar=False,
                map_size=map_size,
            )
            meta = {
                "layer": layer,
                "channels": grid.channels,
                "boxes": [list(b) for b in grid.boxes],
                "width": grid.image.width,
                "height": grid.image.height,
                "factor": grid.factor,
                "vmin": _floats(grid.scaling.vmin),
                "vmax": _floats(grid.scaling.vmax),
            }
            hit = (_png(grid.image), json.dumps(meta, separators=(",", ":")))
            e.keep(key, *hit)
            engine.captures.refresh()
        return _png_response(hit[0], {"X-Featuremaps-Grid": hit[1]})

    @app.get("/api/captures/{capture_id}/channel")
    def channel_info(
        capture_id: str,
        layer: str = Query(max_length=300),
        channel: int = Query(ge=0),
        norm: str = "linear",
    ) -> dict[str, Any]:
        e = engine.capture_entry(capture_id)
        m = _channel(engine.layer_map(e, layer), channel)
        s = compute_scaling(m, _norm(norm), per_channel=True)
        stats = engine.layer_stats(e, layer)
        return {
            "layer": layer,
            "channel": channel,
            "shape": list(m.shape[1:]),
            "min": float(stats["min"][channel]),
            "mean": float(stats["mean"][channel]),
            "max": float(stats["max"][channel]),
            "dead": bool(stats["dead"][channel]),
            "norm": s.norm,
            "vmin": float(s.vmin[0]),
            "vmax": float(s.vmax[0]),
            "ticks": _ticks(s),
        }

    @app.get("/api/captures/{capture_id}/channel.png")
    def channel_png(
        capture_id: str,
        layer: str = Query(max_length=300),
        channel: int = Query(ge=0),
        cmap: str = Query("viridis", max_length=40),
        norm: str = "linear",
        size: int = Query(448, ge=16, le=2048),
    ) -> Response:
        e = engine.capture_entry(capture_id)
        m = _channel(engine.layer_map(e, layer), channel)
        scaled, s = _scaled(m, norm)
        rgb = colorize(scaled, _cmap(cmap))
        factor = max(1, size // max(rgb.shape[:2]))
        headers = {
            "X-Featuremaps-Range": json.dumps({"vmin": float(s.vmin[0]), "vmax": float(s.vmax[0])})
        }
        return _png_response(_png(Image.fromarray(upsample(rgb, factor))), headers)

    @app.get("/api/captures/{capture_id}/overlay.png")
    def overlay_png(
        capture_id: str,
        layer: str = Query(max_length=300),
        channel: int = Query(ge=0),
        cmap: str = Query("viridis", max_length=40),
        norm: str = "linear",
        alpha: float = Query(0.55, ge=0.0, le=1.0),
    ) -> Response:
        e = engine.capture_entry(capture_id)
        m = _channel(engine.layer_map(e, layer), channel)
        scaled, _ = _scaled(m, norm)
        img = overlay(e.display, np.nan_to_num(scaled, nan=0.0), alpha=alpha, cmap=_cmap(cmap))
        return _png_response(_png(img))

    @app.get("/api/captures/{capture_id}/pca.png")
    def pca_png(
        capture_id: str,
        layer: str = Query(max_length=300),
        mode: str = "map",
        size: int = Query(448, ge=16, le=2048),
        alpha: float = Query(0.6, ge=0.0, le=1.0),
    ) -> Response:
        e = engine.capture_entry(capture_id)
        if mode not in ("map", "overlay"):
            raise ApiError(400, f"mode {mode!r}: use map or overlay")
        key = ("pca", layer, mode, size, alpha)
        hit = e.pngs.get(key)
        if hit is None:
            t = engine.layer_map(e, layer)
            rgb = pca_rgb(t, 3)
            img = pca_picture(rgb, size) if mode == "map" else overlay(e.display, rgb, alpha=alpha)
            hit = (_png(img), "")
            e.keep(key, *hit)
            engine.captures.refresh()
        return _png_response(hit[0])

    @app.get("/api/colorbar.png")
    def colorbar_png(cmap: str = Query("viridis", max_length=40)) -> Response:
        lut = colormap_lut(_cmap(cmap))
        return _png_response(_png(Image.fromarray(np.ascontiguousarray(lut[None, :, :]))))

    return app


def _png_response(data: bytes, headers: dict[str, str] | None = None) -> Response:
    h = {"Cache-Control": "private, max-age=600"}
    h.update(headers or {})
    return Response(data, media_type="image/png", headers=h)


async def _read_upload(request: Request, engine: Engine) -> bytes:
    """The uploaded file: the raw body, or the ``file`` field of a multipart form.

    The body is read in chunks and refused (413) as soon as it passes the limit, so a
    huge upload never sits in memory.
    """
    limit = engine.max_upload_bytes
    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    budget = limit + (_MULTIPART_SLACK if multipart else 0)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > budget:
        raise ApiError(413, engine.too_large())
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > budget:
            raise ApiError(413, engine.too_large())
        chunks.append(chunk)
    body = b"".join(chunks)
    if not multipart:
        return body

    async def replay() -> AsyncGenerator[bytes, None]:
        yield body
        yield b""

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise ApiError(400, f"malformed multipart upload: {exc.message}") from exc
    file = form.get("file")
    if file is None or isinstance(file, str):
        raise ApiError(400, "send the image as the form field 'file' (or as the raw body)")
    data = await file.read()
    await file.close()
    if len(data) > limit:
        raise ApiError(413, engine.too_large())
    return data


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allow_code_models: bool = False,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    device: str = "cpu",
    log_level: str = "info",
) -> None:
    """Serve the viewer with uvicorn until interrupted.

    Args:
        host: address to bind; anything but loopback makes the viewer reachable from
            other machines.
        port: TCP port.
        allow_code_models: accept model specs that run code.
        max_upload_bytes: largest upload.
        device: where models run.
        log_level: uvicorn's log level.

    Raises:
        FeatureMapsError: FastAPI/uvicorn are missing.
    """
    _require()
    import uvicorn

    hosts: list[str] = list(LOOPBACK_HOSTS)
    if host in ("0.0.0.0", "::", ""):
        hosts = ["*"]
    elif not is_loopback(host):
        hosts.append(host)
    app = create_app(allow_code_models, max_upload_bytes, allowed_hosts=hosts, device=device)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
