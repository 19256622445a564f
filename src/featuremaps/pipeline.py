"""From a model spec and image files to pictures on disk and a manifest.

This is what ``featuremaps run`` and ``featuremaps demo`` call: load the model, load and
preprocess each image, capture, reduce, render, write. Every file is written under a
temporary name and renamed, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ._files import (
    atomic_path,
    describe_os_error,
    output_lock,
    save_image,
    write_json,
)
from .capture import FeatureMaps, LayoutContext, capture
from .errors import FeatureMapsError, Interrupted, ReduceError
from .images import display_image, expand_inputs, load_image, preprocess
from .models import LoadedModel, load_model
from .options import Device, RenderOptions, parse_choice
from .pca import PCARecipe, PCAResult, pca_fit
from .reduce import PCABasis, load_bases, pca_rgb
from .relevance_outputs import (
    RELEVANCE_ORDER,
    ImageRelevance,
    RelevanceRequest,
    cam_picture,
    check_request,
    explain_image,
    target_json,
)
from .render import overlay, pca_panel, pca_picture, render_grid
from .summaries import LayerSummary
from .video import VIDEO_SUFFIXES, VideoProgress, is_video, video_rate

Progress = Callable[[str, int, int], None]
"""Called after each step as ``progress(phase, done, total)``."""


@dataclass
class ImageResult:
    """One image's input picture, captured maps and the model's predictions."""

    path: Path
    key: str
    display: np.ndarray
    maps: FeatureMaps
    predictions: list[dict[str, Any]] | None = None
    relevance: ImageRelevance | None = None


@dataclass
class RunResult:
    """What a run wrote."""

    out_dir: Path
    manifest: Path
    files: list[Path] = field(default_factory=list)
    manifest_data: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: Device | str = Device.AUTO) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; a named device must be available."""
    dev = parse_choice(Device, device, "--device")
    if dev == Device.AUTO:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if dev == Device.CUDA and not torch.cuda.is_available():
        raise FeatureMapsError("--device cuda: no CUDA device here; use auto or cpu")
    if dev == Device.MPS and not torch.backends.mps.is_available():
        raise FeatureMapsError("--device mps: MPS is not available here; use auto or cpu")
    return torch.device(dev.value)


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


def iter_analyze(
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
    relevance: RelevanceRequest | None = None,
) -> Generator[ImageResult, None, None]:
    """Capture ``layers`` for each image (one forward each), yielding one at a time.

    Only the image being yielded is held: a caller that writes and drops each result
    runs in memory that does not grow with the number of images. Arguments as
    :func:`analyze`; with ``relevance``, each result also carries the relevance of its
    layers (:func:`featuremaps.relevance_outputs.explain_image`, one more forward and
    backward).

    Raises:
        FeatureMapsError: on any bad input (image, layer, non-finite values).
    """
    paths = expand_inputs(images)
    dev = resolve_device(device)
    module = model.module.to(dev)
    predict = with_predictions and model.is_imagenet_classifier and model.pretrained
    for n, (path, key) in enumerate(zip(paths, _unique_keys(paths), strict=True), 1):
        img = load_image(path, draft_size=model.preprocess.resize)
        x = preprocess(img, model.preprocess, full=full)[None].to(dev)
        del img
        fm = capture(module, x, layers, full_forward=predict, layout=layout)
        if not allow_nan:
            _check_finite(fm, path)
        preds = None
        if predict and isinstance(fm.output, torch.Tensor) and fm.output.ndim == 2:
            assert model.categories is not None  # an ImageNet classifier has them
            preds = top_predictions(fm.output[0], model.categories)
        fm.output = None  # the logits are read; do not keep them
        rel = explain_image(module, x, layers, relevance, layout=layout) if relevance else None
        result = ImageResult(path, key, display_image(x[0], model.preprocess), fm, preds, rel)
        del x
        if progress:
            progress("capture", n, len(paths))
        yield result
        del result, fm


