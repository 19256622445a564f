"""The engine-neutral step of the atlas: one batch of images to per-layer partial results.

Every engine calls :func:`process_batch` on the same fixed batches, so a batch gives
bitwise the same :class:`BatchResult` wherever it runs. Partials merge associatively
and commutatively (:meth:`LayerPartial.merge`): top-K lists under a total order (score
descending, then image id, i.e. path, ascending), float64 sums, dead counts and the
channel covariance of a streaming PCA. Maps larger than ``PCA_PIXELS`` pixels feed the
covariance through a regular grid of their pixels.

With the ``relevance`` score, one :func:`featuremaps.relevance.relevance` call (one
forward, one backward) replaces the capture: its activations give the activation ranking
(by spatial max) exactly as a capture would, and its per-channel relevance to each
image's own top-1 class gives a second top-K list, kept beside the first
(:class:`RelevanceTop`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..capture import capture
from ..models import LoadedModel
from ..options import Precision
from ..reduce import PCAAccumulator
from ..relevance import TargetError, relevance
from .data import LoadedBatch

AUTOCAST_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}
"""The forward's autocast type of each reduced precision."""
PCA_PIXELS = 256
"""Pixels per map (per image and layer) the dataset PCA basis uses at most.

Also the size up to which a map's sum is taken in float64; larger maps are summed in
float32 (see :func:`map_sums`)."""
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
    channels_last: bool = False
    """Whether the model gives the same maps for a channels-last input (see :func:`probe`):
    then the CPU forward, and a ``bf16``/``fp16`` forward on a GPU, take the batch in that
    layout (:func:`input_layout`)."""

    @property
    def activation_score(self) -> str:
        """What ranks the activation top-K: ``max`` or ``mean`` (``max`` for relevance)."""
        return "max" if self.score == "relevance" else self.score

    @property
    def relevance(self) -> bool:
        """Whether a relevance top-K is kept beside the activation top-K."""
        return self.score == "relevance"


@dataclass
class RelevanceTop:
    """A layer's top-K images by channel relevance to each image's own top-1 class.

    Attributes:
        scores: ``(C, K)`` float32 relevance (gradient x activation summed over the map),
            best first; empty slots hold ``-inf``.
        ids: ``(C, K)`` image ids; empty slots hold the largest int64.
        ys, xs: ``(C, K)`` location of the largest gradient x activation in the map.
        classes: ``(C, K)`` the image's top-1 class (the target), ``-1`` when empty.
        probs: ``(C, K)`` float32 softmax probability of that class.
        total: ``(C,)`` float64 sum of the relevance over the images.
    """

    scores: np.ndarray
    ids: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    classes: np.ndarray
    probs: np.ndarray
    total: np.ndarray

    @classmethod
    def empty(cls, channels: int, top: int) -> RelevanceTop:
        return cls(
            np.full((channels, top), -np.inf, dtype=np.float32),
            np.full((channels, top), NO_IMAGE, dtype=np.int64),
            np.zeros((channels, top), dtype=np.int64),
            np.zeros((channels, top), dtype=np.int64),
            np.full((channels, top), -1, dtype=np.int64),
            np.zeros((channels, top), dtype=np.float32),
            np.zeros(channels, dtype=np.float64),
        )

    def merge(self, other: RelevanceTop) -> None:
        k = self.scores.shape[1]
        both = [
            np.concatenate([getattr(self, f), getattr(other, f)], 1) for f in _RELEVANCE_TOP_FIELDS
        ]
        self.scores, self.ids, self.ys, self.xs, self.classes, self.probs = _top_k(k, *both)
        self.total = self.total + other.total


