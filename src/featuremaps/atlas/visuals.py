"""Feature visualizations for the atlas pages: what maximizes each channel's mean.

After the pass over the data, every channel of every layer gets one picture made by
:func:`featuremaps.visualize.visualize` with the objective ``channel:LAYER:C``. The
channels of a layer are cut into fixed jobs of ``batch`` channels, each optimized as one
batch; an engine runs the jobs (the local engine one after the other on its device, the
Ray engine spread over a pool of actors) and yields their results in job order, and the
driver alone writes the pictures, next to the crops. Each picture has its own generator
(seeded by the seed and its objective), so a job gives the same pictures wherever it
runs: the same as ``visualize(model, job.objectives, steps=, size=, seed=)`` on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..models import LoadedModel, Preprocess
from ..options import check_range
from .batch import AtlasSpec


@dataclass(frozen=True)
class VisualizeSpec:
    """How the atlas's visualizations are made.

    Attributes:
        steps: optimization steps per picture.
        size: side of each picture, in pixels.
        seed: the seed (the same seed gives the same pictures on the CPU).
        batch: channels optimized together in one job.
    """

    steps: int = 128
    size: int = 96
    seed: int = 0
    batch: int = 16

    def validate(self) -> None:
        """Raise :class:`OptionError` for settings out of range."""
        check_range(self.steps, "--visualize-steps", 1)
        check_range(self.size, "--visualize-size", 8)
        check_range(self.batch, "--visualize-batch", 1)

    def to_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "size": self.size, "seed": self.seed, "batch": self.batch}


@dataclass(frozen=True)
class VisualizeJob:
    """One batch of channels of one layer, optimized together."""

    index: int
    layer_index: int
    layer: str
    channels: tuple[int, ...]

    @property
    def objectives(self) -> list[str]:
        return [f"channel:{self.layer}:{c}" for c in self.channels]


@dataclass
class VisualizeResult:
    """The pictures of one job: ``(N, S, S, 3)`` uint8, the final objective values."""

    index: int
    pictures: np.ndarray
    values: np.ndarray
    worker: int
    """The id of the process that made them (the Ray engine spreads jobs over actors)."""


def plan_jobs(spec: AtlasSpec, vspec: VisualizeSpec) -> list[VisualizeJob]:
    """Every channel of every layer, in jobs of at most ``vspec.batch`` channels."""
    jobs: list[VisualizeJob] = []
    for li, (name, n) in enumerate(zip(spec.names, spec.channels, strict=True)):
        for start in range(0, n, vspec.batch):
            chans = tuple(range(start, min(n, start + vspec.batch)))
            jobs.append(VisualizeJob(len(jobs), li, name, chans))
    return jobs


def run_job(
    module: nn.Module,
    pp: Preprocess,
    job: VisualizeJob,
    vspec: VisualizeSpec,
    device: torch.device | None = None,
) -> VisualizeResult:
    """Optimize one job's pictures (the engine-neutral step of the visualizations)."""
    from ..visualize import visualize

    vis = visualize(
        module,
        job.objectives,
        steps=vspec.steps,
        size=vspec.size,
        seed=vspec.seed,
        device=device,
        preprocess=pp,
    )
    pictures = np.stack([np.asarray(v.to_pil()) for v in vis])
    values = np.array([v.value for v in vis], dtype=np.float64)
    return VisualizeResult(job.index, pictures, values, os.getpid())


def check_visualize(loaded: LoadedModel, spec: AtlasSpec, vspec: VisualizeSpec) -> None:
    """Check, before the pass over the data, that every layer can be visualized.

    One step on one tiny batch (channel 0 of each layer): an unknown layer syntax, a
    layer the optimization cannot read or a size the model refuses fails now, not after
    hours of inference.

    Raises:
        FeatureMapsError: the visualization's own message, naming ``--visualize``.
    """
    from ..errors import FeatureMapsError
    from ..visualize import visualize

    vspec.validate()
    try:
        visualize(
            loaded.module,
            [f"channel:{name}:0" for name in spec.names],
            steps=1,
            size=vspec.size,
            seed=vspec.seed,
            preprocess=loaded.preprocess,
        )
    except FeatureMapsError as exc:
        raise FeatureMapsError(f"--visualize: {exc}") from exc


Pictures = list[dict[int, tuple[np.ndarray, float]]]
"""Per layer (in spec order): channel -> (picture ``(S, S, 3)`` uint8, final value)."""


def collect(into: Pictures, result: VisualizeResult, jobs: Sequence[VisualizeJob]) -> int:
    """Add one job's pictures to ``into``; returns how many."""
    job = jobs[result.index]
    for k, c in enumerate(job.channels):
        into[job.layer_index][c] = (result.pictures[k], float(result.values[k]))
    return len(job.channels)
