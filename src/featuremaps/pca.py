"""Principal component pictures of feature maps: fit, project, colour; streaming and saved bases.

Each pixel (or token) of a ``(C, H, W)`` map is a C-vector; its projection onto the top
principal components, scaled to [0, 1], is the picture. The DINO recipe is a set of
options on top of the plain PCA, each off by default (see :class:`PCARecipe`):

- ``foreground="auto"``: a first PCA over the pixels (less the outermost ring, which zero
  padding distorts in CNNs), its first component thresholded (Otsu's split), the side
  that touches the map's border less is the foreground; the PCA is refitted on the
  foreground pixels only and the background is drawn black. A user mask may be given
  instead.
- ``outliers=k``: pixels whose feature norm lies more than ``k`` median absolute
  deviations above the median norm (the high-norm artifact tokens of large ViTs) are left
  out of every fit and clipped in the picture; :class:`PCAResult` reports them.
- ``whiten=True``: each component divided by its standard deviation on the fitted pixels.
- ``colors="sigmoid"``: ``1 / (1 + exp(-2 z))`` instead of the min-max range.

Pure functions on tensors/arrays; none modifies its input and none draws anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.linalg
import torch

from .errors import ReduceError

ArrayLike = torch.Tensor | np.ndarray
Colors = Literal["minmax", "sigmoid"]
Foreground = Literal["none", "auto"]

COLORS: tuple[str, ...] = ("minmax", "sigmoid")
FOREGROUNDS: tuple[str, ...] = ("none", "auto")
DEFAULT_OUTLIER_MADS = 6.0
"""``k`` when outlier removal is asked for without a value: for normally spread norms
six median absolute deviations are about four standard deviations."""
SIGMOID_GAIN = 2.0
"""``colors="sigmoid"`` draws ``sigmoid(SIGMOID_GAIN * z)`` (the DINOv3 notebooks' 2)."""
_SAMPLE_CAP = 1 << 22
"""Values kept for medians and thresholds; beyond, an even subsample (streaming fits)."""


def _as_tensor(fmap: ArrayLike) -> torch.Tensor:
    """A float tensor copy of an array, or a detached CPU float view of a tensor."""
    if isinstance(fmap, np.ndarray):
        return torch.from_numpy(np.array(fmap, dtype=np.float32, copy=True))
    return fmap.detach().to("cpu", torch.float32)


def _as_chw(fmap: ArrayLike) -> torch.Tensor:
    """One ``(C, H, W)`` map from a map or a batch of one, checked."""
    shape = tuple(int(n) for n in fmap.shape)
    if len(shape) == 4:
        if shape[0] != 1:
            raise ReduceError(f"expected one map (1, C, H, W), got batch of {shape[0]}")
        shape = shape[1:]
    if len(shape) != 3:
        raise ReduceError(f"expected a (C, H, W) map, got shape {shape}")
    return _as_tensor(fmap).reshape(shape)


@dataclass(frozen=True)
class PCARecipe:
    """How a PCA picture is fitted and coloured; the defaults give the plain PCA.

    Attributes:
        n_components: 3 for RGB, 1 for a gray map.
        foreground: ``"none"`` (every pixel) or ``"auto"`` (first component thresholded,
            refit on the foreground, background black).
        whiten: divide each component by its standard deviation on the fitted pixels
            (unit variance). Changes ``sigmoid`` colours and projected values; min-max
            colours scale each component to its range either way.
        colors: ``"minmax"`` (each component's min..max over the fitted pixels -> 0..1)
            or ``"sigmoid"`` (``sigmoid(2 z)``, ``z`` the whitened projection, or without
            whitening the projection over the first component's standard deviation).
        outliers: ``k``: leave out of the fit pixels whose norm exceeds the median norm by
            more than ``k`` median absolute deviations; ``None``: keep every pixel.
    """

    n_components: int = 3
    foreground: Foreground = "none"
    whiten: bool = False
    colors: Colors = "minmax"
    outliers: float | None = None

    def validate(self) -> PCARecipe:
        """Check every field; return ``self`` (raises :class:`ReduceError`)."""
        if isinstance(self.n_components, bool) or not isinstance(self.n_components, int):
            raise ReduceError(f"n_components must be an integer, got {self.n_components!r}")
        if self.n_components < 1:
            raise ReduceError("n_components must be at least 1")
        if self.foreground not in FOREGROUNDS:
            raise ReduceError(
                f"foreground {self.foreground!r}: use one of {', '.join(FOREGROUNDS)} "
                "(or pass a mask)"
            )
        if self.colors not in COLORS:
            raise ReduceError(f"colors {self.colors!r}: use one of {', '.join(COLORS)}")
        if self.outliers is not None and not (
            isinstance(self.outliers, int | float) and math.isfinite(self.outliers)
        ):
            raise ReduceError(f"outliers must be a number of MADs, got {self.outliers!r}")
        if self.outliers is not None and self.outliers <= 0:
            raise ReduceError(f"outliers must be a positive number of MADs, got {self.outliers}")
        return self

    @property
    def selects_pixels(self) -> bool:
        """Whether the fit uses only some of the pixels (foreground or outlier removal)."""
        return self.foreground != "none" or self.outliers is not None


@dataclass(frozen=True)
class PCABasis:
    """A PCA basis over channels: ``(x - mean) @ components.T``, then ``lo..hi`` -> 0..1.

    Everything needed to draw a new map the same way travels with it, so one basis
    serves the images of a run, the frames of a video and another checkpoint of the same
    layer width (:func:`save_bases`).

    Attributes:
        mean: ``(C,)`` channel means of the fitted pixels.
        components: ``(K, C)`` unit vectors, strongest first, sign fixed so that each
            component's largest-magnitude loading is positive.
        explained: ``(K,)`` variance along each component on the fitted pixels.
        lo, hi: ``(K,)`` the projection values (whitened when ``whiten``) drawn as 0
            and 1 by min-max colours.
        whiten: projections are divided by ``sqrt(explained)``.
        colors: ``"minmax"`` or ``"sigmoid"``.
        fg_axis, fg_offset: a pixel ``x`` is foreground when ``fg_axis @ x > fg_offset``
            (on maps of at least :data:`EDGE_MIN_SIDE` pixels a side, an edge pixel also
            needs the pixel inside it to be); ``fg_axis`` is ``None`` when every pixel
            is foreground.
        norm_limit: pixels whose norm exceeds it are outliers (``inf``: none).
    """

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    whiten: bool = False
    colors: Colors = "minmax"
    fg_axis: np.ndarray | None = None
    fg_offset: float = 0.0
    norm_limit: float = math.inf

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    def _map_pixels(self, fmap: ArrayLike) -> tuple[np.ndarray, int, int]:
        t = _as_chw(fmap)
        c, h, w = t.shape
        if c != self.channels:
            raise ReduceError(
                f"the PCA basis is for {self.channels} channels, the map has {c}; use a "
                "basis fitted on a layer of the same width"
            )
        x = _pixels(t[None])[0]
        if not np.isfinite(x.sum(dtype=np.float64)):
            _raise_not_finite(x)
        return x, h, w

    def _values(self, x: np.ndarray) -> np.ndarray:
        """``(K, N)`` projections of ``(C, N)`` pixels, whitened when the basis says so."""
        y = _project(x, self.components, self.mean)
        if self.whiten:
            y = y * _inv_sd(self.explained)[:, None]
        return y

    def project(self, fmap: ArrayLike) -> np.ndarray:
        """Project a ``(C, H, W)`` map: ``(H, W, K)`` component values (whitened if set)."""
        x, h, w = self._map_pixels(fmap)
        return self._values(x).T.reshape(h, w, -1)

    def _masks(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N,)`` foreground and outlier flags of ``(C, N)`` pixels."""
        out = _norms(x) > self.norm_limit
        if self.fg_axis is None:
            fg = np.ones(x.shape[1], bool)
        else:
            fg = _fg_side(x, self.fg_axis, self.fg_offset)
        return fg, out

    def colour(self, y: np.ndarray) -> np.ndarray:
        """``(..., K)`` projections (as :meth:`project` gives them) -> colours in [0, 1]."""
        if self.colors == "minmax":
            return _scaled(y, self.lo, self.hi)
        scale = np.ones_like(self.explained) if self.whiten else _inv_sd(self.explained[:1])
        z = np.clip(SIGMOID_GAIN * y * scale, -60.0, 60.0)
        out = np.where(self.explained > 0, 1.0 / (1.0 + np.exp(-z)), 0.0).astype(np.float32)
        return out[..., 0] if out.shape[-1] == 1 else out

    def to_rgb(self, fmap: ArrayLike) -> np.ndarray:
        """Project and colour: ``(H, W, K)`` (``(H, W)`` for one component) in [0, 1].

        The background (when the basis has a foreground rule) is black.
        """
        return self.apply(_as_chw(fmap)).rgb[0]

    def apply(self, fmaps: ArrayLike, mask: ArrayLike | None = None) -> PCAResult:
        """Draw maps with this basis: a :class:`PCAResult` with one picture per map.

        Args:
            fmaps: ``(C, H, W)`` or ``(B, C, H, W)``.
            mask: optional foreground mask (``(H, W)`` or ``(B, H, W)``, any resolution,
                true or > 0.5 = foreground), combined with the basis's own rule.
        """
        t = _as_batch(fmaps)
        b, _, h, w = t.shape
        user = _mask_pixels(mask, b, h, w)
        rgbs, fgs, outs = [], [], []
        for i in range(b):
            x, _, _ = self._map_pixels(t[i])
            fg, out = self._masks(x)
            if self.fg_axis is not None:
                fg = _edge_follows_inside(fg, h, w)
            if user is not None:
                fg &= user[i]
            rgb = self.colour(self._values(x).T)
            rgb[~fg] = 0.0
            rgbs.append(rgb.reshape(h, w, *rgb.shape[1:]))
            fgs.append(fg.reshape(h, w))
            outs.append(out.reshape(h, w))
        return PCAResult(np.stack(rgbs), np.stack(fgs), np.stack(outs), self)


@dataclass(frozen=True)
class PCAResult:
    """PCA pictures of a batch of maps with what was drawn and what was left out.

    Attributes:
        rgb: ``(B, H, W, K)`` (``(B, H, W)`` for one component) float32 in [0, 1];
            background pixels are 0 (black).
        foreground: ``(B, H, W)`` bool, the pixels drawn (all true without a foreground).
        outliers: ``(B, H, W)`` bool, pixels whose norm exceeds ``basis.norm_limit``
            (left out of the fit, clipped to the colour range in the picture).
        basis: the basis that drew them.
    """

    rgb: np.ndarray
    foreground: np.ndarray
    outliers: np.ndarray
    basis: PCABasis = field(repr=False)

    @property
    def outlier_count(self) -> int:
        return int(self.outliers.sum())

    @property
    def outlier_positions(self) -> list[tuple[int, int, int]]:
        """``(image, row, column)`` of each outlier pixel, in map coordinates."""
        return [(int(b), int(r), int(c)) for b, r, c in np.argwhere(self.outliers)]

    def summary(self, max_positions: int = 256) -> dict[str, Any]:
        """A JSON-ready record: recipe, foreground share, outlier count and positions."""
        pos = self.outlier_positions
        return {
            "components": int(self.basis.components.shape[0]),
            "whiten": self.basis.whiten,
            "colors": self.basis.colors,
            "foreground": self.basis.fg_axis is not None,
            "foreground_fraction": float(self.foreground.mean()) if self.foreground.size else 0.0,
            "norm_limit": None if math.isinf(self.basis.norm_limit) else self.basis.norm_limit,
            "outliers": len(pos),
            "outlier_positions": [list(p) for p in pos[:max_positions]],
            "outlier_positions_truncated": len(pos) > max_positions,
        }


def _pixels(t: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` as a ``(B, C, H*W)`` float32 array; a view when already contiguous."""
    return np.ascontiguousarray(t.numpy(), dtype=np.float32).reshape(t.shape[0], t.shape[1], -1)


def _raise_not_finite(x: np.ndarray) -> None:
    bad = int((~np.isfinite(x)).sum())
    if bad:
        raise ReduceError(
            f"the map holds {bad} NaN/Inf value(s) of {x.size}; PCA needs finite values "
            "(check the model's input and weights)"
        )
    raise ReduceError(
        f"the map holds values up to {float(np.abs(x).max()):.3g}, too large for PCA in "
        "float32; rescale the map first"
    )


def _project(x: np.ndarray, comps: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``(K, N)`` projections of the ``(C, N)`` pixels ``x`` onto a basis, in float32."""
    w = comps.astype(np.float32)
    # x.T is Fortran-ordered, so SciPy's BLAS reads x in place: (x.T @ w.T).T = w @ x.
    y = scipy.linalg.blas.sgemm(1.0, x.T, w.T).T
    return y - (comps @ mean).astype(np.float32)[:, None]


def _scatter(x: np.ndarray) -> np.ndarray:
    """``x @ x.T`` of ``(C, N)`` float32 pixels as a float64 ``(C, C)`` matrix.

    One BLAS ``ssyrk`` on the pixels where they lie (``x.T`` is Fortran-ordered). All the
    BLAS work of the PCA goes through SciPy's library: alternating with NumPy's, a second
    OpenBLAS with its own spinning threads, makes both several times slower on few cores.
    """
    upper = scipy.linalg.blas.ssyrk(1.0, x.T, trans=1).astype(np.float64)
    return np.triu(upper) + np.triu(upper, 1).T


def _scaled(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    span = hi - lo
    safe = np.where(span > 0, span, 1.0)
    out = np.where(span > 0, (y - lo) / safe, 0.0)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return out[..., 0] if out.shape[-1] == 1 else out


def _fit(cov: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k eigenvectors ``(k, C)`` of a covariance matrix, with a deterministic sign.

    Only the k largest eigenpairs are computed (LAPACK ``syevr`` through SciPy). Each
    component's largest-magnitude loading is made positive, so re-runs keep their colours.
    Fewer channels than components: the missing components are zero vectors.
    """
    c = cov.shape[0]
    kk = min(k, c)
    vals, vecs = scipy.linalg.eigh(cov, subset_by_index=[c - kk, c - 1])  # ascending
    comps = vecs[:, ::-1].T.copy()  # (k', C), strongest first
    vals = np.clip(vals[::-1], 0.0, None)
    rows = np.arange(kk)
    signs = np.sign(comps[rows, np.abs(comps).argmax(1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    if kk < k:
        comps = np.concatenate([comps, np.zeros((k - kk, c))])
        vals = np.concatenate([vals, np.zeros(k - kk)])
    return comps, vals


def _fit_pixels(x: np.ndarray, n_components: int) -> tuple[PCABasis, list[np.ndarray]]:
    """Fit a basis on ``(B, C, N)`` float32 pixels; also return each image's projections.

    The scatter matrix is one float32 BLAS product per image on the pixels as they lie
    (``sum x x^T``, no transposed or centred copy), centred afterwards in float64
    (``- n m m^T``). When the means are so large against the spread that float32 would
    lose the covariance to cancellation, the pixels are centred first.
    """
    b, c, n = x.shape
    total = b * n
    sums = x.sum(2, dtype=np.float64)  # (B, C)
    if not np.isfinite(sums).all():
        _raise_not_finite(x)
    mean = sums.sum(0) / total
    scatter = np.zeros((c, c))
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        for img in x:
            scatter += _scatter(img)
    if not np.isfinite(scatter).all():
        _raise_not_finite(x)
    cov = (scatter - total * np.outer(mean, mean)) / max(total - 1, 1)
    # float32 sums carry errors of about 1e-7 * C of the raw second moments: when these
    # exceed the variance 100 times over (constant maps, large offsets), centre first.
    if float(np.trace(scatter)) / total > 100.0 * float(np.trace(cov)):
        m32 = mean.astype(np.float32)[:, None]
        scatter = np.zeros((c, c))
        for img in x:
            scatter += _scatter(img - m32)
        cov = scatter / max(total - 1, 1)
    comps, vals = _fit(cov, n_components)
    ys = [_project(img, comps, mean) for img in x]
    lo = np.min([y.min(1) for y in ys], 0).astype(np.float64)
    hi = np.max([y.max(1) for y in ys], 0).astype(np.float64)
    return PCABasis(mean, comps, vals, lo, hi), ys


def _as_batch(fmaps: ArrayLike) -> torch.Tensor:
    t = _as_tensor(fmaps)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ReduceError(f"expected (C, H, W) or (B, C, H, W), got {tuple(t.shape)}")
    return t


# -- the recipe: outliers, foreground, refit -------------------------------------------------


class PixelBlock(NamedTuple):
    """One map's pixels for a streaming fit.

    Attributes:
        x: ``(C, N)`` float32 pixels.
        border: ``(N,)`` bool, the ring of pixels the border prior looks at.
        edge: ``(N,)`` bool, the outermost ring, left out when the foreground is sought.
        mask: ``(N,)`` bool user foreground, or ``None``.
    """

    x: np.ndarray
    border: np.ndarray
    edge: np.ndarray
    mask: np.ndarray | None = None


BlockSource = Callable[[], Iterable[PixelBlock]]
"""Returns a fresh iterator over the blocks at each call (a fit passes several times)."""


EDGE_MIN_SIDE = 9
"""Maps at least this large on both sides lose their outermost ring in the foreground
search: zero padding makes a CNN's outer row and column unlike any content (the plain
PCA of EfficientNet's early stages spends its first component on them)."""


def map_rings(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """``(border, edge)``, ``(h*w,)`` bool each, for the foreground search of an h x w map.

    ``edge`` is the outermost ring (empty on maps under :data:`EDGE_MIN_SIDE`),
    ``border`` the ring just inside it (the outermost ring on small maps).
    """
    yy, xx = np.mgrid[0:h, 0:w]
    depth = np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx)).reshape(-1)
    if min(h, w) >= EDGE_MIN_SIDE:
        return depth == 1, depth == 0
    return depth == 0, np.zeros(h * w, bool)


def _edge_follows_inside(fg: np.ndarray, h: int, w: int) -> np.ndarray:
    """``(h*w,)`` foreground flags where an edge-ring pixel also needs its inner neighbour.

    The edge ring is left out of the foreground search (zero padding distorts it), so
    the rule says little about it: an edge pixel stays foreground only where the pixel
    just inside it is foreground too. An object running into the frame keeps its edge;
    a padding strip over the background goes. Maps under :data:`EDGE_MIN_SIDE`: as is.
    """
    if min(h, w) < EDGE_MIN_SIDE:
        return fg
    grid = fg.reshape(h, w)
    rows = np.clip(np.arange(h), 1, h - 2)
    cols = np.clip(np.arange(w), 1, w - 2)
    return (grid & grid[rows][:, cols]).reshape(-1)


def _inv_sd(var: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.clip(var, 0.0, None))
    return np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0)


def _norms(x: np.ndarray) -> np.ndarray:
    """``(N,)`` Euclidean norms of ``(C, N)`` pixels, in float64."""
    return np.sqrt(np.einsum("cn,cn->n", x, x, dtype=np.float64))


def _fg_side(x: np.ndarray, axis: np.ndarray, offset: float) -> np.ndarray:
    return (axis.astype(np.float32) @ x).astype(np.float64) > offset


class _Sample:
    """Up to ``cap`` values of a stream, all of them while they fit, then every 2^k-th."""

    def __init__(self, cap: int = _SAMPLE_CAP) -> None:
        self.cap = cap
        self.step = 1
        self.seen = 0
        self.parts: list[np.ndarray] = []
        self.size = 0

    def add(self, values: np.ndarray) -> None:
        first = (-self.seen) % self.step  # keep global indices that are multiples of step
        kept = values[first :: self.step]
        self.seen += len(values)
        self.parts.append(kept)
        self.size += len(kept)
        while self.size > self.cap:
            whole = np.concatenate(self.parts)
            # kept elements sit at global multiples of step; keep multiples of 2 * step
            whole = whole[::2]
            self.parts, self.size, self.step = [whole], len(whole), self.step * 2

    def values(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0)


def _norm_limit(source: BlockSource, k: float) -> float:
    """Median norm plus ``k`` median absolute deviations (``inf`` when the MAD is 0)."""
    sample = _Sample()
    for blk in source():
        sample.add(_norms(blk.x))
    norms = sample.values()
    if norms.size == 0:
        return math.inf
    med = float(np.median(norms))
    mad = float(np.median(np.abs(norms - med)))
    return med + k * mad if mad > 0 else math.inf


def _otsu(v: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the split of ``v`` that maximizes the between-class variance."""
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)[:-1].astype(np.float64)
    w1 = len(v) - w0
    s0 = np.cumsum(hist * centers)[:-1]
    s1 = float((hist * centers).sum()) - s0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - s1 / w1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def _moments(
    source: BlockSource, keep: Callable[[PixelBlock], np.ndarray]
) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean, covariance and count of the kept pixels: a pass for the mean, one centred."""
    c = 0
    total = 0
    sums: np.ndarray | None = None
    for blk in source():
        k = keep(blk)
        s = blk.x[:, k].sum(1, dtype=np.float64)
        sums = s if sums is None else sums + s
        total += int(k.sum())
        c = blk.x.shape[0]
    if sums is None or total == 0:
        return np.zeros(c), np.zeros((c, c)), 0
    if not np.isfinite(sums).all():
        for blk in source():
            _raise_not_finite(blk.x)
    mean = sums / total
    m32 = mean.astype(np.float32)[:, None]
    scatter = np.zeros((c, c))
    with np.errstate(over="ignore"):
        for blk in source():
            k = keep(blk)
            if k.any():
                scatter += _scatter(blk.x[:, k] - m32)
    if not np.isfinite(scatter).all():
        for blk in source():
            _raise_not_finite(blk.x)
    return mean, scatter / max(total - 1, 1), total


def _auto_foreground(
    source: BlockSource, keep: Callable[[PixelBlock], np.ndarray]
) -> tuple[np.ndarray, float] | None:
    """The foreground rule ``(axis, offset)`` from the first component, or ``None``.

    The first component over the kept pixels (less the edge ring) is split at Otsu's
    threshold. Which side is
    the object: the one that holds the smaller share of border pixels (the background
    surrounds the object and runs into the frame: the border prior of saliency
    detection); a pixel count alone would lose close-ups, where the object fills more
    than half the picture. Equal shares (maps too small to have an inside): the smaller
    side.
    """

    def inner(blk: PixelBlock) -> np.ndarray:
        return keep(blk) & ~blk.edge

    mean, cov, n = _moments(source, inner)
    if n < 3:
        return None
    comps, vals = _fit(cov, 1)
    if vals[0] <= 0:
        return None
    axis = comps[0]
    ys, borders = _Sample(), _Sample()
    shift = float(axis @ mean)
    for blk in source():
        k = inner(blk)
        ys.add((axis.astype(np.float32) @ blk.x[:, k]).astype(np.float64) - shift)
        borders.add(blk.border[k])
    y, border = ys.values(), borders.values().astype(bool)
    t = _otsu(y)
    above = y > t
    n_above, n_below = int(above.sum()), int((~above).sum())
    if n_above == 0 or n_below == 0:
        return None
    share_above = float(border[above].mean())
    share_below = float(border[~above].mean())
    if share_above != share_below:
        sign = 1.0 if share_above < share_below else -1.0
    else:
        sign = 1.0 if n_above <= n_below else -1.0
    return sign * axis, sign * (t + shift)


def fit_recipe(source: BlockSource, recipe: PCARecipe) -> PCABasis:
    """Fit a basis with the recipe over a stream of pixel blocks (constant memory).

    Each step is a pass over ``source()``: the outlier limit (from the norms), the
    foreground rule (first component over the inliers), the mean, the covariance of the
    kept pixels, and their projection range. Medians and the threshold are computed on
    at most ``2**22`` values (an even subsample beyond); sums are exact.

    Raises:
        ReduceError: fewer than two pixels to fit, NaN/Inf values.
    """
    recipe.validate()
    limit = math.inf if recipe.outliers is None else _norm_limit(source, recipe.outliers)

    def inliers(blk: PixelBlock) -> np.ndarray:
        k = np.ones(blk.x.shape[1], bool) if math.isinf(limit) else _norms(blk.x) <= limit
        if blk.mask is not None:
            k &= blk.mask
        return k

    rule = _auto_foreground(source, inliers) if recipe.foreground == "auto" else None

    def kept(blk: PixelBlock) -> np.ndarray:
        k = inliers(blk)
        if rule is not None:  # the edge ring stays out of the refit and the colour range
            k &= _fg_side(blk.x, rule[0], rule[1]) & ~blk.edge
        return k

    mean, cov, n = _moments(source, kept)
    if n < 2 and rule is not None:  # the split left (almost) nothing: draw every pixel
        rule = None
        mean, cov, n = _moments(source, kept)
    if n < 2:
        raise ReduceError(
            f"a PCA basis needs at least two pixels to fit, {n} left after the outlier and "
            "foreground selection; relax --pca-outliers or the mask"
        )
    comps, vals = _fit(cov, recipe.n_components)
    scale = _inv_sd(vals) if recipe.whiten else np.ones_like(vals)
    lo = np.full(len(vals), np.inf)
    hi = np.full(len(vals), -np.inf)
    for blk in source():
        k = kept(blk)
        if k.any():
            y = _project(blk.x[:, k], comps, mean) * scale[:, None]
            lo, hi = np.minimum(lo, y.min(1)), np.maximum(hi, y.max(1))
    return PCABasis(
        mean,
        comps,
        vals,
        lo,
        hi,
        whiten=recipe.whiten,
        colors=recipe.colors,
        fg_axis=None if rule is None else rule[0],
        fg_offset=0.0 if rule is None else float(rule[1]),
        norm_limit=limit,
    )


def _mask_pixels(mask: ArrayLike | None, b: int, h: int, w: int) -> np.ndarray | None:
    """A user mask as ``(B, h*w)`` bool, resized (area average > 0.5) to the map."""
    if mask is None:
        return None
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    m = m.detach().to("cpu", torch.float32)
    if m.ndim == 2:
        m = m[None].expand(b, -1, -1)
    if m.ndim != 3 or m.shape[0] != b:
        raise ReduceError(
            f"the foreground mask has shape {tuple(m.shape)}; expected (H, W) or ({b}, H, W)"
        )
    if tuple(m.shape[1:]) != (h, w):
        m = torch.nn.functional.interpolate(m[:, None], size=(h, w), mode="area")[:, 0]
    return (m > 0.5).reshape(b, -1).numpy()


def _blocks(x: np.ndarray, h: int, w: int, mask: np.ndarray | None) -> BlockSource:
    border, edge = map_rings(h, w)

    def source() -> Iterator[PixelBlock]:
        for i, img in enumerate(x):
            yield PixelBlock(img, border, edge, None if mask is None else mask[i])

    return source


def _recipe(
    n_components: int,
    foreground: Foreground | ArrayLike,
    whiten: bool,
    colors: Colors,
    outliers: float | None,
) -> tuple[PCARecipe, ArrayLike | None]:
    if isinstance(foreground, str):
        mode, mask = foreground, None
    else:
        mode, mask = "none", foreground
    recipe = PCARecipe(n_components, mode, whiten, colors, outliers)  # type: ignore[arg-type]
    return recipe.validate(), mask


def _fit_batch(t: torch.Tensor, recipe: PCARecipe, mask: ArrayLike | None) -> PCABasis:
    b, _, h, w = t.shape
    x = _pixels(t)
    if not recipe.selects_pixels and mask is None:
        fitted = _fit_pixels(x, recipe.n_components)[0]
        if not (recipe.whiten or recipe.colors != "minmax"):
            return fitted
        scale = _inv_sd(fitted.explained) if recipe.whiten else 1.0
        return PCABasis(
            fitted.mean,
            fitted.components,
            fitted.explained,
            fitted.lo * scale,
            fitted.hi * scale,
            whiten=recipe.whiten,
            colors=recipe.colors,
        )
    return fit_recipe(_blocks(x, h, w, _mask_pixels(mask, b, h, w)), recipe)


def pca_fit(
    fmaps: ArrayLike,
    n_components: int = 3,
    *,
    foreground: Foreground | ArrayLike = "none",
    whiten: bool = False,
    colors: Colors = "minmax",
    outliers: float | None = None,
    basis: PCABasis | None = None,
) -> PCAResult:
    """Fit a PCA basis over the maps (jointly) and draw each: pictures, masks and basis.

    The DINO-style picture is ``pca_fit(maps, foreground="auto", outliers=6)`` (add
    ``whiten=True, colors="sigmoid"`` for the DINOv3 look).

    Args:
        fmaps: ``(C, H, W)`` or ``(B, C, H, W)``; a batch shares one basis and one scale.
        n_components: 3 for RGB, 1 for gray.
        foreground: ``"none"`` (default: every pixel), ``"auto"`` (first component
            thresholded, refit on the foreground, background black; see
            :class:`PCARecipe`), or a mask (``(H, W)`` or ``(B, H, W)``, any resolution,
            true or > 0.5 = foreground).
        whiten: unit variance per component on the fitted pixels (default off).
        colors: ``"minmax"`` (default) or ``"sigmoid"``.
        outliers: ``k`` median absolute deviations of the pixel norms
            (:data:`DEFAULT_OUTLIER_MADS` is a good start); ``None`` (default) keeps all.
        basis: draw with this fitted basis instead of fitting (the other options then
            come from the basis; a mask still blacks out what it excludes).

    Returns:
        a :class:`PCAResult` (``rgb`` is ``(B, H, W, K)``).

    Raises:
        ReduceError: an invalid option, NaN/Inf values, a shape that is not a map, a
            basis for another number of channels.

    Example:
        >>> r = pca_fit(torch.rand(2, 64, 14, 14), foreground="auto", outliers=6)
        >>> r.rgb.shape, r.foreground.shape
        ((2, 14, 14, 3), (2, 14, 14))
    """
    recipe, mask = _recipe(n_components, foreground, whiten, colors, outliers)
    t = _as_batch(fmaps)
    if basis is None:
        basis = _fit_batch(t, recipe, mask)
    return basis.apply(t, mask)


def pca_basis(
    fmaps: ArrayLike,
    n_components: int = 3,
    *,
    foreground: Foreground | ArrayLike = "none",
    whiten: bool = False,
    colors: Colors = "minmax",
    outliers: float | None = None,
) -> PCABasis:
    """Fit one PCA basis over every pixel of a ``(C, H, W)`` or ``(B, C, H, W)`` input.

    The drawn range (``lo``/``hi``) is the min/max of the projections over the fitted
    pixels, so a batch fitted jointly shares one colour scale. The options are those of
    :func:`pca_fit`; the basis carries them to whatever it draws next.
    """
    recipe, mask = _recipe(n_components, foreground, whiten, colors, outliers)
    return _fit_batch(_as_batch(fmaps), recipe, mask)


def pca_rgb(
    fmap: ArrayLike,
    n_components: int = 3,
    *,
    basis: PCABasis | None = None,
    foreground: Foreground | ArrayLike = "none",
    whiten: bool = False,
    colors: Colors = "minmax",
    outliers: float | None = None,
) -> np.ndarray:
    """Project a layer's channels onto its principal components, as a picture.

    Each pixel is a C-vector; PCA over the pixels, then each component min-max scaled to
    [0, 1]. The sign of each component is fixed (largest loading positive) so re-runs
    give the same colours. Constant maps give zeros; a map with fewer channels than
    components gets zero components. The DINO recipe (foreground, whitening, sigmoid
    colours, outliers) is the options of :func:`pca_fit`, which also returns the masks.

    Args:
        fmap: ``(C, H, W)`` or ``(1, C, H, W)``; a ``(B, C, H, W)`` batch is fitted
            jointly (one basis, one scale) and gives ``(B, H, W, K)``.
        n_components: 3 for RGB, 1 for a single gray map.
        basis: a fitted :class:`PCABasis` (e.g. a dataset basis) to use instead.
        foreground, whiten, colors, outliers: see :func:`pca_fit`.

    Returns:
        ``(H, W, 3)`` (or ``(H, W)`` for one component) float32 in [0, 1].

    Raises:
        ReduceError: NaN/Inf values, or a shape that is not a map.

    Example:
        >>> rgb = pca_rgb(torch.rand(64, 14, 14))
        >>> rgb.shape
        (14, 14, 3)
    """
    recipe, mask = _recipe(n_components, foreground, whiten, colors, outliers)
    t = _as_batch(fmap)
    if basis is not None:
        pics = basis.apply(t, mask).rgb
        return pics[0] if len(pics) == 1 else pics
    if recipe.selects_pixels or mask is not None or recipe != PCARecipe(n_components):
        pics = _fit_batch(t, recipe, mask).apply(t, mask).rgb
        return pics[0] if len(pics) == 1 else pics
    h, w = t.shape[2:]
    fitted, ys = _fit_pixels(_pixels(t), n_components)
    out = [_scaled(y.T.reshape(h, w, -1), fitted.lo, fitted.hi) for y in ys]
    return out[0] if t.shape[0] == 1 else np.stack(out)


class PCAAccumulator:
    """Streaming PCA: accumulate channel sums and co-sums over many maps, then fit.

    Memory is ``O(C^2)`` whatever the number of pixels. The drawn range of the fitted
    basis is mean +- 3 standard deviations of each component.
    """

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.cosum = torch.zeros(channels, channels, dtype=torch.float64)

    def update(self, fmaps: ArrayLike) -> None:
        """Add every pixel of a ``(C, H, W)`` or ``(B, C, H, W)`` input."""
        t = _as_tensor(fmaps)
        if t.ndim == 3:
            t = t[None]
        if not torch.isfinite(t.sum(dtype=torch.float64)):
            _raise_not_finite(t.numpy())
        x = t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).double()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.cosum += x.T @ x

    def merge(self, other: PCAAccumulator) -> None:
        """Add another accumulator's pixels (for partial results from workers)."""
        self.n += other.n
        self.sum += other.sum
        self.cosum += other.cosum

    def fit(self, n_components: int = 3) -> PCABasis:
        if self.n < 2:
            raise ReduceError("a PCA basis needs at least two pixels")
        mean = self.sum / self.n
        cov = (self.cosum - self.n * torch.outer(mean, mean)) / (self.n - 1)
        comps, vals = _fit(cov.numpy(), n_components)
        sd = np.sqrt(vals)
        return PCABasis(mean.numpy(), comps, vals, -3 * sd, 3 * sd)


_SCALAR_FIELDS = ("whiten", "colors", "fg_offset", "norm_limit")


def save_bases(bases: dict[str, PCABasis], path: str | Path) -> None:
    """Write per-layer bases to one ``.npz`` file (keys ``LAYER::field``), atomically.

    The recipe travels too (whitening, colours, foreground rule, outlier limit), so a
    basis saved from one run or checkpoint draws another the same way.
    """
    from ._files import atomic_path

    arrays: dict[str, np.ndarray] = {}
    for layer, b in bases.items():
        for name in ("mean", "components", "explained", "lo", "hi"):
            arrays[f"{layer}::{name}"] = getattr(b, name)
        for name in _SCALAR_FIELDS:
            arrays[f"{layer}::{name}"] = np.array(getattr(b, name))
        if b.fg_axis is not None:
            arrays[f"{layer}::fg_axis"] = b.fg_axis
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def _basis_from(f: dict[str, np.ndarray]) -> PCABasis:
    kw: dict[str, Any] = {n: f[n] for n in ("mean", "components", "explained", "lo", "hi")}
    if "whiten" in f:
        kw["whiten"] = bool(f["whiten"])
    if "colors" in f:
        colors = str(f["colors"])
        if colors not in COLORS:
            raise ValueError(f"unknown colors {colors!r}")
        kw["colors"] = colors
    for name in ("fg_offset", "norm_limit"):
        if name in f:
            kw[name] = float(f[name])
    if "fg_axis" in f:
        kw["fg_axis"] = f["fg_axis"]
    return PCABasis(**kw)


def load_bases(path: str | Path) -> dict[str, PCABasis]:
    """Read per-layer bases written by :func:`save_bases` (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            fields: dict[str, dict[str, np.ndarray]] = {}
            for key in z.files:
                layer, _, name = key.rpartition("::")
                fields.setdefault(layer, {})[name] = z[key]
        return {layer: _basis_from(f) for layer, f in fields.items()}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ReduceError(
            f"cannot read PCA bases from {str(path)!r} ({exc}); expected a file written by "
            "`featuremaps atlas` or featuremaps.pca.save_bases"
        ) from exc


# Two models' maps of one width in one basis (report --compare, compare pages).
def _pixels_as_map(maps: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(C, N*H*W)``: every pixel as one column."""
    return maps.permute(1, 0, 2, 3).reshape(maps.shape[1], -1)


def joint_basis(maps_a: torch.Tensor, maps_b: torch.Tensor, n_components: int = 3) -> PCABasis:
    """One PCA basis (and colour scale) over every pixel of both ``(N, C, H, W)`` batches.

    The two batches may differ in size and in map size, not in channels.

    Raises:
        ReduceError: the channel counts differ, or a map is not finite.
    """
    if maps_a.ndim != 4 or maps_b.ndim != 4:
        raise ReduceError(
            f"joint PCA takes two (N, C, H, W) batches, got {tuple(maps_a.shape)} and "
            f"{tuple(maps_b.shape)}"
        )
    ca, cb = int(maps_a.shape[1]), int(maps_b.shape[1])
    if ca != cb:
        raise ReduceError(
            f"one PCA basis needs layers of one width; these have {ca} and {cb} channels"
        )
    pixels = torch.cat([_pixels_as_map(maps_a.float()), _pixels_as_map(maps_b.float())], dim=1)
    return pca_basis(pixels[None, :, None, :], n_components)  # (1, C, 1, P): P pixels


def joint_pca(
    maps_a: torch.Tensor, maps_b: torch.Tensor, n_components: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Both batches drawn with :func:`joint_basis`: ``(N_a, H_a, W_a, K)`` and ``(N_b, ...)``.

    Values in [0, 1]: each component min-max scaled over the pixels of both batches.
    """
    basis = joint_basis(maps_a, maps_b, n_components)
    out = []
    for maps in (maps_a, maps_b):
        rgb = pca_rgb(maps.float(), n_components, basis=basis)
        out.append(rgb[None] if maps.shape[0] == 1 else rgb)
    return out[0], out[1]
