"""Two captures side by side: one layer's PCA of model A and model B in one basis.

For layers of the same width, the basis (and colour scale) is fitted over the pixels of
both maps (:func:`featuremaps.pca.joint_basis`), so a colour means the same direction in
both models. Layers of different widths cannot share a basis: the summary says so and
each picture falls back to its own basis.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from ...pca import joint_basis, pca_rgb
from ...render import pca_picture
from ..deps import Entry, LayerName, State
from ..errors import ApiError
from ..pictures import png, png_response
from ..schemas import CompareOut
from ..stores import CaptureEntry

router = APIRouter(prefix="/api")


def _pair(
    state: State, e: Entry, other_id: str, layer: str
) -> tuple[CaptureEntry, torch.Tensor, torch.Tensor | None]:
    """Model B's capture, A's map and B's map of the same layer name (None if B lacks it)."""
    b = state.captures.get(other_id)
    map_a = state.captures.layer_map(e, layer)
    has = any(i.name == layer for i in b.layers)
    return b, map_a, state.captures.layer_map(b, layer) if has else None


def _note(e: CaptureEntry, b: CaptureEntry, layer: str, ca: int, cb: int | None) -> str | None:
    if cb is None:
        return (
            f"{b.spec} has no layer named {layer!r}; only {e.spec}'s map is shown. Pick a "
            "layer both models have."
        )
    if ca != cb:
        return (
            f"{layer!r} has {ca} channels in {e.spec} and {cb} in {b.spec}: one PCA basis "
            "needs layers of one width, so each picture uses its own basis and the colours "
            "of the two do not correspond."
        )
    return None


@router.get("/captures/{capture_id}/compare/{other_id}")
def compare_info(
    e: Entry, state: State, other_id: Annotated[str, Path(max_length=64)], layer: LayerName
) -> CompareOut:
    """Whether both captures' maps of ``layer`` share one PCA basis, and why not."""
    b, map_a, map_b = _pair(state, e, other_id, layer)
    ca = int(map_a.shape[0])
    cb = None if map_b is None else int(map_b.shape[0])
    return CompareOut(
        layer=layer,
        model_a=e.spec,
        model_b=b.spec,
        channels_a=ca,
        channels_b=cb,
        joint=cb == ca,
        note=_note(e, b, layer, ca, cb),
    )


@router.get("/captures/{capture_id}/compare/{other_id}/pca.png")
def compare_pca_png(
    e: Entry,
    state: State,
    other_id: Annotated[str, Path(max_length=64)],
    layer: LayerName,
    side: Literal["a", "b"] = "a",
    size: Annotated[int, Query(ge=16, le=2048)] = 448,
) -> Response:
    """One side's PCA picture, in the basis fitted over both maps when the widths match.

    Raises:
        ApiError: 404 when ``side=b`` and model B has no layer of that name.
    """
    b, map_a, map_b = _pair(state, e, other_id, layer)
    if side == "b" and map_b is None:
        raise ApiError(404, _note(e, b, layer, int(map_a.shape[0]), None) or "")
    joint = map_b is not None and map_b.shape[0] == map_a.shape[0]

    def draw() -> tuple[bytes, str]:
        shown = map_a if side == "a" else map_b
        assert shown is not None
        if joint and map_b is not None:
            basis = joint_basis(map_a[None].float(), map_b[None].float(), 3)
            rgb = pca_rgb(shown.float(), 3, basis=basis)
        else:
            rgb = pca_rgb(shown.float(), 3)
        return png(pca_picture(np.asarray(rgb), size)), ""

    owner = e if side == "a" else b
    key = ("compare-pca", other_id if side == "a" else e.id, layer, side, size)
    data, _ = state.captures.picture(owner, key, draw)
    return png_response(data, {"X-Featuremaps-Joint": "1" if joint else "0"})
