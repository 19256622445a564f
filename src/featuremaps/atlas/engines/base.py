"""The contract every atlas engine fulfils, and the one set of arguments they all take.

An engine turns the pending batches of a :class:`~featuremaps.atlas.data.Plan` into
:class:`~featuremaps.atlas.batch.BatchResult` objects by calling the engine-neutral
:func:`~featuremaps.atlas.batch.process_batch` (or its two halves) on each, and yields
them **in batch order** (the driver folds float sums in that order, which is what makes every engine
give the same ``atlas.json`` bit for bit). Likewise :meth:`Engine.visualize` runs the
jobs of the feature visualizations (``--visualize``), in job order. Where the batches
run, who decodes the images and on which device is the engine's business; what it can do
is declared in its :class:`EngineCapabilities`. The driver alone writes files. An engine
may pass each batch's uint8 input pixels along (``BatchResult.pixels``, the local engine
does): the driver then keeps the crops of the top lists from them instead of decoding
those images again at the end.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ...models import LoadedModel
from ..batch import AtlasSpec, BatchResult
from ..data import Plan
from ..visuals import VisualizeJob, VisualizeResult, VisualizeSpec


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do, declared once (the CLI and the docs read it).

    Attributes:
        name: the value of ``--engine``.
        devices: the devices its forward may run on.
        multi_node: it can spread the batches over several machines.
        remote_reads: its workers read the images themselves (the driver's file system
            is not assumed).
        gpu_workers: ``gpus_per_worker`` is honoured.
    """

    name: str
    devices: tuple[str, ...]
    multi_node: bool
    remote_reads: bool
    gpu_workers: bool


@dataclass(frozen=True)
class EngineOptions:
    """The one set of arguments of every engine (each ignores what it cannot use).

    Attributes:
        workers: decoding processes (local) or model actors (ray); 0 decodes in the
            driver's process (local) and means one actor (ray).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` for the local engine's forward.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast) for the forward.
        gpus_per_worker: GPUs per Ray actor; ``None`` picks one where the cluster has
            GPUs, else zero.
        address: the Ray cluster (``None``: ``RAY_ADDRESS`` or a local instance).
    """

    workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    gpus_per_worker: float | None = None
    address: str | None = None


@runtime_checkable
class Engine(Protocol):
    """Runs the pending batches of a plan; see the module notes for the contract."""

    capabilities: EngineCapabilities

    def run(
        self, plan: Plan, pending: Sequence[int], loaded: LoadedModel, spec: AtlasSpec
    ) -> Generator[BatchResult, None, None]:
        """Yield the results of ``pending`` (ascending batch numbers) in that order.

        A generator: closing it early (Ctrl-C, an error in the driver) releases what
        the engine holds (worker processes, a Ray instance it started).

        Args:
            plan: the fixed batches.
            pending: the batch numbers still to do, ascending.
            loaded: the model (with its fixed-size preprocessing), on the CPU.
            spec: what each batch computes.
        """
        ...

    def visualize(
        self, loaded: LoadedModel, jobs: Sequence[VisualizeJob], vspec: VisualizeSpec
    ) -> Generator[VisualizeResult, None, None]:
        """Yield the results of ``jobs`` (see :mod:`featuremaps.atlas.visuals`) in order.

        Each job is :func:`~featuremaps.atlas.visuals.run_job`; a generator, closed
        early like :meth:`run`.
        """
        ...
