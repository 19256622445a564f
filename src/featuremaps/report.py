"""One self-contained HTML report of what a model's layers see in some images.

The report is a single file: the input photos, the PCA pictures and the channel maps are
embedded, the page's script and style are inline, and a Content-Security-Policy forbids
every request, so it opens from disk with no network.

The channels are embedded as data, not as pictures: each shown channel is min-max
scaled and rounded to one of the :data:`~featuremaps.render.LEVELS` colour levels
exactly as :func:`featuremaps.render.render_grid` does, each level is stored as the
index of its colour in the 256-entry colormap lookup table, and the maps of a layer are
tiled into one grayscale PNG (an "atlas"). The page colours them with the embedded
lookup tables, so the grid, the enlarged channel, its colorbar (which states the
channel's actual min and max) and the overlay all come from the same numbers, the
colours are those of the grid pictures, and a colormap switch costs no file size.

Example:
    >>> from featuremaps.images import sample_image
    >>> path = write_report("r.html", "efficientnet_lite0", [sample_image("cat")])
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import html
import io
import json
import math
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._files import write_bytes
from .capture import FeatureMaps, LayoutContext
from .errors import FeatureMapsError, ReduceError
from .models import LoadedModel, load_model
from .pipeline import ImageResult, Progress, analyze, layer_record, predictions_note
from .reduce import apply_scaling, compute_scaling, pca_rgb, select_channels
from .render import LEVEL_LUT, LEVELS, colormap_lut, level_index, pca_picture

REPORT_CMAPS = ("viridis", "magma", "inferno", "gray", "RdBu_r", "jet")
"""Colormaps the report can switch between (their lookup tables are embedded)."""

_TOKEN = re.compile(r"\{\{(\w+)\}\}")


def asset(name: str) -> str:
    """The text of a packaged template or static file (``templates/x`` or ``static/x``)."""
    return (resources.files("featuremaps") / name).read_text(encoding="utf-8")


def fill_template(template: str, values: dict[str, str]) -> str:
    """Replace each ``{{name}}`` by ``values[name]`` in one pass (values are not rescanned).

    Raises:
        FeatureMapsError: the template names a value that is not given.
    """

    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise FeatureMapsError(f"template value {key!r} is missing")
        return values[key]

    return _TOKEN.sub(sub, template)


def script_json(obj: Any) -> str:
    """JSON safe to place inside a ``<script>`` element (no ``<``, ``>`` or ``&``)."""
    text = json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def _data_url(img: Image.Image, fmt: str = "PNG", **save: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _num(v: float) -> float:
    """A float rounded to 6 significant digits (keeps the JSON short)."""
    return float(f"{float(v):.6g}")


def quantize(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale each ``(K, H, W)`` channel to its own min..max and quantize it as the grid does.

    Each value gets the level :func:`featuremaps.render.render_grid` draws for a linear,
    per-channel grid, stored as that level's index in the 256-entry colormap lookup
    table (:data:`featuremaps.render.LEVEL_LUT`): colouring the result with
    :func:`featuremaps.render.colormap_lut` gives the grid's very pixels. A stored ``q``
    stands for ``vmin + q / 255 * (vmax - vmin)``, within half a level plus half a table
    step of the activation. NaN is stored as 0.

    Returns:
        The ``uint8`` maps, and each channel's minimum and maximum.
    """
    scaling = compute_scaling(maps, "linear", per_channel=True)
    scaled = apply_scaling(maps, scaling)
    q = LEVEL_LUT[level_index(np.nan_to_num(scaled, nan=0.0))]
    return q, scaling.vmin, scaling.vmax


def atlas_png(q: np.ndarray, cols: int) -> Image.Image:
    """Tile ``(K, H, W)`` uint8 maps row by row into one grayscale picture, no padding."""
    k, h, w = q.shape
    rows = math.ceil(k / cols)
    atlas = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for i in range(k):
        r, c = divmod(i, cols)
        atlas[r * h : (r + 1) * h, c * w : (c + 1) * w] = q[i]
    return Image.fromarray(atlas, "L")