def _check_finite(fm: FeatureMaps, path: Path) -> None:
    for name, t in fm.items():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise FeatureMapsError(
                f"layer {name!r} produced {bad} NaN/Inf value(s) on {path}: the "
                "model's weights or input are broken. Check them, or pass "
                "--allow-nan to draw such values in magenta."
            )


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
    """Capture ``layers`` for each image (one forward each); all results in a list.

    Holds every image's maps; :func:`iter_analyze` yields them one at a time instead.

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
    return list(
        iter_analyze(
            model,
            images,
            layers,
            full=full,
            device=device,
            with_predictions=with_predictions,
            layout=layout,
            allow_nan=allow_nan,
            progress=progress,
        )
    )


MAX_GRID_PIXELS = 64_000_000
"""The largest channel grid drawn (64 megapixels, 64 MB as a palette image)."""


def check_grid_size(name: str, shape: Sequence[int], opts: RenderOptions) -> None:
    """Refuse a grid whose maps alone would exceed :data:`MAX_GRID_PIXELS`.

    ``shape`` is the layer's ``(C, H, W)``; the count is that of the maps, upsampled as
    :func:`featuremaps.render.render_grid` does, laid out in ``cols`` columns.

    Raises:
        FeatureMapsError: the picture would be too large; says which option to lower.
    """
    c, h, w = (int(v) for v in shape[-3:])
    k = c if isinstance(opts.order, str) else len(opts.order)
    k = min(k, opts.max_maps) if opts.max_maps else k
    factor = max(1, round(opts.map_size / max(h, w, 1)))
    cols = opts.cols or max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    width, height = cols * (w * factor + 2), rows * (h * factor + 2)
    if width * height > MAX_GRID_PIXELS:
        raise FeatureMapsError(
            f"layer {name!r}: {k} maps of {h}x{w} drawn at --map-size {opts.map_size} in "
            f"{cols} columns make a {width}x{height} picture ({width * height / 1e6:.0f} "
            f"megapixels; the limit is {MAX_GRID_PIXELS // 1_000_000}). Lower --map-size, "
            "--max-maps or --cols."
        )


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
    pca_recipe: PCARecipe | None = None,
    relevance: RelevanceRequest | None = None,
    fps: float | None = None,
    channels: Sequence[int] = (),
    pca_joint: bool = False,
) -> RunResult:
    """Capture and render ``layers`` of ``spec`` for each image into ``out_dir``.

    Videos among the inputs (:func:`featuremaps.video.is_video`, GIFs excepted: they stay
    images) go to :func:`featuremaps.video.video_pca` after the images: ``STEM/LAYER.pca.mp4``
    (the input beside its PCA picture and the ``channels``, one basis over the video),
    sampled at ``fps`` (``None``: the video's own rate, at most
    :data:`DEFAULT_VIDEO_FPS`), listed under ``manifest["videos"]``. With ``pca_joint``
    one basis per layer is fitted over all the images first (one extra forward per
    image, constant memory: :class:`featuremaps.pca.PCAAccumulator`-style streaming
    sums) and every image is drawn with it.

    Writes, per image, ``KEY/input.png``, ``KEY/LAYER.png`` (channel grid),
    ``KEY/pca_panel.png``, and ``manifest.json`` at the top (and
    ``activations.safetensors`` with ``save_activations``). With ``pca_recipe`` (the
    DINO-style options of :func:`featuremaps.pca.pca_fit`: foreground, whitening,
    colours, outliers) the PCA pictures follow it, and each layer also gets
    ``KEY/LAYER.pca.png`` (map resolution) and ``KEY/LAYER.pca-overlay.png`` (over the
    input), with the foreground share and the outliers in the manifest. With ``relevance``
    (:class:`~featuremaps.relevance_outputs.RelevanceRequest`) each image's entry gains
    ``target`` and each layer ``relevance`` (per channel) and ``KEY/LAYER.cam.png``
    (Grad-CAM over the input); its ``order`` ranks the grids by relevance. Each image is written and
    dropped before the next is read, so memory does not grow with the image count.

    The inputs and the output folder are checked before the model is loaded; the folder
    is locked (:func:`featuremaps._files.output_lock`) so two runs cannot write into it
    at once. A run that fails before writing anything removes the folder it created.
    Ctrl-C raises :class:`featuremaps.errors.Interrupted` after writing a manifest of the
    images that were complete; no file is left half-written.

    Example:
        >>> from featuremaps.images import sample_image
        >>> r = run("resnet18", [sample_image()], "layer1", "out", weights="none")
    """
    opts = options or RenderOptions()  # a RenderOptions is valid once built
    if pca_recipe is not None:
        pca_recipe.validate()
    paths = expand_inputs(images, also=VIDEO_SUFFIXES)
    videos = [p for p in paths if _is_video_input(p)]
    paths = [p for p in paths if p not in videos]
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise FeatureMapsError(f"--fps must be a positive number, got {fps}")
    if pca_joint and pca_basis:
        raise FeatureMapsError("--pca-joint fits a basis; --pca-basis gives one: choose one")
    for video in videos:
        video_rate(video)  # opens it: a missing, corrupt or unsupported video fails here
    bases: dict[str, PCABasis] | None = load_bases(pca_basis) if pca_basis else None
    out = Path(out_dir)
    created = not out.exists()
    try:
        with output_lock(out, "featuremaps run"):  # prepares the folder first
            return _run_locked(
                spec,
                paths,
                layers,
                out,
                weights=weights,
                opts=opts,
                full=full,
                device=device,
                save_activations=save_activations,
                pca_basis=pca_basis,
                bases=bases,
                layout=layout,
                allow_nan=allow_nan,
                model=model,
                progress=progress,
                pca_recipe=pca_recipe,
                relevance=relevance,
                videos=videos,
                fps=fps,
                channels=channels,
                pca_joint=pca_joint,
            )
    except BaseException:
        if created:
            _remove_if_empty(out)
        raise


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (something was written), or gone
        pass


def _run_locked(
    spec: str,
    paths: list[Path],
    layers: str | Sequence[str],
    out: Path,
    *,
    weights: str,
    opts: RenderOptions,
    full: bool,
    device: str,
    save_activations: bool,
    pca_basis: str | Path | None,
    bases: dict[str, PCABasis] | None,
    layout: LayoutContext | None,
    allow_nan: bool,
    model: LoadedModel | None,
    progress: Progress | None,
    pca_recipe: PCARecipe | None = None,
    relevance: RelevanceRequest | None = None,
    videos: Sequence[Path] = (),
    fps: float | None = None,
    channels: Sequence[int] = (),
    pca_joint: bool = False,
) -> RunResult:
    loaded = model or load_model(spec, weights)
    if relevance is not None:
        check_request(loaded, relevance)
    manifest: dict[str, Any] = {
        "model": loaded.spec,
        "weights": loaded.weights,
        "preprocess": loaded.preprocess.to_dict(),
        "full_image": full,
        "render": opts.to_json(),
        "pca_basis": str(pca_basis) if pca_basis else None,
        "pca_recipe": _recipe_json(pca_recipe),
        "images": [],
    }
    if relevance is not None and relevance.order:
        manifest["render"]["order"] = RELEVANCE_ORDER
    manifest_path = out / "manifest.json"
    files: list[Path] = []
    spool = _ActivationSpool(out) if save_activations else None
    if pca_joint and paths and opts.pca:
        from .joint import joint_bases

        joint = replace(pca_recipe or PCARecipe(), n_components=opts.pca)
        first_pass = iter_analyze(
            loaded,
            paths,
            layers,
            full=full,
            device=device,
            with_predictions=False,
            layout=layout,
            allow_nan=allow_nan,
        )
        bases = joint_bases((res.maps for res in first_pass), joint)
        manifest["pca_joint"] = True
    results = (
        iter_analyze(
            loaded,
            paths,
            layers,
            full=full,
            device=device,
            layout=layout,
            allow_nan=allow_nan,
            relevance=relevance,
        )
        if paths
        else _no_results()
    )
    try:
        for res in results:
            if bases is not None:
                _check_bases(bases, res.maps, pca_basis)
            entry, written = _write_image(
                res, out, opts, bases, loaded, spool, pca_recipe, relevance
            )
            del res
            manifest["images"].append(entry)
            files.extend(written)
            if progress:
                progress("images", len(manifest["images"]), len(paths))
        if spool is not None:
            files.append(spool.finish({"model": loaded.spec}))
            manifest["activations"] = spool.path.name
        for video in videos:
            taken = {e["key"] for e in manifest["images"] + manifest.get("videos", [])}
            given = None if pca_joint else bases  # a video fits its own basis over its frames
            entry, written = _write_video(
                loaded,
                video,
                layers,
                out,
                fps,
                pca_recipe,
                opts,
                channels,
                full,
                given,
                device,
                taken,
                progress,
            )
            manifest.setdefault("videos", []).append(entry)
            files.extend(written)
    except KeyboardInterrupt as exc:
        results.close()
        done = len(manifest["images"])
        if done:
            manifest["interrupted"] = {"images_written": done, "images_given": len(paths)}
            _write_file(lambda: write_json(manifest_path, manifest), manifest_path)
        raise Interrupted(done, len(paths), out) from exc
    finally:
        if spool is not None:
            spool.close()
    _write_file(lambda: write_json(manifest_path, manifest), manifest_path)
    files.append(manifest_path)
    return RunResult(out, manifest_path, files, manifest)


def _check_bases(bases: dict[str, PCABasis], maps: FeatureMaps, where: Any) -> None:
    missing = [n for n in maps if n not in bases]
    if missing:
        raise FeatureMapsError(
            f"the PCA basis file {str(where)!r} has no basis for {missing}; it has {sorted(bases)}"
        )


def _write_image(
    res: ImageResult,
    out: Path,
    opts: RenderOptions,
    bases: dict[str, PCABasis] | None,
    loaded: LoadedModel,
    spool: _ActivationSpool | None,
    recipe: PCARecipe | None = None,
    relevance: RelevanceRequest | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Render and write one image's pictures; its manifest entry and files.

    If anything stops it (an error, Ctrl-C), the files it wrote are removed, so an
    image is either complete on disk or absent.
    """
    folder = out / res.key
    entry: dict[str, Any] = {
        "path": str(res.path),
        "key": res.key,
        "input": f"{res.key}/input.png",
        "input_size": list(res.maps.input_shape[-2:]),
        "predictions": res.predictions,
        "layers": {},
    }
    rel = res.relevance.main if res.relevance is not None else None
    if rel is not None:
        entry["target"] = target_json(rel.target)
    if res.predictions is None:
        entry["predictions_note"] = predictions_note(
            loaded.is_imagenet_classifier, loaded.pretrained
        )
    files: list[Path] = []
    mark = spool.mark() if spool is not None else 0
    try:
        for name in res.maps:
            check_grid_size(name, res.maps[name].shape, opts)
        files.append(_save(Image.fromarray(res.display), folder / "input.png"))
        pcas: dict[str, np.ndarray] = {}
        for name in res.maps:
            t = res.maps[name][0]
            ranked = rel is not None and relevance is not None and relevance.order
            gopts = opts.replace(order=rel.order(name)) if ranked and rel else opts
            grid = render_grid(t, **gopts.grid_kwargs())
            fname = f"{_safe(name)}.png"
            files.append(_save(grid.image, folder / fname))
            rec = LayerSummary.from_maps(name, res.maps).to_json()
            rec["grid"] = f"{res.key}/{fname}"
            rec["grid_channels"] = grid.channels
            del grid
            if rel is not None:
                rec["relevance"] = rel.layer_json(name)
                title = f"Grad-CAM {name}: {rel.target.label}"
                cam = cam_picture(res.display, rel.gradcam[name], title)
                files.append(_save(cam, folder / f"{_safe(name)}.cam.png"))
                rec["cam"] = f"{res.key}/{_safe(name)}.cam.png"
            if opts.pca:
                try:
                    basis = bases.get(name) if bases else None
                    if recipe is None:
                        pcas[name] = pca_rgb(t, opts.pca, basis=basis)
                    else:
                        fitted = _pca_with_recipe(t, opts.pca, recipe, basis)
                        pcas[name] = fitted.rgb[0]
                        files.extend(_save_pca_pictures(res, fitted, folder, name, rec))
                except ReduceError as exc:
                    rec["pca_error"] = str(exc)
            entry["layers"][name] = rec
            if spool is not None:
                spool.add(f"{res.key}/{name}", res.maps[name])
        if pcas:
            panel = pca_panel(res.display, pcas)
            files.append(_save(panel, folder / "pca_panel.png"))
            entry["pca_panel"] = f"{res.key}/pca_panel.png"
    except BaseException:
        for f in files:
            f.unlink(missing_ok=True)
        _remove_if_empty(folder)
        if spool is not None:
            spool.rewind(mark)
        raise
    return entry, files


