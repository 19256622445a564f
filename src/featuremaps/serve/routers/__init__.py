"""The viewer's routes, one router per resource: pages, images, captures, pictures."""

from __future__ import annotations

from . import captures, images, pages, pictures

ROUTERS = (pages.router, images.router, captures.router, pictures.router)
"""Every router, in the order the app includes them."""

__all__ = ["ROUTERS"]
