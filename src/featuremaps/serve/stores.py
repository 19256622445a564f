"""The server's bounded memory: uploaded images, loaded models and captured activations.

Each store has a small public API; routes and jobs never touch a store's internals.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image

from ..capture import LayerInfo, capture
from ..errors import FeatureMapsError, suggest
from ..images import SAMPLES, sample_image
from ..models import LoadedModel, load_model
from ..summaries import ChannelStats, LayerSummary
from .config import too_large
from .errors import ApiError
from .upload import RETRY_AFTER_S, Decoder

if TYPE_CHECKING:
    from .relevance import RelevanceEntry

V = TypeVar("V")


class LRU(Generic[V]):
    """A thread-safe LRU map bounded by item count and by total size.

    The most recently added item is never evicted, so one item larger than the byte
    bound still fits (alone).

    Example:
        >>> lru: LRU[bytes] = LRU(2, max_bytes=4, size=len)
        >>> lru.put("a", b"xx"); lru.put("b", b"xxx"); list(lru.keys())
        ['b']
    """

    def __init__(
        self, max_items: int, max_bytes: int | None = None, size: Callable[[V], int] | None = None
    ) -> None:
        if max_items < 1:
            raise FeatureMapsError("a cache holds at least one item")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size = size or (lambda v: 0)
        self._items: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._evict()

    def refresh(self) -> None:
        """Evict again after an item grew."""
        with self._lock:
            self._evict()

    def _evict(self) -> None:
        while len(self._items) > 1 and (
            len(self._items) > self.max_items
            or (self.max_bytes is not None and self.nbytes() > self.max_bytes)
        ):
            self._items.popitem(last=False)

    def nbytes(self) -> int:
        return sum(self._size(v) for v in list(self._items.values()))

    def make_room(self, extra: int) -> bool:
        """Evict the oldest items (the newest too) until ``extra`` more bytes fit.

        Returns:
            Whether they fit now.
        """
        if self.max_bytes is None:
            return True
        with self._lock:
            while self._items and self.nbytes() + extra > self.max_bytes:
                self._items.popitem(last=False)
            return self.nbytes() + extra <= self.max_bytes

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


# -- images -----------------------------------------------------------------------------------


def image_bytes(img: Image.Image) -> int:
    """Memory Pillow holds for an RGB image (four bytes a pixel)."""
    return img.width * img.height * 4


class ImageStore:
    """Decoded uploads under their content hash, bounded in count and memory."""

    def __init__(self, decoder: Decoder, max_upload_bytes: int, max_items: int = 32) -> None:
        self.decoder = decoder
        self.max_upload_bytes = max_upload_bytes
        self.max_bytes = decoder.max_bytes
        self._images: LRU[Image.Image] = LRU(max_items, decoder.max_bytes, image_bytes)
        self._lock = threading.Lock()
        self._reserved = 0

    def add(self, data: bytes) -> tuple[str, Image.Image]:
        """Decode and keep uploaded bytes (once per content); return its id and image.

        Raises:
            ApiError: 400 empty, 413 too large, 415 not an image, 503 decoders busy.
        """
        if not data:
            raise ApiError(400, "empty upload: send the image file")
        if len(data) > self.max_upload_bytes:
            raise ApiError(413, too_large(self.max_upload_bytes))
        image_id = hashlib.sha256(data).hexdigest()[:24]
        img = self._images.get(image_id)
        if img is None:
            with self._room(self.decoder.measure(data)):
                img = self.decoder.decode(data)
                self._images.put(image_id, img)
        return image_id, img

    @contextmanager
    def _room(self, need: int) -> Iterator[None]:
        """Hold ``need`` bytes of the memory bound while an image decodes.

        The kept images plus those being decoded stay within ``max_bytes``: the oldest
        kept ones make room; when decodes in flight hold the room, 503.
        """
        with self._lock:
            if not self._images.make_room(self._reserved + need):
                raise ApiError(
                    503,
                    f"the server is decoding other large images ({self._reserved / 2**20:.0f} "
                    f"MiB of its {self.max_bytes / 2**20:.0f} MiB); try again in "
                    f"{RETRY_AFTER_S} s",
                    {"Retry-After": str(RETRY_AFTER_S)},
                )
            self._reserved += need
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= need

    def add_sample(self, name: str) -> tuple[str, Image.Image]:
        """Keep a bundled sample image.

        Raises:
            ApiError: 404 for a name that is not a sample.
        """
        if name not in SAMPLES:
            raise ApiError(404, f"no sample {name!r}; samples: {', '.join(SAMPLES)}")
        return self.add(sample_image(name).read_bytes())

    def get(self, image_id: str) -> Image.Image:
        """The image of an id.

        Raises:
            ApiError: 404 when it was never uploaded or was evicted.
        """
        img = self._images.get(image_id)
        if img is None:
            raise ApiError(
                404, "image not found (uploads are kept for a while only); upload it again"
            )
        return img

    def __len__(self) -> int:
        return len(self._images)


# -- models -----------------------------------------------------------------------------------


class ModelStore:
    """Loaded models (a few, LRU) and the lock that lets one forward pass run at a time."""

    def __init__(self, max_items: int, device: str) -> None:
        self.device = torch.device(device)
        self._models: LRU[LoadedModel] = LRU(max_items)
        self._lock = threading.Lock()
        self.compute = threading.Lock()
        """Held around every forward pass: one at a time keeps memory bounded."""

    def get(self, spec: str, weights: str) -> LoadedModel:
        """The model of a (checked) spec and weights, loaded on first use."""
        key = f"{spec}\0{weights}"
        with self._lock:
            loaded = self._models.get(key)
            if loaded is None:
                loaded = load_model(spec, weights)
                loaded.module.to(self.device)
                self._models.put(key, loaded)
            return loaded


# -- captures ---------------------------------------------------------------------------------


def capture_key(spec: str, weights: str, image_id: str) -> str:
    """The id of the capture of one (model, weights, image)."""
    return hashlib.sha256(f"{spec}\0{weights}\0{image_id}".encode()).hexdigest()[:20]


_PICTURES_KEPT = 48


@dataclass
class CaptureEntry:
    """The activations of one (model, weights, image), with what the page shows of it."""

    id: str
    spec: str
    weights: str
    image_id: str
    weights_desc: str
    pretrained: bool
    preprocess: str
    x: torch.Tensor
    display: np.ndarray
    layers: list[LayerInfo]
    stages: list[str]
    predictions: list[dict[str, Any]] | None
    classifier: bool = False
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    summaries: dict[str, LayerSummary] = field(default_factory=dict)
    pictures: dict[tuple[Any, ...], tuple[bytes, str]] = field(default_factory=dict)
    relevance: OrderedDict[int, RelevanceEntry] = field(default_factory=OrderedDict)
    """Relevance to each class asked for (the newest few), by class index."""

    def layer_info(self, name: str) -> LayerInfo:
        """The listing of a layer.

        Raises:
            ApiError: 404 with the closest names for an unknown layer.
        """
        for info in self.layers:
            if info.name == name:
                return info
        raise ApiError(
            404, f"unknown layer {name!r}.{suggest(name, [i.name for i in self.layers])}"
        )

    def nbytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in self.maps.values())
        pngs = sum(len(data) + len(note) for data, note in self.pictures.values())
        scores = sum(r.nbytes() for r in list(self.relevance.values()))
        return tensors + self.x.numel() * 4 + self.display.nbytes + pngs + scores


class CaptureStore:
    """Captures (LRU by count and bytes), with layers captured on demand.

    Args:
        models: where the model of a capture is loaded from for a layer captured later.
        max_items: captures kept.
        max_bytes: total size of their activations and pictures.
    """

    def __init__(self, models: ModelStore, max_items: int, max_bytes: int) -> None:
        self.models = models
        self._entries: LRU[CaptureEntry] = LRU(max_items, max_bytes, CaptureEntry.nbytes)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, capture_id: object) -> bool:
        return capture_id in self._entries

    def put(self, entry: CaptureEntry) -> None:
        self._entries.put(entry.id, entry)

    def refresh(self) -> None:
        """Evict again after an entry grew (relevance added to it)."""
        self._entries.refresh()

    def get(self, capture_id: str) -> CaptureEntry:
        """A kept capture.

        Raises:
            ApiError: 404 when it was evicted (or never made).
        """
        entry = self._entries.get(capture_id)
        if entry is None:
            raise ApiError(404, "this capture is no longer cached; press Capture again")
        return entry

    def layer_map(self, entry: CaptureEntry, layer: str) -> torch.Tensor:
        """The ``(C, H, W)`` map of a layer, captured now if it was not yet.

        Raises:
            ApiError: 404 for an unknown layer.
        """
        t = entry.maps.get(layer)
        if t is not None:
            return t
        entry.layer_info(layer)
        loaded = self.models.get(entry.spec, entry.weights)
        with self.models.compute:
            fm = capture(loaded.module, entry.x.to(self.models.device), [layer])
        t = fm[layer][0]
        with self._lock:
            entry.maps[layer] = t
        self._entries.refresh()
        return t

    def layer_summary(self, entry: CaptureEntry, layer: str) -> LayerSummary:
        """The layer's :class:`~featuremaps.summaries.LayerSummary` (computed once)."""
        summary = entry.summaries.get(layer)
        if summary is None:
            t = self.layer_map(entry, layer)
            c, h, w = (int(n) for n in t.shape)
            info = entry.layer_info(layer).to_dict()
            summary = LayerSummary(layer, info, c, h, w, ChannelStats.from_map(t))
            with self._lock:
                entry.summaries[layer] = summary
        return summary

    def picture(
        self, entry: CaptureEntry, key: tuple[Any, ...], draw: Callable[[], tuple[bytes, str]]
    ) -> tuple[bytes, str]:
        """A rendered picture and its metadata, drawn once and kept (the newest 48)."""
        hit = entry.pictures.get(key)
        if hit is not None:
            return hit
        hit = draw()
        with self._lock:
            entry.pictures[key] = hit
            while len(entry.pictures) > _PICTURES_KEPT:
                entry.pictures.pop(next(iter(entry.pictures)))
        self._entries.refresh()
        return hit
