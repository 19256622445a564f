"""The report's data: what it embeds about each image and layer, built image by image.

The channels are embedded as data, not as pictures: each shown channel is min-max
scaled and rounded to one of the :data:`~featuremaps.render.LEVELS` colour levels
exactly as :func:`featuremaps.render.render_grid` does, each level is stored as the
index of its colour in the 256-entry colormap lookup table, and the maps of a layer are
tiled into one grayscale PNG (an "atlas"). The page colours them with the embedded
lookup tables, so the grid, the enlarged channel, its colorbar (which states the
channel's actual min and max) and the overlay all come from the same numbers, the
colours are those of the grid pictures, and a colormap switch costs no file size.

A :class:`ReportBuilder` takes one captured image at a time and keeps only this small
quantized data, so a report over many images never holds more than one image's maps.

Example:
    >>> from featuremaps.images import sample_image
    >>> path = write_report("r.html", "efficientnet_lite0", [sample_image("cat")])
"""

from __future__ import annotations

import base64
import datetime as _dt
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._files import atomic_path
from ..capture import FeatureMaps, LayoutContext
from ..errors import FeatureMapsError, ReduceError
from ..images import expand_inputs
from ..models import LoadedModel, load_model
from ..options import (
    REPORT_CMAPS,
    ChannelOrder,
    Order,
    check_cmap,
    check_range,
    describe_order,
    order_to_json,
    parse_order,
)
from ..pca import pca_rgb
from ..pipeline import ImageResult, Progress, iter_analyze, predictions_note
from ..reduce import apply_scaling, compute_scaling, select_channels
from ..relevance_outputs import RelevanceRequest, check_request, report_json, report_order
from ..render import LEVEL_LUT, LEVELS, colormap_lut, level_index, pca_picture
from ..summaries import LayerSummary, json_float, json_floats
from ..video import VIDEO_SUFFIXES, is_video
from .html import asset, data_url, escape, fill_template, inline_csp, script_json_chunks
from .side_by_side import compare_json, second_results
from .video import VIDEO_CAP_BYTES, video_entry

RELEVANCE_ORDER_TEXT = "most relevant to the target class first"

__all__ = [
    "REPORT_CMAPS",
    "ReportBuilder",
    "ReportOptions",
    "atlas_png",
    "build_report",
    "html_chunks",
    "layer_data",
    "page_values",
    "quantize",
    "render_html",
    "report_css",
    "report_script",
    "write_report",
]

DIGITS = 6
"""Significant digits of the numbers the report embeds (keeps the JSON short)."""


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
    name: str,
    fm: FeatureMaps,
    *,
    max_channels: int | None = 64,
    order: ChannelOrder | str = Order.INDEX,
    index: int = 0,
) -> dict[str, Any]:
    """Everything the report shows about one layer of one image.

    Args:
        name: the layer.
        fm: the captured maps.
        max_channels: how many channels to embed (``None``: all).
        order: which channels come first (see :func:`featuremaps.reduce.select_channels`).
        index: the image in the batch.

    Returns:
        A JSON-ready dict: the layer's :class:`~featuremaps.summaries.LayerSummary`
        (module type, shape, stride, note, dead share, per-channel statistics of the
        shown channels), the atlas and the PCA picture.
    """
    summary = LayerSummary.from_maps(name, fm, index)
    t = fm[name][index].detach().to("cpu", torch.float32)  # reduce's functions copy nothing
    channels = select_channels(t, order, max_channels)
    q, vmin, vmax = quantize(t.numpy()[channels])
    _, h, w = q.shape
    cols = max(1, math.ceil(math.sqrt(len(channels))))
    info = summary.info
    out: dict[str, Any] = {
        "name": name,
        "type": summary.module_type,
        "shape": info.get("shape"),
        "stride": info.get("stride"),
        "note": info.get("note", ""),
        "channels_total": summary.channels,
        "dead_share": json_float(summary.dead_share, DIGITS),
        "dead_count": summary.dead_count,
        "layer_min": json_float(summary.layer_min, DIGITS),
        "layer_mean": json_float(summary.layer_mean, DIGITS),
        "layer_max": json_float(summary.layer_max, DIGITS),
        "h": int(h),
        "w": int(w),
        "cols": cols,
        "channels": [int(c) for c in channels],
        **summary.stats.take(channels).to_json(DIGITS),  # min, mean, max, dead
        "vmin": json_floats(vmin, DIGITS),
        "vmax": json_floats(vmax, DIGITS),
        "atlas": data_url(atlas_png(q, cols), "PNG", optimize=True),
        "pca": None,
        "pca_error": None,
    }
    try:
        rgb = pca_rgb(t, 3)
        out["pca"] = data_url(pca_picture(rgb, size=max(h, w)), "PNG", optimize=True)
    except ReduceError as exc:
        out["pca_error"] = str(exc)
    return out


