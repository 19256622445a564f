"""The report's interactive view inside a notebook cell: :func:`explore`.

An :class:`Explorer` captures the layers once and shows itself (``_repr_html_``) as the
report's view made for a cell: layer navigation, the channel grid, a click enlarges a
channel with its colour bar and the overlay on the input, the PCA of each layer and the
predictions. It needs no server, no extension and no network: the data, style and script
are inline. The view lives in a shadow root, so its style cannot restyle the notebook
(nor the notebook's restyle it), and each display gets its own id, so several explorers
in one notebook work independently. A size cap keeps the cell output small: past it,
fewer channels per layer are embedded and the view says so. With ``target=`` or
``relevance=True`` (ImageNet classifiers) it also shows, as ``featuremaps report
--relevance`` does, each channel's relevance to a class, Grad-CAM and a class picker.

Example:
    >>> import featuremaps as fm
    >>> ex = fm.explore("efficientnet_lite0", [fm.sample_image("cat")], layers="stages")
    >>> ex.predictions[0][0]["label"] in ("tabby", "tiger cat", "Egyptian cat")
    True
    >>> ex                                   # in a notebook: the interactive view
    >>> path = ex.save("report.html")        # the same view as a report file
"""

from __future__ import annotations

import html
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ._files import write_bytes
from .capture import FeatureMaps, LayoutContext, capture
from .errors import FeatureMapsError, ImageError
from .images import display_image, expand_inputs, load_image, preprocess, to_rgb
from .models import LoadedModel, Preprocess, load_model
from .options import ChannelOrder, Order
from .pipeline import ImageResult, resolve_device, top_predictions
from .relevance import TargetError
from .relevance_outputs import (
    RELEVANCE_ORDER,
    ImageRelevance,
    RelevanceRequest,
    check_request,
    explain_image,
    parse_target,
)
from .report.build import (
    ReportBuilder,
    ReportOptions,
    page_values,
    report_css,
    report_script,
)
from .report.html import asset, fill_template, script_json

__all__ = ["DEFAULT_MAX_BYTES", "Explorer", "explore", "maps_html"]

DEFAULT_MAX_BYTES = 4_000_000
"""The largest cell output an explorer makes by default (about 4 MB of HTML): Jupyter
servers throttle bigger outputs, and notebooks that carry them get slow to open."""

ImageInput = str | os.PathLike[str] | Image.Image


