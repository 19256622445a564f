"""Uploads and samples: ``POST /api/images``, ``POST /api/samples/{name}``, thumbnails."""

from __future__ import annotations

import io

from fastapi import APIRouter, Request
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..deps import State
from ..schemas import ImageOut
from ..upload import read_upload

router = APIRouter(prefix="/api")


@router.post("/images", status_code=201)
async def upload(request: Request, state: State) -> ImageOut:
    """Keep an image sent as the raw body or as the form field ``file``."""
    data = await read_upload(request, state.config)
    image_id, img = await run_in_threadpool(state.images.add, data)
    return ImageOut(image_id=image_id, width=img.width, height=img.height)


@router.post("/samples/{name}")
def sample(name: str, state: State) -> ImageOut:
    image_id, img = state.images.add_sample(name)
    return ImageOut(image_id=image_id, width=img.width, height=img.height)


@router.get("/images/{image_id}/thumb.jpg")
def thumb(image_id: str, state: State) -> Response:
    img = state.images.get(image_id)
    scale = min(1.0, 160 / max(img.width, img.height))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    small = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)  # no full-size copy
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=85)
    return Response(buf.getvalue(), media_type="image/jpeg")
