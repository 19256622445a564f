"""The pictures: channel grid, one channel, its overlay on the input, PCA, colorbars.

Each is drawn by :mod:`featuremaps.render` from the captured map, exactly as the legend
says; the grid and PCA pictures are kept with their capture.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query
from fastapi.responses import Response
from PIL import Image

from ...options import ChannelOrder, Norm, Scale
from ...reduce import pca_rgb
from ...render import colorize, colormap_lut, overlay, pca_picture, render_grid, upsample
from ..deps import RELEVANCE, ChannelOrderParam, Cmap, Entry, LayerName, State
from ..errors import ApiError
from ..pictures import channel_map, png, png_response, scaled
from ..schemas import GridMeta, floats

router = APIRouter(prefix="/api")
Alpha = Annotated[float, Query(ge=0.0, le=1.0)]
Size = Annotated[int, Query(ge=16, le=2048)]
Channel = Annotated[int, Query(ge=0)]


@router.get("/captures/{capture_id}/grid.png")
def grid_png(
    e: Entry,
    state: State,
    layer: LayerName,
    cmap: Cmap,
    order: ChannelOrderParam,
    norm: Norm = Norm.LINEAR,
    scale: Scale = Scale.CHANNEL,
    max_maps: Annotated[int, Query(ge=1, le=256)] = 64,
    map_size: Annotated[int, Query(ge=8, le=256)] = 64,
    target: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """The channel grid; the header ``X-Featuremaps-Grid`` says where each channel is.

    ``order=relevance&target=K`` shows the most relevant channels to class ``K`` first
    (its relevance must have been asked for: ``POST /api/captures/{id}/relevance``).
    """
    if order == RELEVANCE:
        if target is None:
            raise ApiError(
                400,
                "order=relevance needs target=K, the class whose relevance orders the "
                "channels (ask for it first: POST /api/captures/{id}/relevance)",
            )
        shown: ChannelOrder = state.relevance.scores(e, target, layer)[1].order()
    else:
        shown = order
        target = None

    def draw() -> tuple[bytes, str]:
        grid = render_grid(
            state.captures.layer_map(e, layer),
            max_maps=max_maps,
            norm=norm,
            cmap=cmap,
            order=shown,
            scale=scale,
            labels=True,
            colorbar=False,
            map_size=map_size,
        )
        meta = GridMeta(
            layer=layer,
            channels=list(grid.channels),
            boxes=[list(b) for b in grid.boxes],
            width=grid.image.width,
            height=grid.image.height,
            factor=grid.factor,
            vmin=floats(grid.scaling.vmin),
            vmax=floats(grid.scaling.vmax),
        )
        return png(grid.image), meta.model_dump_json()

    key = ("grid", layer, cmap, norm, order, target, scale, max_maps, map_size)
    data, meta = state.captures.picture(e, key, draw)
    return png_response(data, {"X-Featuremaps-Grid": meta})


@router.get("/captures/{capture_id}/channel.png")
def channel_png(
    e: Entry,
    state: State,
    layer: LayerName,
    channel: Channel,
    cmap: Cmap,
    norm: Norm = Norm.LINEAR,
    size: Size = 448,
) -> Response:
    """One channel through the colormap, enlarged by an integer factor (nearest)."""
    m = channel_map(state.captures.layer_map(e, layer), channel)
    values, s = scaled(m, norm)
    rgb = colorize(values, cmap)
    factor = max(1, size // max(rgb.shape[:2]))
    headers = {
        "X-Featuremaps-Range": json.dumps({"vmin": float(s.vmin[0]), "vmax": float(s.vmax[0])})
    }
    return png_response(png(Image.fromarray(upsample(rgb, factor))), headers)


@router.get("/captures/{capture_id}/overlay.png")
def overlay_png(
    e: Entry,
    state: State,
    layer: LayerName,
    channel: Channel,
    cmap: Cmap,
    norm: Norm = Norm.LINEAR,
    alpha: Alpha = 0.55,
) -> Response:
    """One channel over the model's input."""
    m = channel_map(state.captures.layer_map(e, layer), channel)
    values, _ = scaled(m, norm)
    img = overlay(e.display, np.nan_to_num(values, nan=0.0), alpha=alpha, cmap=cmap)
    return png_response(png(img))


@router.get("/captures/{capture_id}/pca.png")
def pca_png(
    e: Entry,
    state: State,
    layer: LayerName,
    mode: Literal["map", "overlay"] = "map",
    size: Size = 448,
    alpha: Alpha = 0.6,
) -> Response:
    """The first three principal components of the layer as RGB, alone or over the input."""

    def draw() -> tuple[bytes, str]:
        rgb = pca_rgb(state.captures.layer_map(e, layer), 3)
        img = pca_picture(rgb, size) if mode == "map" else overlay(e.display, rgb, alpha=alpha)
        return png(img), ""

    data, _ = state.captures.picture(e, ("pca", layer, mode, size, alpha), draw)
    return png_response(data)


@router.get("/colorbar.png")
def colorbar_png(cmap: Cmap) -> Response:
    """The colormap as a 256x1 strip."""
    lut = colormap_lut(cmap)
    return png_response(png(Image.fromarray(np.ascontiguousarray(lut[None, :, :]))))
