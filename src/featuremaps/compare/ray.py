"""The Ray engine of a comparison: both models' forwards in a pool of Ray Data actors.

The batches are the local engine's fixed batches. Each row of the Ray dataset is one
group of them (its batch numbers and image paths or URLs): normally one batch, or the
last two where the dataset's tail is under :data:`~.cka.MIN_BATCH` files. A pool of
``workers`` actors (``map_batches`` with a callable class) holds both models, reads and
decodes the row's images itself, runs :func:`~.step.process_group` and returns the
group's HSIC terms, its bad files and, for the first rows, the example maps, as ``.npz``
bytes. The driver groups the batches exactly as the local engine does
(:class:`~.batches.Grouper`, on the readable counts the actors report) and folds the
results in batch order, so both engines give the same ``cka.json`` (bit for bit on the
same kind of device; the tests check it on the CPU).

Where bad files leave a batch under ``MIN_BATCH`` readable images, the group the local
engine would fold (that batch with its neighbour) was not a row; such groups, and any
whose example maps were not asked for, are computed in another, short pass after the
first. The fold waits for them, so nothing is folded out of order.

Nothing assumes the driver's file system: the models reach the actors through the
object store, the actors read the images (local paths must be readable on every node;
URLs such as ``s3://`` are read with fsspec from the node itself), and only the driver
writes outputs. The cluster is ``ray_address``, else ``RAY_ADDRESS``, else a local
instance started for the run (and stopped after it). Each actor takes
``gpus_per_worker`` GPUs (default: one where the cluster has GPUs) and runs its
forwards on CUDA when it has one. Ray is an optional extra (``featuremaps[ray]``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..atlas.engines.ray import actor_device, actor_error, connect, gpus_per_actor, import_ray
from ..errors import FeatureMapsError
from ..models import Preprocess
from .batches import Counted, Decoded, Grouper, batch_paths, decode, merge_counted, merge_decoded
from .cka import MIN_BATCH
from .step import GroupResult, StepSpec, process_group


@dataclass(frozen=True)
class RayOptions:
    """Where the actors run.

    Attributes:
        workers: model actors (each holds both models).
        gpus_per_worker: GPUs per actor; ``None``: one where the cluster has GPUs, else 0.
        address: the cluster; ``None``: ``RAY_ADDRESS``, else a local instance.
    """

    workers: int = 1
    gpus_per_worker: float | None = None
    address: str | None = None


@dataclass
class RowResult:
    """What an actor returns for one row: each batch's readable ids and bad files, and
    the group's result (``None`` when under ``MIN_BATCH`` images were readable)."""

    row: int
    batches: list[Counted]
    group: GroupResult | None

    def to_bytes(self) -> bytes:
        meta = {"row": self.row, "batches": [[b.indices[0], b.bad] for b in self.batches]}
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        for k, b in enumerate(self.batches):
            arrays[f"ids{k}"] = b.ids
        if self.group is not None:
            arrays["group"] = np.frombuffer(self.group.to_bytes(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RowResult:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            batches = [
                Counted((int(index),), f[f"ids{k}"], [(int(i), str(r)) for i, r in bad])
                for k, (index, bad) in enumerate(meta["batches"])
            ]
            group = GroupResult.from_bytes(f["group"].tobytes()) if "group" in f.files else None
        return cls(int(meta["row"]), batches, group)


class CompareActor:
    """Both models on one device: turns rows ``{row, batches, want}`` into encoded results."""

    def __init__(
        self, payload: list[Any], spec: StepSpec, pps: tuple[Preprocess, Preprocess], gpus: float
    ) -> None:
        import ray

        self.device = actor_device(gpus)
        # a list keeps Ray from resolving the references before the actor starts; one
        # reference when both sides are the same module
        modules = ray.get(list(payload))
        self.module_a = modules[0].to(self.device)
        self.module_b = modules[-1].to(self.device)
        self.spec, self.pps = spec, pps

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blobs = []
        for row, batches, want in zip(rows["row"], rows["batches"], rows["want"], strict=True):
            blobs.append(self.run(int(row), json.loads(str(batches)), int(want)).to_bytes())
        return {"row": np.asarray(rows["row"]), "result": np.array(blobs, dtype=object)}

    def run(self, row: int, batches: list[Any], want: int) -> RowResult:
        decoded = [decode(int(i), int(first), paths, *self.pps) for i, first, paths in batches]
        group: Decoded = decoded[0]
        for more in decoded[1:]:
            group = merge_decoded(group, more)
        result = None
        if len(group.ids) >= MIN_BATCH:
            result = process_group(
                self.module_a, self.module_b, group, self.spec, self.device, want
            )
        return RowResult(row, [d.counted() for d in decoded], result)


def _in_row_order(results: Iterator[RowResult]) -> Iterator[RowResult]:
    """Rows in order, whatever order they arrive in (the fold order fixes float sums)."""
    waiting: dict[int, RowResult] = {}
    expected = 0
    for result in results:
        waiting[result.row] = result
        while expected in waiting:
            yield waiting.pop(expected)
            expected += 1


Pass = Callable[[Sequence[tuple[tuple[int, ...], int]]], Iterator[RowResult]]


def ray_results(
    module_a: torch.nn.Module,
    module_b: torch.nn.Module,
    paths: Sequence[str],
    batch_size: int,
    pending: Sequence[int],
    pps: tuple[Preprocess, Preprocess],
    spec: StepSpec,
    options: RayOptions,
    want: Callable[[], int],
    arrived: Callable[[Counted], None],
) -> Generator[GroupResult, None, None]:
    """The results of the ``pending`` batches' groups, in batch order (as the local engine's).

    ``arrived`` is told of each batch an actor decoded (after the group it closed was
    folded); ``want()`` says how many example images the fold still needs. Closing the
    generator early releases the actors and a Ray instance it started.

    Raises:
        FeatureMapsError: Ray missing or unreachable, too few GPUs, or an actor's failure
            (in one line).
    """
    if not pending:
        return
    ray = import_ray()
    started = connect(ray, options.address)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the caller shows progress
    try:
        gpus = gpus_per_actor(options.gpus_per_worker, ray.cluster_resources())
        payload = [ray.put(module_a)]
        if module_b is not module_a:
            payload.append(ray.put(module_b))

        def run_pass(rows: Sequence[tuple[tuple[int, ...], int]]) -> Iterator[RowResult]:
            items = []
            for k, (indices, w) in enumerate(rows):
                batches = [[i, *batch_paths(paths, batch_size, i)] for i in indices]
                items.append({"row": k, "batches": json.dumps(batches), "want": w})
            ds = ray.data.from_items(items).map_batches(
                CompareActor,
                fn_constructor_kwargs={"payload": payload, "spec": spec, "pps": pps, "gpus": gpus},
                batch_size=1,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=max(1, min(options.workers, len(rows)))),
                num_cpus=1,
                num_gpus=gpus,
            )
            got = (RowResult.from_bytes(bytes(r["result"])) for r in ds.iter_rows())
            return _in_row_order(got)

        try:
            yield from _fold_order(run_pass, paths, batch_size, pending, want, arrived)
        except ray.exceptions.RayError as exc:
            raise actor_error(exc) from exc
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()


def _rows(
    paths: Sequence[str], batch_size: int, pending: Sequence[int], want: int
) -> list[tuple[tuple[int, ...], int]]:
    """The first pass's rows: the groups the local engine folds when every file is readable
    (a tail under ``MIN_BATCH`` files joins the batch before it), each with the examples
    it is asked for (``want`` for rows that start before ``want`` files, else 0)."""
    grouper: Grouper[tuple[int, ...]] = Grouper(
        lambda g: sum(len(batch_paths(paths, batch_size, i)[1]) for i in g),
        lambda x, y: (*x, *y),
    )
    groups = [g for i in pending if (g := grouper.push((i,))) is not None]
    last = grouper.finish()
    if last is not None:
        groups.append(last)
    rows, before = [], 0
    for g in groups:
        rows.append((g, want if before < want else 0))
        before += sum(len(batch_paths(paths, batch_size, i)[1]) for i in g)
    return rows


def _fold_order(
    run_pass: Pass,
    paths: Sequence[str],
    batch_size: int,
    pending: Sequence[int],
    want: Callable[[], int],
    arrived: Callable[[Counted], None],
) -> Iterator[GroupResult]:
    """Group the batches as the local engine does and yield each group's result in order.

    A group the first pass did not compute as such (bad files moved a boundary) or
    without the examples the fold needs waits, with every group after it, for another
    pass that computes those of them it lacks (with the examples each will need).
    """
    results: dict[tuple[int, ...], GroupResult] = {}
    waiting: list[tuple[Counted, bool]] = []

    def ready(group: Counted, enough: bool) -> GroupResult | None:
        if not enough:
            return GroupResult.left_out(group)
        r = results.get(group.indices)
        if r is None or not r.serves(want()):
            return None
        del results[group.indices]
        return r

    def offer(group: Counted, enough: bool) -> Iterator[GroupResult]:
        r = None if waiting else ready(group, enough)
        if r is None:
            waiting.append((group, enough))
        else:
            yield r

    grouper: Grouper[Counted] = Grouper(lambda g: len(g.ids), merge_counted)
    for row in run_pass(_rows(paths, batch_size, pending, want())):
        if row.group is not None:
            results[row.group.indices] = row.group
        for batch in row.batches:
            closed = grouper.push(batch)
            if closed is not None:
                yield from offer(closed, True)
            arrived(batch)
    last = grouper.finish()
    if last is not None:
        yield from offer(last, len(last.ids) >= MIN_BATCH)
    while waiting:  # normally one more pass; another only if activations were dropped
        need = want()
        redo = []
        for g, enough in waiting:
            if not enough:
                continue
            r = results.get(g.indices)
            if r is None or not r.serves(need):
                redo.append((g.indices, need))
            need = max(0, need - len(g.ids))  # as if no image is dropped
        for row in run_pass(redo) if redo else ():
            if row.group is not None:
                results[row.group.indices] = row.group
        folded = 0
        while waiting and (r := ready(*waiting[0])) is not None:
            waiting.pop(0)
            folded += 1
            yield r
        if not folded:
            raise FeatureMapsError(
                f"batches {list(waiting[0][0].indices)} read differently in another pass "
                "(did files change during the run?); run the same command again"
            )