_RELEVANCE_TOP_FIELDS = ("scores", "ids", "ys", "xs", "classes", "probs")


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
        relevance: the relevance top-K (score ``relevance`` only), else ``None``.
    """

    scores: np.ndarray
    ids: np.ndarray
    ys: np.ndarray
    xs: np.ndarray
    total: np.ndarray
    dead: np.ndarray
    pca: PCAAccumulator
    relevance: RelevanceTop | None = None

    @classmethod
    def empty(cls, channels: int, top: int, relevance: bool = False) -> LayerPartial:
        return cls(
            np.full((channels, top), -np.inf, dtype=np.float32),
            np.full((channels, top), NO_IMAGE, dtype=np.int64),
            np.zeros((channels, top), dtype=np.int64),
            np.zeros((channels, top), dtype=np.int64),
            np.zeros(channels, dtype=np.float64),
            np.zeros(channels, dtype=np.int64),
            PCAAccumulator(channels),
            RelevanceTop.empty(channels, top) if relevance else None,
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
        if (self.relevance is None) != (other.relevance is None):
            raise ValueError("cannot merge a partial with relevance and one without")
        if self.relevance is not None and other.relevance is not None:
            self.relevance.merge(other.relevance)


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
    pixels: tuple[np.ndarray, torch.Tensor] | None = None
    """The batch's image ids and their ``(B, 3, H, W)`` uint8 input pixels, when the
    engine passes them along for the driver to cut crops from (the local engine does);
    never encoded by :meth:`to_bytes`."""

    def to_bytes(self) -> bytes:
        """An ``.npz`` encoding (no pickle), to move a result between processes; without
        ``pixels``."""
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
        if part.relevance is not None:
            for name in (*_RELEVANCE_TOP_FIELDS, "total"):
                arrays[f"{i}.rel_{name}"] = getattr(part.relevance, name)
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
        rel = None
        if f"{i}.rel_scores" in arrays:
            rel = RelevanceTop(
                **{n: arrays[f"{i}.rel_{n}"] for n in (*_RELEVANCE_TOP_FIELDS, "total")}
            )
        out.append(LayerPartial(**fields, pca=pca, relevance=rel))
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
    return reduce_batch(batch, spec, forward_batch(module, batch, spec, device, precision))


@dataclass
class BatchMaps:
    """What a batch's forward gave: the maps on the CPU, and the relevance if asked for."""

    maps: dict[str, torch.Tensor]
    relevance: Any = None


def forward_batch(
    module: torch.nn.Module,
    batch: LoadedBatch,
    spec: AtlasSpec,
    device: torch.device,
    precision: Precision | str = Precision.FP32,
) -> BatchMaps:
    """The first half of :func:`process_batch`: the forward (and backward for relevance)."""
    if len(batch.ids) == 0:
        return BatchMaps({})
    x = batch.x.to(device, non_blocking=True)
    x = x.contiguous(memory_format=input_layout(spec, device, precision))
    autocast: Any = contextlib.nullcontext()
    if precision != "fp32":
        autocast = torch.autocast(device.type, dtype=AUTOCAST_DTYPES[Precision(precision)])
    with autocast:
        if spec.relevance:  # one forward and one backward: the maps and their relevance
            rel = relevance(module, x, list(spec.names), target=None)
            return BatchMaps({name: rel[name].activation for name in spec.names}, rel)
        fm = capture(module, x, list(spec.names), copy=False)  # the maps are used once
        return BatchMaps({name: fm[name] for name in spec.names})


def input_layout(
    spec: AtlasSpec, device: torch.device, precision: Precision | str = Precision.FP32
) -> torch.memory_format:
    """The memory layout of a batch for the forward on ``device`` at ``precision``.

    Channels-last where the convolutions are faster in it and the model allows it
    (:attr:`AtlasSpec.channels_last`): on the CPU (oneDNN's convolutions: a ResNet-18
    forward takes about 1.6x less time) and for a ``bf16``/``fp16`` forward on a GPU
    (tensor cores); else the usual contiguous layout. Only the layout of the input
    changes (the model is not touched); the maps are the module's outputs in either
    layout, equal to float rounding. The rule depends only on the device type and
    precision, so a batch still gives bitwise the same partial wherever it runs.
    """
    fast = device.type == "cpu" or Precision(precision) != Precision.FP32
    return torch.channels_last if spec.channels_last and fast else torch.contiguous_format


