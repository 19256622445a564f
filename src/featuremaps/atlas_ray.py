"""The Ray engine of the atlas: the same per-batch step in a pool of Ray Data actors.

Each row of the Ray dataset is one of the atlas's fixed batches (its number and paths).
A pool of ``workers`` model actors (``map_batches`` with a callable class) decodes the
batch, runs :func:`featuremaps.atlas.process_batch` and returns the partial result
encoded as ``.npz`` bytes. The driver folds the partials in batch order, exactly as the
local engine does, so both give the same ``atlas.json`` bit for bit.

Ray is an optional extra (``pip install 'featuremaps[ray]'``). Without ``RAY_ADDRESS`` a
local instance is started (and stopped at the end); with it, the cluster it names is
used, and every node needs featuremaps installed and the image paths readable. Actors
run on the CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .atlas import AtlasSpec, BatchResult, Plan, load_images, process_batch
from .errors import FeatureMapsError
from .models import LoadedModel, Preprocess


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise FeatureMapsError(
            "--engine ray needs Ray Data: pip install 'featuremaps[ray]'"
        ) from exc
    return ray


class AtlasActor:
    """A model replica: turns rows ``{index, first, paths}`` into encoded partials."""

    def __init__(self, payload: list[Any], spec: AtlasSpec, pp: Preprocess) -> None:
        import ray

        self.module = ray.get(payload[0]).eval()  # a list keeps Ray from resolving it early
        self.spec = spec
        self.pp = pp
        self.device = torch.device("cpu")

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = []
        for index, first, paths in zip(rows["index"], rows["first"], rows["paths"], strict=True):
            batch = load_images(int(index), int(first), json.loads(str(paths)), self.pp)
            blobs.append(process_batch(self.module, batch, self.spec, self.device).to_bytes())
        return {"index": np.asarray(rows["index"]), "result": np.array(blobs, dtype=object)}


def run_ray(
    plan: Plan,
    pending: Sequence[int],
    loaded: LoadedModel,
    spec: AtlasSpec,
    workers: int,
) -> Iterator[BatchResult]:
    """Yield the partial results of the pending batches, in batch order.

    Args:
        plan: the fixed batches.
        pending: the batch numbers still to do, ascending.
        loaded: the model (shipped to the actors through the object store).
        spec: what each batch computes.
        workers: the number of model actors (at least one).
    """
    if not pending:
        return
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(logging_level="warning")
        else:
            ray.init(include_dashboard=False, logging_level="warning")
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the caller shows progress
    try:
        yield from _in_batch_order(_results(ray, plan, pending, loaded, spec, workers), pending)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()


def _results(
    ray: Any,
    plan: Plan,
    pending: Sequence[int],
    loaded: LoadedModel,
    spec: AtlasSpec,
    workers: int,
) -> Iterator[BatchResult]:
    rows = []
    for index in pending:
        first, paths = plan.batch(index)
        rows.append({"index": index, "first": first, "paths": json.dumps(list(paths))})
    ds = ray.data.from_items(rows).map_batches(
        AtlasActor,
        fn_constructor_kwargs={
            "payload": [ray.put(loaded.module)],
            "spec": spec,
            "pp": loaded.preprocess,
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
        num_cpus=1,
    )
    for row in ds.iter_rows():
        yield BatchResult.from_bytes(bytes(row["result"]))


def _in_batch_order(
    results: Iterator[BatchResult], pending: Sequence[int]
) -> Iterator[BatchResult]:
    """Reorder results that may arrive out of order (the fold order fixes float sums)."""
    waiting: dict[int, BatchResult] = {}
    order = iter(pending)
    expected = next(order, None)
    for result in results:
        waiting[result.index] = result
        while expected is not None and expected in waiting:
            yield waiting.pop(expected)
            expected = next(order, None)
