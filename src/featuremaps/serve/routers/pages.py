"""The page and its script and style, all from the package (nothing from a CDN)."""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ...report.html import asset

router = APIRouter()


@cache
def _style() -> str:
    return asset("static/common.css") + asset("static/viewer.css")


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    return HTMLResponse(asset("templates/viewer.html"))


@router.get("/static/viewer.js")
def viewer_js() -> Response:
    return Response(asset("static/viewer.js"), media_type="text/javascript; charset=utf-8")


@router.get("/static/common.js")
def common_js() -> Response:
    """Helpers shared with the report (``el``, ``fmt``, ...)."""
    return Response(asset("static/common.js"), media_type="text/javascript; charset=utf-8")


@router.get("/static/viewer.css")
def viewer_css() -> Response:
    return Response(_style(), media_type="text/css; charset=utf-8")
