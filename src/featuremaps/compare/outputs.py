"""What ``featuremaps compare`` writes: ``cka.json``, ``cka.png`` and ``compare.html``.

The heatmap is drawn with matplotlib's object API on the Agg canvas (no pyplot state).
The page is one self-contained file built with the report's page helpers
(:mod:`featuremaps.report.html`): its style and script are inline and allowed by hash in a
Content-Security-Policy that forbids every request; the data travels as JSON in a
``<script type="application/json">`` element, escaped so no text can close it.
"""

from __future__ import annotations

import html
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._files import atomic_path, write_bytes, write_json
from ..errors import ReduceError
from ..pca import pca_rgb
from ..render import colormap_lut, pca_picture
from ..report.html import asset, data_url, fill_template, inline_csp, script_json
from .joint import joint_pca
from .run import ESTIMATOR, CompareResult, Side

JSON_NAME = "cka.json"
PNG_NAME = "cka.png"
HTML_NAME = "compare.html"
PICTURE_SIZE = 112
"""Side, in pixels, of each layer picture on the page (maps are upsampled by a whole factor)."""
CMAP = "viridis"


def heatmap_png(result: CompareResult) -> bytes:
    """The CKA matrix as a PNG: model A's layers down, model B's across, a colour bar.

    The colours span CKA 0..1 (the debiased estimate can dip slightly below 0; such
    cells take the colour of 0, their number is in ``cka.json``); NaN cells are grey.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = result.matrix
    rows, cols = m.shape
    width = min(16.0, 2.8 + 0.75 * cols + 0.08 * max(map(len, result.a.layers)))
    height = min(16.0, 2.2 + 0.55 * rows + 0.06 * max(map(len, result.b.layers)))
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = _cmap()
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(cols), result.b.layers, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(rows), result.a.layers, fontsize=8)
    ax.set_xlabel(
        f"model B: {_short(result.b.model.spec)}, weights {_weights(result.b)}", fontsize=9
    )
    ax.set_ylabel(
        f"model A: {_short(result.a.model.spec)}, weights {_weights(result.a)}", fontsize=9
    )
    if rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                v = m[i, j]
                text = "n/a" if math.isnan(v) else f"{v:.2f}"
                dark = math.isnan(v) or v > 0.6
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=7,
                    color="black" if dark else "white",
                )  # fmt: skip
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("debiased linear CKA")
    ax.set_title(
        f"CKA over {result.images_used} images (batches of {result.batch_size}, "
        f"pool {result.pool})",
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _axis_label(which: str, side: Side) -> str:
    return f"model {which}: {_short(side.model.spec)}, weights {_weights(side)}"


def _weights(side: Side) -> str:
    """The weights as a short label: a file's name, or DEFAULT / none."""
    w = side.model.weights
    name = Path(w).name if ("/" in w or os.sep in w) else w.split(" (")[0]
    return _short(name, 32)


def _cmap() -> Any:
    import matplotlib

    cmap = matplotlib.colormaps[CMAP].copy()
    cmap.set_bad("#c8c8c8")
    return cmap


def layer_pictures(maps: torch.Tensor) -> tuple[list[np.ndarray], str | None]:
    """PCA pictures of one layer's example maps, ``(N, C, H, W)``, fitted jointly.

    One basis and one colour scale serve the ``N`` images, so a colour means the same
    direction of the layer's channels in each of them.

    Returns:
        ``N`` uint8 ``(h, w, 3)`` pictures (upsampled to about :data:`PICTURE_SIZE`), or
        ``([], reason)`` when PCA has no defined result.
    """
    try:
        rgb = pca_rgb(maps.to(torch.float32), 3)
    except ReduceError as exc:
        return [], str(exc)
    if rgb.ndim == 3:  # a batch of one comes back as (H, W, 3)
        rgb = rgb[None]
    return _pictures(rgb), None


def _pictures(rgb: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(pca_picture(r, size=PICTURE_SIZE)) for r in rgb]


def shared_basis_pairs(result: CompareResult) -> list[tuple[int, int]]:
    """The cells drawn in one basis: the same layer of the same model in A and B.

    Only there do the channels correspond (two checkpoints of one architecture), so
    only there does one basis make a colour mean one direction in both pictures.
    """
    if result.a.model.spec != result.b.model.spec:
        return []
    pairs = []
    for i, (name, shape) in enumerate(zip(result.a.layers, result.a.shapes, strict=True)):
        if name in result.b.layers:
            j = result.b.layers.index(name)
            if result.b.shapes[j][0] == shape[0]:
                pairs.append((i, j))
    return pairs