def reduce_batch(batch: LoadedBatch, spec: AtlasSpec, forward: BatchMaps) -> BatchResult:
    """The second half of :func:`process_batch`: the maps to per-layer partial results.

    Only reads ``forward``'s maps (and overwrites them), so it may run in another thread
    while the next batch's forward runs. The layers are reduced side by side by the
    threads of :func:`reduce_pool`, each computing with one PyTorch thread: the result
    does not depend on how many there are.
    """
    bad = list(batch.bad)
    if len(batch.ids) == 0:
        empty = [LayerPartial.empty(c, spec.top, spec.relevance) for c in spec.channels]
        return BatchResult(batch.index, 0, bad, empty)
    maps, rel = forward.maps, forward.relevance
    pool = reduce_pool()
    sizes = [(maps[name].shape[-2], maps[name].shape[-1]) for name in spec.names]
    # large channels-last maps are reduced as they are, (B, H*W, C): no copy of them
    major = [
        h * w > PCA_PIXELS and _channels_last(maps[name])
        for name, (h, w) in zip(spec.names, sizes, strict=True)
    ]

    def flat_and_sums(li: int) -> tuple[torch.Tensor, np.ndarray]:
        t = maps[spec.names[li]]
        if t.dtype != torch.float32:
            t = t.float()  # keeps the layout
        b, c, h, w = t.shape
        if major[li]:
            flat = t.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view
        else:
            flat = t.contiguous().reshape(b, c, h * w)
        exact = spec.activation_score == "mean"
        return flat, map_sums(flat, exact=exact, dim=1 if major[li] else 2)

    flats, sums = (list(x) for x in zip(*pool.map(flat_and_sums, range(len(sizes))), strict=True))
    keep = np.logical_and.reduce([np.isfinite(s).all(1) for s in sums])
    reason = {int(i): "its activations hold NaN/Inf values" for i in batch.ids[~keep]}
    if rel is not None:
        finite = np.logical_and.reduce(
            [torch.isfinite(rel[n].channels).all(1).numpy() for n in spec.names]
        )
        for i in batch.ids[keep & ~finite]:
            reason[int(i)] = "its relevance holds NaN/Inf values"
        keep &= finite
    ids = batch.ids[keep]
    bad.extend(reason.items())
    if len(ids) < len(batch.ids):  # no copy of the maps when every image is kept
        flats = [f[torch.from_numpy(keep)] for f in flats]
        sums = [s[keep] for s in sums]

    def layer(li: int) -> LayerPartial:
        name, size = spec.names[li], sizes[li]
        # first: the activation partial overwrites the maps (which rel shares)
        rtop = None if rel is None else _relevance_top(rel[name], rel.targets, keep, ids, spec.top)
        part = _layer_partial(
            flats[li], sums[li], ids, size, spec.top, spec.activation_score, major[li]
        )
        part.relevance = rtop
        return part

    # the largest maps first, so that the last layer to start is a small one
    order = sorted(range(len(spec.names)), key=lambda li: -flats[li].numel())
    done = dict(zip(order, pool.map(layer, order), strict=True))
    return BatchResult(batch.index, len(ids), sorted(bad), [done[li] for li in range(len(order))])


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _one_thread() -> None:
    torch.set_num_threads(1)  # per thread (OpenMP's setting is the calling thread's)


