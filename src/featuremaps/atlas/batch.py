"""The engine-neutral step of the atlas: one batch of images to per-layer partial results.

Every engine calls :func:`process_batch` on the same fixed batches, so a batch gives
bitwise the same :class:`BatchResult` wherever it runs. Partials merge associatively
and commutatively (:meth:`LayerPartial.merge`): top-K lists under a total order (score
descending, then image id, i.e. path, ascending), float64 sums, dead counts and the
channel covariance of a streaming PCA. Maps larger than ``PCA_PIXELS`` pixels feed the
covariance through a regular grid of their pixels.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from ..capture import capture
from ..models import LoadedModel
from ..reduce import PCAAccumulator
from .data import LoadedBatch


class Precision(StrEnum):
    """The forward's precision: ``fp32``, or ``bf16``/``fp16`` under autocast."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


AUTOCAST_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}
"""The forward's autocast type of each reduced precision."""
PCA_PIXELS = 4096
"""Pixels per map (per image and layer) the dataset PCA basis uses at most."""
NO_IMAGE = np.iinfo(np.int64).max
"""The id of an empty top-K slot."""
_SCATTER_PIXELS = 1024  # pixels per float32 scatter product (then summed in float64)


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
            np.full((channels, top), NO_IMAGE, dtype=np.int64),
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
        arrays = partials_to_arrays(self.layers)
        arrays["meta"] = np.array(json.dumps([self.index, self.n_images, self.bad]))
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> BatchResult:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        index, n_images, bad = json.loads(str(arrays.pop("meta")))
        return cls(index, n_images, [(int(i), str(m)) for i, m in bad], partials_from(arrays))


_FIELDS = ("scores", "ids", "ys", "xs", "total", "dead")


def partials_to_arrays(layers: Sequence[LayerPartial]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for i, part in enumerate(layers):
        for name in _FIELDS:
            arrays[f"{i}.{name}"] = getattr(part, name)
        arrays[f"{i}.pca_n"] = np.array(part.pca.n, dtype=np.int64)
        arrays[f"{i}.pca_sum"] = part.pca.sum.numpy()
        arrays[f"{i}.pca_cosum"] = part.pca.cosum.numpy()
    return arrays


def partials_from(arrays: dict[str, np.ndarray]) -> list[LayerPartial]:
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
    module: torch.nn.Module,
    batch: LoadedBatch,
    spec: AtlasSpec,
    device: torch.device,
    precision: Precision | str = Precision.FP32,
) -> BatchResult:
    """Run one batch and reduce its maps to per-layer partial results.

    Every engine calls this, so a batch gives bitwise the same partial wherever it runs
    (on the same kind of device, at the same precision). Images whose maps hold NaN/Inf
    are moved to the skipped files.

    Args:
        module: the model, on ``device``.
        batch: the decoded images.
        spec: the layers, the score and K.
        device: where the forward runs.
        precision: ``fp32``, or ``bf16``/``fp16`` for a forward under autocast; the maps
            are then widened to float32 and every statistic is accumulated in float32
            (scores, scatter products) and float64 (sums, covariance), as for ``fp32``.
    """
    bad = list(batch.bad)
    if len(batch.ids) == 0:
        empty = [LayerPartial.empty(c, spec.top) for c in spec.channels]
        return BatchResult(batch.index, 0, bad, empty)
    x = batch.x.to(device, non_blocking=True)
    if precision == "fp32":
        fm = capture(module, x, list(spec.names))
    else:
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[Precision(precision)]):
            fm = capture(module, x, list(spec.names))
    flats, sums = [], []
    for name in spec.names:
        t = fm[name]
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
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
        padded(np.broadcast_to(ids[None, :], (c, b)), NO_IMAGE),
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


@dataclass(frozen=True)
class LayerMeta:
    """A layer's map shape ``(C, H, W)`` and its stride in input pixels ``(y, x)``."""

    shape: tuple[int, int, int]
    stride: tuple[float, float]


def probe(
    loaded: LoadedModel, layers: str | Sequence[str], score: str, top: int
) -> tuple[AtlasSpec, list[LayerMeta]]:
    """Resolve the layers and learn their shapes and strides with one blank input.

    Runs on the model's current device; the input size is the preprocessing's crop.
    """
    side = int(loaded.preprocess.crop or 0)
    device = next(iter(loaded.module.parameters()), torch.empty(0)).device
    fm = capture(loaded.module, torch.zeros(1, 3, side, side, device=device), layers)
    names = tuple(fm)
    metas = []
    for name in names:
        info = fm.info[name]
        assert info.shape is not None and info.stride is not None  # capture checked it
        c, h, w = info.shape[1:]
        metas.append(LayerMeta((c, h, w), (float(info.stride[0]), float(info.stride[1]))))
    channels = tuple(m.shape[0] for m in metas)
    return AtlasSpec(names, channels, score, top), metas
