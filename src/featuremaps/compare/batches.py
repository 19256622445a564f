"""The fixed batches of a comparison, and how small ones join their neighbours.

The dataset is cut into fixed batches of ``batch_size`` files (the last may be shorter),
exactly as the atlas cuts it. The debiased estimator needs :data:`~.cka.MIN_BATCH`
examples per batch, so a batch left with fewer readable images (bad files, the dataset's
tail) joins its neighbour: :class:`Grouper` is that rule, one look-ahead over batches in
order, shared by every engine so that each folds the very same groups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from ..atlas import load_images
from ..models import Preprocess
from .cka import MIN_BATCH

T = TypeVar("T")


class Grouper(Generic[T]):
    """Groups consecutive batches so that each group but the last holds ``MIN_BATCH`` items.

    Batches are pushed in order; :meth:`push` returns a group once it is final (it and
    the batch after it are both large enough), :meth:`finish` the last one, which the
    caller must check (it may still be too small: then it is left out).

    Example:
        >>> g = Grouper(len, lambda a, b: a + b)
        >>> [g.push(b) for b in ([1, 2, 3, 4], [5], [6, 7, 8, 9])], g.finish()
        ([None, None, [1, 2, 3, 4, 5]], [6, 7, 8, 9])
    """

    def __init__(self, size: Callable[[T], int], merge: Callable[[T, T], T]) -> None:
        self.size, self.merge = size, merge
        self.pending: T | None = None

    def push(self, item: T) -> T | None:
        """Add the next batch; the group it closes, if any."""
        if self.pending is None:
            self.pending = item
            return None
        if self.size(self.pending) < MIN_BATCH or self.size(item) < MIN_BATCH:
            self.pending = self.merge(self.pending, item)
            return None
        ready, self.pending = self.pending, item
        return ready

    def finish(self) -> T | None:
        """The last group (``None`` if nothing was pushed)."""
        last, self.pending = self.pending, None
        return last


def batch_paths(paths: Sequence[str], batch_size: int, index: int) -> tuple[int, Sequence[str]]:
    """The id of batch ``index``'s first image and its files."""
    first = index * batch_size
    return first, paths[first : first + batch_size]


def n_batches(paths: Sequence[str], batch_size: int) -> int:
    return math.ceil(len(paths) / batch_size)


@dataclass
class Counted:
    """What decoding a group of batches found: the readable ids and the bad files."""

    indices: tuple[int, ...]
    ids: np.ndarray
    bad: list[tuple[int, str]]


def merge_counted(first: Counted, second: Counted) -> Counted:
    return Counted(
        (*first.indices, *second.indices),
        np.concatenate([first.ids, second.ids]),
        [*first.bad, *second.bad],
    )


@dataclass
class Decoded:
    """A group of batches decoded with each distinct preprocessing.

    ``xa[i]`` (and ``xb[i]``; ``None`` when B's preprocessing is A's) is image ``ids[i]``.
    """

    indices: tuple[int, ...]
    ids: np.ndarray
    xa: torch.Tensor
    xb: torch.Tensor | None
    bad: list[tuple[int, str]]

    def counted(self) -> Counted:
        return Counted(self.indices, self.ids, self.bad)


def decode(index: int, first: int, paths: Sequence[str], pa: Preprocess, pb: Preprocess) -> Decoded:
    """Decode batch ``index`` (files ``paths``, the first with id ``first``) for both models."""
    a = load_images(index, first, paths, pa)
    if pb == pa:
        return Decoded((index,), a.ids, a.x, None, a.bad)
    b = load_images(index, first, paths, pb)
    keep = np.isin(a.ids, b.ids)  # the same files fail with either preprocessing
    bad = sorted({*a.bad, *b.bad})
    ids = a.ids[keep]
    xb = b.x[torch.from_numpy(np.isin(b.ids, ids))]
    return Decoded((index,), ids, a.x[torch.from_numpy(keep)], xb, bad)


def merge_decoded(first: Decoded, second: Decoded) -> Decoded:
    """Two consecutive groups as one."""
    xb = None
    if first.xb is not None and second.xb is not None:
        xb = torch.cat([first.xb, second.xb])
    return Decoded(
        (*first.indices, *second.indices),
        np.concatenate([first.ids, second.ids]),
        torch.cat([first.xa, second.xa]),
        xb,
        [*first.bad, *second.bad],
    )
