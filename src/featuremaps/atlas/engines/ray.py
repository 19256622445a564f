"""The Ray engine: the same per-batch step in a pool of Ray Data actors, on any cluster.

Each row of the Ray dataset is one of the atlas's fixed batches (its number and image
paths or URLs). A pool of ``workers`` model actors (``map_batches`` with a callable
class) reads and decodes the batch itself, runs
:func:`featuremaps.atlas.batch.process_batch` and returns the partial result encoded as
``.npz`` bytes. The driver folds the partials in batch order, exactly as the local
engine does, so both give the same ``atlas.json`` bit for bit (on the same kind of
device and precision).

Nothing assumes the driver's file system: the model reaches the actors through the
object store, the actors read the images (local paths must then be readable on every
node; URLs such as ``s3://`` are read with fsspec from the node itself), and only the
driver writes outputs. The cluster is ``--ray-address``, else ``RAY_ADDRESS``, else a
local instance started for the run. Each actor takes ``gpus_per_worker`` GPUs (default:
one where the cluster has GPUs, else none) and runs its forward on CUDA when it has one.

Ray is an optional extra (``pip install 'featuremaps[ray]'``); every node needs
featuremaps installed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...errors import FeatureMapsError
from ...models import LoadedModel, Preprocess
from ..batch import AtlasSpec, BatchResult, process_batch
from ..data import Plan, load_images
from ..visuals import VisualizeJob, VisualizeResult, VisualizeSpec, run_job
from .base import EngineCapabilities, EngineOptions


def import_ray() -> Any:
    """Ray with Ray Data, or a message saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise FeatureMapsError(
            "--engine ray needs Ray Data: pip install 'featuremaps[ray]'"
        ) from exc
    return ray


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address`` (else ``RAY_ADDRESS``), or start a local instance.

    Returns whether this call started Ray (the caller then shuts it down).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, logging_level="warning")
        else:
            ray.init(include_dashboard=False, logging_level="warning")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise FeatureMapsError(f"cannot reach the Ray cluster {address!r}: {exc}") from exc
    return True


def default_gpus_per_worker(resources: Mapping[str, float]) -> float:
    """One GPU per actor where the cluster has GPUs (``ray.cluster_resources()``), else 0."""
    return 1.0 if resources.get("GPU", 0) >= 1 else 0.0


def gpus_per_actor(requested: float | None, resources: Mapping[str, float]) -> float:
    """The GPUs each actor takes: ``requested``, or the default for the cluster.

    Raises:
        FeatureMapsError: the cluster has fewer GPUs than one actor asks for (Ray would
            wait for them forever).
    """
    gpus = default_gpus_per_worker(resources) if requested is None else requested
    have = resources.get("GPU", 0)
    if gpus > have:
        raise FeatureMapsError(
            f"--gpus-per-worker {gpus:g}: the Ray cluster has {have:g} GPUs; "
            "use --gpus-per-worker 0 to run the actors on CPUs"
        )
    return gpus


def actor_device(gpus: float) -> torch.device:
    """The device of an actor given ``gpus`` GPUs: CUDA if it has any, else the CPU.

    Raises:
        FeatureMapsError: the actor was given GPUs that CUDA cannot see.
    """
    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FeatureMapsError(
            f"--gpus-per-worker {gpus:g}: this node's PyTorch sees no CUDA device; "
            "use --gpus-per-worker 0"
        )
    return torch.device("cuda")


class AtlasActor:
    """A model replica: turns rows ``{index, first, paths}`` into encoded partials."""

    def __init__(
        self, payload: list[Any], spec: AtlasSpec, pp: Preprocess, gpus: float, precision: str
    ) -> None:
        import ray

        self.device = actor_device(gpus)
        # a list keeps Ray from resolving the reference before the actor starts
        self.module = ray.get(payload[0]).eval().to(self.device)
        self.spec = spec
        self.pp = pp
        self.precision = precision

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = []
        for index, first, paths in zip(rows["index"], rows["first"], rows["paths"], strict=True):
            batch = load_images(int(index), int(first), json.loads(str(paths)), self.pp)
            result = process_batch(self.module, batch, self.spec, self.device, self.precision)
            blobs.append(result.to_bytes())
        return {"index": np.asarray(rows["index"]), "result": np.array(blobs, dtype=object)}


