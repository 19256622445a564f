"""What an atlas writes: ``atlas.json``, ``pca_basis.npz``, ``crops/`` and the HTML pages.

Only the driver writes, after the last batch is folded. ``atlas.json`` comes last: its
presence says the outputs are complete. The pages are filled from the packaged
templates ``templates/atlas_*.html`` with every user-given text escaped.
"""

from __future__ import annotations

import glob
import html
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image

from .._files import describe_os_error, save_image, write_bytes, write_json
from ..errors import FeatureMapsError, ImageError
from ..images import resized_pixels
from ..models import LoadedModel, Preprocess
from ..reduce import save_bases
from ..report.html import asset, fill_template
from . import crops as crops_module
from .batch import NO_IMAGE, AtlasSpec, LayerMeta
from .crops import CROP_FACTOR, MIN_CROP, CropTiles, cut_crop, sheet_box, sheet_cell
from .data import Plan, ordered_loader, read_image
from .state import AtlasState
from .visuals import Pictures, VisualizeSpec


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32."""
    v = np.float32(value)
    short = float(str(v))
    return short if np.float32(short) == v else float(v)


def layer_slugs(names: Sequence[str]) -> list[str]:
    """A distinct file name per layer (its page and its crop folder)."""
    slugs: list[str] = []
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "_"
        slug, n = base, 1
        while slug in slugs or slug in ("index", "crops"):
            n += 1
            slug = f"{base}-{n}"
        slugs.append(slug)
    return slugs


def atlas_document(
    state: AtlasState,
    plan: Plan,
    loaded: LoadedModel,
    spec: AtlasSpec,
    metas: Sequence[LayerMeta],
    pictures: Pictures | None = None,
    vspec: VisualizeSpec | None = None,
) -> dict[str, Any]:
    """The content of ``atlas.json``: a function of the dataset and the options only.

    Each channel's ``top`` is the activation ranking (spatial max or mean); with the
    ``relevance`` score, ``top_relevance`` beside it ranks the images by the channel's
    relevance to each image's own top-1 class, and ``mean_relevance`` averages it. With
    visualizations, ``visualization`` names the channel's picture and its final value.
    An entry's ``crop`` is ``{"file": sheet, "box": [left, top, width, height]}``: the
    crops of a top list share one JPEG (``crops.SHEET_ALIGN``; :func:`read_crop`).
    """
    paths = plan.paths
    side = int(loaded.preprocess.crop or 0)
    labels = loaded.categories
    layers_json: dict[str, Any] = {}
    for li, (name, slug, part, meta) in enumerate(
        zip(spec.names, layer_slugs(spec.names), state.layers, metas, strict=True)
    ):
        pixels = state.n_images * meta.shape[1] * meta.shape[2]
        channels = []
        for c in range(meta.shape[0]):
            entries = []
            for rank in range(part.scores.shape[1]):
                i = int(part.ids[c, rank])
                if i == NO_IMAGE:
                    break
                entries.append(
                    {
                        "image": paths[i],
                        "score": _f32(part.scores[c, rank]),
                        "y": int(part.ys[c, rank]),
                        "x": int(part.xs[c, rank]),
                        "crop": {
                            "file": f"crops/{slug}/{sheet_name(c)}",
                            "box": sheet_box(
                                rank,
                                int(part.ys[c, rank]),
                                int(part.xs[c, rank]),
                                meta.stride,
                                side,
                            ),
                        },
                    }
                )
            channel: dict[str, Any] = {
                "channel": c,
                "mean": _f32(part.total[c] / pixels) if pixels else None,
                "dead": int(part.dead[c]),
                "dead_share": float(part.dead[c] / state.n_images) if state.n_images else None,
                "top": entries,
            }
            if part.relevance is not None:
                rel = part.relevance
                channel["mean_relevance"] = (
                    _f32(rel.total[c] / state.n_images) if state.n_images else None
                )
                channel["top_relevance"] = _relevance_entries(
                    rel, c, paths, slug, labels, meta.stride, side
                )
            if pictures is not None:
                value = pictures[li][c][1]
                channel["visualization"] = {
                    "file": f"crops/{slug}/{vis_name(c)}",
                    "objective": f"channel:{name}:{c}",
                    "value": value if math.isfinite(value) else None,
                }
            channels.append(channel)
        layers_json[name] = {
            "shape": list(meta.shape),
            "stride": list(meta.stride),
            "page": f"{slug}.html",
            "channels": channels,
        }
    rankings = {"top": f"activation, spatial {spec.activation_score} of the channel"}
    if spec.relevance:
        rankings["top_relevance"] = (
            "relevance of the channel to the image's own top-1 class: gradient of that "
            "class's logit x activation, summed over the map; y, x: where that product is "
            "largest"
        )
    return {
        "model": loaded.spec,
        "weights": loaded.weights,
        "preprocess": loaded.preprocess.to_dict(),
        "score": spec.score,
        "rankings": rankings,
        "top": spec.top,
        "batch_size": plan.batch_size,
        "crop_rule": f"{CROP_FACTOR:g} x stride (at least {MIN_CROP} pixels) around the "
        "centre of the map cell, clipped to the input",
        "images": {"total": len(paths), "used": state.n_images, "skipped": len(state.skipped)},
        "skipped": [{"image": paths[i], "error": m} for i, m in sorted(state.skipped)],
        "pca_basis": "pca_basis.npz" if state.n_images else None,
        "visualize": None
        if vspec is None
        else {
            **vspec.to_dict(),
            "objective": "channel:LAYER:C, the mean of the channel (featuremaps.visualize)",
        },
        "layers": layers_json,
    }


def vis_name(channel: int) -> str:
    """The file name of a channel's visualization in its layer's crop folder."""
    return f"c{channel:04d}_vis.png"


def sheet_name(channel: int, relevance: bool = False) -> str:
    """The file name of a channel's crop sheet (``top``, or ``top_relevance``)."""
    return f"c{channel:04d}{'_r' if relevance else ''}.jpg"