def reduce_pool() -> ThreadPoolExecutor:
    """The threads that reduce a batch's layers, one per PyTorch thread of the process.

    Created on first use with as many threads as ``torch.get_num_threads()`` then gives;
    each computes with a single PyTorch thread, so on a CPU the reduction of a batch
    uses every core (NumPy's reductions release the GIL) without oversubscribing them,
    and every partial is computed the same way whatever the number of threads.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                max(1, torch.get_num_threads()),
                thread_name_prefix="featuremaps-reduce",
                initializer=_one_thread,
            )
        return _POOL


def _forget_pool() -> None:  # a forked child has none of its parent's threads
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out channels-last (and not also plainly contiguous)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def map_sums(flat: torch.Tensor, exact: bool = False, dim: int = 2) -> np.ndarray:
    """The ``(B, C)`` float64 sums of ``(B, C, HW)`` float32 maps; finite iff every value is.

    ``dim=1`` sums maps laid out ``(B, HW, C)`` (channels-last) instead.

    Maps of up to ``PCA_PIXELS`` pixels (and every map when ``exact``) are summed in
    float64. Larger ones, the first stages of a network, are summed by PyTorch in float32
    (its cascade sum: a relative error near 1e-7, several times faster than a float64
    sum over tens of millions of values), then widened; a sum that overflows float32 is
    taken again in float64. Their dataset PCA takes float64 sums of its own pixels
    (:func:`_pca_pixels`), and ``exact`` serves the ``mean`` score, which ranks by these
    sums.
    """
    if exact or flat.shape[dim] <= PCA_PIXELS:
        return flat.numpy().sum(dim, dtype=np.float64)
    sums = flat.sum(dim).numpy().astype(np.float64)
    if not np.isfinite(sums).all():  # an overflow, or NaN/Inf values: decide in float64
        sums = flat.numpy().sum(dim, dtype=np.float64)
    return sums


def _relevance_top(
    layer: Any, targets: Sequence[Any], keep: np.ndarray, ids: np.ndarray, top: int
) -> RelevanceTop:
    """The relevance top-K of one layer over the kept images of a batch.

    The location of an entry is the cell where gradient x activation is largest: the
    part of the map that contributes most to the channel's relevance.
    """
    rel = layer.channels.numpy()[keep].astype(np.float32)  # (B, C)
    b, c = rel.shape
    if b == 0:
        return RelevanceTop.empty(c, top)
    gxa = layer.grad_x_act.numpy()[keep]
    width = gxa.shape[-1]
    where = gxa.reshape(b, c, -1).argmax(2)  # the first maximum
    kept = [t for t, k in zip(targets, keep, strict=True) if k]
    classes = np.array([t.index for t in kept], dtype=np.int64)
    probs = np.array([t.prob for t in kept], dtype=np.float32)

    def padded(a: np.ndarray, fill: float) -> np.ndarray:  # for batches of fewer than K
        return np.concatenate([a, np.full((c, top), fill, dtype=a.dtype)], 1)

    def per_channel(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a[None, :], (c, b))

    scores, top_ids, ys, xs, cls, pr = _top_k(
        top,
        padded(rel.T, -np.inf),
        padded(per_channel(ids), NO_IMAGE),
        padded((where // width).T, 0),
        padded((where % width).T, 0),
        padded(per_channel(classes), -1),
        padded(per_channel(probs), 0),
    )
    return RelevanceTop(scores, top_ids, ys, xs, cls, pr, rel.sum(0, dtype=np.float64))


def _layer_partial(
    flat: torch.Tensor,
    sums: np.ndarray,
    ids: np.ndarray,
    size: tuple[int, int],
    top: int,
    score: str,
    pixel_major: bool = False,
) -> LayerPartial:
    """Scores, locations, sums, dead counts and covariance of ``(B, C, H*W)`` maps.

    Args:
        flat: the maps, contiguous float32 (overwritten: see :func:`_covariance`).
        sums: ``(B, C)`` float64 sum of each map.
        ids: the image id of each map.
        size: ``(H, W)`` of the maps.
        top: K.
        score: ``max`` or ``mean``.
        pixel_major: ``flat`` is ``(B, H*W, C)`` (channels-last maps, of more than
            ``PCA_PIXELS`` pixels); it is then only read.
    """
    if pixel_major:
        b, hw, c = flat.shape
    else:
        b, c, hw = flat.shape
    width = size[1]
    if b == 0:
        return LayerPartial.empty(c, top)
    if pixel_major:  # the maxima now, their places only for the entries kept below
        peak, where = flat.amax(1).numpy(), None
    else:
        where = flat.numpy().argmax(2)  # the first maximum
        peak = np.take_along_axis(flat.numpy(), where[..., None], 2)[..., 0]
    scores = peak if score == "max" else (sums / hw).astype(np.float32)

    def padded(a: np.ndarray, fill: float) -> np.ndarray:  # for batches of fewer than K
        return np.concatenate([a, np.full((c, top), fill, dtype=a.dtype)], 1)

    rows = np.broadcast_to(np.arange(b)[None, :], (c, b))
    top_scores, top_ids, top_rows = _top_k(
        top,
        padded(scores.T, -np.inf),
        padded(np.broadcast_to(ids[None, :], (c, b)), NO_IMAGE),
        padded(rows, -1),
    )
    if where is None:
        places = _first_max_of(flat, top_rows)
    else:  # empty slots (row -1) at 0, as _first_max_of gives them
        picked = np.take_along_axis(where.T, np.maximum(top_rows, 0), 1)
        places = np.where(top_rows >= 0, picked, 0)
    ys, xs = places // width, places % width
    dead = ((peak == 0) & (sums == 0)).sum(0)  # all values <= 0 and summing to 0
    total, cov = sums.sum(0), _covariance(*_pca_pixels(flat, sums, size, pixel_major))
    return LayerPartial(top_scores, top_ids, ys, xs, total, dead.astype(np.int64), cov)


def _first_max_of(flat: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """Where the first maximum of map ``(rows[c, k], c)`` lies in ``(B, H*W, C)`` maps
    (``0`` where ``rows`` is ``-1``, an empty slot): ``argmax`` of only the maps a top
    list keeps, a column of each image's ``(H*W, C)`` block, gathered image by image and
    read contiguously (PyTorch's ``max(dim)`` over the whole batch is several times
    slower, and NumPy's ``argmax`` over a strided axis copies all of it)."""
    out = np.zeros(rows.shape, dtype=np.int64)
    for r in np.unique(rows[rows >= 0]).tolist():
        cs, ks = np.nonzero(rows == r)
        cols = flat[r].index_select(1, torch.from_numpy(cs))  # (H*W, n)
        out[cs, ks] = cols.T.contiguous().numpy().argmax(1)
    return out


def _pca_pixels(
    flat: torch.Tensor, sums: np.ndarray, size: tuple[int, int], pixel_major: bool = False
) -> tuple[torch.Tensor, np.ndarray]:
    """The pixels the PCA basis is fitted on, and their per-map sums.

    Every pixel of maps of up to ``PCA_PIXELS`` pixels; of larger maps (the first stages
    of a network), every ``s``-th row and column, ``s`` the smallest step that brings
    them under ``PCA_PIXELS``: a regular grid, plenty for a covariance over a dataset,
    and several times cheaper. The grid is ``(B, C, pixels)`` whatever the layout of
    ``flat`` (``pixel_major``: ``(B, H*W, C)``, for maps larger than ``PCA_PIXELS``).
    """
    h, w = size
    step = math.ceil(math.sqrt(h * w / PCA_PIXELS))
    if step == 1:
        assert not pixel_major  # only maps of more than PCA_PIXELS pixels are
        return flat, sums
    if pixel_major:
        b, c = flat.shape[0], flat.shape[2]
        grid = flat.reshape(b, h, w, c)[:, ::step, ::step].permute(0, 3, 1, 2)
    else:
        b, c = flat.shape[:2]
        grid = flat.reshape(b, c, h, w)[:, :, ::step, ::step]
    sub = grid.contiguous().reshape(b, c, -1)
    return sub, sub.numpy().sum(2, dtype=np.float64)


def _covariance(flat: torch.Tensor, sums: np.ndarray) -> PCAAccumulator:
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
    cosum = _scatter(flat[:full], torch.from_numpy(low[:full]), group)
    if full < b:
        cosum += _scatter(flat[full:], torch.from_numpy(low[full:]), b - full)
    m = torch.from_numpy(means)
    cosum.addmm_(m.T, m, alpha=hw)
    acc = PCAAccumulator(0)  # filled below, without allocating a (C, C) zero matrix
    acc.n, acc.sum, acc.cosum = b * hw, torch.from_numpy(sums.sum(0)), cosum
    return acc


def _scatter(flat: torch.Tensor, means: torch.Tensor, group: int) -> torch.Tensor:
    """``sum (x - m)(x - m)^T`` over ``(B, C, HW)`` maps, ``B`` a multiple of ``group``.

    Maps of one image per group (the large ones) are centred in place, in ``flat``.
    """
    b, c, hw = flat.shape
    n = b // group
    if group == 1:
        x = flat.sub_(means[..., None])
    else:  # (n, group, c, hw) -> (n, c, group * hw): the images of a group side by side
        x = flat.reshape(n, group, c, hw) - means.reshape(n, group, c, 1)
        x = x.transpose(1, 2).reshape(n, c, group * hw)
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
    blank = torch.zeros(1, 3, side, side, device=device)
    if score == "relevance":
        try:
            infos = {n: r.info for n, r in relevance(loaded.module, blank, layers).items()}
        except TargetError as exc:
            raise TargetError(
                f"--score relevance ranks images by the relevance of each channel to the "
                f"image's own top-1 class, so it needs a classifier returning (B, classes) "
                f"logits, and {loaded.spec} does not. Use --score max or --score mean."
            ) from exc
    else:
        fm = capture(loaded.module, blank, layers)
        infos = {n: fm.info[n] for n in fm}
    names = tuple(infos)
    metas = []
    for name in names:
        info = infos[name]
        assert info.shape is not None and info.stride is not None  # capture checked it
        c, h, w = info.shape[1:]
        metas.append(LayerMeta((c, h, w), (float(info.stride[0]), float(info.stride[1]))))
    channels = tuple(m.shape[0] for m in metas)
    fast = _allows_channels_last(loaded.module, names, side, device)
    return AtlasSpec(names, channels, score, top, fast), metas


def _allows_channels_last(
    module: torch.nn.Module, names: Sequence[str], side: int, device: torch.device
) -> bool:
    """Whether ``module``, a convolutional network in eval mode, gives the same maps for a
    channels-last input as for a contiguous one.

    Convolutional: two or more 2-D convolutions. A ViT's single patch embedding gains
    nothing from the layout (a ViT-B/16 forward measured 6-12 % slower with it here),
    so models with fewer keep the contiguous layout.

    Two forwards of the same random image, one in each layout: a model that cannot
    take the layout (``x.view(...)`` on a channels-last tensor raises) or whose maps
    differ by more than float rounding (over 1e-3 of the largest value) keeps the
    contiguous layout.
    """
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    if module.training or convs < 2:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, side, side, generator=gen).to(device)
    try:
        plain = capture(module, x, list(names))
        fast = capture(module, x.contiguous(memory_format=torch.channels_last), list(names))
    except RuntimeError:  # the model's own error shows on the first batch, as before
        return False
    for name in names:
        a, b = plain[name].float(), fast[name].float()
        if a.shape != b.shape or not torch.isfinite(a).all():
            return False
        if (a - b).abs().max() > 1e-3 * a.abs().max() + 1e-6:
            return False
    return True
