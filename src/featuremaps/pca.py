"""Principal component pictures of feature maps: fit, project, colour; streaming and saved bases.

Pure functions on tensors/arrays; none modifies its input and none draws anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from .errors import ReduceError

ArrayLike = torch.Tensor | np.ndarray


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
    t = _as_tensor(fmaps)
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
