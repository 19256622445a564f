"""Numeric reductions of feature maps: statistics, ranking and scaling (PCA: ``pca.py``).

Pure functions on tensors/arrays; none modifies its input and none draws anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ReduceError
from .options import Norm, OptionError, Order, parse_choice, parse_order
from .pca import (  # noqa: F401  (moved to pca.py; re-exported for importers)
    PCAAccumulator,
    PCABasis,
    load_bases,
    pca_basis,
    pca_rgb,
    save_bases,
)

ArrayLike = torch.Tensor | np.ndarray


class ReduceOptionError(ReduceError, OptionError):
    """A reduction was given an option value outside its choices."""


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


_RANKINGS: dict[Order, Callable[[torch.Tensor], torch.Tensor]] = {
    Order.TOP: lambda flat: flat.mean(1),
    Order.VARIANCE: lambda flat: flat.double().var(1, correction=0),
}
"""The score of each channel of ``(C, H*W)`` values under each ranking order, highest
shown first. A new ranking order is one member of :class:`~featuremaps.options.Order`
and one entry here."""


def select_channels(
    fmap: ArrayLike, order: str | Order | Sequence[int] = "index", k: int | None = None
) -> list[int]:
    """Channel indices to show.

    Args:
        fmap: a ``(C, H, W)`` map.
        order: a :class:`~featuremaps.options.Order` or its name: ``"index"`` (0, 1,
            2, ...), ``"top"`` (highest mean activation first), ``"variance"`` (highest
            spatial variance first: the population variance of each channel's ``H * W``
            values, computed in float64); or an explicit list of channel indices (also
            as text, ``"3,7,12"``). Ties keep index order; a channel holding NaN/Inf
            ranks last.
        k: how many (``None``: all).

    Raises:
        ReduceError: an unknown order or an index outside the layer.

    Example:
        >>> x = torch.zeros(3, 2, 2); x[2, 0, 0] = 1.0; x[1] = 5.0
        >>> select_channels(x, "top"), select_channels(x, "variance")
        ([1, 2, 0], [2, 0, 1])
    """
    c = _chw_shape(fmap)[0]  # only the ranking orders read the values
    chosen = parse_order(order, "channel order", error=ReduceOptionError)  # type: ignore[arg-type]
    if chosen is Order.INDEX:
        idx = list(range(c))
    elif isinstance(chosen, Order):
        score = _RANKINGS[chosen](_as_chw(fmap).flatten(1))
        score = torch.nan_to_num(score, nan=-float("inf"))  # var of a ±Inf channel is NaN
        idx = torch.argsort(score, descending=True, stable=True).tolist()
    else:
        idx = list(chosen)
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


def compute_scaling(
    maps: np.ndarray, norm: Norm | str = Norm.LINEAR, per_channel: bool = True
) -> Scaling:
    """Bounds for ``(K, H, W)`` maps: each channel's own or the layer's shared min/max.

    NaN and ±Inf values are left out of the bounds. For ``log`` the lower bound is the
    smallest positive value (values <= 0 show at the bottom of the scale); for ``symlog``
    the linear range is 1% of the largest magnitude. A channel with no usable value gets
    0..0 (``log``: 1..1). The bounds are float64 copies of values of the maps.
    """
    norm = parse_choice(Norm, norm, "norm", error=ReduceOptionError)
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
