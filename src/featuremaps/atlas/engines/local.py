"""The local engine: decoding in DataLoader worker processes, the forward in this process.

On a GPU, each batch's maps are reduced to partials in a second thread while the next
batch's forward runs on the device. On the CPU the forward already keeps every core
busy, so a batch is reduced after its forward, its layers side by side on every core
(:func:`~featuremaps.atlas.batch.reduce_pool`): overlapping the two there only makes
them compete (measured in ``benchmarks/bench_atlas.py``). Results come in batch order,
from the same code as every engine's.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ...models import LoadedModel
from ...pipeline import resolve_device
from ..batch import AtlasSpec, BatchMaps, BatchResult, forward_batch, reduce_batch
from ..data import LoadedBatch, Plan, batch_loader
from ..visuals import VisualizeJob, VisualizeResult, VisualizeSpec, run_job
from .base import EngineCapabilities, EngineOptions


class LocalEngine:
    """Batches decoded by ``workers`` processes, run on ``device`` in the driver.

    The model is moved to the device for the run and back to where it was afterwards.
    Each result carries its batch's uint8 input pixels (``BatchResult.pixels``), from
    which the driver keeps the crops of the top lists, so that it need not decode those
    images again at the end.
    """

    capabilities = EngineCapabilities(
        name="local",
        devices=("cpu", "cuda", "mps"),
        multi_node=False,
        remote_reads=False,
        gpu_workers=False,
    )

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.device = resolve_device(options.device)  # raises for a missing device
        self.overlap = self.device.type != "cpu"
        """Reduce batch i in a second thread during batch i + 1's forward (on a GPU)."""

    def run(
        self, plan: Plan, pending: Sequence[int], loaded: LoadedModel, spec: AtlasSpec
    ) -> Generator[BatchResult, None, None]:
        if not pending:
            return
        module = loaded.module
        home = next(iter(module.parameters()), torch.empty(0)).device
        module.to(self.device)
        try:
            loader = batch_loader(
                plan, pending, loaded.preprocess, self.options.workers, pixels=True
            )
            if not self.overlap:
                for batch in loader:
                    maps = forward_batch(module, batch, spec, self.device, self.options.precision)
                    yield _reduce_with_pixels(batch, spec, maps)
                return
            # batch i's maps are reduced in a thread while batch i + 1's forward runs
            with ThreadPoolExecutor(1, thread_name_prefix="featuremaps-overlap") as pool:
                previous: Future[BatchResult] | None = None
                for batch in loader:
                    maps = forward_batch(module, batch, spec, self.device, self.options.precision)
                    current = pool.submit(_reduce_with_pixels, batch, spec, maps)
                    if previous is not None:
                        yield previous.result()
                    previous = current
                if previous is not None:
                    yield previous.result()
        finally:
            module.to(home)

    def visualize(
        self, loaded: LoadedModel, jobs: Sequence[VisualizeJob], vspec: VisualizeSpec
    ) -> Generator[VisualizeResult, None, None]:
        for job in jobs:  # visualize() moves the model to the device and back
            yield run_job(loaded.module, loaded.preprocess, job, vspec, self.device)


def _reduce_with_pixels(batch: LoadedBatch, spec: AtlasSpec, maps: BatchMaps) -> BatchResult:
    """:func:`reduce_batch`, the result carrying the batch's uint8 pixels for the crops."""
    result = reduce_batch(batch, spec, maps)
    if batch.pixels is not None:
        result.pixels = (batch.ids, batch.pixels)
    return result
