"""Every user choice, once: the names a user may type, their meaning and their checks.

The CLI (Typer), the server (FastAPI), the report, the atlas and the notebook take these
types directly, so no other module spells a list of valid values or repeats a check.
Each enum is a :class:`~enum.StrEnum` (or :class:`~enum.IntEnum`): Typer and FastAPI
turn it into a choice, and its members compare equal to the plain strings, so
``Norm.LOG == "log"``.

A channel order is one of the named :class:`Order` values or an explicit list of
channel indices; :func:`parse_order` reads both (``"top"``, ``"3,7,12"``, ``[3, 7]``).

Example:
    >>> from featuremaps.options import Norm, RenderOptions, parse_order
    >>> RenderOptions(norm="log", order="3,7").order
    (3, 7)
    >>> parse_order("variance").describe()
    'highest spatial variance first'
    >>> Norm("symlog") is Norm.SYMLOG
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum, StrEnum
from typing import Any, Literal, TypeAlias, TypeVar

from .errors import FeatureMapsError, suggest

__all__ = [
    "MAX_MAP_SIZE",
    "REPORT_CMAPS",
    "ChannelOrder",
    "Device",
    "Engine",
    "Norm",
    "OptionError",
    "Order",
    "PCAComponents",
    "RenderOptions",
    "Scale",
    "Score",
    "check_cmap",
    "check_range",
    "choices",
    "describe_order",
    "order_to_json",
    "parse_choice",
    "parse_order",
]


class OptionError(FeatureMapsError, ValueError):
    """An option has a value outside its choices or range.

    It is also a :class:`ValueError`, so a Typer ``parser`` or a pydantic validator that
    calls the checks of this module reports it as a usage error (exit 2, HTTP 422).
    """


class Norm(StrEnum):
    """How values map to colours: ``linear``, ``log`` or ``symlog`` (see ``reduce``)."""

    LINEAR = "linear"
    LOG = "log"
    SYMLOG = "symlog"


class Scale(StrEnum):
    """The range each map is scaled over: its own (``channel``) or the layer's (``layer``)."""

    CHANNEL = "channel"
    LAYER = "layer"


class Order(StrEnum):
    """A named channel order; an explicit list of indices is the other kind (see
    :data:`ChannelOrder`)."""

    INDEX = "index"
    TOP = "top"
    VARIANCE = "variance"

    def describe(self) -> str:
        """The order in words, as the report and viewer show it."""
        return _ORDER_WORDS[self]


_ORDER_WORDS = {
    Order.INDEX: "by index",
    Order.TOP: "highest mean first",
    Order.VARIANCE: "highest spatial variance first",
}
_ORDER_HELP = {
    Order.INDEX: "index (0, 1, 2, ...)",
    Order.TOP: "top (highest mean activation first)",
    Order.VARIANCE: "variance (highest spatial variance first)",
}

ChannelOrder: TypeAlias = Order | tuple[int, ...]
"""A named order or the channel indices to show, in that order."""


class Score(StrEnum):
    """What ranks the images of a channel in the atlas: its spatial ``max`` or ``mean``."""

    MAX = "max"
    MEAN = "mean"
    RELEVANCE = "relevance"
    """Relevance to each image's own top-1 class (the activation ranking by max is kept)."""


class Engine(StrEnum):
    """Where the atlas runs: ``local`` (this process) or ``ray`` (Ray Data)."""

    LOCAL = "local"
    RAY = "ray"


class Device(StrEnum):
    """Where models run; ``auto`` picks CUDA, then MPS, then the CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


class Precision(StrEnum):
    """The forward's precision: ``fp32``, or ``bf16``/``fp16`` under autocast."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class PCAComponents(IntEnum):
    """PCA pictures: ``3`` (RGB), ``1`` (gray) or ``0`` (none)."""

    NONE = 0
    GRAY = 1
    RGB = 3


PCALiteral = Literal[0, 1, 3]

REPORT_CMAPS = ("viridis", "magma", "inferno", "gray", "RdBu_r", "jet")
"""Colormaps the report and the notebook explorer can switch between (their lookup tables
are embedded in the page)."""

