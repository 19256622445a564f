"""A local web app to explore the layers of a model on an image (``featuremaps serve``).

The page (plain HTML and JavaScript shipped in the package, nothing from a CDN) lets you
pick a model and an image, lists the layers with their shapes, and shows a channel grid,
an enlarged channel with its colorbar and an overlay on the input, and the PCA picture
of each layer; for an ImageNet classifier, the relevance of each channel to a class
(picked from the top-5 or searched) with Grad-CAM and LayerCAM overlays and a grid
ordered by relevance; and, per channel, a feature visualization made by optimization.
The server answers with PNG pictures drawn by :mod:`featuremaps.render`.

Layout: ``app`` (factory, middleware, error handlers), ``guard`` (Host, token and Origin
checks), ``deps`` (state reached through ``Depends``), ``routers/`` (pages, images,
captures, pictures, relevance, visualize), ``schemas`` (JSON in and out), ``stores``
(images, models, captures), ``jobs`` (the job board and background captures),
``relevance`` (relevance jobs and per-layer scores), ``visualize`` (visualization jobs,
one at a time), ``upload`` (bounded reading and decoding), ``config`` (limits and the
model-spec policy).

Safety: the server binds to 127.0.0.1 by default and accepts only loopback ``Host``
headers (against DNS rebinding) and same-origin requests; a bind beyond loopback keeps
those checks and adds an access token. Uploads are size-, pixel- and memory-limited,
decoded a few at a time, and must decode as JPEG, PNG, WebP, BMP, TIFF or GIF; they live
in memory under their content hash and no request value is ever used as a file path;
model specs that run code are refused unless the server was started with
``allow_code_models=True``.

Example:
    >>> app = create_app()  # then: uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

from typing import Any

from ..errors import FeatureMapsError
from .config import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD, ServerConfig
from .errors import ApiError
from .guard import Guard, is_loopback
from .stores import LRU
from .upload import decode_image

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised without the extra only
    _missing = str(_exc)

    def _require(*args: Any, **kwargs: Any) -> Any:
        raise FeatureMapsError(
            f"the viewer needs FastAPI and uvicorn ({_missing}): pip install 'featuremaps[serve]'"
        )

    create_app = run_server = _require
else:
    from .app import create_app, run_server

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD",
    "LRU",
    "ApiError",
    "Guard",
    "ServerConfig",
    "create_app",
    "decode_image",
    "is_loopback",
    "run_server",
]
