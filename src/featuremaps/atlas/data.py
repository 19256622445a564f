"""The dataset of an atlas: which images, in which order, and how a batch is decoded.

A dataset is a folder (searched recursively), a glob pattern, an image file, a text file
that lists images, or a sequence of these. Each may also be an fsspec URL
(``s3://bucket/photos/``, ``gs://bucket/*.jpg``, ``s3://bucket/list.txt``; extra
``featuremaps[storage]`` for S3): a prefix is listed recursively, a list file may name
URLs, and the images are read wherever the batch is decoded (a DataLoader worker, a Ray
actor). Credentials and endpoints come from the environment as the cloud SDKs read them
(for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``AWS_ENDPOINT_URL_S3`` for an S3-compatible server).

Images are identified by their path or URL string; the canonical order is the sorted
strings, and the batches are fixed chunks of ``batch_size`` consecutive images of that
order (:class:`Plan`), whatever the engine.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from .._files import LOCK_NAME
from ..errors import ImageError
from ..images import IMAGE_SUFFIXES, expand_inputs, load_image, normalized, resized_pixels
from ..models import Preprocess

T = TypeVar("T")

DataSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""What :func:`dataset_paths` accepts."""


def dataset_paths(data: DataSpec) -> list[str]:
    """The images of a dataset, as sorted unique path strings (the canonical order).

    Args:
        data: a folder (searched recursively), a glob pattern, an image file, a text file
            listing one path or URL per line (blank lines and ``#`` comments ignored;
            relative paths are relative to the list's folder), or a sequence of these;
            each may be an fsspec URL (a prefix, a glob, an image or a list file).

    Returns:
        Path strings sorted as strings. Listed files are not checked here: a missing one
        is skipped and counted like any unreadable image.

    Raises:
        ImageError: a folder, prefix or pattern matches no image, the dataset is empty,
            or the object store refuses or fails (one line naming the URL).

    Example:
        >>> dataset_paths("photos/")  # doctest: +SKIP
        ['photos/a.jpg', 'photos/sub/b.png']
    """
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    found: set[str] = set()
    for item in items:
        if is_url(item):
            found.update(_url_images(str(item)))
            continue
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
    for entry in _entries(lines):
        if is_url(entry):
            out.append(entry)
        else:
            out.append(str(Path(entry) if Path(entry).is_absolute() else base / entry))
    return out


def _entries(lines: Sequence[str]) -> list[str]:
    """The entries of a list file: stripped lines, without blanks and ``#`` comments."""
    return [e for e in (line.strip() for line in lines) if e and not e.startswith("#")]


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(item: str | os.PathLike[str]) -> bool:
    """Whether ``item`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(item, str) and bool(_URL.match(item))


def _filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path within it."""
    try:
        import fsspec
    except ImportError:
        raise ImageError(f"{url}: reading URLs needs fsspec: pip install 'featuremaps[storage]'")
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ImageError(
            f"{url}: {exc} (for s3:// install 'featuremaps[storage]'; other stores need "
            "their fsspec package, such as gcsfs or adlfs)"
        ) from exc


def _storage_error(url: str, exc: BaseException) -> ImageError:
    """One line for a failure of the object store (missing object, denied, unreachable)."""
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"{url}: no such object, prefix or bucket")
    if isinstance(exc, PermissionError):
        return ImageError(
            f"{url}: access denied ({exc}); check the credentials in the environment "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://)"
        )
    name = type(exc).__name__
    if "credential" in f"{name} {exc}".lower():
        return ImageError(
            f"{url}: no usable credentials ({exc}); set them in the environment "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://)"
        )
    return ImageError(f"{url}: the store failed ({name}: {exc})")


