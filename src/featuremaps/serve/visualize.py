"""Feature visualization in the viewer: the picture a channel responds to most.

A visualize job runs :func:`featuremaps.visualize.visualize` for one ``channel:LAYER:C``
objective, one job at a time (a second one asked for while one runs gets 503 with
``Retry-After``), on the server's own copy of the model so that the optimization's hooks
and modes never meet the captures' forward passes. Results are kept (the newest 32) under
an id made from the model, weights, layer, channel and settings, so asking again is free.
The defaults (128 steps at 128 px) are meant for a CPU: for EfficientNet-Lite0 they took
96 s (``_blocks.2``) and 261 s (``_blocks.10``) on a 2-core KVM guest shared by about 15
busy processes; 32 steps at 64 px took 1.3 s there. Each step is reported to the page.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..visualize import Objective, ObjectiveKind, visualize
from .errors import ApiError
from .jobs import Job, JobBoard, run_job
from .stores import LRU, CaptureEntry, ModelStore

DEFAULT_STEPS = 128
"""Optimization steps the viewer offers first (small enough for a CPU)."""
DEFAULT_SIZE = 128
"""Side of the pictures in pixels, first offered."""
MAX_STEPS = 1024
MAX_SIZE = 384
RETRY_AFTER_S = 5
_KEPT = 32


@dataclass(frozen=True)
class VisSettings:
    """One visualization asked for: the model, the channel and the optimization's settings."""

    spec: str
    weights: str
    layer: str
    channel: int
    steps: int
    size: int
    seed: int

    @property
    def id(self) -> str:
        """Where its result is found (a hash: no request value becomes a name)."""
        text = json.dumps(
            [self.spec, self.weights, self.layer, self.channel, self.steps, self.size, self.seed]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def objective(self) -> Objective:
        return Objective(ObjectiveKind.CHANNEL, layer=self.layer, index=self.channel)


@dataclass(frozen=True)
class VisResult:
    """A finished visualization: the PNG and what it was made of."""

    settings: VisSettings
    png: bytes
    value: float
    history: tuple[float, ...]
    weights_desc: str
    seconds: float

    def nbytes(self) -> int:
        return len(self.png) + 8 * len(self.history)


class VisualizeJobs:
    """Runs visualizations one at a time and keeps their results.

    Args:
        board: the server's job board (``GET /api/jobs/{id}`` polls these jobs too).
        device: where the optimization runs.
    """

    def __init__(self, board: JobBoard, device: str) -> None:
        self.board = board
        self.models = ModelStore(1, device)
        self.results: LRU[VisResult] = LRU(_KEPT, 64 << 20, VisResult.nbytes)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featuremaps-vis")

    def start(
        self, entry: CaptureEntry, layer: str, channel: int, steps: int, size: int, seed: int
    ) -> Job:
        """Queue the visualization of one channel of the capture's model.

        Raises:
            ApiError: 404 for an unknown layer or a channel out of range; 503 while
                another visualization runs.
        """
        info = entry.layer_info(layer)
        channels = int(info.shape[1]) if info.shape else 0
        if not 0 <= channel < channels:
            raise ApiError(
                404, f"channel {channel} out of range: {layer} has {channels} (0..{channels - 1})"
            )
        settings = VisSettings(entry.spec, entry.weights, layer, channel, steps, size, seed)
        vid = settings.id
        key = f"visualize:{vid}"
        others = [j for j in self.board.busy("visualize:") if j.key != key]
        if others:
            j = others[0]
            raise ApiError(
                503,
                f"one visualization at a time: another one is at step {j.step}/{j.steps} "
                f"({j.phase}); try again when it is done",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        job, new = self.board.open(key, entry.id, steps=steps + 1)
        job.result_id = vid
        if not new:
            return job
        if vid in self.results:
            job.finish("cached")
            return job

        def work(job: Job) -> None:
            job.advance("loading the model", 1)
            loaded = self.models.get(settings.spec, settings.weights)
            vis = visualize(
                loaded,
                settings.objective,
                steps=steps,
                size=size,
                seed=seed,
                progress=lambda phase, done, total: job.progress("optimizing, step", done, total),
            )
            buf = io.BytesIO()
            vis[0].to_pil().save(buf, format="PNG")
            self.results.put(
                vid,
                VisResult(
                    settings=settings,
                    png=buf.getvalue(),
                    value=vis[0].value,
                    history=vis[0].history,
                    weights_desc=loaded.weights,
                    seconds=job.elapsed,
                ),
            )

        self.executor.submit(run_job, job, work, "visualize")
        return job

    def get(self, vid: str) -> VisResult:
        """A finished visualization.

        Raises:
            ApiError: 404 when it was never made or was evicted.
        """
        found = self.results.get(vid)
        if found is None:
            raise ApiError(
                404, "no such visualization (results are kept for a while); run it again"
            )
        return found

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