class VisualizeActor:
    """A model replica that runs visualization jobs (``ray.remote`` wraps it)."""

    def __init__(self, payload: list[Any], pp: Preprocess, gpus: float) -> None:
        import ray

        self.device = actor_device(gpus)
        self.module = ray.get(payload[0]).eval().to(self.device)
        self.pp = pp

    def run(self, job: VisualizeJob, vspec: VisualizeSpec) -> VisualizeResult:
        return run_job(self.module, self.pp, job, vspec, self.device)


class RayEngine:
    """Batches run by a pool of Ray Data actors; see the module notes."""

    capabilities = EngineCapabilities(
        name="ray",
        devices=("cpu", "cuda"),
        multi_node=True,
        remote_reads=True,
        gpu_workers=True,
    )

    def __init__(self, options: EngineOptions) -> None:
        self.options = options
        self.ray = import_ray()

    def run(
        self, plan: Plan, pending: Sequence[int], loaded: LoadedModel, spec: AtlasSpec
    ) -> Generator[BatchResult, None, None]:
        if not pending:
            return
        ray = self.ray
        started = self._connect()
        ctx = ray.data.DataContext.get_current()
        saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False  # the caller shows progress
        try:
            gpus = gpus_per_actor(self.options.gpus_per_worker, ray.cluster_resources())
            results = self._results(plan, pending, loaded, spec, gpus)
            try:
                yield from _in_batch_order(results, pending)
            except ray.exceptions.RayError as exc:
                raise actor_error(exc) from exc
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
            if started:
                ray.shutdown()

    def _connect(self) -> bool:
        return connect(self.ray, self.options.address)

    def visualize(
        self, loaded: LoadedModel, jobs: Sequence[VisualizeJob], vspec: VisualizeSpec
    ) -> Generator[VisualizeResult, None, None]:
        """The jobs spread over a pool of ``workers`` actors, results in job order."""
        if not jobs:
            return
        ray = self.ray
        from ray.util import ActorPool

        started = self._connect()
        actors: list[Any] = []
        try:
            gpus = gpus_per_actor(self.options.gpus_per_worker, ray.cluster_resources())
            remote = ray.remote(num_cpus=1, num_gpus=gpus)(VisualizeActor)
            payload = [ray.put(loaded.module)]
            n = min(max(1, self.options.workers), len(jobs))
            actors = [remote.remote(payload, loaded.preprocess, gpus) for _ in range(n)]
            pool = ActorPool(actors)
            try:
                yield from pool.map(lambda actor, job: actor.run.remote(job, vspec), list(jobs))
            except ray.exceptions.RayError as exc:
                raise actor_error(exc) from exc
        finally:
            for actor in actors:
                ray.kill(actor)
            if started:
                ray.shutdown()

    def _results(
        self,
        plan: Plan,
        pending: Sequence[int],
        loaded: LoadedModel,
        spec: AtlasSpec,
        gpus: float,
    ) -> Generator[BatchResult, None, None]:
        ray = self.ray
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
                "gpus": gpus,
                "precision": self.options.precision,
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, self.options.workers)),
            num_cpus=1,
            num_gpus=gpus,
        )
        for row in ds.iter_rows():
            yield BatchResult.from_bytes(bytes(row["result"]))


_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (.*)$")


def actor_error(exc: BaseException) -> FeatureMapsError:
    """One line for a failure inside the Ray engine: the actor's own exception.

    Ray Data hands back its wrappers (``RayTaskError(UserCodeException)``) whose text
    holds the actor's traceback; the first exception named there that is not Ray's is
    what went wrong. An actor's :class:`FeatureMapsError` keeps its message.
    """
    root, seen = exc, {id(exc)}
    while True:
        inner = getattr(root, "cause", None) or root.__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        root = inner
        seen.add(id(inner))
    if isinstance(root, FeatureMapsError):
        return root
    what = f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}"
    for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines():
        found = _RAISED.match(line.strip())
        if found and not found.group(1).startswith("ray."):
            name, message = found.groups()
            if name.rsplit(".", 1)[-1] in _OWN_ERRORS:
                return FeatureMapsError(message)
            what = f"{name.rsplit('.', 1)[-1]}: {message}"
            break
    return FeatureMapsError(
        f"the Ray engine failed: {what} (every node needs featuremaps and the model's code "
        "installed, and must be able to read the images)"
    )


_OWN_ERRORS = {"FeatureMapsError", "ImageError", "ModelError", "LayerError", "OptionError"}


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