MAX_MAP_SIZE = 1024
"""The largest ``map_size``: one upsampled map of at most 1024 x 1024 pixels."""

_E = TypeVar("_E", bound=Enum)


def choices(kind: type[Enum] | Iterable[Any]) -> str:
    """The valid values in words: ``"linear, log or symlog"``."""
    names = [str(m.value) if isinstance(m, Enum) else str(m) for m in kind]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def parse_choice(
    kind: type[_E], value: Any, option: str, *, error: type[OptionError] = OptionError
) -> _E:
    """``value`` as a member of the enum ``kind``, or an ``error`` naming ``option``.

    Example:
        >>> parse_choice(Norm, "log", "--norm")
        <Norm.LOG: 'log'>
    """
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        pass
    if isinstance(value, str):  # enum members are lower case; accept "LOG" or " log "
        try:
            return kind(value.strip().lower())
        except ValueError:
            pass
    valid = [str(m.value) for m in kind]
    hint = suggest(str(value), valid, n=1) if isinstance(value, str) else ""
    raise error(f"{option} {value!r}: use {choices(kind)}.{hint}".rstrip("."))


def parse_order(
    value: str | Order | Sequence[int],
    option: str = "--order",
    *,
    error: type[OptionError] = OptionError,
) -> ChannelOrder:
    """A channel order from a name (``"top"``), a comma-separated list (``"3,7,12"``) or a
    sequence of ints.

    Explicit indices must be non-negative; whether they exist is checked against the
    layer by :func:`featuremaps.reduce.select_channels`.

    Raises:
        OptionError: (or ``error``) neither a known name nor a list of non-negative integers.

    Example:
        >>> parse_order("3, 7,12")
        (3, 7, 12)
        >>> parse_order("TOP")
        <Order.TOP: 'top'>
    """
    if isinstance(value, Order):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in Order._value2member_map_:
            return Order(text)
        parts = [p.strip() for p in text.split(",")]
        if not all(p.lstrip("-").isdigit() for p in parts):
            hint = suggest(text, [m.value for m in Order], n=1)
            raise error(
                f"{option} {value!r}: use {choices(_ORDER_HELP.values())}, or channel "
                f"numbers like 3,7,12.{hint}".rstrip(".")
            )
        idx = tuple(int(p) for p in parts)
    else:
        try:
            idx = tuple(_as_index(i) for i in value)
        except (TypeError, ValueError):
            raise error(f"{option} {value!r}: channel indices must be integers") from None
    if not idx:
        raise error(f"{option}: the list of channels is empty")
    negative = [i for i in idx if i < 0]
    if negative:
        raise error(f"{option}: channel indices start at 0; got {negative}")
    return idx


def _as_index(i: Any) -> int:
    if isinstance(i, bool) or int(i) != i:
        raise TypeError(i)
    return int(i)


def describe_order(order: ChannelOrder) -> str:
    """The order in words: ``"highest mean first"``, ``"as listed: 3, 7, 12"``."""
    if isinstance(order, Order):
        return order.describe()
    shown = ", ".join(map(str, order[:8])) + (", ..." if len(order) > 8 else "")
    return f"as listed: {shown}"


def order_to_json(order: ChannelOrder) -> str | list[int]:
    """The order as JSON writes it: the name, or the list of indices."""
    return order.value if isinstance(order, Order) else list(order)


def order_help() -> str:
    """The help text of an ``--order`` option, made from the choices."""
    return f"{choices(_ORDER_HELP.values())}, or a list of channels like 3,7,12."


def check_cmap(name: str, option: str = "--cmap", offered: Sequence[str] | None = None) -> str:
    """``name`` if it is a matplotlib colormap (and one of ``offered`` when given).

    Raises:
        OptionError: an unknown name, with the closest matches.
    """
    if offered is not None:
        if name not in offered:
            raise OptionError(
                f"{option} {name!r}: not a colormap offered here; use "
                f"{choices(offered)}.{suggest(name, offered, n=2)}"
            )
        return name
    if name in REPORT_CMAPS:  # known without importing matplotlib (about 0.3 s)
        return name
    import matplotlib

    if name not in matplotlib.colormaps:
        hint = suggest(name, list(matplotlib.colormaps))
        raise OptionError(
            f"{option} {name!r}: not a matplotlib colormap.{hint} Common: viridis, magma, "
            "inferno, gray, RdBu_r, jet."
        )
    return name