def read_crop(atlas_dir: str | os.PathLike[str], entry: dict[str, Any]) -> Image.Image:
    """The crop of a top-list entry of ``atlas.json``, cut from its sheet.

    Example:
        >>> doc = json.loads(Path("atlas/atlas.json").read_text())
        >>> read_crop("atlas", doc["layers"]["layer3"]["channels"][7]["top"][0]).size
        (32, 32)
    """
    left, top, width, height = entry["crop"]["box"]
    with Image.open(Path(atlas_dir) / entry["crop"]["file"]) as sheet:
        return sheet.crop((left, top, left + width, top + height))


def _relevance_entries(
    rel: Any,
    c: int,
    paths: Sequence[str],
    slug: str,
    labels: Sequence[str] | None,
    stride: tuple[float, float],
    side: int,
) -> list[dict[str, Any]]:
    entries = []
    for rank in range(rel.scores.shape[1]):
        i = int(rel.ids[c, rank])
        if i == NO_IMAGE:
            break
        k = int(rel.classes[c, rank])
        entries.append(
            {
                "image": paths[i],
                "relevance": _f32(rel.scores[c, rank]),
                "class": {
                    "index": k,
                    "label": labels[k] if labels is not None and 0 <= k < len(labels) else None,
                    "prob": _f32(rel.probs[c, rank]),
                },
                "y": int(rel.ys[c, rank]),
                "x": int(rel.xs[c, rank]),
                "crop": {
                    "file": f"crops/{slug}/{sheet_name(c, True)}",
                    "box": sheet_box(
                        rank, int(rel.ys[c, rank]), int(rel.xs[c, rank]), stride, side
                    ),
                },
            }
        )
    return entries


def write_outputs(
    out: Path,
    doc: dict[str, Any],
    state: AtlasState,
    loaded: LoadedModel,
    spec: AtlasSpec,
    metas: Sequence[LayerMeta],
    n_components: int,
    report_url: str | None,
    workers: int,
    progress: Any = None,
    pictures: Pictures | None = None,
    tiles: CropTiles | None = None,
) -> tuple[Path, Path | None, list[Path]]:
    """Write the basis, the crops, the pages and, last, ``atlas.json``.

    The crops of an earlier run are set aside and deleted in a background thread while
    the pages are written (deleting thousands of files is slow I/O, not CPU).
    """
    basis_path = None
    if state.n_images:
        basis_path = out / "pca_basis.npz"
        fitted = [p.pca.fit(n_components) for p in state.layers]
        save_bases(dict(zip(spec.names, fitted, strict=True)), basis_path)
    slugs = layer_slugs(spec.names)
    old = write_crops(
        out, doc, loaded.preprocess, metas, spec, slugs, workers, progress, pictures, tiles
    )
    cleaner = threading.Thread(target=_remove_all, args=(old,), daemon=True)
    cleaner.start()
    try:
        pages = write_pages(out, doc, report_url)
        atlas_json = out / "atlas.json"
        write_json(atlas_json, doc, indent=None)  # last: says the outputs are complete
    finally:
        cleaner.join()
    return atlas_json, basis_path, pages


