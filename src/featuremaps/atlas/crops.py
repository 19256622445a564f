"""Where a crop lies in an input, and the crops of the top lists kept during the pass.

A crop is the input region around a map cell (:func:`crop_box`), cut from the uint8
pixels the model's input was normalized from. The driver writes every crop of the final
top lists at the end. Decoding those images a second time costs as much as their first
decoding (about 2 ms an image here, thousands of images), so while the pass runs the
driver keeps the crop of every entry of the current top lists, cut from the pixels the
local engine passes along with each batch (:class:`CropTiles`): an entry that enters a
list has its crop cut once, one that drops out is forgotten, and the memory held is
bounded by the lists' size (channels x K crops), not by the dataset. Entries without a
kept crop (a Ray engine's batches, the batches of an earlier, interrupted run) are cut
from a fresh decoding at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .batch import NO_IMAGE, AtlasSpec, BatchResult, LayerMeta
from .state import AtlasState

CROP_FACTOR = 2.0
MIN_CROP = 16
"""A crop is ``CROP_FACTOR * stride`` (at least ``MIN_CROP``) input pixels on each side,
centred on the map cell, clipped to the image."""
TILE_BUDGET = 512 * 2**20
"""Bytes of crops :class:`CropTiles` may hold at most; beyond, the crops are cut from a
fresh decoding at the end (a group of layers of at most this many bytes at a time)."""
SHEET_ALIGN = 8
"""The crops of a channel's top list share one JPEG, a *sheet*: crop k sits at the left
of cell k of a row of cells, each the layer's largest crop rounded up to a multiple of
this many pixels. Encoded without chroma subsampling, JPEG's 8x8 blocks then never mix
two crops."""


def crop_box(
    y: int, x: int, stride: tuple[float, float], size: tuple[int, int], factor: float = CROP_FACTOR
) -> tuple[int, int, int, int]:
    """The input region ``(top, left, bottom, right)`` that feeds map cell ``(y, x)``.

    An approximation of the receptive field: a square of ``factor * stride`` input pixels
    (at least ``MIN_CROP``) centred on the cell's centre ``((y + 0.5) * stride_y,
    (x + 0.5) * stride_x)``, clipped to the image of ``size = (H, W)``.
    """
    sy, sx = stride
    cy, cx = (y + 0.5) * sy, (x + 0.5) * sx
    hy, hx = max(factor * sy, MIN_CROP) / 2, max(factor * sx, MIN_CROP) / 2
    top, left = max(0, math.floor(cy - hy)), max(0, math.floor(cx - hx))
    bottom, right = min(size[0], math.ceil(cy + hy)), min(size[1], math.ceil(cx + hx))
    return top, left, max(bottom, top + 1), max(right, left + 1)


def cut_crop(hwc: np.ndarray, y: int, x: int, stride: tuple[float, float]) -> np.ndarray:
    """The crop around map cell ``(y, x)`` of an ``(H, W, 3)`` uint8 picture, a copy."""
    t, left, b, r = crop_box(y, x, stride, (hwc.shape[0], hwc.shape[1]))
    return np.ascontiguousarray(hwc[t:b, left:r])


def crop_size(stride: tuple[float, float], side: int) -> tuple[int, int]:
    """The largest ``(h, w)`` of a crop around a cell of a map of ``stride``, in an input
    of ``side`` pixels."""
    h, w = (min(side, math.ceil(max(CROP_FACTOR * s, MIN_CROP)) + 1) for s in stride)
    return h, w


def crop_bytes(stride: tuple[float, float], side: int) -> int:
    """The largest size in bytes of an RGB crop around a cell of a map of ``stride``."""
    h, w = crop_size(stride, side)
    return 3 * h * w


def sheet_cell(stride: tuple[float, float], side: int) -> tuple[int, int]:
    """The ``(h, w)`` of a cell of the layer's sheets (see ``SHEET_ALIGN``)."""
    h, w = crop_size(stride, side)
    return -(-h // SHEET_ALIGN) * SHEET_ALIGN, -(-w // SHEET_ALIGN) * SHEET_ALIGN


def sheet_box(rank: int, y: int, x: int, stride: tuple[float, float], side: int) -> list[int]:
    """Where crop ``rank`` of a top list lies on its sheet: ``[left, top, width, height]``."""
    t, left, b, r = crop_box(y, x, stride, (side, side))
    return [rank * sheet_cell(stride, side)[1], 0, r - left, b - t]


class CropTiles:
    """The crops of every entry of the current top lists, kept as the batches are folded.

    Call :meth:`add` after each fold; :meth:`get` gives an entry's crop (``(h, w, 3)``
    uint8, the pixels :func:`crop_box` selects) or ``None`` when none was kept. Disabled
    (keeps nothing) when the lists' crops could exceed ``budget`` bytes (default
    ``TILE_BUDGET``).
    """

    def __init__(
        self,
        spec: AtlasSpec,
        metas: Sequence[LayerMeta],
        paths: Sequence[str],
        side: int,
        budget: int | None = None,
    ) -> None:
        budget = TILE_BUDGET if budget is None else budget
        kinds = 2 if spec.relevance else 1
        need = sum(
            kinds * c * spec.top * crop_bytes(m.stride, side)
            for c, m in zip(spec.channels, metas, strict=True)
        )
        self.enabled = need <= budget
        self.strides = [m.stride for m in metas]
        self.paths = paths
        self._ids: dict[str, int] | None = None
        # [layer][kind][channel] -> {image id: crop}; kind 0: activation, 1: relevance
        self.tiles: list[list[list[dict[int, np.ndarray]]]] = [
            [[{} for _ in range(c)] for _ in range(kinds)] for c in spec.channels
        ]

    def add(self, state: AtlasState, result: BatchResult) -> None:
        """Keep the crops of ``result``'s images that entered a top list of ``state``
        (folded with ``result`` already), and forget those of entries that dropped out."""
        if not self.enabled or result.pixels is None or len(result.pixels[0]) == 0:
            return
        ids, pixels = result.pixels
        rows = {int(i): n for n, i in enumerate(ids)}
        hwc = pixels.permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, 3)
        for li, part in enumerate(state.layers):
            lists = [(part.ids, part.ys, part.xs)]
            if part.relevance is not None:
                lists.append((part.relevance.ids, part.relevance.ys, part.relevance.xs))
            stride = self.strides[li]
            for kind, (top_ids, ys, xs) in enumerate(lists):
                kept = self.tiles[li][kind]
                for c in np.flatnonzero(np.isin(top_ids, ids).any(1)):  # lists that changed
                    old, new = kept[c], {}
                    for k, i in enumerate(top_ids[c].tolist()):
                        if i == NO_IMAGE:
                            break
                        if i in rows:
                            new[i] = cut_crop(hwc[rows[i]], int(ys[c, k]), int(xs[c, k]), stride)
                        elif i in old:
                            new[i] = old[i]
                    kept[c] = new

    def get(self, layer: int, kind: int, channel: int, image: str) -> np.ndarray | None:
        """The kept crop of ``image`` in a top list (kind 0: activation, 1: relevance)."""
        if not self.enabled:
            return None
        if self._ids is None:
            self._ids = {p: i for i, p in enumerate(self.paths)}
        i = self._ids.get(image)
        return None if i is None else self.tiles[layer][kind][channel].get(i)
