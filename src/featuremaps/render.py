"""Arrays to pictures: channel mosaics, PCA pictures, overlays and panels.

Rendering composes one image with numpy (a colormap lookup table indexed by the scaled
values, nearest-neighbour upsampling by an integer factor), so a 512-channel grid costs
milliseconds rather than one matplotlib axes per channel. A pixel of a map is drawn as
``lut[round(255 * scaled)]`` where ``scaled`` is the value mapped to [0, 1] as the legend
says. No model code here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import FeatureMapsError, suggest
from .reduce import ArrayLike, Norm, Scaling, apply_scaling, compute_scaling, select_channels

NAN_RGB = (255, 0, 255)
"""Colour of NaN/Inf pixels (magenta, outside every default colormap)."""
_BG = 255


@lru_cache(maxsize=32)
def colormap_lut(name: str = "viridis") -> np.ndarray:
    """A ``(256, 3)`` uint8 lookup table of a matplotlib colormap."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        names = list(matplotlib.colormaps)
        raise FeatureMapsError(
            f"unknown colormap {name!r}.{suggest(name, names)} Common: viridis, magma, "
            "inferno, gray, RdBu_r, jet."
        ) from None
    lut = (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colorize(scaled: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Map values in [0, 1] (NaN allowed) to RGB uint8 through a colormap."""
    lut = colormap_lut(cmap)
    finite = np.isfinite(scaled)
    idx = np.rint(np.where(finite, scaled, 0.0) * 255.0).astype(np.intp)
    rgb = lut[np.clip(idx, 0, 255)]
    rgb[~finite] = NAN_RGB
    return rgb


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class Grid:
    """A rendered channel mosaic.

    Attributes:
        image: the picture.
        channels: the channel index shown in each cell, in reading order.
        boxes: ``(x0, y0, x1, y1)`` of each cell's map within ``image``.
        scaling: the bounds and norm used to map values to colours.
        factor: integer upsampling factor of each map.
        cmap: the colormap name.
    """

    image: Image.Image
    channels: list[int]
    boxes: list[tuple[int, int, int, int]]
    scaling: Scaling
    factor: int
    cmap: str


def _chw_numpy(fmap: ArrayLike) -> np.ndarray:
    if isinstance(fmap, torch.Tensor):
        arr = fmap.detach().to("cpu", torch.float32).numpy()
    else:
        arr = np.asarray(fmap, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise FeatureMapsError(f"expected a (C, H, W) map, got shape {arr.shape}")
    return arr


def render_grid(
    fmap: ArrayLike,
    *,
    max_maps: int | None = 64,
    cols: int | None = None,
    map_size: int = 64,
    norm: Norm = "linear",
    cmap: str = "viridis",
    order: str | Sequence[int] = "index",
    scale: str = "channel",
    labels: bool = False,
    colorbar: bool = False,
    pad: int = 2,
) -> Grid:
    """Render the channels of one map as a mosaic.

    Args:
        fmap: ``(C, H, W)`` or ``(1, C, H, W)``.
        max_maps: how many channels at most (``None``: all).
        cols: columns (default: about square).
        map_size: each map is upsampled by the integer factor that brings its longer
            side nearest this many pixels (never downsampled).
        norm: ``linear``, ``log`` or ``symlog``.
        cmap: a matplotlib colormap name.
        order: ``index``, ``top`` (by mean activation) or a list of channel indices.
        scale: ``channel`` (each map its own min..max) or ``layer`` (one shared range).
        labels: write the channel index above each map.
        colorbar: add a colour bar with the value range at the bottom.
        pad: pixels between maps.
    """
    if scale not in ("channel", "layer"):
        raise FeatureMapsError(f"scale {scale!r}: use channel or layer")
    arr = _chw_numpy(fmap)
    channels = select_channels(arr, order, max_maps)
    if not channels:
        raise FeatureMapsError("no channels to draw")
    maps = arr[channels]
    scaling = compute_scaling(maps, norm, per_channel=scale == "channel")
    rgb = colorize(apply_scaling(maps, scaling), cmap)  # (K, H, W, 3)
    k, h, w = maps.shape
    factor = max(1, round(map_size / max(h, w)))
    if factor > 1:
        rgb = rgb.repeat(factor, axis=1).repeat(factor, axis=2)
    ch, cw = h * factor, w * factor
    ncols = cols or max(1, math.ceil(math.sqrt(k)))
    nrows = math.ceil(k / ncols)
    label_h = 12 if labels else 0
    cell_h, cell_w = ch + label_h + pad, cw + pad
    bar_h = 34 if colorbar else 0
    width = max(ncols * cell_w + pad, 160 if colorbar else 0)
    height = nrows * cell_h + pad + bar_h
    canvas = np.full((height, width, 3), _BG, dtype=np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    for i in range(k):
        r, c = divmod(i, ncols)
        y0 = pad + r * cell_h + label_h
        x0 = pad + c * cell_w
        canvas[y0 : y0 + ch, x0 : x0 + cw] = rgb[i]
        boxes.append((x0, y0, x0 + cw, y0 + ch))
    image = Image.fromarray(canvas)
    if labels or colorbar:
        draw = ImageDraw.Draw(image)
        if labels:
            for ch_idx, (x0, y0, _, _) in zip(channels, boxes, strict=True):
                draw.text((x0, y0 - label_h), str(ch_idx), fill=(0, 0, 0), font=_font(10))
        if colorbar:
            _draw_colorbar(image, draw, scaling, cmap, scale, height - bar_h + 4, pad)
    return Grid(image, channels, boxes, scaling, factor, cmap)


def channel_grid(fmap: ArrayLike, **kwargs: Any) -> Image.Image:
    """The picture of :func:`render_grid` (same arguments).

    Example:
        >>> img = channel_grid(torch.rand(16, 8, 8), cols=4)
        >>> img.size
        (266, 266)
    """
    return render_grid(fmap, **kwargs).image


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _draw_colorbar(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    s: Scaling,
    cmap: str,
    scale: str,
    y: int,
    pad: int,
) -> None:
    width = min(image.width - 2 * pad, 256)
    bar = colorize(np.linspace(0.0, 1.0, width)[None, :].repeat(10, 0), cmap)
    image.paste(Image.fromarray(bar), (pad, y))
    if scale == "layer":
        lo, hi = _fmt(float(s.vmin[0])), _fmt(float(s.vmax[0]))
        text = f"{lo}  ({s.norm})  {hi}"
    else:
        text = f"each map: its min -> max ({s.norm})"
    draw.text((pad, y + 12), text, fill=(0, 0, 0), font=_font(11))


def upsample(arr: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of ``(H, W, ...)`` by an integer factor."""
    return arr.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else arr


def pca_picture(rgb: np.ndarray, size: int = 224) -> Image.Image:
    """A PCA result (``(H, W, 3)`` or ``(H, W)`` in [0, 1]) upsampled to about ``size``."""
    arr = np.asarray(rgb, dtype=np.float32)
    u8 = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    factor = max(1, round(size / max(u8.shape[:2])))
    img = Image.fromarray(upsample(u8, factor))
    return img.convert("RGB")


def resize_map(map2d: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``(h, w)`` map to ``size = (H, W)``."""
    t = torch.from_numpy(np.ascontiguousarray(map2d, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def overlay(
    image: np.ndarray | Image.Image,
    heat: np.ndarray,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Image.Image:
    """Blend a map over the input picture.

    Args:
        image: the input as shown, ``(H, W, 3)`` uint8.
        heat: an ``(h, w)`` map scaled to [0, 1] (one channel) or an ``(h, w, 3)`` PCA
            picture; upsampled bilinearly to the image size.
        alpha: weight of the map.
        cmap: colormap for a one-channel map.
    """
    base = np.asarray(image, dtype=np.float32)
    hw = base.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim == 2:
        colour = colorize(np.clip(resize_map(heat, hw), 0, 1), cmap).astype(np.float32)
    else:
        chans = [resize_map(heat[..., i], hw) for i in range(heat.shape[-1])]
        colour = np.clip(np.stack(chans, -1), 0, 1) * 255.0
    out = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def titled_panel(
    items: Mapping[str, Image.Image], *, tile: int = 224, cols: int | None = None
) -> Image.Image:
    """Tiles side by side (wrapping after ``cols``), each under its title."""
    if not items:
        raise FeatureMapsError("nothing to put in the panel")
    names = list(items)
    ncols = cols or len(names)
    nrows = math.ceil(len(names) / ncols)
    title_h, pad = 18, 6
    canvas = Image.new(
        "RGB", (ncols * (tile + pad) + pad, nrows * (tile + title_h + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        r, c = divmod(i, ncols)
        x0 = pad + c * (tile + pad)
        y0 = pad + r * (tile + title_h + pad)
        img = items[name]
        scale = tile / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
        canvas.paste(img.resize(size, resample), (x0, y0 + title_h))
        title = name if len(name) <= 30 else "..." + name[-27:]
        draw.text((x0, y0 + 2), title, fill=(0, 0, 0), font=_font(12))
    return canvas


def pca_panel(
    input_image: np.ndarray | Image.Image,
    pcas: Mapping[str, np.ndarray],
    *,
    tile: int = 224,
    cols: int | None = None,
) -> Image.Image:
    """The input picture followed by the PCA picture of each layer, titled by name."""
    items: dict[str, Image.Image] = {"input": _to_pil(input_image)}
    for name, rgb in pcas.items():
        items[name] = pca_picture(rgb, tile)
    return titled_panel(items, tile=tile, cols=cols)


def _to_pil(img: np.ndarray | Image.Image) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))


def show(image: Image.Image | np.ndarray, ax: Any = None, title: str | None = None) -> Any:
    """Draw a rendered picture on a matplotlib axes (a new figure if none); returns it."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax
