"""Channel atlas over a dataset: the images that excite each channel most.

For every channel of every selected layer, :func:`build_atlas` keeps the ``top`` images
with the highest score (the spatial max of the channel, or its mean), with the location
of the max and a crop of the input region that feeds it. It also gathers, per channel,
the mean activation and the share of images where the channel is dead (all zero), and
fits a per-layer PCA basis over the pixels of the whole dataset (streaming: accumulated
covariance, never the pixels themselves; maps larger than ``PCA_PIXELS`` contribute a
regular grid of their pixels).

Determinism. ``atlas.json`` is a function of the dataset and the options only:

* images are identified by their path; the canonical order is the sorted path strings;
* ties are broken by a total order, score descending then path ascending, so merging
  partial top-K lists is associative and commutative;
* batches are fixed chunks of ``batch_size`` consecutive images of the canonical order
  (minus unreadable files), whatever the engine and however often a run was resumed:
  some convolution kernels give last-bit differences for another batch size, so the
  same batches are what makes the engines agree bitwise;
* floating-point sums (mean activation, covariance) are folded batch by batch in batch
  order, from per-batch partials that each engine computes with the same code.

Checkpoints. Every ``checkpoint_seconds`` the whole state (top-K arrays, sums, dead
counts, PCA accumulators, which batches are done, skipped files) is written atomically to
``OUT/atlas_state.npz`` (numpy arrays and one JSON string, no pickle). A run that finds a
checkpoint of the same configuration resumes from it and skips the batches it holds.

Engines. ``local`` decodes in a :class:`torch.utils.data.DataLoader` with worker
processes and runs the model in this process. ``ray`` (module :mod:`featuremaps.atlas_ray`,
extra ``featuremaps[ray]``) runs the same per-batch step in a pool of Ray Data actors.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image

from ._files import atomic_path, write_bytes, write_json
from .capture import capture
from .errors import FeatureMapsError, ImageError
from .images import IMAGE_SUFFIXES, display_image, expand_inputs, load_image, preprocess
from .models import LoadedModel, Preprocess, load_model
from .pipeline import _safe, resolve_device
from .reduce import PCAAccumulator, save_bases

Progress = Callable[[str, int, int], None]
"""Called as ``progress(phase, done, total)``; phase ``images`` counts images."""

SCORES = ("max", "mean")
ENGINES = ("local", "ray")
CROP_FACTOR = 2.0
MIN_CROP = 16
"""A crop is ``CROP_FACTOR * stride`` (at least ``MIN_CROP``) input pixels on each side,
centred on the map cell, clipped to the image."""
PCA_PIXELS = 4096
"""Pixels per map (per image and layer) the dataset PCA basis uses at most."""
STATE_FILE = "atlas_state.npz"
_STATE_VERSION = 1
_NO_IMAGE = np.iinfo(np.int64).max  # id of an empty top-K slot
_SCATTER_PIXELS = 1024  # pixels per float32 scatter product (then summed in float64)


class SkippedImageWarning(UserWarning):
    """A file of the dataset could not be used (unreadable, or non-finite activations)."""


# -- the dataset -------------------------------------------------------------------------------


def dataset_paths(data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The images of a dataset, as sorted unique path strings (the canonical order).

    Args:
        data: a folder (searched recursively), a glob pattern, an image file, a text file
            listing one path per line (blank lines and ``#`` comments ignored; relative
            paths are relative to the list's folder), or a sequence of these.

    Returns:
        Path strings sorted as strings. Listed files are not checked here: a missing one
        is skipped and counted like any unreadable image.

    Raises:
        ImageError: a folder or pattern matches no image, or the dataset is empty.
    """
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    found: set[str] = set()
    for item in items:
        path = Path(item)
        if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
            found.update(_read_list(path))
        else:
            found.update(str(p) for p in expand_inputs([item]))
    if not found:
        raise ImageError(f"the dataset {[str(i) for i in items]} holds no image")
    return sorted(found)


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"cannot read the list of images {str(path)!r}: {exc}") from exc
    base = path.parent
    out = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out.append(str(Path(entry) if Path(entry).is_absolute() else base / entry))
    return out


def fixed_size(pp: Preprocess) -> Preprocess:
    """The preprocessing with a centre crop, so every image gives the same input size."""
    if pp.crop:
        return pp
    return replace(pp, crop=pp.resize or 224)


@dataclass
class LoadedBatch:
    """The decoded images of one batch: ``x[i]`` is image ``ids[i]``."""

    index: int
    ids: np.ndarray
    x: torch.Tensor
    bad: list[tuple[int, str]]


def load_images(index: int, first: int, paths: Sequence[str], pp: Preprocess) -> LoadedBatch:
    """Decode and preprocess the images of batch ``index``; unreadable ones go to ``bad``.

    Args:
        index: the batch number.
        first: the id (canonical position) of ``paths[0]``.
        paths: the batch's files.
        pp: the fixed-size preprocessing.
    """
    tensors: list[torch.Tensor] = []
    ids: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            img = load_image(path, draft_size=pp.resize)
            tensors.append(preprocess(img, pp))
            ids.append(first + i)
        except ImageError as exc:
            bad.append((first + i, str(exc)))
        except (OSError, ValueError) as exc:  # a decoder failing late, on resize
            bad.append((first + i, f"image {path!r} cannot be decoded: {exc}"))
    side = int(pp.crop or 0)
    x = torch.stack(tensors) if tensors else torch.empty(0, 3, side, side)
    return LoadedBatch(index, np.asarray(ids, dtype=np.int64), x, bad)


# -- per-batch partial results -------------------------------------------------------------------


@dataclass(frozen=True)
class AtlasSpec:
    """What each batch computes: the layers, their channel counts, the score and K."""

    names: tuple[str, ...]
    channels: tuple[int, ...]
    score: str
    top: int


@dataclass
class LayerPartial:
    """One layer's partial result over some images; :meth:`merge` is associative.

    Attributes:
        scores: ``(C, K)`` float32, best first; empty slots hold ``-inf``.
        ids: ``(C, K)`` image ids; empty slots hold the largest int64.
        ys, xs: ``(C, K)`` location of the spatial max in the map.
        total: ``(C,)`` float64 sum of the activations.
        dead: ``(C,)`` number of images where the channel is all zero.
        pca: the channel covariance accumulator.
    """

    scores: np.ndarray
    ids: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    total: np.ndarray
    dead: np.ndarray
    pca: PCAAccumulator

    @classmethod
    def empty(cls, channels: int, top: int) -> LayerPartial:
        return cls(
            np.full((channels, top), -np.inf, dtype=np.float32),
            np.full((channels, top), _NO_IMAGE, dtype=np.int64),
            np.zeros((channels, top), dtype=np.int64),
            np.zeros((channels, top), dtype=np.int64),
            np.zeros(channels, dtype=np.float64),
            np.zeros(channels, dtype=np.int64),
            PCAAccumulator(channels),
        )

    def merge(self, other: LayerPartial) -> None:
        """Add ``other`` (images disjoint from this one's) into this partial."""
        k = self.scores.shape[1]
        self.scores, self.ids, self.ys, self.xs = _top_k(
            k,
            np.concatenate([self.scores, other.scores], 1),
            np.concatenate([self.ids, other.ids], 1),
            np.concatenate([self.ys, other.ys], 1),
            np.concatenate([self.xs, other.xs], 1),
        )
        self.total = self.total + other.total
        self.dead = self.dead + other.dead
        self.pca.merge(other.pca)


def _top_k(k: int, scores: np.ndarray, ids: np.ndarray, *rest: np.ndarray) -> list[np.ndarray]:
    """The ``k`` best columns of each row: score descending, then id (path) ascending."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return [np.take_along_axis(a, order, axis=1) for a in (scores, ids, *rest)]


@dataclass
class BatchResult:
    """What one batch contributes: its good images, its skipped files, per-layer partials."""

    index: int
    n_images: int
    bad: list[tuple[int, str]]
    layers: list[LayerPartial]

    def to_bytes(self) -> bytes:
        """An ``.npz`` encoding (no pickle), to move a result between processes."""
        arrays = _partials_to_arrays(self.layers)
        arrays["meta"] = np.array(json.dumps([self.index, self.n_images, self.bad]))
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> BatchResult:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        index, n_images, bad = json.loads(str(arrays.pop("meta")))
        return cls(index, n_images, [(int(i), str(m)) for i, m in bad], _partials_from(arrays))


_FIELDS = ("scores", "ids", "ys", "xs", "total", "dead")


def _partials_to_arrays(layers: Sequence[LayerPartial]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for i, part in enumerate(layers):
        for name in _FIELDS:
            arrays[f"{i}.{name}"] = getattr(part, name)
        arrays[f"{i}.pca_n"] = np.array(part.pca.n, dtype=np.int64)
        arrays[f"{i}.pca_sum"] = part.pca.sum.numpy()
        arrays[f"{i}.pca_cosum"] = part.pca.cosum.numpy()
    return arrays


def _partials_from(arrays: dict[str, np.ndarray]) -> list[LayerPartial]:
    out = []
    i = 0
    while f"{i}.scores" in arrays:
        pca = PCAAccumulator(arrays[f"{i}.total"].shape[0])
        pca.n = int(arrays[f"{i}.pca_n"])
        pca.sum = torch.from_numpy(arrays[f"{i}.pca_sum"].copy())
        pca.cosum = torch.from_numpy(arrays[f"{i}.pca_cosum"].copy())
        fields = {name: arrays[f"{i}.{name}"] for name in _FIELDS}
        out.append(LayerPartial(**fields, pca=pca))
        i += 1
    return out


def process_batch(
    module: torch.nn.Module, batch: LoadedBatch, spec: AtlasSpec, device: torch.device
) -> BatchResult:
    """Run one batch and reduce its maps to per-layer partial results.

    Both engines call this, so a batch gives bitwise the same partial wherever it runs.
    Images whose maps hold NaN/Inf are moved to the skipped files.
    """
    bad = list(batch.bad)
    if len(batch.ids) == 0:
        empty = [LayerPartial.empty(c, spec.top) for c in spec.channels]
        return BatchResult(batch.index, 0, bad, empty)
    fm = capture(module, batch.x.to(device), list(spec.names))
    flats, sums = [], []
    for name in spec.names:
        t = fm[name]
        flat = np.ascontiguousarray(t.numpy()).reshape(t.shape[0], t.shape[1], -1)
        flats.append(flat)
        sums.append(flat.sum(2, dtype=np.float64))  # finite iff every value is
    keep = np.logical_and.reduce([np.isfinite(s).all(1) for s in sums])
    ids = batch.ids[keep]
    for i in batch.ids[~keep]:
        bad.append((int(i), "its activations hold NaN/Inf values"))
    if len(ids) < len(batch.ids):
        flats = [f[keep] for f in flats]
        sums = [s[keep] for s in sums]
    layers = [
        _layer_partial(f, s, ids, (fm[name].shape[-2], fm[name].shape[-1]), spec.top, spec.score)
        for name, f, s in zip(spec.names, flats, sums, strict=True)
    ]
    return BatchResult(batch.index, len(ids), sorted(bad), layers)


def _layer_partial(
    flat: np.ndarray,
    sums: np.ndarray,
    ids: np.ndarray,
    size: tuple[int, int],
    top: int,
    score: str,
) -> LayerPartial:
    """Scores, locations, sums, dead counts and covariance of ``(B, C, H*W)`` maps.

    Args:
        flat: the maps, float32 (overwritten: see :func:`_covariance`).
        sums: ``(B, C)`` float64 sum of each map.
        ids: the image id of each map.
        size: ``(H, W)`` of the maps.
        top: K.
        score: ``max`` or ``mean``.
    """
    b, c, hw = flat.shape
    width = size[1]
    if b == 0:
        return LayerPartial.empty(c, top)
    where = flat.argmax(2)  # the first maximum
    peak = np.take_along_axis(flat, where[..., None], 2)[..., 0]
    scores = peak if score == "max" else (sums / hw).astype(np.float32)

    def padded(a: np.ndarray, fill: float) -> np.ndarray:  # for batches of fewer than K
        return np.concatenate([a, np.full((c, top), fill, dtype=a.dtype)], 1)

    top_scores, top_ids, ys, xs = _top_k(
        top,
        padded(scores.T, -np.inf),
        padded(np.broadcast_to(ids[None, :], (c, b)), _NO_IMAGE),
        padded((where // width).T, 0),
        padded((where % width).T, 0),
    )
    dead = ((peak == 0) & (sums == 0)).sum(0)  # all values <= 0 and summing to 0
    total, cov = sums.sum(0), _covariance(*_pca_pixels(flat, sums, size))
    return LayerPartial(top_scores, top_ids, ys, xs, total, dead.astype(np.int64), cov)


def _pca_pixels(
    flat: np.ndarray, sums: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The pixels the PCA basis is fitted on, and their per-map sums.

    Every pixel of maps of up to ``PCA_PIXELS`` pixels; of larger maps (the first stages
    of a network), every ``s``-th row and column, ``s`` the smallest step that brings
    them under ``PCA_PIXELS``: a regular grid, plenty for a covariance over a dataset,
    and several times cheaper.
    """
    h, w = size
    step = math.ceil(math.sqrt(h * w / PCA_PIXELS))
    if step == 1:
        return flat, sums
    b, c = flat.shape[:2]
    grid = flat.reshape(b, c, h, w)[:, :, ::step, ::step]
    sub = np.ascontiguousarray(grid).reshape(b, c, -1)
    return sub, sub.sum(2, dtype=np.float64)


def _covariance(flat: np.ndarray, sums: np.ndarray) -> PCAAccumulator:
    """The PCA accumulator of ``(B, C, H*W)`` maps whose per-map sums are ``sums``.

    ``flat`` may be overwritten (the caller hands over maps it no longer needs).

    The same sums as :meth:`PCAAccumulator.update`, several times faster: each image's
    pixels are centred on its own mean in float32 (no cancellation, no float64 copy of
    the maps), their scatter matrices are batched float32 products over groups of images
    of about ``_SCATTER_PIXELS`` pixels, summed in float64 and shifted back in float64
    (``sum x x^T = sum (x - m)(x - m)^T + HW m m^T`` per image).
    """
    b, _, hw = flat.shape
    means = sums / hw
    low = means.astype(np.float32)
    group = max(1, min(b, -(-_SCATTER_PIXELS // hw)))
    full = b - b % group
    cosum = _scatter(flat[:full], low[:full], group)
    if full < b:
        cosum += _scatter(flat[full:], low[full:], b - full)
    m = torch.from_numpy(means)
    cosum.addmm_(m.T, m, alpha=hw)
    acc = PCAAccumulator(0)  # filled below, without allocating a (C, C) zero matrix
    acc.n, acc.sum, acc.cosum = b * hw, torch.from_numpy(sums.sum(0)), cosum
    return acc


def _scatter(flat: np.ndarray, means: np.ndarray, group: int) -> torch.Tensor:
    """``sum (x - m)(x - m)^T`` over ``(B, C, HW)`` maps, ``B`` a multiple of ``group``.

    Maps of one image per group (the large ones) are centred in place, in ``flat``.
    """
    b, c, hw = flat.shape
    n = b // group
    centred = flat if group == 1 else np.empty((n, c, group, hw), dtype=np.float32)
    np.subtract(
        flat.reshape(n, group, c, hw),
        means.reshape(n, group, c, 1),
        out=centred.reshape(n, c, group, hw).transpose(0, 2, 1, 3),
    )
    x = torch.from_numpy(centred.reshape(n, c, group * hw))
    return torch.bmm(x, x.mT).sum(0, dtype=torch.float64)  # bmm: far faster than mm loops


# -- the running state and its checkpoint ---------------------------------------------------------


@dataclass
class _State:
    config: dict[str, Any]
    layers: list[LayerPartial]
    done: set[int] = field(default_factory=set)
    n_images: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def fold(self, result: BatchResult) -> None:
        for mine, theirs in zip(self.layers, result.layers, strict=True):
            mine.merge(theirs)
        self.n_images += result.n_images
        self.skipped.extend(result.bad)
        self.done.add(result.index)

    def save(self, path: Path) -> None:
        arrays = _partials_to_arrays(self.layers)
        meta = {
            "version": _STATE_VERSION,
            "config": self.config,
            "n_images": self.n_images,
            "skipped": sorted(self.skipped),
        }
        arrays["meta"] = np.array(json.dumps(meta))
        arrays["done"] = np.array(sorted(self.done), dtype=np.int64)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> _State:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(str(arrays.pop("meta")))
            done = {int(j) for j in arrays.pop("done")}
            if meta.get("version") != _STATE_VERSION:
                raise ValueError(f"state version {meta.get('version')}")
            skipped = [(int(i), str(m)) for i, m in meta["skipped"]]
            return cls(meta["config"], _partials_from(arrays), done, meta["n_images"], skipped)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise FeatureMapsError(
                f"cannot read the atlas checkpoint {str(path)!r} ({exc}). Delete it or pass "
                "--restart to start over."
            ) from exc


def _open_state(path: Path, config: dict[str, Any], spec: AtlasSpec, restart: bool) -> _State:
    for stale in path.parent.glob(f".{path.name}.*.part"):  # left by a killed run
        stale.unlink(missing_ok=True)
    if restart or not path.exists():
        return _State(config, [LayerPartial.empty(c, spec.top) for c in spec.channels])
    state = _State.load(path)
    if state.config != config:
        diff = sorted(k for k in {*config, *state.config} if config.get(k) != state.config.get(k))
        raise FeatureMapsError(
            f"{path.parent} holds the checkpoint of another atlas run (it differs in: "
            f"{', '.join(diff)}). Re-run with the same options to resume it, choose another "
            "--out, or pass --restart to start over."
        )
    return state


# -- engines ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """The fixed batches over the canonical image list."""

    paths: tuple[str, ...]
    batch_size: int

    @property
    def n_batches(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def batch(self, index: int) -> tuple[int, tuple[str, ...]]:
        """The id of the batch's first image and its paths."""
        first = index * self.batch_size
        return first, self.paths[first : first + self.batch_size]


class BatchDataset(torch.utils.data.Dataset[LoadedBatch]):
    """Item ``i`` is the decoded ``pending[i]``-th batch (a whole batch per worker call)."""

    def __init__(self, plan: Plan, pending: Sequence[int], pp: Preprocess) -> None:
        self.plan = plan
        self.pending = list(pending)
        self.pp = pp

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, i: int) -> LoadedBatch:
        index = self.pending[i]
        first, paths = self.plan.batch(index)
        return load_images(index, first, paths, self.pp)


def _identity(item: Any) -> Any:
    return item


def batch_loader(
    plan: Plan, pending: Sequence[int], pp: Preprocess, workers: int
) -> torch.utils.data.DataLoader[LoadedBatch]:
    """A DataLoader that yields the pending batches in order, decoded by ``workers``."""
    return torch.utils.data.DataLoader(
        BatchDataset(plan, pending, pp),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=2 if workers else None,
    )


def _run_local(
    plan: Plan,
    pending: Sequence[int],
    loaded: LoadedModel,
    spec: AtlasSpec,
    workers: int,
    device: torch.device,
) -> Iterator[BatchResult]:
    for batch in batch_loader(plan, pending, loaded.preprocess, workers):
        yield process_batch(loaded.module, batch, spec, device)


# -- the entry point -------------------------------------------------------------------------------


@dataclass
class AtlasResult:
    """What :func:`build_atlas` did.

    Attributes:
        out_dir: the output folder.
        atlas_json: path of ``atlas.json``.
        pca_basis: path of ``pca_basis.npz`` (for ``featuremaps run --pca-basis``);
            ``None`` when no image could be used.
        pages: the per-layer HTML pages (and ``index.html`` first).
        images_total: images in the dataset.
        images_used: images that went into the atlas.
        skipped: ``(path, reason)`` of every file that could not be used.
        resumed: images already done by an earlier, interrupted run.
        seconds: wall time of this run's inference loop.
        images_per_second: images this run processed per second of that loop.
    """

    out_dir: Path
    atlas_json: Path
    pca_basis: Path | None
    pages: list[Path]
    images_total: int
    images_used: int
    skipped: list[tuple[str, str]]
    resumed: int
    seconds: float
    images_per_second: float


def build_atlas(
    model: str | LoadedModel,
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    layers: str | Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    weights: str = "DEFAULT",
    top: int = 9,
    score: str = "max",
    batch_size: int = 32,
    workers: int = 2,
    engine: str = "local",
    device: str = "auto",
    checkpoint_seconds: float = 60.0,
    restart: bool = False,
    n_components: int = 3,
    report_url: str | None = None,
    progress: Progress | None = None,
) -> AtlasResult:
    """Build the channel atlas of ``layers`` over a dataset, resuming a checkpoint if any.

    Args:
        model: a model spec (see :func:`featuremaps.load_model`) or a loaded model.
        data: a folder (recursively), a glob, a text file of paths, or a list of these.
        layers: names, globs or presets (``stages``).
        out_dir: where ``atlas.json``, ``pca_basis.npz``, ``crops/``, the HTML pages and
            the checkpoint go.
        weights: weights of a model given as a spec.
        top: images kept per channel.
        score: ``max`` (spatial max of the channel) or ``mean``.
        batch_size: images per forward; also fixes the batches (see the module notes).
        workers: decoding processes (local) or model actors (ray).
        engine: ``local`` or ``ray`` (a local Ray instance, or ``RAY_ADDRESS``).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (local engine; ray uses the CPU).
        checkpoint_seconds: time between checkpoints (0: after every batch).
        restart: ignore an existing checkpoint in ``out_dir``.
        n_components: PCA components of the dataset basis.
        report_url: link of each channel on the pages, a template with ``{layer}`` and
            ``{channel}`` (default: the channel's anchor on its page).
        progress: called as ``progress(phase, done, total)``.

    Returns:
        An :class:`AtlasResult`.

    Raises:
        FeatureMapsError: bad options, an unknown model or layer, an empty dataset, or a
            checkpoint of another configuration in ``out_dir``.

    Example:
        >>> r = build_atlas("resnet18", "photos/", "layer3", "atlas", weights="none", top=9)
        >>> r.atlas_json.name
        'atlas.json'
    """
    _check_options(top, score, batch_size, workers, engine, n_components, report_url)
    paths = dataset_paths(data)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights)
    loaded = replace(loaded, preprocess=fixed_size(loaded.preprocess))
    dev = torch.device("cpu") if engine == "ray" else resolve_device(device)
    loaded.module.to(dev)
    spec, infos = _probe(loaded, layers, score, top, dev)
    plan = Plan(tuple(paths), batch_size)
    config = {
        "model": loaded.spec,
        "weights": loaded.weights,
        "preprocess": loaded.preprocess.to_dict(),
        "layers": list(spec.names),
        "score": score,
        "top": top,
        "batch_size": batch_size,
        "images": len(paths),
        "paths_sha256": sha256("\n".join(paths).encode()).hexdigest(),
    }
    out = Path(out_dir)
    state_path = out / STATE_FILE
    state = _open_state(state_path, config, spec, restart)
    pending = [j for j in range(plan.n_batches) if j not in state.done]
    resumed = sum(len(plan.batch(j)[1]) for j in state.done)
    if engine == "ray":
        from .atlas_ray import run_ray

        results = run_ray(plan, pending, loaded, spec, workers)
    else:
        results = _run_local(plan, pending, loaded, spec, workers, dev)
    start = last_save = time.monotonic()
    seen = resumed
    if progress:
        progress("images", seen, len(paths))
    for result in results:
        state.fold(result)
        for i, msg in result.bad:
            warnings.warn(f"skipped {paths[i]}: {msg}", SkippedImageWarning, stacklevel=2)
        seen += len(plan.batch(result.index)[1])
        if time.monotonic() - last_save >= checkpoint_seconds:
            state.save(state_path)
            last_save = time.monotonic()
        if progress:
            progress("images", seen, len(paths))
    seconds = time.monotonic() - start
    state.save(state_path)
    atlas_json, basis, pages = _write_outputs(
        out, state, plan, loaded, spec, infos, n_components, report_url, workers, progress
    )
    done_now = seen - resumed
    return AtlasResult(
        out_dir=out,
        atlas_json=atlas_json,
        pca_basis=basis,
        pages=pages,
        images_total=len(paths),
        images_used=state.n_images,
        skipped=[(paths[i], m) for i, m in sorted(state.skipped)],
        resumed=resumed,
        seconds=seconds,
        images_per_second=done_now / seconds if seconds > 0 else 0.0,
    )


def _check_options(
    top: int,
    score: str,
    batch_size: int,
    workers: int,
    engine: str,
    n_components: int,
    report_url: str | None,
) -> None:
    if top < 1:
        raise FeatureMapsError(f"--top {top}: keep at least one image per channel")
    if score not in SCORES:
        raise FeatureMapsError(f"--score {score!r}: use {' or '.join(SCORES)}")
    if batch_size < 1:
        raise FeatureMapsError(f"--batch-size {batch_size}: use 1 or more")
    if workers < 0:
        raise FeatureMapsError(f"--workers {workers}: use 0 (decode in this process) or more")
    if engine not in ENGINES:
        raise FeatureMapsError(f"--engine {engine!r}: use {' or '.join(ENGINES)}")
    if n_components < 1:
        raise FeatureMapsError(f"n_components {n_components}: use 1 or more")
    if report_url is not None:
        try:
            report_url.format(layer="layer", channel=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise FeatureMapsError(
                f"--report-url {report_url!r}: a template with {{layer}} and {{channel}} "
                f"only ({exc!r})"
            ) from None


@dataclass(frozen=True)
class _LayerMeta:
    shape: tuple[int, int, int]
    stride: tuple[float, float]


def _probe(
    loaded: LoadedModel, layers: str | Sequence[str], score: str, top: int, device: torch.device
) -> tuple[AtlasSpec, list[_LayerMeta]]:
    """Resolve the layers and learn their shapes and strides with one blank input."""
    side = int(loaded.preprocess.crop or 0)
    fm = capture(loaded.module, torch.zeros(1, 3, side, side, device=device), layers)
    names = tuple(fm)
    metas = []
    for name in names:
        info = fm.info[name]
        assert info.shape is not None and info.stride is not None  # capture checked it
        c, h, w = info.shape[1:]
        metas.append(_LayerMeta((c, h, w), (float(info.stride[0]), float(info.stride[1]))))
    channels = tuple(m.shape[0] for m in metas)
    return AtlasSpec(names, channels, score, top), metas


# -- outputs ---------------------------------------------------------------------------------------


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


def _f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32."""
    v = np.float32(value)
    short = float(str(v))
    return short if np.float32(short) == v else float(v)


def _write_outputs(
    out: Path,
    state: _State,
    plan: Plan,
    loaded: LoadedModel,
    spec: AtlasSpec,
    metas: list[_LayerMeta],
    n_components: int,
    report_url: str | None,
    workers: int,
    progress: Progress | None,
) -> tuple[Path, Path | None, list[Path]]:
    paths = plan.paths
    slugs = _unique_slugs(spec.names)
    layers_json: dict[str, Any] = {}
    for name, slug, part, meta in zip(spec.names, slugs, state.layers, metas, strict=True):
        pixels = state.n_images * meta.shape[1] * meta.shape[2]
        channels = []
        for c in range(meta.shape[0]):
            entries = []
            for rank in range(part.scores.shape[1]):
                i = int(part.ids[c, rank])
                if i == _NO_IMAGE:
                    break
                entries.append(
                    {
                        "image": paths[i],
                        "score": _f32(part.scores[c, rank]),
                        "y": int(part.ys[c, rank]),
                        "x": int(part.xs[c, rank]),
                        "crop": f"crops/{slug}/c{c:04d}_{rank}.jpg",
                    }
                )
            channels.append(
                {
                    "channel": c,
                    "mean": _f32(part.total[c] / pixels) if pixels else None,
                    "dead": int(part.dead[c]),
                    "dead_share": float(part.dead[c] / state.n_images) if state.n_images else None,
                    "top": entries,
                }
            )
        layers_json[name] = {
            "shape": list(meta.shape),
            "stride": list(meta.stride),
            "page": f"{slug}.html",
            "channels": channels,
        }
    doc = {
        "model": loaded.spec,
        "weights": loaded.weights,
        "preprocess": loaded.preprocess.to_dict(),
        "score": spec.score,
        "top": spec.top,
        "batch_size": plan.batch_size,
        "crop_rule": f"{CROP_FACTOR:g} x stride (at least {MIN_CROP} pixels) around the "
        "centre of the map cell, clipped to the input",
        "images": {"total": len(paths), "used": state.n_images, "skipped": len(state.skipped)},
        "skipped": [{"image": paths[i], "error": m} for i, m in sorted(state.skipped)],
        "pca_basis": "pca_basis.npz" if state.n_images else None,
        "layers": layers_json,
    }
    basis_path = None
    if state.n_images:
        basis_path = out / "pca_basis.npz"
        fitted = [p.pca.fit(n_components) for p in state.layers]
        save_bases(dict(zip(spec.names, fitted, strict=True)), basis_path)
    _write_crops(out, doc, loaded.preprocess, metas, spec, slugs, workers, progress)
    pages = _write_pages(out, doc, report_url)
    atlas_json = out / "atlas.json"
    write_json(atlas_json, doc)  # last: its presence says the outputs are complete
    return atlas_json, basis_path, pages


def _unique_slugs(names: Sequence[str]) -> list[str]:
    slugs: list[str] = []
    for name in names:
        base = _safe(name)
        slug, n = base, 1
        while slug in slugs or slug in ("index", "crops"):
            n += 1
            slug = f"{base}-{n}"
        slugs.append(slug)
    return slugs


def _write_crops(
    out: Path,
    doc: dict[str, Any],
    pp: Preprocess,
    metas: list[_LayerMeta],
    spec: AtlasSpec,
    slugs: list[str],
    workers: int,
    progress: Progress | None,
) -> None:
    """Decode each image that made a top list once and cut all its crops.

    Each layer's crops go to a fresh folder that then replaces ``crops/LAYER``: creating
    files is cheap, while overwriting thousands of them (in place or by renames) makes
    ext4 flush each one and costs seconds.
    """
    wanted: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for li, name in enumerate(spec.names):
        for ch in doc["layers"][name]["channels"]:
            for entry in ch["top"]:
                wanted.setdefault(entry["image"], []).append((li, entry))
    images = sorted(wanted)
    fresh = [out / "crops" / f".{slug}.new" for slug in slugs]
    for folder in fresh:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    plan = Plan(tuple(images), 1)
    for n, batch in enumerate(batch_loader(plan, range(len(images)), pp, workers), 1):
        if len(batch.ids) == 1:
            picture = display_image(batch.x[0], pp)
            size = (picture.shape[0], picture.shape[1])
            for li, entry in wanted[images[batch.index]]:
                t, left, b, r = crop_box(entry["y"], entry["x"], metas[li].stride, size)
                crop = Image.fromarray(np.ascontiguousarray(picture[t:b, left:r]))
                crop.save(fresh[li] / Path(entry["crop"]).name, format="JPEG", quality=92)
        if progress:
            progress("crops", n, len(images))
    for folder, slug in zip(fresh, slugs, strict=True):
        final, old = out / "crops" / slug, out / "crops" / f".{slug}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        folder.rename(final)
        shutil.rmtree(old, ignore_errors=True)


_CSS = """
body { font: 13px system-ui, sans-serif; margin: 1em; color: #222; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.ch { border: 1px solid #ddd; border-radius: 4px; padding: 4px; }
.ch h3 { margin: 0 0 2px; font-size: 13px; }
.ch p { margin: 0 0 4px; color: #666; font-size: 11px; }
.crops { display: grid; grid-template-columns: repeat(var(--cols), 68px); gap: 2px; }
.crops img { width: 68px; height: 68px; object-fit: contain; image-rendering: pixelated;
  background: #eee; }
.dead { opacity: 0.5; }
"""


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    )


def _write_pages(out: Path, doc: dict[str, Any], report_url: str | None) -> list[Path]:
    """``index.html`` and one page per layer: each channel with its top crops."""
    esc = html.escape
    items = []
    pages: list[Path] = []
    for name, layer in doc["layers"].items():
        items.append(
            f'<li><a href="{quote(layer["page"])}">{esc(name)}</a> '
            f"({layer['shape'][0]} channels, {esc('x'.join(map(str, layer['shape'])))})</li>"
        )
        cells = []
        for ch in layer["channels"]:
            c = ch["channel"]
            link = report_url.format(layer=quote(name), channel=c) if report_url else f"#c{c}"
            imgs = "".join(
                f'<img src="{quote(e["crop"])}" loading="lazy" alt="" title="'
                f'{esc(e["image"])}&#10;score {e["score"]:.4g} at ({e["y"]}, {e["x"]})">'
                for e in ch["top"]
            )
            stats = (
                "no image"
                if ch["mean"] is None
                else (f"mean {ch['mean']:.3g} · dead {ch['dead_share']:.0%}")
            )
            dead = " dead" if ch["dead_share"] == 1 else ""
            cells.append(
                f'<section class="ch{dead}" id="c{c}"><h3><a href="{esc(link)}">channel {c}'
                f'</a></h3><p>{stats}</p><div class="crops">{imgs}</div></section>'
            )
        body = (
            f'<p><a href="index.html">atlas</a> / {esc(name)}</p>'
            f"<h1>{esc(name)}</h1><p>{esc(doc['model'])} ({esc(doc['weights'])}), "
            f"top {doc['top']} images per channel by spatial {esc(doc['score'])}, "
            f"{doc['images']['used']} images. Crops: {esc(doc['crop_rule'])}.</p>"
            f'<div class="grid" style="--cols: {math.ceil(math.sqrt(doc["top"]))}">'
            f"{''.join(cells)}</div>"
        )
        page = out / layer["page"]
        write_bytes(page, _page(f"{name} · atlas", body).encode())
        pages.append(page)
    skipped = doc["images"]["skipped"]
    index = (
        f"<h1>Channel atlas of {esc(doc['model'])}</h1><p>{doc['images']['used']} images"
        f"{f', {skipped} skipped' if skipped else ''}; per-layer PCA basis: "
        f'<a href="pca_basis.npz">pca_basis.npz</a>, data: '
        f'<a href="atlas.json">atlas.json</a>.</p><ul>{"".join(items)}</ul>'
    )
    index_path = out / "index.html"
    write_bytes(index_path, _page("atlas", index).encode())
    return [index_path, *pages]
