"""From a model spec and image files to pictures on disk and a manifest.

This is what ``featuremaps run`` and ``featuremaps demo`` call: load the model, load and
preprocess each image, capture, reduce, render, write. Every file is written under a
temporary name and renamed, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ._files import atomic_path, save_image, write_json
from .capture import FeatureMaps, LayoutContext, capture
from .errors import FeatureMapsError, ReduceError
from .images import display_image, expand_inputs, load_image, preprocess
from .models import LoadedModel, load_model
from .reduce import PCABasis, channel_stats, load_bases, pca_rgb
from .render import pca_panel, render_grid

Progress = Callable[[str, int, int], None]
"""Called after each step as ``progress(phase, done, total)``."""


@dataclass
class RenderOptions:
    """The knobs of the pictures (see :func:`featuremaps.render.render_grid`)."""

    max_maps: int | None = 64
    cols: int | None = None
    map_size: int = 64
    cmap: str = "viridis"
    norm: str = "linear"
    order: str | Sequence[int] = "index"
    scale: str = "channel"
    labels: bool = False
    colorbar: bool = True
    pca: int = 3


@dataclass
class ImageResult:
    """One image's input picture, captured maps and the model's predictions."""

    path: Path
    key: str
    display: np.ndarray
    maps: FeatureMaps
    predictions: list[dict[str, Any]] | None = None


@dataclass
class RunResult:
    """What a run wrote."""

    out_dir: Path
    manifest: Path
    files: list[Path] = field(default_factory=list)
    manifest_data: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; a named device must be available."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise FeatureMapsError("--device cuda: no CUDA device here; use auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise FeatureMapsError("--device mps: MPS is not available here; use auto or cpu")
    if device not in ("cpu", "cuda", "mps"):
        raise FeatureMapsError(f"--device {device!r}: use auto, cpu, cuda or mps")
    return torch.device(device)


def top_predictions(
    logits: torch.Tensor, categories: Sequence[str], k: int = 5
) -> list[dict[str, Any]]:
    """The ``k`` most probable classes of one logit vector, as label/index/probability."""
    probs = torch.softmax(logits.double().flatten(), 0)
    values, idx = probs.topk(min(k, probs.numel()))
    return [
        {"label": categories[int(i)], "index": int(i), "probability": round(float(p), 6)}
        for p, i in zip(values, idx, strict=True)
    ]


def predictions_note(is_classifier: bool, pretrained: bool) -> str:
    """Why a result carries no top-5 predictions."""
    if is_classifier and not pretrained:
        return "random weights: predictions would be meaningless, so none are shown"
    return "not an ImageNet classifier: no predictions"


def _unique_keys(paths: Sequence[Path]) -> list[str]:
    keys: list[str] = []
    for p in paths:
        base = _safe(p.stem) or "image"
        key, n = base, 1
        while key in keys:
            n += 1
            key = f"{base}-{n}"
        keys.append(key)
    return keys


def _safe(name: str) -> str:
    """A name usable as a file name (no path separators or odd characters)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "_"


def analyze(
    model: LoadedModel,
    images: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str],
    *,
    full: bool = False,
    device: str = "auto",
    with_predictions: bool = True,
    layout: LayoutContext | None = None,
    allow_nan: bool = False,
    progress: Progress | None = None,
) -> list[ImageResult]:
    """Capture ``layers`` for each image (one forward each).

    Args:
        model: from :func:`featuremaps.load_model`.
        images: files, folders or globs.
        layers: names, globs or presets.
        full: keep the whole image (no centre crop).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        with_predictions: run the full forward and keep the top-5 of ImageNet classifiers.
        layout: token-layout overrides.
        allow_nan: keep maps holding NaN/Inf instead of stopping with an error.
        progress: called after each image.

    Raises:
        FeatureMapsError: on any bad input (image, layer, non-finite values).
    """
    paths = expand_inputs(images)
    dev = resolve_device(device)
    module = model.module.to(dev)
    predict = with_predictions and model.is_imagenet_classifier and model.pretrained
    results: list[ImageResult] = []
    for n, (path, key) in enumerate(zip(paths, _unique_keys(paths), strict=True), 1):
        img = load_image(path, draft_size=model.preprocess.resize)
        x = preprocess(img, model.preprocess, full=full)[None].to(dev)
        fm = capture(module, x, layers, full_forward=predict, layout=layout)
        if not allow_nan:
            for name, t in fm.items():
                bad = int((~torch.isfinite(t)).sum())
                if bad:
                    raise FeatureMapsError(
                        f"layer {name!r} produced {bad} NaN/Inf value(s) on {path}: the "
                        "model's weights or input are broken. Check them, or pass "
                        "--allow-nan to draw such values in magenta."
                    )
        preds = None
        if predict and isinstance(fm.output, torch.Tensor) and fm.output.ndim == 2:
            assert model.categories is not None
            preds = top_predictions(fm.output[0], model.categories)
        results.append(ImageResult(path, key, display_image(x[0], model.preprocess), fm, preds))
        if progress:
            progress("capture", n, len(paths))
    return results


