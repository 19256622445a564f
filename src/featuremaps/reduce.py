"""Numeric reductions of feature maps: statistics, ranking, scaling and PCA.

Pure functions on tensors/arrays; none modifies its input and none draws anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg
import torch

from .errors import ReduceError

ArrayLike = torch.Tensor | np.ndarray
Norm = Literal["linear", "log", "symlog"]


def as_tensor(fmap: ArrayLike) -> torch.Tensor:
    """A float tensor view/copy of an array or tensor (never the caller's storage)."""
    if isinstance(fmap, np.ndarray):
        return torch.from_numpy(np.array(fmap, dtype=np.float32, copy=True))
    return fmap.detach().to("cpu", torch.float32)


def _chw_shape(fmap: ArrayLike) -> tuple[int, int, int]:
    """The ``(C, H, W)`` of a map or a batch of one, checked, without reading the values."""
    shape = tuple(int(n) for n in fmap.shape)
    if len(shape) == 4:
        if shape[0] != 1:
            raise ReduceError(f"expected one map (1, C, H, W), got batch of {shape[0]}")
        shape = shape[1:]
    if len(shape) != 3:
        raise ReduceError(f"expected a (C, H, W) map, got shape {shape}")
    return shape  # type: ignore[return-value]


def _as_chw(fmap: ArrayLike) -> torch.Tensor:
    return as_tensor(fmap).reshape(_chw_shape(fmap))


# -- statistics and ranking ------------------------------------------------------------------


def channel_stats(fmap: ArrayLike) -> dict[str, np.ndarray]:
    """Per-channel ``min``, ``mean``, ``max`` and ``dead`` (all values zero) of a map."""
    t = _as_chw(fmap).flatten(1)
    return {
        "min": t.amin(1).numpy(),
        "mean": t.mean(1).numpy(),
        "max": t.amax(1).numpy(),
        "dead": (t == 0).all(1).numpy(),
    }


def select_channels(
    fmap: ArrayLike, order: str | Sequence[int] = "index", k: int | None = None
) -> list[int]:
    """Channel indices to show.

    Args:
        fmap: a ``(C, H, W)`` map.
        order: ``"index"`` (0, 1, 2, ...), ``"top"`` (highest mean activation first) or
            an explicit list of channel indices.
        k: how many (``None``: all).
    """
    c = _chw_shape(fmap)[0]  # only "top" reads the values
    if isinstance(order, str):
        if order == "index":
            idx = list(range(c))
        elif order == "top":
            means = torch.nan_to_num(_as_chw(fmap).flatten(1).mean(1), nan=-float("inf"))
            idx = torch.argsort(means, descending=True, stable=True).tolist()
        else:
            raise ReduceError(f"channel order {order!r}: use index, top or a list of indices")
    else:
        idx = [int(i) for i in order]
        bad = [i for i in idx if not 0 <= i < c]
        if bad:
            raise ReduceError(f"channels {bad} out of range: this layer has {c} (0..{c - 1})")
    return idx[:k] if k is not None else idx


# -- scaling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scaling:
    """How values map to [0, 1]: per channel bounds and the norm."""

    vmin: np.ndarray  # (K,) lower bound per shown channel
    vmax: np.ndarray  # (K,) upper bound per shown channel
    norm: Norm
    linthresh: np.ndarray  # (K,) linear range of symlog


def compute_scaling(maps: np.ndarray, norm: Norm = "linear", per_channel: bool = True) -> Scaling:
    """Bounds for ``(K, H, W)`` maps: each channel's own or the layer's shared min/max.

    NaN and ±Inf values are left out of the bounds. For ``log`` the lower bound is the
    smallest positive value (values <= 0 show at the bottom of the scale); for ``symlog``
    the linear range is 1% of the largest magnitude. A channel with no usable value gets
    0..0 (``log``: 1..1). The bounds are float64 copies of values of the maps.
    """
    if norm not in ("linear", "log", "symlog"):
        raise ReduceError(f"norm {norm!r}: use linear, log or symlog")
    k = maps.shape[0]
    flat = _float(maps).reshape(k, -1)
    if flat.size and _all_finite(flat):  # the usual case: plain min/max, no NaN masks
        lo, hi = _bounds(flat, per_channel)
        if norm == "log":
            if not (lo > 0).all():
                lo, _ = _bounds(np.where(flat > 0, flat, np.inf), per_channel)
            none = ~(hi > 0)
            lo[none] = hi[none] = 1.0
    else:
        finite = np.where(np.isfinite(flat), flat, np.nan)
        with np.errstate(all="ignore"):
            if norm == "log":
                pos = np.where(finite > 0, finite, np.nan)
                lo = _nan_reduce(np.nanmin, pos, per_channel, 1.0)
                hi = _nan_reduce(np.nanmax, pos, per_channel, 1.0)
            else:
                lo = _nan_reduce(np.nanmin, finite, per_channel, 0.0)
                hi = _nan_reduce(np.nanmax, finite, per_channel, 0.0)
    mag = np.maximum(np.abs(lo), np.abs(hi))
    lin = np.where(mag > 0, mag * 0.01, 1.0)
    return Scaling(lo, hi, norm, lin)


def _float(maps: np.ndarray) -> np.ndarray:
    """The maps as a float array: no copy when they already are one."""
    a = np.asarray(maps)
    return a if a.dtype.kind == "f" else a.astype(np.float64)


def _all_finite(a: np.ndarray) -> bool:
    """No NaN or ±Inf in ``a``: a finite sum says so in one cheap pass."""
    with np.errstate(all="ignore"):
        if np.isfinite(a.sum()):
            return True
    return bool(np.isfinite(a).all())  # the sum overflowed or some value is not finite


def _bounds(flat: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of ``(K, N)`` values, per row or shared, as ``(K,)`` float64."""
    if per_channel:
        return flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
    k = flat.shape[0]
    return np.full(k, float(flat.min())), np.full(k, float(flat.max()))


def _nan_reduce(fn: object, a: np.ndarray, per_channel: bool, empty: float) -> np.ndarray:
    k = a.shape[0]
    all_nan = np.isnan(a).all(axis=1)
    if per_channel:
        out = np.full(k, empty)
        if (~all_nan).any():
            out[~all_nan] = fn(a[~all_nan], axis=1)  # type: ignore[operator]
        return out
    value = empty if all_nan.all() else float(fn(a))  # type: ignore[operator]
    return np.full(k, value)


def _symlog(x: np.ndarray, lin: np.ndarray | float) -> np.ndarray:
    """``sign(x) * log10(1 + |x| / lin)``, in the precision of ``x``."""
    out = np.abs(x) / lin
    np.log1p(out, out=out)
    out *= 1.0 / np.log(10.0)
    return np.copysign(out, x, out=out)


def apply_scaling(maps: np.ndarray, s: Scaling) -> np.ndarray:
    """Map ``(K, H, W)`` values to [0, 1] as ``s`` says; a new array.

    The result is float32 for float32 (or narrower) maps and float64 for float64 ones.
    Values outside the bounds are clipped to 0 or 1, NaN and ±Inf become NaN, and a
    channel whose bounds are equal gives 0.
    """
    x = _float(maps)
    dt = np.result_type(x.dtype, np.float32)
    lo = s.vmin[:, None, None].astype(np.float64)
    hi = s.vmax[:, None, None].astype(np.float64)
    with np.errstate(all="ignore"):
        if s.norm == "log":
            t = np.maximum(x, lo.astype(dt), dtype=dt)
            np.log10(t, out=t)
            lo, hi = np.log10(lo), np.log10(hi)
        elif s.norm == "symlog":
            lin = s.linthresh[:, None, None].astype(np.float64)
            t = _symlog(x.astype(dt, copy=False), lin.astype(dt))
            lo, hi = _symlog(lo, lin), _symlog(hi, lin)
        else:
            t = x
        span = (hi - lo).astype(dt)
        const = ~(span > 0)  # also a span too small for float32
        out = np.subtract(t, lo.astype(dt), dtype=dt)  # always a new array
        out /= np.where(const, 1.0, span).astype(dt)
        np.clip(out, 0.0, 1.0, out=out)
    if const.any():
        out[const[:, 0, 0]] = 0.0
    if not _all_finite(x):
        out[~np.isfinite(x)] = np.nan
    return out


# -- PCA -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PCABasis:
    """A PCA basis over channels: ``(x - mean) @ components.T``, then ``lo..hi`` -> 0..1.

    Attributes:
        mean: ``(C,)`` channel means.
        components: ``(K, C)`` unit vectors, strongest first, sign fixed so that each
            component's largest-magnitude loading is positive.
        explained: ``(K,)`` variance along each component.
        lo, hi: ``(K,)`` the projection values drawn as 0 and 1.
    """

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def project(self, fmap: ArrayLike) -> np.ndarray:
        """Project a ``(C, H, W)`` map: ``(H, W, K)`` raw component values."""
        t = _as_chw(fmap)
        c, h, w = t.shape
        if c != self.mean.shape[0]:
            raise ReduceError(f"basis is for {self.mean.shape[0]} channels, map has {c}")
        x = _pixels(t[None])[0]
        if not np.isfinite(x.sum(dtype=np.float64)):
            _raise_not_finite(x)
        return _project(x, self.components, self.mean).T.reshape(h, w, -1)

    def to_rgb(self, fmap: ArrayLike) -> np.ndarray:
        """Project and scale to [0, 1]: ``(H, W, K)`` (``(H, W)`` for one component)."""
        return _scaled(self.project(fmap), self.lo, self.hi)


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
    t = as_tensor(fmaps)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ReduceError(f"expected (C, H, W) or (B, C, H, W), got {tuple(t.shape)}")
    return t


def pca_basis(fmaps: ArrayLike, n_components: int = 3) -> PCABasis:
    """Fit one PCA basis over every pixel of a ``(C, H, W)`` or ``(B, C, H, W)`` input.

    The drawn range (``lo``/``hi``) is the min/max of the projections over the same
    input, so a batch fitted jointly shares one colour scale.
    """
    if n_components < 1:
        raise ReduceError("n_components must be at least 1")
    return _fit_pixels(_pixels(_as_batch(fmaps)), n_components)[0]


def pca_rgb(fmap: ArrayLike, n_components: int = 3, *, basis: PCABasis | None = None) -> np.ndarray:
    """Project a layer's channels onto its principal components, as a picture.

    Each pixel is a C-vector; PCA over the pixels, then each component min-max scaled to
    [0, 1]. The sign of each component is fixed (largest loading positive) so re-runs
    give the same colours. Constant maps give zeros; a map with fewer channels than
    components gets zero components.

    Args:
        fmap: ``(C, H, W)`` or ``(1, C, H, W)``; a ``(B, C, H, W)`` batch is fitted
            jointly (one basis, one scale) and gives ``(B, H, W, K)``.
        n_components: 3 for RGB, 1 for a single gray map.
        basis: a fitted :class:`PCABasis` (e.g. a dataset basis) to use instead.

    Returns:
        ``(H, W, 3)`` (or ``(H, W)`` for one component) float32 in [0, 1].

    Raises:
        ReduceError: NaN/Inf values, or a shape that is not a map.

    Example:
        >>> rgb = pca_rgb(torch.rand(64, 14, 14))
        >>> rgb.shape
        (14, 14, 3)
    """
    if n_components < 1:
        raise ReduceError("n_components must be at least 1")
    t = _as_batch(fmap)
    if basis is not None:
        pics = [basis.to_rgb(m) for m in t]
        return pics[0] if len(pics) == 1 else np.stack(pics)
    h, w = t.shape[2:]
    fitted, ys = _fit_pixels(_pixels(t), n_components)
    pics = [_scaled(y.T.reshape(h, w, -1), fitted.lo, fitted.hi) for y in ys]
    return pics[0] if t.shape[0] == 1 else np.stack(pics)


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
        t = as_tensor(fmaps)
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


def save_bases(bases: dict[str, PCABasis], path: str | Path) -> None:
    """Write per-layer bases to one ``.npz`` file (keys ``LAYER::field``), atomically."""
    from ._files import atomic_path

    arrays: dict[str, np.ndarray] = {}
    for layer, b in bases.items():
        for name in ("mean", "components", "explained", "lo", "hi"):
            arrays[f"{layer}::{name}"] = getattr(b, name)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]


def load_bases(path: str | Path) -> dict[str, PCABasis]:
    """Read per-layer bases written by :func:`save_bases` (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            fields: dict[str, dict[str, np.ndarray]] = {}
            for key in z.files:
                layer, _, name = key.rpartition("::")
                fields.setdefault(layer, {})[name] = z[key]
        return {layer: PCABasis(**f) for layer, f in fields.items()}
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ReduceError(
            f"cannot read PCA bases from {str(path)!r} ({exc}); expected a file written by "
            "`featuremaps atlas`"
        ) from exc