def _url_images(url: str) -> list[str]:
    """The image URLs under a prefix, matching a glob, named by a list file, or ``url``."""
    fs, path = _filesystem(url)
    try:
        if glob.has_magic(path):
            hits = [p for p in fs.glob(path) if _is_image(p)]
            if not hits:
                raise ImageError(f"pattern {url!r} matches no image")
        elif _is_image(path):
            if not fs.isfile(path):
                raise FileNotFoundError(path)
            hits = [path]
        elif url.endswith("/") or fs.isdir(path):
            hits = [p for p in fs.find(path) if _is_image(p)]
            if not hits:
                raise ImageError(f"{url} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        elif fs.isfile(path):
            text = fs.cat_file(path).decode("utf-8")
            base = url.rsplit("/", 1)[0]
            return [e if is_url(e) else f"{base}/{e}" for e in _entries(text.splitlines())]
        else:
            raise FileNotFoundError(path)
    except ImageError:
        raise
    except UnicodeDecodeError as exc:
        raise ImageError(f"cannot read the list of images {url!r}: {exc}") from exc
    except Exception as exc:  # each store raises its own kinds (botocore, aiohttp, ...)
        raise _storage_error(url, exc) from exc
    return [fs.unstrip_protocol(p) for p in hits]


def _is_image(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str, draft_size: int | None = None) -> Image.Image:
    """Open a local image or an image URL as 8-bit RGB (see :func:`load_image`).

    A URL's bytes are read with fsspec into memory and decoded from there; errors name
    the URL.

    Raises:
        ImageError: the file or object is missing, unreadable, or not an image.
    """
    if not is_url(path):
        return load_image(path, draft_size=draft_size)
    fs, inner = _filesystem(path)
    try:
        data = fs.cat_file(inner)
    except Exception as exc:  # the store's own kinds
        raise _storage_error(path, exc) from exc
    with _in_memory_file(data) as local:
        try:
            return load_image(local, draft_size=draft_size)
        except ImageError as exc:
            raise ImageError(str(exc).replace(local, path)) from exc


@contextmanager
def _in_memory_file(data: bytes) -> Iterator[str]:
    """A path whose content is ``data``: an anonymous memory file on Linux, else a
    temporary file."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("featuremaps-image")
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="featuremaps-") as tmp:
        tmp.write(data)
        tmp.flush()
        yield tmp.name


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
    pixels: torch.Tensor | None = None
    """``(B, 3, H, W)`` uint8: the pixels ``x`` was normalized from (when asked for)."""


def load_images(
    index: int, first: int, paths: Sequence[str], pp: Preprocess, pixels: bool = False
) -> LoadedBatch:
    """Decode and preprocess the images of batch ``index``; unreadable ones go to ``bad``.

    Args:
        index: the batch number.
        first: the id (canonical position) of ``paths[0]``.
        paths: the batch's files.
        pp: the fixed-size preprocessing.
        pixels: also keep the uint8 pixels of the inputs (``LoadedBatch.pixels``).
    """
    tensors: list[torch.Tensor] = []
    raw: list[torch.Tensor] = []
    ids: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, path in enumerate(paths):
        try:
            img = read_image(path, draft_size=pp.resize)
            px = resized_pixels(img, pp)
            tensors.append(normalized(px, pp))  # bitwise preprocess(img, pp)
            if pixels:
                raw.append(px)
            ids.append(first + i)
        except ImageError as exc:
            bad.append((first + i, str(exc)))
        except (OSError, ValueError) as exc:  # a decoder failing late, on resize
            bad.append((first + i, f"image {path!r} cannot be decoded: {exc}"))
    side = int(pp.crop or 0)
    x = torch.stack(tensors) if tensors else torch.empty(0, 3, side, side)
    kept = None
    if pixels:
        kept = torch.stack(raw) if raw else torch.empty(0, 3, side, side, dtype=torch.uint8)
    return LoadedBatch(index, np.asarray(ids, dtype=np.int64), x, bad, kept)


class BatchDataset(torch.utils.data.Dataset[LoadedBatch]):
    """Item ``i`` is the decoded ``pending[i]``-th batch (a whole batch per worker call)."""

    def __init__(
        self, plan: Plan, pending: Sequence[int], pp: Preprocess, pixels: bool = False
    ) -> None:
        self.plan = plan
        self.pending = list(pending)
        self.pp = pp
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pending)

    def __getitem__(self, i: int) -> LoadedBatch:
        index = self.pending[i]
        first, paths = self.plan.batch(index)
        return load_images(index, first, paths, self.pp, self.pixels)


def release_inherited_lock(worker_id: int = 0) -> None:
    """In a forked DataLoader worker: close the inherited descriptor of the output lock.

    A flock lives as long as any descriptor of it, so without this a worker that
    outlives a killed run (workers notice their parent's death only after a while)
    would keep the output folder locked. Linux only (``/proc/self/fd``); elsewhere
    workers are spawned and inherit nothing.
    """
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return
    for entry in list(fds.iterdir()):
        try:
            if os.readlink(entry).endswith(f"/{LOCK_NAME}"):
                os.close(int(entry.name))
        except (OSError, ValueError):
            pass


def batch_loader(
    plan: Plan, pending: Sequence[int], pp: Preprocess, workers: int, pixels: bool = False
) -> torch.utils.data.DataLoader[LoadedBatch]:
    """A DataLoader that yields the pending batches in order, decoded by ``workers``
    (with their uint8 pixels when ``pixels``)."""
    return ordered_loader(BatchDataset(plan, pending, pp, pixels), workers)


def ordered_loader(
    dataset: torch.utils.data.Dataset[T], workers: int
) -> torch.utils.data.DataLoader[T]:
    """A DataLoader over ``dataset``'s items as they are (no batching, no collation), in
    order, made by ``workers`` processes (none: this one) that first close the inherited
    output lock (:func:`release_inherited_lock`)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        prefetch_factor=2 if workers else None,
        worker_init_fn=release_inherited_lock,
    )


def _identity(item: T) -> T:
    return item
