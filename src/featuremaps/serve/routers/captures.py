"""Captures and their jobs: start, poll, summary, input picture, layer and channel numbers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from PIL import Image

from ...options import Norm
from ...pipeline import predictions_note
from ...reduce import compute_scaling
from ...summaries import json_float
from ..deps import Entry, LayerName, State
from ..pictures import channel_map, png, png_response, ticks
from ..schemas import (
    CaptureOut,
    CaptureRequest,
    ChannelOut,
    JobOut,
    LayerOut,
    LayerRow,
    job_out,
)

router = APIRouter(prefix="/api")


@router.post("/captures")
def start(req: CaptureRequest, state: State, response: Response) -> JobOut:
    """Queue a capture: 202 while it runs, 200 when it is cached already."""
    compare = None if req.compare_model is None else (req.compare_model, req.compare_weights)
    job = state.jobs.start(req.model, req.weights, req.image_id, compare)
    response.status_code = 200 if job.status.finished else 202
    return job_out(job)


@router.get("/jobs/{job_id}")
def job(job_id: str, state: State) -> JobOut:
    return job_out(state.jobs.get(job_id))


@router.get("/captures/{capture_id}")
def summary(e: Entry) -> CaptureOut:
    stages = set(e.stages)
    note = None if e.predictions is not None else predictions_note(e.classifier, e.pretrained)
    return CaptureOut(
        capture_id=e.id,
        model=e.spec,
        weights=e.weights_desc,
        preprocess=e.preprocess,
        input_size=[int(e.display.shape[0]), int(e.display.shape[1])],
        predictions=e.predictions,
        predictions_note=note,
        classifier=e.classifier,
        pretrained=e.pretrained,
        stages=e.stages,
        layers=[
            LayerRow(
                name=i.name,
                type=i.module_type,
                shape=list(i.shape or ()),
                stride=list(i.stride) if i.stride else None,
                stage=i.name in stages,
                captured=i.name in e.maps,
            )
            for i in e.layers
        ],
    )


@router.get("/captures/{capture_id}/input.png")
def input_png(e: Entry) -> Response:
    return png_response(png(Image.fromarray(e.display)))


@router.get("/captures/{capture_id}/layer")
def layer_info(e: Entry, state: State, layer: LayerName) -> LayerOut:
    """The layer's summary (the one every view shows) with its map's ``(C, H, W)``."""
    s = state.captures.layer_summary(e, layer)
    stats = s.stats.to_json(6)
    info = e.layer_info(layer)
    return LayerOut(
        name=layer,
        type=s.module_type,
        shape=[s.channels, s.height, s.width],
        stride=list(info.stride) if info.stride else None,
        channels=s.channels,
        dead_count=s.dead_count,
        dead_share=s.dead_share,
        layer_min=json_float(s.layer_min),
        layer_mean=json_float(s.layer_mean),
        layer_max=json_float(s.layer_max),
        min=stats["min"],
        mean=stats["mean"],
        max=stats["max"],
        dead=stats["dead"],
    )


@router.get("/captures/{capture_id}/channel")
def channel_info(
    e: Entry,
    state: State,
    layer: LayerName,
    channel: Annotated[int, Query(ge=0)],
    norm: Norm = Norm.LINEAR,
) -> ChannelOut:
    m = channel_map(state.captures.layer_map(e, layer), channel)
    s = compute_scaling(m, norm, per_channel=True)
    stats = state.captures.layer_summary(e, layer).stats
    return ChannelOut(
        layer=layer,
        channel=channel,
        shape=list(m.shape[1:]),
        min=json_float(stats.min[channel]),
        mean=json_float(stats.mean[channel]),
        max=json_float(stats.max[channel]),
        dead=bool(stats.dead[channel]),
        norm=s.norm,
        vmin=float(s.vmin[0]),
        vmax=float(s.vmax[0]),
        ticks=ticks(s),
    )