@dataclass(frozen=True)
class ReportOptions:
    """What the report shows: how many channels, which first, the colormap shown first.

    Construction normalizes and checks the values (an :class:`~featuremaps.options.OptionError`
    names the bad one), so a report fails on a bad option before any model is loaded.
    """

    max_channels: int | None = 64
    order: ChannelOrder = Order.INDEX
    cmap: str = "viridis"
    relevance: RelevanceRequest | None = None
    compare: str | LoadedModel | None = None
    weights_b: str = "DEFAULT"

    def __post_init__(self) -> None:
        object.__setattr__(self, "order", parse_order(self.order, "order"))
        check_cmap(self.cmap, "colormap", offered=REPORT_CMAPS)
        check_range(self.max_channels, "max_channels", 1, none="or None for all")


class ReportBuilder:
    """Collects the report's data one captured image at a time.

    :meth:`add` turns an image's maps into the small embedded data (quantized atlases,
    statistics, PCA pictures) and keeps nothing else, so the caller can drop the maps.

    Example:
        >>> b = ReportBuilder(model, ReportOptions(max_channels=16))  # doctest: +SKIP
        >>> for res in iter_analyze(model, paths, "stages"):   # doctest: +SKIP
        ...     b.add(res)
        >>> text = b.html()                                    # doctest: +SKIP
    """

    def __init__(
        self,
        model: LoadedModel,
        options: ReportOptions | None = None,
        *,
        full: bool = False,
        title: str | None = None,
    ) -> None:
        self.model = model
        self.options = options or ReportOptions()
        self.full = full
        self.title = title
        self.layers: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.videos: list[dict[str, Any]] = []  # see report/video.py
        self._names: list[str] = []

    def add(
        self, res: ImageResult, index: int = 0, other: ImageResult | None = None
    ) -> dict[str, Any]:
        """Add one image (image ``index`` of ``res.maps``); returns its embedded data.
        ``other``: the compared model's maps of the same image (``--compare``)."""
        if not self.layers:
            self.layers = [
                {"name": n, "type": res.maps.info[n].module_type, "shape": list(res.maps[n].shape)}
                for n in res.maps
            ]
        model = self.model
        note = None
        if res.predictions is None:
            note = predictions_note(model.is_imagenet_classifier, model.pretrained)
        elif not model.pretrained:
            note = "random weights: these predictions are meaningless"
        display = Image.fromarray(res.display)
        opts = self.options
        entry = {
            "key": res.key,
            "name": res.path.name,
            "path": str(res.path),
            "input": data_url(display, "JPEG", quality=90),
            "input_size": [int(display.height), int(display.width)],
            "predictions": res.predictions,
            "predictions_note": note,
            "layers": {
                name: layer_data(
                    name,
                    res.maps,
                    max_channels=self.options.max_channels,
                    order=report_order(res.relevance, opts.relevance, name, opts.order),
                    index=index,
                )
                for name in res.maps
            },
        }
        if res.relevance is not None:
            entry["relevance"] = report_json(res.relevance, res.display)
        if other is not None:
            b = opts.compare
            spec_b = b.spec if isinstance(b, LoadedModel) else str(b)
            weights_b = b.weights if isinstance(b, LoadedModel) else opts.weights_b
            entry["compare"] = compare_json(res, other, spec_b, weights_b)
        self.images.append(entry)
        self._names.append(res.path.name)
        return entry

    def data(self) -> dict[str, Any]:
        """The JSON the page embeds."""
        names = ", ".join(self._names[:3]) + (" ..." if len(self._names) > 3 else "")
        m, opts = self.model, self.options
        return {
            "title": self.title or f"{m.spec} on {names}",
            "model": m.spec,
            "weights": m.weights,
            "pretrained": m.pretrained,
            "preprocess": m.preprocess.describe(),
            "full_image": self.full,
            "order": order_to_json(opts.order),
            "order_text": RELEVANCE_ORDER_TEXT
            if opts.relevance and opts.relevance.order
            else describe_order(opts.order),
            "cmap": opts.cmap,
            "cmaps": list(REPORT_CMAPS),
            "levels": LEVELS,
            "level_lut": LEVEL_LUT.tolist(),
            "luts": {
                name: base64.b64encode(colormap_lut(name).tobytes()).decode("ascii")
                for name in REPORT_CMAPS
            },
            "layers": self.layers,
            "images": self.images,
            "videos": self.videos,
            "class_labels": m.categories if opts.relevance else None,
        }

    def html(self) -> str:
        """The report page."""
        return render_html(self.data())