def explore(
    model: str | LoadedModel | nn.Module,
    images: torch.Tensor | ImageInput | Iterable[ImageInput],
    layers: str | Sequence[str] = "stages",
    *,
    weights: str = "DEFAULT",
    max_channels: int | None = 32,
    order: ChannelOrder | str = Order.INDEX,
    cmap: str = "viridis",
    full: bool = False,
    device: str = "auto",
    title: str | None = None,
    layout: LayoutContext | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    target: int | str | None = None,
    relevance: bool = False,
) -> Explorer:
    """Capture ``layers`` for some images and return an :class:`Explorer` to show them.

    Args:
        model: a model spec (``"efficientnet_lite0"``, ``"resnet50"``, ``"timm:..."``), a
            :class:`~featuremaps.models.LoadedModel`, or an ``nn.Module`` (fed as given;
            its input is assumed normalized with the ImageNet mean and std).
        images: files, folders, globs or PIL images (preprocessed as the model wants), or
            a ``(B, 3, H, W)`` tensor batch already preprocessed.
        layers: names, globs or presets (``stages``, ``convs``).
        weights: ``DEFAULT``, ``none`` or a state dict file (when ``model`` is a spec).
        max_channels: channels shown per layer (``None``: all; the size cap may lower it).
        order: ``index``, ``top``, ``variance``, ``relevance`` (each grid ranked by its
            channels' relevance to the target class) or a list of channels.
        cmap: the colormap shown first.
        full: keep the whole image (no centre crop); images must then share one size.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        title: the heading of the view.
        layout: token-layout overrides for transformer outputs.
        max_bytes: the largest cell output; beyond it fewer channels are embedded.
        target: the class whose relevance is shown (an index or an ImageNet label;
            ``None``: each image's top-1). Giving it turns relevance on.
        relevance: show relevance (gradient x activation per channel, Grad-CAM, a class
            picker over the target and the top-5 classes) as ``featuremaps report
            --relevance`` does. Needs an ImageNet classifier (1000 outputs).

    Raises:
        FeatureMapsError: a bad option, model, image or layer (before any capture where
            it can be known).

    Example:
        >>> ex = explore("resnet18", [sample_image("cat")], "layer1", weights="none")
        >>> ex.maps["layer1"].shape
        torch.Size([1, 64, 56, 56])
    """
    order, request = _relevance_request(order, target, relevance)
    opts = ReportOptions(max_channels, order, cmap, request)  # type: ignore[arg-type]
    if max_bytes < 100_000:
        raise FeatureMapsError(f"max_bytes {max_bytes}: use at least 100000 (100 kB)")
    loaded = _loaded(model, weights)
    if request is not None and not loaded.is_imagenet_classifier:
        raise TargetError(
            f"target= / relevance=True / order='relevance': a class target needs an ImageNet "
            f"classifier (1000 class outputs), and {loaded.spec!r} is not one. For another "
            "model, call featuremaps.relevance(model, x, layers, target=fn) with fn mapping "
            "the model's output to one score per image."
        )
    if request is not None:
        check_request(loaded, request)  # an unknown label or index: refused before capture
    x, names = _batch(images, loaded.preprocess, full)
    dev = resolve_device(device)
    module = loaded.module.to(dev)
    predict = loaded.is_imagenet_classifier and loaded.pretrained
    fm = capture(module, x.to(dev), layers, full_forward=predict, layout=layout)
    predictions: list[list[dict[str, Any]] | None] = [None] * x.shape[0]
    if predict and isinstance(fm.output, torch.Tensor) and fm.output.ndim == 2:
        assert loaded.categories is not None  # an ImageNet classifier has them
        predictions = [top_predictions(row, loaded.categories) for row in fm.output]
    fm.output = None
    rels: list[ImageRelevance | None] = [None] * x.shape[0]
    if request is not None:  # one more forward and backward per image (two with top-5)
        rels = [
            explain_image(module, x[i : i + 1].to(dev), list(fm), request, layout=layout)
            for i in range(x.shape[0])
        ]
    displays = [display_image(x[i], loaded.preprocess) for i in range(x.shape[0])]
    note = None
    if isinstance(images, torch.Tensor):
        note = (
            "a (B, 3, H, W) tensor fed as given; pictures undo the normalization with mean "
            + ",".join(f"{m:.3f}" for m in loaded.preprocess.mean)
            + ", std "
            + ",".join(f"{v:.3f}" for v in loaded.preprocess.std)
        )
    return Explorer(
        loaded, fm, names, displays, predictions, opts, full, title, max_bytes, note, rels
    )


def _relevance_request(
    order: ChannelOrder | str, target: int | str | None, wanted: bool
) -> tuple[ChannelOrder | str, RelevanceRequest | None]:
    """The grid order and the relevance to compute (``None``: none) from ``order``,
    ``target`` and ``relevance``: as ``report --order/--target/--relevance``, with the
    target and the top-5 classes embedded for the class picker."""
    ranked = isinstance(order, str) and order.strip().lower() == RELEVANCE_ORDER
    if not (ranked or target is not None or wanted):
        return order, None
    if isinstance(target, str) and not target.strip():
        raise FeatureMapsError("target '': give a class index or an ImageNet label")
    request = RelevanceRequest(parse_target(target), ranked, top_classes=5)
    return (Order.INDEX if ranked else order), request


def _loaded(model: str | LoadedModel | nn.Module, weights: str) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(model, Preprocess(), type(model).__name__, "as given")
    if isinstance(model, str):
        return load_model(model, weights)
    raise FeatureMapsError(
        f"model: expected a spec such as 'resnet50', a LoadedModel or an nn.Module, got "
        f"{type(model).__name__}"
    )


def _batch(
    images: torch.Tensor | ImageInput | Iterable[ImageInput], pp: Preprocess, full: bool
) -> tuple[torch.Tensor, list[str]]:
    """The input batch and a name for each image."""
    if isinstance(images, torch.Tensor):
        x = images.detach()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ImageError(
                f"images: a tensor must be (B, 3, H, W) or (3, H, W), got {tuple(images.shape)}"
            )
        return x.float().cpu(), [f"image {i}" for i in range(x.shape[0])]
    items = [images] if isinstance(images, str | os.PathLike | Image.Image) else list(images)
    tensors: list[torch.Tensor] = []
    names: list[str] = []
    for item in items:
        if isinstance(item, Image.Image):
            tensors.append(preprocess(to_rgb(item), pp, full=full))
            names.append(f"image {len(names)}")
            continue
        for path in expand_inputs([item]):
            img = load_image(path, draft_size=pp.resize)
            tensors.append(preprocess(img, pp, full=full))
            names.append(path.name)
    if not tensors:
        raise ImageError("images: nothing to show; give files, folders, PIL images or a tensor")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ImageError(
            f"images: with full=True the images must share one size, got {sorted(shapes)}; "
            "drop full=True (centre crop) or resize them first"
        )
    return torch.stack(tensors), names