def layer_data(
    name: str, fm: FeatureMaps, *, max_channels: int | None = 64, order: str = "index"
) -> dict[str, Any]:
    """Everything the report shows about one layer of one image.

    Args:
        name: the layer.
        fm: the captured maps (batch of one).
        max_channels: how many channels to embed (``None``: all).
        order: ``index`` or ``top`` (highest mean activation first).

    Returns:
        A JSON-ready dict: shape, module type, stride, dead share, per-channel
        statistics of the shown channels, the atlas and the PCA picture.
    """
    rec = layer_record(name, fm)
    t = fm[name][0].detach().to("cpu", torch.float32)  # reduce's functions take it uncopied
    channels = select_channels(t, order, max_channels)
    q, vmin, vmax = quantize(t.numpy()[channels])
    _, h, w = q.shape
    cols = max(1, math.ceil(math.sqrt(len(channels))))
    out: dict[str, Any] = {
        "name": name,
        "type": rec["type"],
        "shape": rec["shape"],
        "stride": rec["stride"],
        "note": rec["note"],
        "channels_total": rec["channels"],
        "dead_share": _num(rec["dead_share"]),
        "dead_count": round(rec["dead_share"] * rec["channels"]),
        "layer_min": _num(min(rec["min"])),
        "layer_mean": _num(float(np.mean(rec["mean"]))),
        "layer_max": _num(max(rec["max"])),
        "h": int(h),
        "w": int(w),
        "cols": cols,
        "channels": [int(c) for c in channels],
        "min": [_num(rec["min"][c]) for c in channels],
        "mean": [_num(rec["mean"][c]) for c in channels],
        "max": [_num(rec["max"][c]) for c in channels],
        "dead": [bool(rec["max"][c] == 0 and rec["min"][c] == 0) for c in channels],
        "vmin": [_num(v) for v in vmin],
        "vmax": [_num(v) for v in vmax],
        "atlas": _data_url(atlas_png(q, cols), "PNG", optimize=True),
        "pca": None,
        "pca_error": None,
    }
    try:
        rgb = pca_rgb(t, 3)
        out["pca"] = _data_url(pca_picture(rgb, size=max(h, w)), "PNG", optimize=True)
    except ReduceError as exc:
        out["pca_error"] = str(exc)
    return out


def _image_data(
    res: ImageResult, model: LoadedModel, max_channels: int | None, order: str
) -> dict[str, Any]:
    display = Image.fromarray(res.display)
    note = None
    if res.predictions is None:
        note = predictions_note(model.is_imagenet_classifier, model.pretrained)
    elif not model.pretrained:
        note = "random weights: these predictions are meaningless"
    return {
        "key": res.key,
        "name": res.path.name,
        "path": str(res.path),
        "input": _data_url(display, "JPEG", quality=90),
        "input_size": [int(display.height), int(display.width)],
        "predictions": res.predictions,
        "predictions_note": note,
        "layers": {
            name: layer_data(name, res.maps, max_channels=max_channels, order=order)
            for name in res.maps
        },
    }


