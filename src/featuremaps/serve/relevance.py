"""Relevance in the viewer: which channels of a layer matter for a class, and where.

A relevance job runs :func:`featuremaps.relevance.relevance` on a capture's input for one
class (one forward and one backward for the capture's stages and the layer on show) and
keeps, per layer, the per-channel relevance and the Grad-CAM and LayerCAM maps exactly as
the library returned them (float32, not rescaled). A layer asked for later is computed
then, alone. Results live with their capture (the newest few classes), so they are
evicted with it.

Class targets need an ImageNet classifier (1000 outputs); labels from requests are looked
up in the model's own list of names, never used as anything else.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import suggest
from ..relevance import Target, relevance
from .errors import ApiError
from .jobs import CaptureJobs, Job, run_job
from .stores import CaptureEntry, CaptureStore, ModelStore

TARGETS_KEPT = 6
"""Classes whose relevance is kept per capture."""


@dataclass(frozen=True)
class LayerScores:
    """What the viewer keeps of one layer's relevance (one image, float32, as computed).

    Attributes:
        channels: per-channel relevance, ``(gradient * activation)`` summed over space ``(C,)``.
        gradcam: Grad-CAM ``(H, W)``, not normalized.
        layercam: LayerCAM ``(H, W)``, not normalized.
    """

    channels: np.ndarray
    gradcam: np.ndarray
    layercam: np.ndarray

    def nbytes(self) -> int:
        return self.channels.nbytes + self.gradcam.nbytes + self.layercam.nbytes

    def order(self) -> tuple[int, ...]:
        """Channels from the most to the least relevant (ties by index; NaN last)."""
        key = np.nan_to_num(self.channels.astype(np.float64), nan=-np.inf)
        return tuple(int(i) for i in np.argsort(-key, kind="stable"))


@dataclass
class RelevanceEntry:
    """The relevance of one capture to one class, layer by layer."""

    target: Target
    layers: dict[str, LayerScores] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in list(self.layers.values()))


def check_target(
    entry: CaptureEntry, target: int | str | None, labels: Sequence[str]
) -> int | None:
    """The class index a request names (``None``: the top-1 prediction, unknown yet).

    Args:
        entry: the capture; its model must be an ImageNet classifier.
        target: a class index, an ImageNet label (case does not matter) or ``None``.
        labels: the model's class names.

    Raises:
        ApiError: 400 for a model that is not an ImageNet classifier, an index out of
            range, an unknown label (with the closest names) or one naming two classes.
    """
    if not entry.classifier:
        raise ApiError(
            400,
            f"relevance to a class needs an ImageNet classifier (1000 classes); {entry.spec} "
            "is not one. In Python, featuremaps.relevance(model, x, layers, target=fn) takes "
            "a callable target for any model.",
        )
    if target is None:
        return int(entry.predictions[0]["index"]) if entry.predictions else None
    if isinstance(target, int):
        if not 0 <= target < len(labels):
            raise ApiError(400, f"class {target} is not an index in 0..{len(labels) - 1}")
        return target
    text = target.strip().lower()
    found = [i for i, name in enumerate(labels) if name.lower() == text]
    if not found:
        folded = sorted({name.lower() for name in labels})
        raise ApiError(
            400,
            f"unknown ImageNet label {target!r}.{suggest(text, folded)} Pick a class from "
            "the list (GET /api/labels).",
        )
    if len(found) > 1:
        raise ApiError(
            400,
            f"the label {target!r} names classes {', '.join(map(str, found))}; pick one by index",
        )
    return found[0]


class RelevanceService:
    """Starts relevance jobs and answers per-layer relevance, computing layers on demand."""

    def __init__(self, models: ModelStore, captures: CaptureStore, jobs: CaptureJobs) -> None:
        self.models = models
        self.captures = captures
        self.jobs = jobs
        self._lock = threading.Lock()

    def labels(self, entry: CaptureEntry) -> list[str]:
        """The class names of the capture's model (empty for other models)."""
        return list(self.models.get(entry.spec, entry.weights).categories or [])

    def start(self, entry: CaptureEntry, target: int | str | None, layer: str | None) -> Job:
        """Queue the relevance of ``entry`` to a class (or return the cached/running one).

        Raises:
            ApiError: a bad target (see :func:`check_target`), an unknown layer (404).
        """
        index = check_target(entry, target, self.labels(entry) if entry.classifier else [])
        layers = list(dict.fromkeys([*entry.stages, *([layer] if layer else [])]))
        for name in layers:
            entry.layer_info(name)
        key = f"relevance:{entry.id}:{'top1' if index is None else index}"
        job, new = self.jobs.board.open(key, entry.id, steps=3)
        if not new:
            return job
        done = entry.relevance.get(index) if index is not None else None
        if done is not None and all(n in done.layers for n in layers):
            job.result_id = str(index)
            job.finish("cached")
            return job

        def work(job: Job) -> None:
            job.advance("loading the model", 1)
            self.models.get(entry.spec, entry.weights)
            job.advance(f"one forward and one backward for {len(layers)} layers", 2)
            found = self._compute(entry, index, layers)
            job.result_id = str(found.target.index)

        self.jobs.executor.submit(run_job, job, work, "relevance")
        return job

    def scores(self, entry: CaptureEntry, index: int, layer: str) -> tuple[Target, LayerScores]:
        """The relevance of ``layer`` to class ``index``, computed now if it was not yet.

        Raises:
            ApiError: 404 when that class was never asked for (or was evicted), or for an
                unknown layer.
        """
        found = entry.relevance.get(index)
        if found is None:
            raise ApiError(
                404, f"no relevance to class {index} for this capture yet; pick the class again"
            )
        scores = found.layers.get(layer)
        if scores is None:
            entry.layer_info(layer)
            found = self._compute(entry, index, [layer])
            scores = found.layers[layer]
        return found.target, scores

    def _compute(self, entry: CaptureEntry, index: int | None, layers: list[str]) -> RelevanceEntry:
        loaded = self.models.get(entry.spec, entry.weights)
        with self.models.compute:
            r = relevance(loaded.module, entry.x.to(self.models.device), layers, target=index)
        target = r.targets[0]
        assert target.index is not None  # a class target always has one
        with self._lock:
            found = entry.relevance.get(target.index)
            if found is None:
                found = entry.relevance[target.index] = RelevanceEntry(target)
            entry.relevance.move_to_end(target.index)
            for name, lr in r.items():
                found.layers[name] = LayerScores(
                    channels=lr.channels[0].numpy().copy(),
                    gradcam=lr.gradcam[0].numpy().copy(),
                    layercam=lr.layercam[0].numpy().copy(),
                )
            while len(entry.relevance) > TARGETS_KEPT:
                entry.relevance.popitem(last=False)
        self.captures.refresh()
        return found
