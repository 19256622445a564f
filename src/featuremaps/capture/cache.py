"""What earlier forwards taught about a model, kept while its modules stay the same.

Per model (held weakly, so the memo never keeps a model alive) and per input signature
(shape, dtype, device, train/eval mode): the layer listing of :func:`list_layers` and the
layout tracker's decisions, with each module's call count from a forward that ran to its
end. Adding, removing or replacing a module starts the model's memo afresh;
:func:`clear_cache` forgets on request.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from .layout import LayerInfo, LayoutRecord

MEMO_SIZE = 16
"""Input signatures remembered per model (a server sees pictures of many sizes)."""

Signature = tuple[Any, ...]


@dataclass
class ModelMemo:
    """What earlier captures learned about one model.

    ``probes`` holds :func:`list_layers` results, ``layouts`` the layout trackers'
    decisions; both are keyed by the input (see :func:`signature`).
    """

    modules: list[tuple[str, weakref.ref[nn.Module]]]
    probes: dict[Any, list[LayerInfo]] = field(default_factory=dict)
    layouts: dict[Any, LayoutRecord] = field(default_factory=dict)
    modified: set[str] = field(default_factory=set)
    """Modules whose output a later in-place operation changed (``capture(copy=False)``
    copies their outputs from then on)."""

    def matches(self, named: list[tuple[str, nn.Module]]) -> bool:
        return len(named) == len(self.modules) and all(
            name == known and ref() is module
            for (name, module), (known, ref) in zip(named, self.modules, strict=True)
        )

    def record(self, sig: Signature) -> LayoutRecord:
        """The layout record for inputs with this signature (the oldest goes beyond 16)."""
        found = self.layouts.get(sig)
        if found is None:
            found = _keep(self.layouts, sig, LayoutRecord())
        return found

    def keep_probe(self, key: Any, order: list[LayerInfo]) -> None:
        _keep(self.probes, key, order)


_V = TypeVar("_V")


def _keep(kept: dict[Any, _V], key: Any, value: _V) -> _V:
    """``kept[key] = value``, first dropping the oldest entry once there are MEMO_SIZE."""
    if len(kept) >= MEMO_SIZE:
        del kept[next(iter(kept))]
    kept[key] = value
    return value


_MEMOS: weakref.WeakKeyDictionary[nn.Module, ModelMemo] = weakref.WeakKeyDictionary()


def memo_for(model: nn.Module, named: list[tuple[str, nn.Module]]) -> ModelMemo:
    """The model's memo, started afresh when a module was added, removed or replaced.

    Args:
        model: the model.
        named: ``list(model.named_modules())``, walked just now.
    """
    memo = _MEMOS.get(model)
    if memo is None or not memo.matches(named):
        memo = ModelMemo([(name, weakref.ref(module)) for name, module in named])
        _MEMOS[model] = memo
    return memo


def signature(x: torch.Tensor, training: bool) -> Signature:
    """What a forward's path may depend on, besides the modules and the data.

    Args:
        x: the model's input.
        training: the model's mode during the forward.
    """
    return (tuple(x.shape), x.dtype, x.device, training)


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget what was learned about ``model`` (every model when ``None``).

    The next capture hooks every module again to decide layouts, and the next listing
    runs a forward. Useful after editing a model in place in a way the memo cannot see
    (changing a module's attributes rather than replacing it), or to time a first run.

    Example:
        >>> import torchvision
        >>> clear_cache(torchvision.models.resnet18())
    """
    if model is None:
        _MEMOS.clear()
    else:
        _MEMOS.pop(model, None)