def check_range(
    value: int | None,
    option: str,
    low: int,
    high: int | None = None,
    *,
    none: str | None = None,
) -> int | None:
    """``value`` if ``low <= value <= high`` (``None`` passes when ``none`` says what it
    means), else an :class:`OptionError` naming ``option`` and the range."""
    if value is None and none is not None:
        return None
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        span = f"from {low} to {high}" if high is not None else f"{low} or more"
        also = f" ({none})" if none else ""
        raise OptionError(f"{option} {value!r}: use a whole number {span}{also}")
    return value


@dataclass(frozen=True)
class RenderOptions:
    """The knobs of the pictures (see :func:`featuremaps.render.render_grid`).

    Strings are accepted where an enum is expected (``norm="log"``) and an order may be
    ``"3,7,12"`` or a list; construction normalizes them and checks every field
    (:meth:`validate`), so an instance always holds valid options.

    Attributes:
        max_maps: channels per grid (``None``: all).
        cols: grid columns (``None``: about square).
        map_size: pixels of each map's longer side after integer upsampling.
        cmap: a matplotlib colormap name.
        norm: :class:`Norm`.
        order: :class:`Order` or a tuple of channel indices.
        scale: :class:`Scale`.
        labels: write the channel index above each map.
        colorbar: add a colour bar under each grid.
        pca: :class:`PCAComponents` (0, 1 or 3).

    Example:
        >>> opts = RenderOptions(max_maps=16, order="variance")
        >>> opts.order, opts.to_json()["order"]
        (<Order.VARIANCE: 'variance'>, 'variance')
    """

    max_maps: int | None = 64
    cols: int | None = None
    map_size: int = 64
    cmap: str = "viridis"
    norm: Norm = Norm.LINEAR
    order: ChannelOrder = Order.INDEX
    scale: Scale = Scale.CHANNEL
    labels: bool = False
    colorbar: bool = True
    pca: PCAComponents = PCAComponents.RGB

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> RenderOptions:
        """Normalize the fields in place (strings to enums) and check them all.

        Returns:
            ``self``, for chaining.

        Raises:
            OptionError: the first bad field, named as its command-line option.
        """
        fix = object.__setattr__  # a frozen dataclass normalizes itself once, here
        fix(self, "norm", parse_choice(Norm, self.norm, "--norm"))
        fix(self, "scale", parse_choice(Scale, self.scale, "--scale"))
        fix(self, "order", parse_order(self.order))  # type: ignore[arg-type]
        fix(self, "pca", parse_choice(PCAComponents, self.pca, "--pca"))
        check_range(self.max_maps, "--max-maps", 1, none="or 0 for all")
        check_range(self.cols, "--cols", 1, none="or leave it out for about square")
        check_range(self.map_size, "--map-size", 1, MAX_MAP_SIZE)
        check_cmap(self.cmap)
        return self

    def replace(self, **changes: Any) -> RenderOptions:
        """A copy with some fields changed (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values: enum names as strings, an explicit order as a list."""
        return {
            "max_maps": self.max_maps,
            "cols": self.cols,
            "map_size": self.map_size,
            "cmap": self.cmap,
            "norm": self.norm.value,
            "order": order_to_json(self.order),
            "scale": self.scale.value,
            "labels": self.labels,
            "colorbar": self.colorbar,
            "pca": int(self.pca),
        }

    def grid_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`featuremaps.render.render_grid` these options set."""
        return {
            "max_maps": self.max_maps,
            "cols": self.cols,
            "map_size": self.map_size,
            "norm": self.norm,
            "cmap": self.cmap,
            "order": self.order,
            "scale": self.scale,
            "labels": self.labels,
            "colorbar": self.colorbar,
        }


class PCAColors(StrEnum):
    """How PCA components become colours (:class:`featuremaps.pca.PCARecipe`)."""

    MINMAX = "minmax"
    SIGMOID = "sigmoid"