def layer_record(name: str, fm: FeatureMaps) -> dict[str, Any]:
    """Manifest entry of one layer: shape, module info and per-channel statistics."""
    t = fm[name][0]
    stats = channel_stats(t)
    info = fm.info[name].to_dict()
    return {
        **info,
        "channels": int(t.shape[0]),
        "dead_share": float(stats["dead"].mean()),
        "min": _finite_list(stats["min"]),
        "mean": _finite_list(stats["mean"]),
        "max": _finite_list(stats["max"]),
    }


def _finite_list(values: np.ndarray) -> list[float | None]:
    """Floats for JSON; NaN/Inf (only kept with ``allow_nan``) become ``null``."""
    return [float(v) if np.isfinite(v) else None for v in values]


def run(
    spec: str,
    images: Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str],
    out_dir: str | Path,
    *,
    weights: str = "DEFAULT",
    options: RenderOptions | None = None,
    full: bool = False,
    device: str = "auto",
    save_activations: bool = False,
    pca_basis: str | Path | None = None,
    layout: LayoutContext | None = None,
    allow_nan: bool = False,
    model: LoadedModel | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Capture and render ``layers`` of ``spec`` for each image into ``out_dir``.

    Writes, per image, ``KEY/input.png``, ``KEY/LAYER.png`` (channel grid),
    ``KEY/pca_panel.png``, and ``manifest.json`` at the top (and
    ``activations.safetensors`` with ``save_activations``).

    Example:
        >>> from featuremaps.images import sample_image
        >>> r = run("resnet18", [sample_image()], "layer1", "out", weights="none")
    """
    opts = options or RenderOptions()
    if opts.pca not in (0, 1, 3):
        raise FeatureMapsError(f"--pca {opts.pca}: use 1 (gray), 3 (RGB) or 0 (none)")
    bases: dict[str, PCABasis] | None = load_bases(pca_basis) if pca_basis else None
    loaded = model or load_model(spec, weights)
    results = analyze(
        loaded,
        images,
        layers,
        full=full,
        device=device,
        layout=layout,
        allow_nan=allow_nan,
        progress=progress,
    )
    out = Path(out_dir)
    files: list[Path] = []
    manifest: dict[str, Any] = {
        "model": loaded.spec,
        "weights": loaded.weights,
        "preprocess": loaded.preprocess.to_dict(),
        "full_image": full,
        "render": {k: v if not isinstance(v, tuple) else list(v) for k, v in vars(opts).items()},
        "pca_basis": str(pca_basis) if pca_basis else None,
        "images": [],
    }
    if bases is not None:
        missing = [n for n in results[0].maps if n not in bases]
        if missing:
            raise FeatureMapsError(
                f"the PCA basis file {str(pca_basis)!r} has no basis for {missing}; it has "
                f"{sorted(bases)}"
            )
    tensors: dict[str, torch.Tensor] = {}
    total = sum(len(r.maps) for r in results)
    done = 0
    for res in results:
        folder = out / res.key
        entry: dict[str, Any] = {
            "path": str(res.path),
            "key": res.key,
            "input": f"{res.key}/input.png",
            "input_size": list(res.maps.input_shape[-2:]),
            "predictions": res.predictions,
            "layers": {},
        }
        if res.predictions is None:
            entry["predictions_note"] = predictions_note(
                loaded.is_imagenet_classifier, loaded.pretrained
            )
        files.append(_save(Image.fromarray(res.display), folder / "input.png"))
        pcas: dict[str, np.ndarray] = {}
        for name in res.maps:
            t = res.maps[name][0]
            grid = render_grid(
                t,
                max_maps=opts.max_maps,
                cols=opts.cols,
                map_size=opts.map_size,
                norm=opts.norm,  # type: ignore[arg-type]
                cmap=opts.cmap,
                order=opts.order,
                scale=opts.scale,
                labels=opts.labels,
                colorbar=opts.colorbar,
            )
            fname = f"{_safe(name)}.png"
            files.append(_save(grid.image, folder / fname))
            rec = layer_record(name, res.maps)
            rec["grid"] = f"{res.key}/{fname}"
            rec["grid_channels"] = grid.channels
            if opts.pca:
                try:
                    basis = bases.get(name) if bases else None
                    pcas[name] = pca_rgb(t, opts.pca, basis=basis)
                except ReduceError as exc:
                    rec["pca_error"] = str(exc)
            entry["layers"][name] = rec
            if save_activations:
                tensors[f"{res.key}/{name}"] = res.maps[name].contiguous()
            done += 1
            if progress:
                progress("render", done, total)
        if pcas:
            panel = pca_panel(res.display, pcas)
            files.append(_save(panel, folder / "pca_panel.png"))
            entry["pca_panel"] = f"{res.key}/pca_panel.png"
        manifest["images"].append(entry)
    if save_activations:
        from safetensors.torch import save_file

        target = out / "activations.safetensors"
        with atomic_path(target) as tmp:
            save_file(
                tensors,
                str(tmp),
                metadata={"model": loaded.spec, "keys": json.dumps(list(tensors))},
            )
        files.append(target)
        manifest["activations"] = "activations.safetensors"
    manifest_path = out / "manifest.json"
    write_json(manifest_path, manifest)
    files.append(manifest_path)
    return RunResult(out, manifest_path, files, manifest)


def _save(img: Any, path: Path) -> Path:
    save_image(img, path, optimize=False, compress_level=3)
    return path
