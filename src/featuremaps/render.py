"""Arrays to pictures: channel mosaics, PCA pictures, overlays and panels.

Rendering composes one image with numpy, so a 512-channel grid costs milliseconds rather
than one matplotlib axes per channel. A value scaled to ``s`` in [0, 1] (as the legend
says) is drawn as one of :data:`LEVELS` colour levels, ``round((LEVELS - 1) * s)``, whose
colour is :func:`colormap_levels`; maps are upsampled by an integer factor, nearest
neighbour. Channel grids are palette ("P") images: one byte per pixel, the colormap's
levels plus the background, NaN and text colours as the palette. No model code here.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import FeatureMapsError
from .options import Norm, Order, Scale, check_cmap, parse_choice
from .reduce import ArrayLike, Scaling, apply_scaling, compute_scaling, select_channels

LEVELS = 250
"""Colour levels of every colormapped picture (grids, channel views, overlays).

A palette image holds 256 colours: the levels, then the background, the NaN colour and
four shades of the text (black on white, antialiased).
"""

LEVEL_LUT: np.ndarray = np.rint(np.linspace(0.0, 255.0, LEVELS)).astype(np.uint8)
"""Index in :func:`colormap_lut` of each level's colour: ``round(255 * j / (LEVELS - 1))``."""
LEVEL_LUT.setflags(write=False)

NAN_RGB = (255, 0, 255)
"""Colour of NaN/Inf pixels (magenta, outside every default colormap)."""
BACKGROUND_RGB = (255, 255, 255)
"""Colour around and between the maps."""
_TEXT_SHADES = 4  # antialiasing of black text on the background: coverage in quarters
_BG = LEVELS  # palette indices after the levels
_NAN = LEVELS + 1
_TEXT = LEVELS + 2  # _TEXT + i: coverage (i + 1) / _TEXT_SHADES, black at the last
assert _TEXT + _TEXT_SHADES == 256


@lru_cache(maxsize=32)
def colormap_lut(name: str = "viridis") -> np.ndarray:
    """A ``(256, 3)`` uint8 lookup table of a matplotlib colormap.

    The offered colormaps' tables are stored (:mod:`featuremaps._colormaps`), so the
    common case does not import matplotlib.
    """
    from ._colormaps import builtin_lut, from_matplotlib

    lut = builtin_lut(name)
    if lut is None:
        lut = from_matplotlib(check_cmap(name, "colormap"))
    lut.setflags(write=False)
    return lut


def colormap_levels(name: str = "viridis") -> np.ndarray:
    """The ``(LEVELS, 3)`` uint8 colours of the levels: ``colormap_lut(name)[LEVEL_LUT]``."""
    return _palette(name)[:LEVELS]


@lru_cache(maxsize=32)
def _palette(name: str) -> np.ndarray:
    """The 256 colours of a grid picture: levels, background, NaN, text shades."""
    shades = [(round(255 * (1 - (i + 1) / _TEXT_SHADES)),) * 3 for i in range(_TEXT_SHADES)]
    extra = np.array([BACKGROUND_RGB, NAN_RGB, *shades], dtype=np.uint8)
    pal = np.vstack([colormap_lut(name)[LEVEL_LUT], extra])
    pal.setflags(write=False)
    return pal


def level_index(scaled: np.ndarray) -> np.ndarray:
    """The level of each value in [0, 1]: ``round((LEVELS - 1) * s)`` as uint8.

    NaN gives the palette index of the NaN colour (``LEVELS + 1``). Values must lie in
    [0, 1] (see :func:`featuremaps.reduce.apply_scaling`); ties round up.
    """
    x = np.asarray(scaled)
    return _levels(x if x.dtype.kind == "f" else x.astype(np.float64), inplace=False)