def _joint(result: CompareResult, i: int, j: int) -> dict[str, Any] | None:
    a = result.example_maps_a.get(result.a.layers[i])
    b = result.example_maps_b.get(result.b.layers[j])
    if a is None or b is None:
        return None
    try:
        rgb_a, rgb_b = joint_pca(a, b, 3)
    except ReduceError as exc:
        return {"a": [], "b": [], "error": str(exc)}
    return {
        "a": [data_url(Image.fromarray(p), optimize=True) for p in _pictures(rgb_a)],
        "b": [data_url(Image.fromarray(p), optimize=True) for p in _pictures(rgb_b)],
        "error": None,
    }


def _colour(v: float) -> str:
    if math.isnan(v):
        return "#c8c8c8"
    r, g, b = colormap_lut(CMAP)[round(min(max(v, 0.0), 1.0) * 255)]
    return f"#{r:02x}{g:02x}{b:02x}"


def page_data(result: CompareResult) -> dict[str, Any]:
    """Everything the page shows, JSON-ready."""

    def side(s: Side, maps: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        out = []
        for name, shape in zip(s.layers, s.shapes, strict=True):
            pictures, error = layer_pictures(maps[name]) if name in maps else ([], None)
            out.append(
                {
                    "name": name,
                    "shape": list(shape),
                    "pictures": [data_url(Image.fromarray(p), optimize=True) for p in pictures],
                    "error": error,
                }
            )
        return out

    m = result.matrix
    return {
        "model_a": result.a.describe(),
        "model_b": result.b.describe(),
        "layers_a": side(result.a, result.example_maps_a),
        "layers_b": side(result.b, result.example_maps_b),
        "matrix": [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in m],
        "colours": [[_colour(float(v)) for v in row] for row in m],
        "images": [data_url(Image.fromarray(x), "JPEG", quality=85) for x in result.examples],
        "joint": {f"{i},{j}": _joint(result, i, j) for i, j in shared_basis_pairs(result)},
        "images_used": result.images_used,
        "images_total": result.images_total,
        "skipped": len(result.skipped),
        "left_out": result.left_out,
        "batch_size": result.batch_size,
        "batches": result.batches,
        "pool": result.pool,
        "estimator": ESTIMATOR,
    }


def render_page(data: dict[str, Any]) -> str:
    """The self-contained HTML page of a comparison."""
    from .. import __version__

    css = asset("static/common.css") + asset("static/compare.css")
    js = asset("static/compare.js")
    csp = inline_csp([css], [js], img_src="data:")
    a, b = data["model_a"], data["model_b"]
    esc = html.escape
    title = f"{a['model']} ({a['weights']}) vs {b['model']} ({b['weights']})"
    values = {
        "csp": esc(csp),
        "title": esc(title),
        "model_a": esc(f"{a['model']}, weights {a['weights']}"),
        "model_b": esc(f"{b['model']}, weights {b['weights']}"),
        "preprocess": esc(a["preprocess"]),
        "summary": esc(
            f"{data['images_used']} of {data['images_total']} images used "
            f"({data['skipped']} skipped, {data['left_out']} left out), "
            f"{data['batches']} batch(es) of {data['batch_size']}, pool {data['pool']}"
        ),
        "estimator": esc(data["estimator"]),
        "version": esc(__version__),
        "css": css,
        "js": js,
        "data": script_json(data),
    }
    return fill_template(asset("templates/compare.html"), values)


def write_outputs(result: CompareResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``cka.json``, ``cka.png`` and ``compare.html`` atomically into ``out_dir``."""
    out = Path(out_dir)
    paths = {"json": out / JSON_NAME, "heatmap": out / PNG_NAME, "html": out / HTML_NAME}
    write_json(paths["json"], result.to_json())
    with atomic_path(paths["heatmap"]) as tmp:
        tmp.write_bytes(heatmap_png(result))
    write_bytes(paths["html"], render_page(page_data(result)).encode("utf-8"))
    return paths
