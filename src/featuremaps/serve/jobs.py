"""Captures (and relevance and visualizations) run as background jobs the page polls.

A job moves ``queued -> running -> done`` (or ``error``); its status is a
:class:`JobStatus`, never a bare string. Every kind of job is listed on one
:class:`JobBoard` (so ``GET /api/jobs/{id}`` finds any of them); a second request for
work that is queued or running gets the same job. One worker thread runs the captures
and relevance jobs in order (they share the model's forward lock).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from PIL import Image

from ..capture import capture, list_layers, resolve_layers
from ..errors import FeatureMapsError, LayerError
from ..images import display_image, preprocess
from ..pipeline import top_predictions
from .config import ModelCatalog
from .errors import ApiError
from .stores import CaptureEntry, CaptureStore, ImageStore, ModelStore, capture_key

log = logging.getLogger("featuremaps.serve")
_JOBS_KEPT = 200


class JobStatus(StrEnum):
    """Where a job is."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.ERROR)


@dataclass
class Job:
    """A capture running in the background."""

    id: str
    capture_id: str
    key: str = ""
    """What the job computes; a second request for the same key joins this job."""
    result_id: str = ""
    """Where its result is found once done (a relevance target, a visualization id)."""
    compare_id: str = ""
    """The capture of the second model on the same image, when one was asked for."""
    status: JobStatus = JobStatus.QUEUED
    phase: str = "waiting for the previous job"
    step: int = 0
    steps: int = 4
    message: str = ""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def advance(self, phase: str, step: int) -> None:
        self.status, self.phase, self.step = JobStatus.RUNNING, phase, step

    def finish(self, phase: str = "done") -> None:
        self.status, self.phase, self.step = JobStatus.DONE, phase, self.steps
        self.finished = time.monotonic()

    def progress(self, phase: str, done: int, total: int) -> None:
        """Report ``done`` of ``total`` sub-steps (steps are rescaled to ``self.steps``)."""
        self.status, self.phase = JobStatus.RUNNING, f"{phase} {done}/{total}"
        self.step = min(self.steps, 1 + (done * (self.steps - 1)) // max(1, total))

    def fail(self, message: str) -> None:
        self.status, self.message = JobStatus.ERROR, message
        self.finished = time.monotonic()

    @property
    def elapsed(self) -> float:
        end = self.finished if self.finished is not None else time.monotonic()
        return round(end - self.started, 2)


class JobBoard:
    """Every job of one server (the last 200), found by id, joined by key."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, key: str, capture_id: str = "", steps: int = 4) -> tuple[Job, bool]:
        """The unfinished job of ``key``, or a new one; and whether it is new."""
        with self._lock:
            for job in self._jobs.values():
                if job.key == key and not job.status.finished:
                    return job, False
            job = Job(uuid.uuid4().hex[:16], capture_id, key=key, steps=steps)
            self._jobs[job.id] = job
            while len(self._jobs) > _JOBS_KEPT:
                self._jobs.popitem(last=False)
            return job, True

    def get(self, job_id: str) -> Job:
        """A job by id.

        Raises:
            ApiError: 404 for an unknown (or long forgotten) job.
        """
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}")
        return job

    def busy(self, prefix: str) -> list[Job]:
        """Unfinished jobs whose key starts with ``prefix``."""
        with self._lock:
            return [
                j for j in self._jobs.values() if j.key.startswith(prefix) and not j.status.finished
            ]


def run_job(job: Job, work: Callable[[Job], None], what: str) -> None:
    """Run ``work(job)``; a user error fails the job with its message, anything else too."""
    try:
        work(job)
        if not job.status.finished:
            job.finish()
    except FeatureMapsError as exc:
        job.fail(str(exc))
    except ApiError as exc:
        job.fail(exc.message)
    except Exception as exc:
        log.exception("%s failed", what)
        job.fail(f"unexpected error: {exc.__class__.__name__}: {exc}")


class CaptureJobs:
    """Starts captures as jobs on the board; runs them (and relevance jobs) one at a time."""

    def __init__(
        self,
        catalog: ModelCatalog,
        images: ImageStore,
        models: ModelStore,
        captures: CaptureStore,
        board: JobBoard | None = None,
    ) -> None:
        self.catalog = catalog
        self.images = images
        self.models = models
        self.captures = captures
        self.board = board or JobBoard()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featuremaps-job")

    def start(
        self, spec: str, weights: str, image_id: str, compare: tuple[str, str] | None = None
    ) -> Job:
        """Queue a capture (or return the finished or running one for the same input).

        Args:
            compare: a second model spec and weights, captured on the same image by the
                same job (checked by the same policy as the first).

        Raises:
            ApiError: a refused spec (400/403) or an unknown image (404).
        """
        spec, weights = self.catalog.check(spec, weights)
        other = self.catalog.check(*compare) if compare is not None else None
        img = self.images.get(image_id)
        cid = capture_key(spec, weights, image_id)
        bid = capture_key(*other, image_id) if other is not None else ""
        job, new = self.board.open(f"capture:{cid}:{bid}", cid, steps=8 if other else 4)
        job.compare_id = bid
        if not new:
            return job
        todo = [(cid, spec, weights)] if cid not in self.captures else []
        if other is not None and bid not in self.captures and bid != cid:
            todo.append((bid, *other))
        if not todo:
            job.finish("cached")
            return job

        def work(job: Job) -> None:
            for n, (key, s, w) in enumerate(todo):
                self.captures.put(self._capture(job, s, w, image_id, img, key, 4 * n))

        self.executor.submit(run_job, job, work, "capture")
        return job

    def get(self, job_id: str) -> Job:
        """A job by id (of any kind; see :meth:`JobBoard.get`)."""
        return self.board.get(job_id)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def _capture(
        self,
        job: Job,
        spec: str,
        weights: str,
        image_id: str,
        img: Image.Image,
        cid: str = "",
        step0: int = 0,
    ) -> CaptureEntry:
        def advance(phase: str, step: int) -> None:
            job.advance(f"{spec}: {phase}" if job.steps > 4 else phase, step0 + step)

        advance("loading the model", 1)
        loaded = self.models.get(spec, weights)
        advance("preprocessing the image", 2)
        x = preprocess(img, loaded.preprocess)[None].to(self.models.device)
        with self.models.compute:
            advance("listing the layers (one forward pass)", 3)
            probe = list_layers(loaded.module, x)
            spatial = [i for i in probe if i.shape is not None]
            if not spatial:
                raise LayerError(f"{spec} has no layer with a spatial (B, C, H, W) output")
            try:
                stages = resolve_layers(loaded.module, "stages", probe)
            except LayerError:
                stages = [spatial[-1].name]
            advance("capturing the stages", 4)
            predict = loaded.is_imagenet_classifier and loaded.pretrained
            fm = capture(loaded.module, x, stages, full_forward=predict)
        preds = None
        if predict and isinstance(fm.output, torch.Tensor) and fm.output.ndim == 2:
            preds = top_predictions(fm.output[0], loaded.categories or [])
        return CaptureEntry(
            id=cid or job.capture_id,
            spec=spec,
            weights=weights,
            image_id=image_id,
            weights_desc=loaded.weights,
            pretrained=loaded.pretrained,
            preprocess=loaded.preprocess.describe(),
            x=x.cpu(),
            display=display_image(x[0].cpu(), loaded.preprocess),
            layers=spatial,
            stages=stages,
            predictions=preds,
            classifier=loaded.is_imagenet_classifier,
            maps={name: fm[name][0] for name in fm},
        )
