"""The viewer's routes, one router per resource: pages, images, captures, pictures,
relevance and visualizations."""

from __future__ import annotations

from .captures import router as captures_router
from .compare import router as compare_router
from .images import router as images_router
from .pages import router as pages_router
from .pictures import router as pictures_router
from .relevance import router as relevance_router
from .visualize import router as visualize_router

ROUTERS = (
    pages_router,
    images_router,
    captures_router,
    pictures_router,
    compare_router,
    relevance_router,
    visualize_router,
)
"""Every router, in the order the app includes them."""

__all__ = ["ROUTERS"]