class _ActivationSpool:
    """Writes ``activations.safetensors`` without holding every image's tensors.

    Each tensor's bytes go to an anonymous temporary file as it comes; :meth:`finish`
    writes the safetensors header (which needs every name, shape and offset) and then
    copies the bytes after it, under a temporary name renamed at the end.
    """

    _DTYPES: ClassVar[dict[torch.dtype, str]] = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float64: "F64",
    }

    def __init__(self, out: Path) -> None:
        self.path = out / "activations.safetensors"
        self._data = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
            dir=out, prefix=".activations.", suffix=".part"
        )
        self._header: dict[str, Any] = {}
        self._size = 0

    def mark(self) -> int:
        return len(self._header)

    def rewind(self, mark: int) -> None:
        """Forget the tensors added after ``mark`` (those of an image not written)."""
        names = list(self._header)[mark:]
        if names:
            self._size = self._header[names[0]]["data_offsets"][0]
            for name in names:
                del self._header[name]
            self._data.truncate(self._size)
            self._data.seek(self._size)

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu()
        if t.dtype not in self._DTYPES:
            t = t.float()
        data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        _write_file(lambda: self._data.write(data), self.path)
        self._header[name] = {
            "dtype": self._DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._size, self._size + len(data)],
        }
        self._size += len(data)

    def finish(self, metadata: dict[str, str]) -> Path:
        header = {
            "__metadata__": {**metadata, "keys": json.dumps(list(self._header))},
            **self._header,
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._data.flush()
        self._data.seek(0)

        def write() -> None:
            with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                shutil.copyfileobj(self._data, f, 1 << 20)

        _write_file(write, self.path)
        return self.path

    def close(self) -> None:
        self._data.close()


def _write_file(write: Callable[[], object], path: Path) -> None:
    """Run ``write``; an OSError becomes one line naming ``path`` and the cause."""
    try:
        write()
    except OSError as exc:
        raise FeatureMapsError(f"cannot write {describe_os_error(exc, path)}") from exc


DEFAULT_VIDEO_FPS = 10.0
"""Frames sampled per second of video when ``fps`` is not given: the video's own rate,
at most this (a 30 fps clip gives every third frame; one forward each)."""


def _is_video_input(path: Path) -> bool:
    """A video suffix other than ``.gif``: a GIF, animated or not, stays an image in a run
    (its first frame, with a warning), as before videos were read; ``video_pca`` takes it."""
    return is_video(path) and path.suffix.lower() != ".gif"


def _no_results() -> Generator[ImageResult, None, None]:
    yield from ()


def _write_video(
    loaded: LoadedModel,
    video: Path,
    layers: str | Sequence[str],
    out: Path,
    fps: float | None,
    recipe: PCARecipe | None,
    opts: RenderOptions,
    channels: Sequence[int],
    full: bool,
    bases: dict[str, PCABasis] | None,
    device: str,
    taken: set[str],
    progress: Progress | None,
) -> tuple[dict[str, Any], list[Path]]:
    """One video's PCA videos under ``out/KEY``; its manifest entry and files."""
    from .video import video_pca

    base = _safe(video.stem) or "video"
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}-{n}"
    if fps is None:
        rate = video_rate(video)
        fps = min(rate, DEFAULT_VIDEO_FPS) if rate else DEFAULT_VIDEO_FPS
    r = recipe or PCARecipe()
    loaded.module.to(resolve_device(device))

    def report(p: VideoProgress) -> None:
        if progress is not None:
            progress(f"{key} {p.phase}", p.done, p.total or p.done)

    res = video_pca(
        loaded,
        video,
        layers,
        out / key,
        fps=fps,
        n_components=opts.pca or 3,
        foreground=r.foreground,
        whiten=r.whiten,
        colors=r.colors,
        outliers=r.outliers,
        channels=channels,
        bases=bases,
        full=full,
        progress=report,
    )
    entry: dict[str, Any] = {
        "path": str(video),
        "key": key,
        "frames": res.frames,
        "fps": res.fps,
        "videos": {name: f"{key}/{p.name}" for name, p in res.videos.items()},
        "manifest": f"{key}/{res.manifest.name}",
        "pca_basis": f"{key}/{res.basis_file.name}",
    }
    return entry, [*res.videos.values(), res.basis_file, res.manifest]