def build_report(
    model: str | LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str] = "stages",
    *,
    weights: str = "DEFAULT",
    max_channels: int | None = 64,
    order: str = "index",
    cmap: str = "viridis",
    full: bool = False,
    device: str = "auto",
    title: str | None = None,
    layout: LayoutContext | None = None,
    progress: Progress | None = None,
) -> str:
    """Capture ``layers`` for each image and return the report as one HTML string.

    Args:
        model: a model spec (see :func:`featuremaps.load_model`) or a loaded model.
        images: image files, folders or glob patterns.
        layers: names, globs or presets (``stages``, ``convs``).
        weights: ``DEFAULT``, ``none`` or a state dict file (when ``model`` is a spec).
        max_channels: channels shown per layer (``None``: all).
        order: ``index`` or ``top`` (highest mean activation first).
        cmap: the colormap shown first (any of :data:`REPORT_CMAPS`).
        full: keep the whole image (no centre crop).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        title: the page title (default: model and image names).
        layout: token-layout overrides for transformer outputs.
        progress: called as ``progress(phase, done, total)``.

    Returns:
        The HTML text.

    Raises:
        FeatureMapsError: bad model, image, layer or option.

    Example:
        >>> from featuremaps.images import sample_image
        >>> text = build_report("efficientnet_lite0", [sample_image("cat")], "stages")
        >>> text.startswith("<!doctype html>")
        True
    """
    if order not in ("index", "top"):
        raise FeatureMapsError(f"order {order!r}: use index or top")
    if cmap not in REPORT_CMAPS:
        raise FeatureMapsError(f"colormap {cmap!r}: the report offers {', '.join(REPORT_CMAPS)}")
    if max_channels is not None and max_channels < 1:
        raise FeatureMapsError("max_channels must be at least 1 (or None for all)")
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights)
    results = analyze(
        loaded, images, layers, full=full, device=device, layout=layout, progress=progress
    )
    data_images = []
    for n, res in enumerate(results, 1):
        data_images.append(_image_data(res, loaded, max_channels, order))
        if progress:
            progress("render", n, len(results))
    first = results[0].maps
    layer_list = [
        {"name": name, "type": first.info[name].module_type, "shape": list(first[name].shape)}
        for name in first
    ]
    names = ", ".join(res.path.name for res in results[:3]) + (" ..." if len(results) > 3 else "")
    page_title = title or f"{loaded.spec} on {names}"
    data = {
        "title": page_title,
        "model": loaded.spec,
        "weights": loaded.weights,
        "pretrained": loaded.pretrained,
        "preprocess": loaded.preprocess.describe(),
        "full_image": full,
        "order": order,
        "cmap": cmap,
        "cmaps": list(REPORT_CMAPS),
        "levels": LEVELS,
        "luts": {
            name: base64.b64encode(colormap_lut(name).tobytes()).decode("ascii")
            for name in REPORT_CMAPS
        },
        "layers": layer_list,
        "images": data_images,
    }
    return render_html(data)


def render_html(data: dict[str, Any]) -> str:
    """Put report data into the page template with its inline style and script."""
    from . import __version__

    css = asset("static/common.css") + asset("static/report.css")
    js = asset("static/report.js")
    csp = (
        "default-src 'none'; img-src data: blob:; "
        f"style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; "
        "base-uri 'none'; form-action 'none'"
    )
    first = data["images"][0] if data["images"] else {}
    size = "×".join(str(v) for v in first.get("input_size", []))
    generated = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    esc = html.escape
    values = {
        "csp": esc(csp),
        "title": esc(data["title"]),
        "model": esc(data["model"]),
        "weights": esc(data["weights"]),
        "preprocess": esc(data["preprocess"] + (", whole image" if data["full_image"] else "")),
        "input_size": esc(size),
        "n_images": str(len(data["images"])),
        "n_layers": str(len(data["layers"])),
        "order": esc("highest mean first" if data["order"] == "top" else "by index"),
        "generated": esc(generated),
        "version": esc(__version__),
        "css": css,
        "js": js,
        "data": script_json(data),
    }
    return fill_template(asset("templates/report.html"), values)


def write_report(
    out: str | os.PathLike[str],
    model: str | LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str] = "stages",
    **kwargs: Any,
) -> Path:
    """Build the report (see :func:`build_report`) and write it atomically to ``out``.

    Returns:
        The path written.

    Raises:
        FeatureMapsError: ``out`` is a folder, or anything :func:`build_report` raises.
    """
    path = Path(out)
    if path.is_dir():
        raise FeatureMapsError(
            f"--out {str(path)!r} is a folder; give a file name like report.html"
        )
    text = build_report(model, images, layers, **kwargs)
    write_bytes(path, text.encode("utf-8"))
    return path