def build_report(
    model: str | LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str] = "stages",
    *,
    weights: str = "DEFAULT",
    max_channels: int | None = 64,
    order: ChannelOrder | str = Order.INDEX,
    cmap: str = "viridis",
    full: bool = False,
    device: str = "auto",
    title: str | None = None,
    layout: LayoutContext | None = None,
    progress: Progress | None = None,
    relevance: RelevanceRequest | None = None,
    compare: str | LoadedModel | None = None,
    weights_b: str = "DEFAULT",
) -> str:
    """Capture ``layers`` for each image and return the report as one HTML string.

    Images are captured and reduced one at a time; only the embedded data is kept.

    Args:
        model: a model spec (see :func:`featuremaps.load_model`) or a loaded model.
        images: image files, folders or glob patterns.
        layers: names, globs or presets (``stages``, ``convs``).
        weights: ``DEFAULT``, ``none`` or a state dict file (when ``model`` is a spec).
        max_channels: channels shown per layer (``None``: all).
        order: ``index``, ``top`` (highest mean first), ``variance`` (highest spatial
            variance first) or a list of channels (see :mod:`featuremaps.options`).
        cmap: the colormap shown first (any of :data:`REPORT_CMAPS`).
        full: keep the whole image (no centre crop).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        title: the page title (default: model and image names).
        layout: token-layout overrides for transformer outputs.
        progress: called as ``progress(phase, done, total)``.
        relevance: what relevance to embed (``None``: none; see
            :class:`~featuremaps.relevance_outputs.RelevanceRequest`): per image the
            target's and the other top classes' per-channel relevance and Grad-CAM.
        compare: a second model (spec or loaded) whose PCA pictures are shown beside
            these, one basis per pair of equal-width layers (layers paired in order).
        weights_b: the second model's weights (as ``weights``).

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
    return _build(
        model,
        images,
        layers,
        weights=weights,
        options=ReportOptions(max_channels, order, cmap, relevance, compare, weights_b),  # type: ignore[arg-type]
        full=full,
        device=device,
        title=title,
        layout=layout,
        progress=progress,
    ).html()


def _build(
    model: str | LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str],
    *,
    weights: str,
    options: ReportOptions,
    full: bool,
    device: str,
    title: str | None,
    layout: LayoutContext | None,
    progress: Progress | None,
) -> ReportBuilder:
    """Capture and reduce each image in turn into a builder (see :func:`build_report`)."""
    paths = expand_inputs(images, also=VIDEO_SUFFIXES)
    clips = [p for p in paths if is_video(p)]
    paths = [p for p in paths if not is_video(p)]
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights)
    builder = ReportBuilder(loaded, options, full=full, title=title)
    if options.relevance is not None:
        check_request(loaded, options.relevance)
    for clip in clips:  # each a PCA video per layer, within one byte cap for the page
        used = sum(v["bytes"] for e in builder.videos for v in e["layers"].values())
        entry = video_entry(loaded, clip, layers, full=full, budget=VIDEO_CAP_BYTES - used)
        builder.videos.append(entry)
        builder._names.append(clip.name)
        if progress:
            progress("video", len(builder.videos), len(clips))
    if not paths:
        return builder
    analyzed = iter_analyze(
        loaded, paths, layers, full=full, device=device, layout=layout, relevance=options.relevance
    )
    others = None
    if options.compare is not None:
        others = second_results(
            options.compare,
            options.weights_b,
            paths,
            layers,
            full=full,
            device=device,
            layout=layout,
        )
    # No enumerate() here: its reused result tuple would keep the last image's maps alive.
    for res in analyzed:
        builder.add(res, other=next(others) if others is not None else None)
        del res  # the maps go; the builder keeps the quantized data
        if progress:
            progress("render", len(builder.images), len(paths))
    return builder


def render_html(data: dict[str, Any]) -> str:
    """Put report data into the page template with its inline style and script."""
    return "".join(html_chunks(data))


_DATA_MARK = "\x00featuremaps-data\x00"  # stands for the data while the template is filled


def html_chunks(data: dict[str, Any]) -> Iterator[str]:
    """The report page in pieces: the page up to the data, the data's JSON in pieces of
    about 1 MB, the rest of the page. Writing them holds no second copy of the data."""
    css = report_css()
    js = report_script()
    values = {
        **page_values(data),
        "csp": escape(inline_csp([css], [js], media_src="data:")),
        "css": css,
        "js": js,
        "data": _DATA_MARK,
    }
    head, tail = fill_template(asset("templates/report.html"), values).split(_DATA_MARK)
    yield head
    yield from script_json_chunks(data)
    yield tail


def page_values(data: dict[str, Any]) -> dict[str, str]:
    """The escaped text values of the report template (all but style, script and data)."""
    from .. import __version__

    first = data["images"][0] if data["images"] else {}
    size = "×".join(str(v) for v in first.get("input_size", []))
    generated = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return {
        "title": escape(data["title"]),
        "model": escape(data["model"]),
        "weights": escape(data["weights"]),
        "preprocess": escape(data["preprocess"] + (", whole image" if data["full_image"] else "")),
        "input_size": escape(size),
        "n_images": str(len(data["images"])),
        "n_layers": str(len(data["layers"])),
        "order": escape(data["order_text"]),
        "generated": escape(generated),
        "version": escape(__version__),
    }


def report_css() -> str:
    """The report's style: the shared ``static/common.css``, then the report's own."""
    return asset("static/common.css") + asset("static/report.css")


def report_script() -> str:
    """The report's script: the shared helpers (``static/common.js``), then the page's."""
    return "\n".join(
        asset(f"static/{name}")
        for name in (
            "common.js",
            "report.js",
            "report_relevance.js",
            "report_compare.js",
            "report_video.js",
        )
    )


def write_report(
    out: str | os.PathLike[str],
    model: str | LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str] = "stages",
    *,
    weights: str = "DEFAULT",
    max_channels: int | None = 64,
    order: ChannelOrder | str = Order.INDEX,
    cmap: str = "viridis",
    full: bool = False,
    device: str = "auto",
    title: str | None = None,
    layout: LayoutContext | None = None,
    progress: Progress | None = None,
    relevance: RelevanceRequest | None = None,
    compare: str | LoadedModel | None = None,
    weights_b: str = "DEFAULT",
) -> Path:
    """Build the report (arguments as :func:`build_report`) and write it atomically to
    ``out``, in pieces: the page is never held as one string.

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
    opts = ReportOptions(max_channels, order, cmap, relevance, compare, weights_b)  # type: ignore[arg-type]
    builder = _build(
        model,
        images,
        layers,
        weights=weights,
        options=opts,
        full=full,
        device=device,
        title=title,
        layout=layout,
        progress=progress,
    )
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for chunk in html_chunks(builder.data()):
            fh.write(chunk)
    return path
