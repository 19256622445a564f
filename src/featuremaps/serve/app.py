"""The viewer's app factory: middleware, error handlers and the routers; ``run_server``.

Example:
    >>> from fastapi.testclient import TestClient
    >>> client = TestClient(create_app(), base_url="http://127.0.0.1:8000")
    >>> client.get("/api/config").status_code
    200
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import FeatureMapsError
from ..images import SAMPLES
from ..options import Norm, Order, Scale
from .config import (
    CMAPS,
    DEFAULT_IMAGE_BYTES,
    DEFAULT_MAX_DECODES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD,
    ServerConfig,
)
from .deps import ServerState, State
from .errors import ApiError
from .guard import Guard, GuardMiddleware
from .routers import ROUTERS
from .schemas import ConfigOut, ModelOut
from .upload import MULTIPART_SLACK
from .visualize import DEFAULT_SIZE, DEFAULT_STEPS

log = logging.getLogger("featuremaps.serve")

CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def create_app(
    allow_code_models: bool = False,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decodes: int = DEFAULT_MAX_DECODES,
    image_bytes: int = DEFAULT_IMAGE_BYTES,
    cache_entries: int = 8,
    cache_bytes: int = 1 << 30,
    device: str = "cpu",
    guard: Guard | None = None,
) -> FastAPI:
    """Build the viewer's FastAPI application.

    Args:
        allow_code_models: accept model specs that run code (``package.module:factory``,
            TorchScript files). Off by default: anyone who can reach the page could
            otherwise run code on this machine.
        max_upload_bytes: largest upload in bytes (larger ones get 413).
        max_pixels: largest image in pixels (larger ones get 413).
        max_decodes: uploads decoded at once (more get 503 with ``Retry-After``).
        image_bytes: memory for decoded images; a larger one is refused before decoding.
        cache_entries: captures kept in memory (LRU).
        cache_bytes: total size of kept activations (LRU).
        device: where models run (``cpu``, ``cuda``, ``mps``).
        guard: who may talk to the server (:class:`~featuremaps.serve.guard.Guard`);
            by default loopback names only, no token.

    Returns:
        The app; ``app.state.engine`` holds the server's state
        (:class:`~featuremaps.serve.deps.ServerState`).

    Raises:
        FeatureMapsError: a limit below one.
    """
    config = ServerConfig(
        allow_code_models=allow_code_models,
        max_upload_bytes=max_upload_bytes,
        max_pixels=max_pixels,
        max_decodes=max_decodes,
        image_bytes=image_bytes,
        cache_entries=cache_entries,
        cache_bytes=cache_bytes,
        device=device,
    )
    state = ServerState.create(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # list the models (seconds of torchvision imports) before the first request, so
        # that the page's first /api/config answers at once
        await run_in_threadpool(state.catalog.pretrained)
        yield
        state.close()

    app = FastAPI(
        title="featuremaps viewer",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.engine = state
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(FeatureMapsError, _user_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.middleware("http")(_limits_and_headers)
    app.add_middleware(GuardMiddleware, guard=guard or Guard())
    for router in ROUTERS:
        app.include_router(router)
    app.add_api_route("/api/config", config_route, methods=["GET"])
    return app


def config_route(state: State) -> ConfigOut:
    """``GET /api/config``: what the page offers."""
    pretrained = state.catalog.pretrained()
    return ConfigOut(
        models=[ModelOut(name=n, pretrained=p) for n, p in pretrained.items()],
        default_model=state.catalog.names()[0],
        samples=list(SAMPLES),
        cmaps=list(CMAPS),
        norms=[m.value for m in Norm],
        orders=[m.value for m in Order],
        order_labels={m.value: m.describe() for m in Order},
        scales=[m.value for m in Scale],
        allow_code_models=state.config.allow_code_models,
        max_upload_bytes=state.config.max_upload_bytes,
        visualize_steps=DEFAULT_STEPS,
        visualize_size=DEFAULT_SIZE,
    )


async def _limits_and_headers(request: Request, call_next: Any) -> Any:
    """Refuse a declared body over the limit before reading it; add security headers."""
    config: ServerConfig = request.app.state.engine.config
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > config.max_upload_bytes + MULTIPART_SLACK:
        return JSONResponse({"detail": config.too_large()}, 413)
    response = await call_next(request)
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)


async def _user_error(request: Request, exc: FeatureMapsError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=400)


async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 with one line per wrong value: its name, what was given and what is valid."""
    lines = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body")]
        name = ".".join(loc) or "request"
        given = e.get("input")
        shown = f" {given!r}" if isinstance(given, str | int | float) else ""
        lines.append(f"{name}{shown}: {e.get('msg', 'invalid')}")
    return JSONResponse({"detail": "; ".join(lines)}, status_code=400)


def run_server(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allow_code_models: bool = False,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_decodes: int = DEFAULT_MAX_DECODES,
    device: str = "cpu",
    log_level: str = "info",
    allow_hosts: Sequence[str] = (),
    guard: Guard | None = None,
) -> None:
    """Serve the viewer with uvicorn until interrupted.

    Args:
        host: address to bind; anything but loopback makes the viewer reachable from
            other machines (then a token is required unless ``allow_hosts`` names them).
        port: TCP port.
        allow_code_models: accept model specs that run code.
        max_upload_bytes: largest upload.
        max_decodes: uploads decoded at once (more get 503 with ``Retry-After``).
        device: where models run.
        log_level: uvicorn's log level.
        allow_hosts: ``Host`` names accepted beside the loopback ones.
        guard: the access rules (by default :meth:`Guard.for_bind` of the above; pass
            one to print its token before the server starts).
    """
    import uvicorn

    bind = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    guard = guard or Guard.for_bind(bind, port, allow_hosts)
    app = create_app(
        allow_code_models, max_upload_bytes, max_decodes=max_decodes, device=device, guard=guard
    )
    uvicorn.run(app, host=bind, port=port, log_level=log_level)