@dataclass
class Explorer:
    """Captured maps of some images and their interactive view.

    Attributes:
        model: the model that ran.
        maps: the captured :class:`~featuremaps.capture.FeatureMaps` (a batch: image ``i``
            is ``maps[name][i]``).
        names: a name for each image.
        displays: each input as the model saw it, ``(H, W, 3)`` uint8.
        predictions: each image's top-5 (ImageNet classifiers with pretrained weights),
            else ``None``.
        options: channels, order, colormap and relevance request of the view.
        relevance: each image's relevance (the target first, then the other top-5
            classes) when relevance was asked for, else ``None`` per image.
    """

    model: LoadedModel
    maps: FeatureMaps
    names: list[str]
    displays: list[np.ndarray]
    predictions: list[list[dict[str, Any]] | None]
    options: ReportOptions
    full: bool = False
    title: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    input_note: str | None = None
    relevance: list[ImageRelevance | None] | None = None

    def data(self, options: ReportOptions | None = None) -> dict[str, Any]:
        """The report data of the view (as :class:`~featuremaps.report.ReportBuilder`)."""
        builder = ReportBuilder(
            self.model, options or self.options, full=self.full, title=self.title
        )
        for i, name in enumerate(self.names):
            key = f"image-{i}"
            rel = self.relevance[i] if self.relevance else None
            res = ImageResult(
                Path(name), key, self.displays[i], self.maps, self.predictions[i], rel
            )
            builder.add(res, index=i)
        data = builder.data()
        if self.input_note:
            data["preprocess"] = self.input_note
        return data

    def cell_data(self) -> tuple[dict[str, Any], str | None]:
        """The data to embed under :attr:`max_bytes`, and a note when channels were dropped.

        Halves the channels per layer until the data fits; a note says how many are
        shown and how to see more.
        """
        opts = self.options
        data = self.data(opts)
        size = len(script_json(data))
        if size <= self.max_bytes:
            return data, None
        widest = max(int(t.shape[1]) for t in self.maps.values())
        k = min(opts.max_channels or widest, widest)
        while size > self.max_bytes and k > 1:
            k = max(1, k // 2)
            data = self.data(replace(opts, max_channels=k))
            size = len(script_json(data))
        if size > self.max_bytes:
            raise FeatureMapsError(
                f"the view needs {size / 1e6:.1f} MB even with one channel per layer, over "
                f"max_bytes={self.max_bytes}; show fewer layers or images, or raise max_bytes"
            )
        note = (
            f"Showing {k} channel(s) per layer (asked: {opts.max_channels or 'all'}) to keep "
            f"this output under {self.max_bytes / 1e6:.1f} MB. Pass max_channels=... to "
            "choose fewer, order='top' or 'variance' to see the strongest first, "
            "max_bytes=... to allow more, or use .save('report.html') for every channel."
        )
        return data, note

    def _repr_html_(self) -> str:
        data, note = self.cell_data()
        return cell_html(data, note)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the view as a self-contained report file (every asked channel, no cap)."""
        from .report.build import render_html

        out = Path(path)
        if out.is_dir():
            raise FeatureMapsError(f"{str(out)!r} is a folder; give a file name like report.html")
        write_bytes(out, render_html(self.data()).encode("utf-8"))
        return out

    def __repr__(self) -> str:
        layers = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.maps.items())
        return f"Explorer({self.model.spec}, {len(self.names)} image(s), {layers})"


# -- the cell's HTML ---------------------------------------------------------------------------

_BODY = re.compile(r'<body class="report">(.*?)<script type="application/json"', re.S)

_CELL_CSS = """
:host { display: block; container-type: inline-size; }
.fm-body { max-height: 880px; overflow: auto; }
.fm-body .topbar { padding: 8px 14px; }
.relevance-left { min-width: 0; flex: 1 1 320px; }
.relevance-bars { max-width: 100%; height: auto; }
@container (max-width: 820px) {
  .layout { grid-template-columns: 1fr; }
  .sidebar { position: static; }
}
"""


def scoped_css(css: str) -> str:
    """The report's style for a shadow root: page rules apply to the view's own box.

    ``:root`` becomes ``:host``, ``html``/``body`` rules apply to ``.fm-body``, and
    viewport media queries become container queries (the cell, not the window).
    """
    css = css.replace(":root", ":host")
    css = re.sub(r"(^|[}\s,])html, body(\s*\{)", r"\1.fm-body\2", css)
    css = re.sub(r"(^|[}\s,])body(\s*\{)", r"\1.fm-body\2", css)
    css = css.replace("@media (max-width", "@container (max-width")
    return css + _CELL_CSS


def cell_html(data: dict[str, Any], note: str | None = None) -> str:
    """The HTML of one explorer in a cell output: inert markup and data, one script.

    The script attaches a shadow root to its own container, copies the markup and style
    into it and draws the report there (``featuremapsReport.mount``). Without script
    (an untrusted notebook, a static viewer) the fallback text says what to do.
    """
    uid = "fm-explorer-" + uuid.uuid4().hex[:12]
    body = _BODY.search(asset("templates/report.html"))
    if body is None:
        raise FeatureMapsError("the report template has no body")  # a packaging error
    markup = fill_template(body.group(1), page_values(data))
    notice = (
        f'<p class="fm-explorer-note" style="margin:4px 0;font:13px sans-serif;'
        f'color:#92400e">{html.escape(note)}</p>'
        if note
        else ""
    )
    mount = (
        "(function () {\n"
        "  const script = document.currentScript;\n"
        f'  const id = "{uid}";\n'
        "  const host = script && script.parentElement && script.parentElement.id === id\n"
        "    ? script.parentElement : document.getElementById(id);\n"
        "  if (!host || host.shadowRoot) return;\n"
        '  const view = host.querySelector(".fm-explorer-view");\n'
        "  const shadow = view.attachShadow({ mode: 'open' });\n"
        '  shadow.append(host.querySelector("template").content.cloneNode(true));\n'
        '  const data = JSON.parse(host.querySelector(".fm-explorer-data").textContent);\n'
        '  host.querySelector(".fm-explorer-fallback").remove();\n'
        "  featuremapsReport.mount(shadow, data, view, { hash: false });\n"
        "  featuremapsRelevance.mount(shadow, data, view);\n"
        "  featuremapsCompare.mount(shadow, data, view);\n"
        "})();"
    )
    return (
        f'<div class="fm-explorer" id="{uid}">{notice}'
        '<p class="fm-explorer-fallback" style="font:13px sans-serif;color:#555">'
        "featuremaps explorer: this view draws with JavaScript. Run the cell again (or "
        "trust the notebook) to see it; <code>.save('report.html')</code> writes it as a "
        "file.</p>"
        f'<div class="fm-explorer-view"></div>'
        f"<template><style>{scoped_css(report_css())}</style>"
        f'<div class="fm-body report">{markup}</div></template>'
        f'<script type="application/json" class="fm-explorer-data">{script_json(data)}</script>'
        f"<script>{report_script()}\n{mount}</script></div>"
    )


def maps_html(fm: FeatureMaps, *, thumb: int = 72) -> str:
    """A table of captured layers (module, shape, stride, layout) with a PCA thumbnail of
    the first image per layer: what ``FeatureMaps._repr_html_`` shows in a notebook.

    User text (layer names, notes) is escaped; the thumbnails are inline PNGs.
    """
    from .pca import pca_rgb
    from .render import pca_picture
    from .report.html import data_url, escape

    rows = []
    for name, t in fm.items():
        info = fm.info[name]
        try:
            pic = pca_picture(pca_rgb(t[0], 3), size=thumb)
            img = (
                f'<img src="{data_url(pic)}" width="{thumb}" height="{thumb}" '
                f'alt="PCA of {escape(name)}" style="image-rendering:pixelated">'
            )
        except FeatureMapsError as exc:
            img = f"<small>no PCA: {escape(exc)}</small>"
        stride = "×".join(f"{s:g}" for s in info.stride) if info.stride else ""
        rows.append(
            f"<tr><td><code>{escape(name)}</code></td><td>{escape(info.module_type)}</td>"
            f"<td>{'×'.join(str(n) for n in t.shape)}</td><td>{stride}</td>"
            f"<td>{escape(info.layout)}</td><td>{img}</td></tr>"
        )
    head = (
        "<tr><th>layer</th><th>module</th><th>shape (B×C×H×W)</th><th>stride</th>"
        "<th>layout</th><th>PCA (image 0)</th></tr>"
    )
    return (
        f'<table class="featuremaps-maps"><caption>FeatureMaps: {len(fm)} layer(s)</caption>'
        f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
    )
