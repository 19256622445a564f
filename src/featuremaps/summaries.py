"""What every view shows about a layer, built once from the captured maps.

The manifest of ``run``, the report, the viewer, the atlas and the notebook all describe
a layer the same way: its module, shapes, stride and layout (from
:class:`~featuremaps.capture.LayerInfo`) and per-channel statistics. They build a
:class:`LayerSummary` and serialize it with :meth:`LayerSummary.to_json`; floats become
JSON here and only here (:func:`json_float`: NaN and ±Inf, which only maps kept with
``allow_nan`` hold, become ``null``).

Example:
    >>> import torch
    >>> from featuremaps import capture
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> fm = capture(net, torch.rand(1, 3, 8, 8), ["1"])
    >>> s = LayerSummary.from_maps("1", fm)
    >>> s.channels, (s.height, s.width), sorted(s.to_json())[:3]
    (4, (6, 6), ['channels', 'dead_share', 'layout'])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .reduce import ArrayLike, channel_stats

if TYPE_CHECKING:
    from .capture import FeatureMaps

__all__ = ["ChannelStats", "LayerSummary", "json_float", "json_floats", "summarize"]


def json_float(value: float, digits: int | None = None) -> float | None:
    """A float for JSON: ``None`` for NaN/±Inf, else the value (rounded to ``digits``
    significant digits when given, to keep embedded data short)."""
    v = float(value)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}") if digits else v


def json_floats(values: Iterable[float], digits: int | None = None) -> list[float | None]:
    """:func:`json_float` of each value."""
    return [json_float(v, digits) for v in values]


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel statistics of one map: ``(C,)`` arrays.

    Attributes:
        min, mean, max: float32 values over each channel's ``H * W`` pixels (NaN when a
            channel holds NaN).
        dead: ``True`` where every value of the channel is zero.
    """

    min: np.ndarray
    mean: np.ndarray
    max: np.ndarray
    dead: np.ndarray

    @classmethod
    def from_map(cls, fmap: ArrayLike) -> ChannelStats:
        """The statistics of a ``(C, H, W)`` map (or a batch of one); the map is not changed."""
        s = channel_stats(fmap)
        return cls(s["min"], s["mean"], s["max"], s["dead"])

    def take(self, channels: Sequence[int]) -> ChannelStats:
        """The statistics of some channels, in the order given."""
        idx = np.asarray(channels, dtype=np.int64)
        return ChannelStats(self.min[idx], self.mean[idx], self.max[idx], self.dead[idx])

    def to_json(self, digits: int | None = None) -> dict[str, list[Any]]:
        """``{"min": [...], "mean": [...], "max": [...], "dead": [...]}`` (NaN -> ``null``)."""
        return {
            "min": json_floats(self.min, digits),
            "mean": json_floats(self.mean, digits),
            "max": json_floats(self.max, digits),
            "dead": [bool(d) for d in self.dead],
        }


@dataclass(frozen=True)
class LayerSummary:
    """One layer of one image, as every view describes it.

    Attributes:
        name: the layer as ``--layers`` takes it.
        info: :meth:`featuremaps.capture.LayerInfo.to_dict` (type, raw and normalized
            shape, stride, layout, note; calls for a module that ran several times).
        channels: ``C``.
        height, width: the map's ``H`` and ``W``.
        stats: per-channel :class:`ChannelStats`.
    """

    name: str
    info: dict[str, Any]
    channels: int
    height: int
    width: int
    stats: ChannelStats

    @classmethod
    def from_maps(cls, name: str, fm: FeatureMaps, index: int = 0) -> LayerSummary:
        """Summarize layer ``name`` of image ``index`` of captured maps."""
        t = fm[name][index]
        c, h, w = (int(n) for n in t.shape)
        return cls(name, fm.info[name].to_dict(), c, h, w, ChannelStats.from_map(t))

    @property
    def module_type(self) -> str:
        return str(self.info.get("type", ""))

    @property
    def dead_count(self) -> int:
        return int(np.count_nonzero(self.stats.dead))

    @property
    def dead_share(self) -> float:
        return self.dead_count / self.channels if self.channels else 0.0

    @property
    def layer_min(self) -> float:
        """The smallest finite value of the layer (NaN when none is finite)."""
        return _finite_reduce(np.min, self.stats.min)

    @property
    def layer_max(self) -> float:
        """The largest finite value of the layer (NaN when none is finite)."""
        return _finite_reduce(np.max, self.stats.max)

    @property
    def layer_mean(self) -> float:
        """The mean of the channel means that are finite (all channels have ``H * W``
        pixels, so this is the layer's mean when every value is finite)."""
        return _finite_reduce(np.mean, self.stats.mean)

    def to_json(self, digits: int | None = None) -> dict[str, Any]:
        """The layer as JSON: ``info`` plus ``channels``, ``dead_share`` and the
        per-channel ``min``, ``mean``, ``max`` lists (NaN/Inf -> ``null``).

        This is the manifest's layer entry; views add what only they show.
        """
        stats = self.stats.to_json(digits)
        return {
            **self.info,
            "channels": self.channels,
            "dead_share": json_float(self.dead_share, digits),
            "min": stats["min"],
            "mean": stats["mean"],
            "max": stats["max"],
        }


def _finite_reduce(fn: Any, values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(fn(finite.astype(np.float64))) if finite.size else math.nan


def summarize(fm: FeatureMaps, index: int = 0) -> dict[str, LayerSummary]:
    """A :class:`LayerSummary` of every captured layer of image ``index``, in capture order."""
    return {name: LayerSummary.from_maps(name, fm, index) for name in fm}