def _remove_all(folders: Sequence[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _Sheet:
    """The crops of one top list, written side by side as one JPEG."""

    folder: int  # index of the layer's fresh folder
    name: str
    cell: tuple[int, int]  # (h, w) of each crop's cell
    tiles: list[np.ndarray | None]  # rank -> crop (None: its image is unreadable now)

    def picture(self) -> np.ndarray:
        """The sheet: each crop at the top left of its cell, its last row and column
        repeated over the rest of the cell (as a JPEG encoder pads a block); grey where
        a crop is missing."""
        h, w = self.cell
        sheet = np.full((h, w * len(self.tiles), 3), 200, dtype=np.uint8)
        for k, tile in enumerate(self.tiles):
            if tile is not None:
                th, tw = tile.shape[:2]
                pad = ((0, h - th), (0, w - tw), (0, 0))
                sheet[:, k * w : (k + 1) * w] = np.pad(tile, pad, mode="edge")
        return sheet


class _CropCutter(torch.utils.data.Dataset[list[tuple[int, int, np.ndarray]]]):
    """Item ``i`` decodes image ``i`` as the atlas saw it and cuts the crops it is wanted
    for: ``(sheet, rank, pixels)`` each.

    Run by DataLoader workers, so decoding and cutting happen in parallel. The crops are
    cut from the resized, cropped uint8 pixels the model's input was normalized from; an
    image that cannot be read any more gives none (its cells stay grey).
    """

    def __init__(
        self,
        images: Sequence[str],
        wants: Sequence[Sequence[tuple[int, int, int, int, tuple[float, float]]]],
        pp: Preprocess,
    ) -> None:
        self.images, self.wants, self.pp = images, wants, pp

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[tuple[int, int, np.ndarray]]:
        try:
            pixels = resized_pixels(read_image(self.images[i], self.pp.resize), self.pp)
        except (ImageError, OSError, ValueError):  # unreadable since the run: no crops
            return []
        hwc = pixels.permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        return [
            (sheet, rank, cut_crop(hwc, y, x, stride))
            for sheet, rank, y, x, stride in self.wants[i]
        ]


def _write_sheet(sheet: _Sheet, folder: str) -> str:
    """Encode and write one sheet; returns an error message, or ``""``."""
    target = os.path.join(folder, sheet.name)
    try:
        with open(target, "wb") as f:  # a fresh folder: no partial file survives
            Image.fromarray(sheet.picture()).save(f, format="JPEG", quality=92, subsampling=0)
    except OSError as exc:
        return describe_os_error(exc, target)
    return ""


def write_crops(
    out: Path,
    doc: dict[str, Any],
    pp: Preprocess,
    metas: Sequence[LayerMeta],
    spec: AtlasSpec,
    slugs: Sequence[str],
    workers: int,
    progress: Any = None,
    pictures: Pictures | None = None,
    tiles: CropTiles | None = None,
) -> list[Path]:
    """Write every crop sheet: the crops kept during the pass (``tiles``) as they are,
    the others cut from one decoding of each of their images.

    One JPEG per top list instead of one per crop: K times fewer files, which on the
    test machine's ext4 cost more than the encoding. The visualizations (``pictures``)
    go to the same fresh folders, as PNG.

    The sheets are filled a group of layers at a time, each group's crops within
    ``crops.TILE_BUDGET`` bytes; ``workers`` DataLoader processes decode and cut the
    crops that were not kept (none: this process), and as many threads (at least one)
    encode the sheets. Each layer's crops go to a fresh folder of a unique name that then
    replaces ``crops/LAYER``: creating files is cheap, while overwriting thousands of
    them (in place or by renames) makes ext4 flush each one and costs seconds. Folders
    left by a killed run (``.LAYER.*.new``, ``.LAYER.*.old``) are removed first; the
    caller holds the output lock, so no other run is writing them.

    Returns:
        The folders that hold the previous run's crops, for the caller to delete.

    Raises:
        FeatureMapsError: a crop cannot be written (the message names it and the cause).
    """
    side = int(pp.crop or 0)
    groups: list[list[_Sheet]] = [[]]
    wanted: list[dict[str, list[tuple[int, int, int, int, tuple[float, float]]]]] = [{}]
    used = 0  # bytes of the crops of the last group
    for li, name in enumerate(spec.names):
        stride = metas[li].stride
        cell = sheet_cell(stride, side)
        layer_bytes = sum(
            3 * cell[0] * cell[1] * len(ch.get(key, []))
            for ch in doc["layers"][name]["channels"]
            for key in ("top", "top_relevance")
        )
        if groups[-1] and used + layer_bytes > crops_module.TILE_BUDGET:
            groups.append([])
            wanted.append({})
            used = 0
        used += layer_bytes
        for ch in doc["layers"][name]["channels"]:
            for kind, key in enumerate(("top", "top_relevance")):
                entries = ch.get(key, [])
                if not entries:
                    continue
                sheet = _Sheet(li, Path(entries[0]["crop"]["file"]).name, cell, [])
                for rank, entry in enumerate(entries):
                    image = entry["image"]
                    tile = None if tiles is None else tiles.get(li, kind, ch["channel"], image)
                    sheet.tiles.append(tile)
                    if tile is None:
                        want = (len(groups[-1]), rank, entry["y"], entry["x"], stride)
                        wanted[-1].setdefault(image, []).append(want)
                groups[-1].append(sheet)
    crops = out / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    for slug in slugs:  # .LAYER.new/.old: the fixed names of earlier versions
        for pattern in (".{}.new", ".{}.old", ".{}.*.new", ".{}.*.old"):
            for stale in crops.glob(pattern.format(glob.escape(slug))):
                shutil.rmtree(stale, ignore_errors=True)
    fresh = [Path(tempfile.mkdtemp(prefix=f".{slug}.", suffix=".new", dir=crops)) for slug in slugs]
    folders = [str(f) for f in fresh]  # os-level strings: thousands of files
    total, written = sum(len(g) for g in groups), 0
    old: list[Path] = []
    try:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="featuremaps-crops") as pool:
            for group, needs in zip(groups, wanted, strict=True):
                images = sorted(needs)
                cutter = _CropCutter(images, [needs[i] for i in images], pp)
                for cut in ordered_loader(cutter, workers if images else 0):
                    for sheet, rank, pixels in cut:
                        group[sheet].tiles[rank] = pixels
                jobs = [pool.submit(_write_sheet, sh, folders[sh.folder]) for sh in group]
                for job in jobs:
                    error = job.result()
                    if error:
                        raise FeatureMapsError(f"cannot write a crop: {error}")
                    written += 1
                    if progress:
                        progress("crops", written, total)
                group.clear()  # the group's crops are written: free them
        for folder, layer_pictures in zip(fresh, pictures or [], strict=False):
            for c, (picture, _) in layer_pictures.items():
                target = folder / vis_name(c)
                try:
                    save_image(Image.fromarray(picture), target)
                except OSError as exc:
                    raise FeatureMapsError(
                        f"cannot write a visualization: {describe_os_error(exc, target)}"
                    ) from exc
        for folder, slug in zip(fresh, slugs, strict=True):
            old.extend(_swap_in(folder, crops / slug))
    finally:
        for folder in fresh:
            shutil.rmtree(folder, ignore_errors=True)  # only what was not swapped in
    return old


def _swap_in(folder: Path, final: Path) -> list[Path]:
    """Replace ``final`` by ``folder``; returns where the old content was set aside."""
    old = []
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        final.rename(aside / final.name)
        old.append(aside)
    folder.rename(final)
    return old


def _css() -> str:
    return asset("static/common.css") + asset("static/atlas.css")


def write_pages(out: Path, doc: dict[str, Any], report_url: str | None) -> list[Path]:
    """``index.html`` and one page per layer: each channel with its top crops."""
    from .. import __version__

    esc = html.escape
    css = _css()
    common = {
        "version": esc(__version__),
        "model": esc(doc["model"]),
        "weights": esc(doc["weights"]),
        "used": str(doc["images"]["used"]),
        "css": css,
    }
    channel_t = asset("templates/atlas_channel.html")
    crop_t = asset("templates/atlas_crop.html")
    layer_t = asset("templates/atlas_layer.html")
    item_t = asset("templates/atlas_index_layer.html")
    items = []
    pages: list[Path] = []
    for name, layer in doc["layers"].items():
        items.append(
            fill_template(
                item_t,
                {
                    "page": esc(quote(layer["page"])),
                    "name": esc(name),
                    "channels": str(layer["shape"][0]),
                    "shape": esc("x".join(map(str, layer["shape"]))),
                },
            )
        )
        cell = sheet_cell(tuple(layer["stride"]), int(doc["preprocess"]["crop"] or 0))
        cells = [
            _channel_cell(ch, name, report_url, channel_t, crop_t, cell) for ch in layer["channels"]
        ]
        page_html = fill_template(
            layer_t,
            {
                **common,
                "name": esc(name),
                "top": str(doc["top"]),
                "score": esc(_ranking_note(doc)),
                "crop_rule": esc(doc["crop_rule"]),
                "cols": str(math.ceil(math.sqrt(doc["top"]))),
                "channels": "".join(cells),
            },
        )
        page = out / layer["page"]
        write_bytes(page, page_html.encode())
        pages.append(page)
    skipped = doc["images"]["skipped"]
    index_html = fill_template(
        asset("templates/atlas_index.html"),
        {**common, "skipped": f", {skipped} skipped" if skipped else "", "layers": "".join(items)},
    )
    index_path = out / "index.html"
    write_bytes(index_path, index_html.encode())
    return [index_path, *pages]


def _ranking_note(doc: dict[str, Any]) -> str:
    """How the crops of a layer page are ranked, and what else the page shows."""
    activation = doc["rankings"]["top"].split(", ", 1)[-1]
    note = activation
    if "top_relevance" in doc["rankings"]:
        note += " (first row) and by relevance to each image's own top-1 class (second row)"
    if doc.get("visualize"):
        v = doc["visualize"]
        note += (
            f"; left: what maximizes the channel's mean (feature visualization, "
            f"{v['steps']} steps, {v['size']} px, seed {v['seed']})"
        )
    return note


CROP_VIEW = 68
"""Pixels of the square in which a page shows each crop, scaled to fit."""


def _crops(entries: list[dict[str, Any]], crop_t: str, what: Any, cell: tuple[int, int]) -> str:
    """The crops of a top list: each a window on its sheet, scaled to fit ``CROP_VIEW``."""
    esc = html.escape
    sheet_w, sheet_h = cell[1] * len(entries), cell[0]
    out = []
    for e in entries:
        left, top, w, h = e["crop"]["box"]
        scale = CROP_VIEW / max(w, h)

        def px(v: float, scale: float = scale) -> str:
            return f"{v * scale + 0.0:.2f}px"  # + 0.0: no "-0.00"

        out.append(
            fill_template(
                crop_t,
                {
                    "src": esc(quote(e["crop"]["file"])),
                    "image": esc(e["image"]),
                    "what": esc(what(e)),
                    "y": str(e["y"]),
                    "x": str(e["x"]),
                    "window": f"width:{px(w)};height:{px(h)}",
                    "place": f"left:{px(-left)};top:{px(-top)};width:{px(sheet_w)};"
                    f"height:{px(sheet_h)}",
                },
            )
        )
    return "".join(out)


def _relevance_title(e: dict[str, Any]) -> str:
    cls = e["class"]
    name = cls["label"] if cls["label"] is not None else f"class {cls['index']}"
    return f"relevance {e['relevance']:.4g} to {name} (p {cls['prob']:.2f})"


def _channel_cell(
    ch: dict[str, Any],
    layer: str,
    report_url: str | None,
    channel_t: str,
    crop_t: str,
    cell: tuple[int, int],
) -> str:
    esc = html.escape
    c = ch["channel"]
    link = report_url.format(layer=quote(layer), channel=c) if report_url else f"#c{c}"
    crops = _crops(ch["top"], crop_t, lambda e: f"score {e['score']:.4g}", cell)
    more = ""
    if "top_relevance" in ch:
        rel = _crops(ch["top_relevance"], crop_t, _relevance_title, cell)
        more = f'<div class="crops rel" title="by relevance">{rel}</div>'
    vis = ""
    if ch.get("visualization"):
        v = ch["visualization"]
        alt = esc(f"feature visualization of {layer} channel {c}, objective {v['value']:.4g}")
        vis = (
            f'<figure class="vis"><img src="{esc(quote(v["file"]))}" loading="lazy" '
            f'alt="{alt}" title="{alt}"></figure>'
        )
    if ch["mean"] is None:
        stats = "no image"
    else:
        stats = f"mean {ch['mean']:.3g} · dead {ch['dead_share']:.0%}"
        if ch.get("mean_relevance") is not None:
            stats += f" · relevance {ch['mean_relevance']:.3g}"
    return fill_template(
        channel_t,
        {
            "dead": " dead" if ch["dead_share"] == 1 else "",
            "channel": str(c),
            "link": esc(link),
            "stats": esc(stats),
            "crops": crops,
            "more": more,
            "vis": vis,
        },
    )
