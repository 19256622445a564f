"""Small helpers that turn maps into PNG responses and colour-scale ticks."""

from __future__ import annotations

import io

import numpy as np
import torch
from fastapi.responses import Response
from PIL import Image

from ..reduce import Norm, Scaling, _symlog, apply_scaling, compute_scaling
from .errors import ApiError


def png(img: Image.Image) -> bytes:
    """PNG bytes of a picture (fast compression: pictures are drawn per request)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def png_response(data: bytes, headers: dict[str, str] | None = None) -> Response:
    h = {"Cache-Control": "private, max-age=600"}
    h.update(headers or {})
    return Response(data, media_type="image/png", headers=h)


def channel_map(t: torch.Tensor, channel: int) -> np.ndarray:
    """The ``(1, H, W)`` float32 map of one channel of a ``(C, H, W)`` layer.

    Raises:
        ApiError: 404 when the channel is out of range.
    """
    c = int(t.shape[0])
    if not 0 <= channel < c:
        raise ApiError(404, f"channel {channel} out of range: this layer has {c} (0..{c - 1})")
    return t[channel].detach().to("cpu", torch.float32).numpy()[None]


def scaled(m: np.ndarray, norm: Norm) -> tuple[np.ndarray, Scaling]:
    """One channel scaled to [0, 1] on its own, with its scaling."""
    s = compute_scaling(m, norm, per_channel=True)
    return apply_scaling(m, s)[0], s


def ticks(s: Scaling, n: int = 5) -> list[float]:
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