def _recipe_json(recipe: PCARecipe | None) -> dict[str, Any] | None:
    if recipe is None:
        return None
    return {
        "foreground": recipe.foreground,
        "whiten": recipe.whiten,
        "colors": recipe.colors,
        "outliers": recipe.outliers,
    }


def _pca_with_recipe(
    t: torch.Tensor, components: int, recipe: PCARecipe, basis: PCABasis | None
) -> PCAResult:
    return pca_fit(
        t,
        components,
        foreground=recipe.foreground,
        whiten=recipe.whiten,
        colors=recipe.colors,
        outliers=recipe.outliers,
        basis=basis,
    )


def _save_pca_pictures(
    res: ImageResult, fitted: PCAResult, folder: Path, name: str, rec: dict[str, Any]
) -> list[Path]:
    """``LAYER.pca.png`` at map resolution and ``LAYER.pca-overlay.png`` over the input."""
    rgb = fitted.rgb[0]
    alone = folder / f"{_safe(name)}.pca.png"
    over = folder / f"{_safe(name)}.pca-overlay.png"
    saved = [_save(pca_picture(rgb, size=max(rgb.shape[:2])), alone)]
    saved.append(_save(overlay(res.display, rgb, alpha=0.6), over))
    rec["pca"] = fitted.summary()
    rec["pca_picture"] = f"{res.key}/{alone.name}"
    rec["pca_overlay"] = f"{res.key}/{over.name}"
    return saved


def _save(img: Any, path: Path) -> Path:
    _write_file(lambda: save_image(img, path, optimize=False, compress_level=3), path)
    return path
