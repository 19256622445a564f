"""Objectives: what a picture maximizes, parsed from text such as ``channel:layer3:0-63``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from ..errors import FeatureMapsError, suggest


class ObjectiveError(FeatureMapsError):
    """An objective is malformed or does not fit the model."""


# -- objectives ------------------------------------------------------------------------------


class ObjectiveKind(StrEnum):
    """What is maximized."""

    CHANNEL = "channel"
    """The mean of one channel over the map."""
    NEURON = "neuron"
    """One channel at the centre position of the map."""
    CLASS = "class"
    """One logit of the model's output."""
    LAYER = "layer"
    """The mean square of a whole layer (DeepDream)."""


_SYNTAX = (
    "write channel:LAYER:C, neuron:LAYER:C (C a channel or a range A-B), class:K, "
    "class:LABEL or layer:LAYER"
)


@dataclass(frozen=True)
class Objective:
    """One objective, one image.

    Attributes:
        kind: what is maximized.
        layer: the layer read (``None`` for a class).
        index: the channel (``channel``, ``neuron``) or the class index (``class``; once
            a label is resolved); ``None`` for ``layer``.
        label: the class name when given by name, else ``None``.
    """

    kind: ObjectiveKind
    layer: str | None = None
    index: int | None = None
    label: str | None = None

    @property
    def text(self) -> str:
        """The objective as typed: ``channel:layer3:5``, ``class:espresso``, ..."""
        if self.kind is ObjectiveKind.CLASS:
            return f"class:{self.label if self.label is not None else self.index}"
        if self.kind is ObjectiveKind.LAYER:
            return f"layer:{self.layer}"
        return f"{self.kind.value}:{self.layer}:{self.index}"

    @property
    def file_stem(self) -> str:
        """A file name for its picture: ``channel_layer3_5``."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.text).strip("._") or "objective"

    def __str__(self) -> str:
        return self.text


def _parse_one(spec: str) -> list[Objective]:
    kind_text, sep, rest = spec.strip().partition(":")
    try:
        kind = ObjectiveKind(kind_text.strip().lower())
    except ValueError:
        kinds = [k.value for k in ObjectiveKind]
        raise ObjectiveError(
            f"objective {spec!r}: unknown kind {kind_text!r}.{suggest(kind_text, kinds)} {_SYNTAX}"
        ) from None
    rest = rest.strip()
    if not sep or not rest:
        raise ObjectiveError(f"objective {spec!r}: nothing after {kind.value!r}; {_SYNTAX}")
    if kind is ObjectiveKind.CLASS:
        if re.fullmatch(r"\d+", rest):
            return [Objective(kind, index=int(rest))]
        return [Objective(kind, label=rest)]
    if kind is ObjectiveKind.LAYER:
        return [Objective(kind, layer=rest)]
    layer, sep, chans = rest.rpartition(":")
    if not sep or not layer.strip():
        raise ObjectiveError(f"objective {spec!r}: give the layer and the channel; {_SYNTAX}")
    found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", chans)
    if found is None:
        raise ObjectiveError(
            f"objective {spec!r}: channel {chans!r} is not a number >= 0 or a range A-B; {_SYNTAX}"
        )
    lo = int(found.group(1))
    hi = int(found.group(2)) if found.group(2) is not None else lo
    if hi < lo:
        raise ObjectiveError(f"objective {spec!r}: the range {chans} is empty; {_SYNTAX}")
    return [Objective(kind, layer=layer.strip(), index=c) for c in range(lo, hi + 1)]


def parse_objectives(specs: str | Objective | Sequence[str | Objective]) -> list[Objective]:
    """Parse objective texts, expanding channel ranges; duplicates are kept once.

    Args:
        specs: ``channel:LAYER:C``, ``channel:LAYER:A-B``, ``neuron:LAYER:C``,
            ``class:K``, ``class:LABEL``, ``layer:LAYER``, or :class:`Objective` records.

    Raises:
        ObjectiveError: a text is malformed; the message shows the syntax.

    Example:
        >>> [o.text for o in parse_objectives(["channel:layer3:0-2", "class:espresso"])]
        ['channel:layer3:0', 'channel:layer3:1', 'channel:layer3:2', 'class:espresso']
    """
    items = [specs] if isinstance(specs, (str, Objective)) else list(specs)
    found: list[Objective] = []
    for item in items:
        found.extend([item] if isinstance(item, Objective) else _parse_one(str(item)))
    if not found:
        raise ObjectiveError(f"no objective given; {_SYNTAX}")
    return list(dict.fromkeys(found))
