"""The dataset of an atlas: which images, in which order, and how a batch is decoded.

A dataset is a folder (searched recursively), a glob pattern, an image file, a text file
that lists images, or a sequence of these. Images are identified by their path string;
the canonical order is the sorted strings, and the batches are fixed chunks of
``batch_size`` consecutive images of that order (:class:`Plan`), whatever the engine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ImageError
from ..images import IMAGE_SUFFIXES, expand_inputs, load_image, preprocess
from ..models import Preprocess

DataSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""What :func:`dataset_paths` accepts."""


def dataset_paths(data: DataSpec) -> list[str]:
    """The images of a dataset, as sorted unique path strings (the canonical order).

    Args:
        data: a folder (searched recursively), a glob pattern, an image file, a text file
            listing one path per line (blank lines and ``#`` comments ignored; relative
            paths are relative to the list's folder), or a sequence of these.

    Returns:
        Path strings sorted as strings. Listed files are not checked here: a missing one
        is skipped and counted like any unreadable image.

    Raises:
        ImageError: a folder or pattern matches no image, or the dataset is empty.

    Example:
        >>> dataset_paths("photos/")  # doctest: +SKIP
        ['photos/a.jpg', 'photos/sub/b.png']
    """
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    found: set[str] = set()
    for item in items:
        path = Path(item)
        if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
            found.update(_read_list(path))
        else:
            found.update(str(p) for p in expand_inputs([item]))
    if not found:
        raise ImageError(f"the dataset {[str(i) for i in items]} holds no image")
    return sorted(found)


def _read_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"cannot read the list of images {str(path)!r}: {exc}") from exc
    base = path.parent
    out = []
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out.append(str(Path(entry) if Path(entry).is_absolute() else base / entry))
    return out


def fixed_size(pp: Preprocess) -> Preprocess:
    """The preprocessing with a centre crop, so every image gives the same input size."""
    if pp.crop:
        return pp
    return replace(pp, crop=pp.resize or 224)


@dataclass(frozen=True)
class Plan:
    """The fixed batches over the canonical image list."""

    paths: tuple[str, ...]
    batch_size: int

    @property
    def n_batches(self) -> int:
        return -(-len(self.paths) // self.batch_size)

    def batch(self, index: int) -> tuple[int, tuple[str, ...]]:
        """The id of the batch's first image and its paths."""
        first = index * self.batch_size
        return first, self.paths[first : first + self.batch_size]


@dataclass
class LoadedBatch:
    """The decoded images of one batch: ``x[i]`` is image ``ids[i]``."""

    index: int
    ids: np.ndarray
    x: torch.Tensor
    bad: list[tuple[int, str]]


def load_images(index: int, first: int, paths: Sequence[str], pp: Preprocess) -> LoadedBatch:
    """Decode and preprocess the images of batch ``index``; unreadable ones go to ``bad``.

    Args:
        index: the batch number.
        first: the id (canonical position) of ``paths[0]``.
        paths: the batch's files.
        pp: the fixed-size preprocessing.
    """
    tensors: list[torch.Tensor] = []
    ids: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            img = load_image(path, draft_size=pp.resize)
            tensors.append(preprocess(img, pp))
            ids.append(first + i)
        except ImageError as exc:
            bad.append((first + i, str(exc)))
        except (OSError, ValueError) as exc:  # a decoder failing late, on resize
            bad.append((first + i, f"image {path!r} cannot be decoded: {exc}"))
    side = int(pp.crop or 0)
    x = torch.stack(tensors) if tensors else torch.empty(0, 3, side, side)
    return LoadedBatch(index, np.asarray(ids, dtype=np.int64), x, bad)


class BatchDataset(torch.utils.data.Dataset[LoadedBatch]):
    """Item ``i`` is the decoded ``pending[i]``-th batch (a whole batch per worker call)."""

    def __init__(self, plan: Plan, pending: Sequence[int], pp: Preprocess) -> None:
        self.plan = plan
        self.pending = list(pending)
        self.pp = pp

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, i: int) -> LoadedBatch:
        index = self.pending[i]
        first, paths = self.plan.batch(index)
        return load_images(index, first, paths, self.pp)


def _identity(item: Any) -> Any:
    return item


def batch_loader(
    plan: Plan, pending: Sequence[int], pp: Preprocess, workers: int
) -> torch.utils.data.DataLoader[LoadedBatch]:
    """A DataLoader that yields the pending batches in order, decoded by ``workers``."""
    return torch.utils.data.DataLoader(
        BatchDataset(plan, pending, pp),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=2 if workers else None,
    )