def _levels(scaled: np.ndarray, inplace: bool) -> np.ndarray:
    """:func:`level_index`; with ``inplace`` it may overwrite ``scaled`` (a float array)."""
    t = np.multiply(scaled, LEVELS - 1, out=scaled if inplace else None, dtype=scaled.dtype)
    t += 0.5
    with np.errstate(invalid="ignore"):
        idx = t.astype(np.uint8)  # floor of a non-negative value
        nan = not np.isfinite(t.sum())
    if nan:
        idx[np.isnan(t)] = _NAN
    return idx


def colorize(scaled: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """Map values in [0, 1] (NaN allowed, others clipped) to RGB uint8 through a colormap.

    Each value is drawn as its level (:func:`level_index`), NaN in :data:`NAN_RGB`; the
    pixels are the very colours of a :func:`render_grid` picture of the same values.
    """
    x = np.asarray(scaled)
    x = np.clip(x, 0.0, 1.0, dtype=np.result_type(x.dtype, np.float32))
    return _palette(cmap)[_levels(x, inplace=True)]


@lru_cache(maxsize=8)
def _font(size: int) -> Any:
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class Grid:
    """A rendered channel mosaic.

    Attributes:
        image: the picture, a palette ("P") image: ``np.asarray(image)`` gives each
            pixel's palette index (the level of a map's pixel, see :data:`LEVELS`);
            ``image.convert("RGB")`` gives the colours.
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

    def _repr_png_(self) -> bytes:
        """The picture as PNG bytes, so a grid at the end of a notebook cell shows itself."""
        import io

        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


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
    norm: Norm | str = Norm.LINEAR,
    cmap: str = "viridis",
    order: str | Order | Sequence[int] = Order.INDEX,
    scale: Scale | str = Scale.CHANNEL,
    labels: bool = False,
    colorbar: bool = False,
    pad: int = 2,
) -> Grid:
    """Render the channels of one map as a mosaic.

    Each value is scaled to ``s`` in [0, 1] by :func:`featuremaps.reduce.apply_scaling`
    (``linear``: ``(x - vmin) / (vmax - vmin)``; ``log`` and ``symlog`` scale the
    transformed values alike) and drawn as level ``round((LEVELS - 1) * s)`` of
    :data:`LEVELS` = 250, in colour ``colormap_levels(cmap)[level]`` (the entry of the
    256-colour table :func:`colormap_lut` nearest the level): a level is within half a
    level, ``(vmax - vmin) / 498``, of the activation (in the norm's terms). NaN and
    ±Inf are drawn in :data:`NAN_RGB`. The colour bar shows the same levels.

    Args:
        fmap: ``(C, H, W)`` or ``(1, C, H, W)``.
        max_maps: how many channels at most (``None``: all).
        cols: columns (default: about square).
        map_size: each map is upsampled by the integer factor that brings its longer
            side nearest this many pixels (never downsampled).
        norm: ``linear``, ``log`` or ``symlog``.
        cmap: a matplotlib colormap name.
        order: ``index``, ``top`` (by mean activation), ``variance`` (by spatial
            variance) or a list of channel indices (see
            :func:`featuremaps.reduce.select_channels`).
        scale: ``channel`` (each map its own min..max) or ``layer`` (one shared range).
        labels: write the channel index above each map.
        colorbar: add a colour bar with the value range at the bottom.
        pad: pixels between maps.

    Returns:
        The picture (a palette image, see :class:`Grid`) and where each channel is.

    Example:
        >>> grid = render_grid(torch.rand(16, 8, 8), cols=4, colorbar=True)
        >>> grid.image.mode, grid.factor, grid.boxes[0]
        ('P', 8, (2, 2, 66, 66))
    """
    scale = parse_choice(Scale, scale, "scale")
    palette = _palette(cmap)  # an unknown colormap fails before any work
    arr = _chw_numpy(fmap)
    channels = select_channels(arr, order, max_maps)
    if not channels:
        raise FeatureMapsError("no channels to draw")
    k = len(channels)
    maps = arr[:k] if channels == list(range(k)) else arr[channels]  # a view when in order
    scaling = compute_scaling(maps, norm, per_channel=scale == "channel")
    idx = _levels(apply_scaling(maps, scaling), inplace=True)  # (K, H, W) uint8
    _, h, w = maps.shape
    factor = max(1, round(map_size / max(h, w)))
    if factor > 1:
        idx = idx.repeat(factor, axis=1).repeat(factor, axis=2)
    ch, cw = h * factor, w * factor
    ncols = cols or max(1, math.ceil(math.sqrt(k)))
    nrows = math.ceil(k / ncols)
    label_h = 12 if labels else 0
    cell_h, cell_w = ch + label_h + pad, cw + pad
    bar_h = 34 if colorbar else 0
    width = max(ncols * cell_w + pad, 160 if colorbar else 0)
    height = nrows * cell_h + pad + bar_h
    canvas = np.full((height, width), _BG, dtype=np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    for i in range(k):
        r, c = divmod(i, ncols)
        y0 = pad + r * cell_h + label_h
        x0 = pad + c * cell_w
        canvas[y0 : y0 + ch, x0 : x0 + cw] = idx[i]
        boxes.append((x0, y0, x0 + cw, y0 + ch))
    if labels:
        for r in range(nrows):
            y = pad + r * cell_h
            row = zip(channels[r * ncols : (r + 1) * ncols], boxes[r * ncols :], strict=False)
            _draw_text(canvas, y, y + label_h, [(x0, y, str(c), 10) for c, (x0, *_) in row])
    if colorbar:
        _draw_colorbar(canvas, scaling, scale, height - bar_h + 4, pad)
    image = Image.fromarray(canvas, "L")
    image.putpalette(palette.tobytes())  # "L" -> "P"
    return Grid(image, channels, boxes, scaling, factor, cmap)


def channel_grid(fmap: ArrayLike, **kwargs: Any) -> Image.Image:
    """The picture of :func:`render_grid` (same arguments), a palette ("P") image.

    Example:
        >>> img = channel_grid(torch.rand(16, 8, 8), cols=4)
        >>> img.size
        (266, 266)
    """
    return render_grid(fmap, **kwargs).image


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _draw_text(
    canvas: np.ndarray, y0: int, y1: int, items: Sequence[tuple[int, int, str, int]]
) -> None:
    """Write ``(x, y, text, size)`` items, black and antialiased, into rows ``y0:y1``.

    The rows must be background: the text's coverage of each pixel is rounded to one of
    the text shades of the palette (black over white).
    """
    band = canvas[y0:y1]
    if band.size == 0:
        return
    mask = Image.new("L", (band.shape[1], band.shape[0]), 0)
    draw = ImageDraw.Draw(mask)
    for x, y, text, size in items:
        draw.text((x, y - y0), text, fill=255, font=_font(size))
    cover = np.asarray(mask, dtype=np.uint16)
    shade = (cover * _TEXT_SHADES + 127) // 255  # 0 (none) .. _TEXT_SHADES (full)
    hit = shade > 0
    band[hit] = (_TEXT - 1 + shade[hit]).astype(np.uint8)


def _draw_colorbar(canvas: np.ndarray, s: Scaling, scale: str, y: int, pad: int) -> None:
    width = min(canvas.shape[1] - 2 * pad, 256)
    canvas[y : y + 10, pad : pad + width] = level_index(np.linspace(0.0, 1.0, width))
    if scale == "layer":
        lo, hi = _fmt(float(s.vmin[0])), _fmt(float(s.vmax[0]))
        text = f"{lo}  ({s.norm})  {hi}"
    else:
        text = f"each map: its min -> max ({s.norm})"
    _draw_text(canvas, y + 10, canvas.shape[0], [(pad, y + 12, text, 11)])


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
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")  # a palette grid resizes by its colours, not indices
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
    if isinstance(image, Image.Image) and image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")  # a palette grid: show its colours, not its indices
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def data_url(img: Image.Image, fmt: str = "PNG", **save: Any) -> str:
    """A picture as a ``data:`` URL (PNG, or JPEG with ``fmt="JPEG"``)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
