"""Relevance to a class: start the job, per-layer numbers, CAM pictures, the label list."""

from __future__ import annotations

import json
from functools import cache
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from PIL import Image

from ...models import imagenet_categories
from ...options import check_cmap
from ...render import colorize, overlay, upsample
from ..deps import Entry, LayerName, State
from ..pictures import png, png_response
from ..schemas import (
    CamKind,
    JobOut,
    LabelsOut,
    RelevanceOut,
    RelevanceRequest,
    TargetOut,
    exact_floats,
    job_out,
)

router = APIRouter(prefix="/api")
ClassIndex = Annotated[int, Path(ge=0, le=100_000)]


def get_cam_cmap(cmap: Annotated[str, Query(max_length=40)] = "jet") -> str:
    """The CAM's colormap (``jet`` unless asked otherwise; 400 with suggestions)."""
    return check_cmap(cmap, "cmap")


CamCmap = Annotated[str, Depends(get_cam_cmap)]


@cache
def _labels() -> tuple[str, ...]:
    return tuple(imagenet_categories())


@router.get("/labels")
def labels() -> LabelsOut:
    """The 1000 ImageNet class names, by index (the class picker searches these)."""
    return LabelsOut(labels=list(_labels()))


@router.post("/captures/{capture_id}/relevance")
def start(e: Entry, req: RelevanceRequest, state: State, response: Response) -> JobOut:
    """Queue the relevance of a capture to a class: 202 while it runs, 200 when cached.

    The finished job's ``result_id`` is the class index (also for the top-1 target).
    """
    job = state.relevance.start(e, req.target, req.layer)
    response.status_code = 200 if job.status.finished else 202
    return job_out(job)


@router.get("/captures/{capture_id}/relevance/{index}")
def layer_relevance(e: Entry, state: State, index: ClassIndex, layer: LayerName) -> RelevanceOut:
    """One layer's per-channel relevance to class ``index``, unrounded, with its CAM range."""
    target, s = state.relevance.scores(e, index, layer)
    finite = s.channels[np.isfinite(s.channels)].astype(np.float64)
    return RelevanceOut(
        layer=layer,
        target=TargetOut(**target.to_dict()),
        channels=exact_floats(s.channels),
        order=list(s.order()),
        positive=float(finite[finite > 0].sum()),
        negative=float(finite[finite < 0].sum()),
        cam_shape=list(s.gradcam.shape),
        gradcam_max=_max(s.gradcam),
        layercam_max=_max(s.layercam),
    )


def _max(cam: np.ndarray) -> float | None:
    m = float(np.nanmax(cam)) if cam.size else float("nan")
    return m if np.isfinite(m) else None


def cam_scaled(cam: np.ndarray) -> tuple[np.ndarray, float]:
    """A CAM divided by its maximum: 0 at the bottom of the colormap, the max at the top.

    A CAM is non-negative (a ReLU); an all-zero one stays zero.
    """
    top = float(np.nanmax(cam)) if cam.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return np.zeros_like(cam, dtype=np.float32), 0.0
    return (cam.astype(np.float32) / np.float32(top)).clip(0, 1), top


@router.get("/captures/{capture_id}/relevance/{index}/cam.png")
def cam_png(
    e: Entry,
    state: State,
    index: ClassIndex,
    layer: LayerName,
    cmap: CamCmap,
    kind: CamKind = "gradcam",
    mode: Literal["overlay", "map"] = "overlay",
    alpha: Annotated[float, Query(ge=0.0, le=1.0)] = 0.5,
    size: Annotated[int, Query(ge=16, le=2048)] = 448,
) -> Response:
    """The Grad-CAM or LayerCAM map of a layer, scaled from 0 to its maximum.

    ``mode=map`` draws the map alone, enlarged by an integer factor (nearest);
    ``overlay`` blends it (bilinearly resized) over the model's input. The header
    ``X-Featuremaps-Range`` gives the values at both ends of the colormap.
    """
    _, s = state.relevance.scores(e, index, layer)
    values, top = cam_scaled(s.gradcam if kind == "gradcam" else s.layercam)
    if mode == "map":
        rgb = colorize(values, cmap)
        img = Image.fromarray(upsample(rgb, max(1, size // max(rgb.shape[:2]))))
    else:
        img = overlay(e.display, values, alpha=alpha, cmap=cmap)
    headers = {"X-Featuremaps-Range": json.dumps({"vmin": 0.0, "vmax": top, "kind": kind})}
    return png_response(png(img), headers)
