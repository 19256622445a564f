"""One pass over a dataset through two models: the CKA of every pair of layers.

Each batch is decoded once per distinct preprocessing (once when both models share it),
runs one forward through each model with its layers captured, and is folded into a
:class:`~featuremaps.compare.cka.CKAAccumulator`. Memory depends on the batch size and the
layers, never on the number of images. The data reader is the atlas's: folders, globs and
lists of paths; unreadable files are skipped and counted.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..atlas import SkippedImageWarning, dataset_paths, fixed_size
from ..capture import capture
from ..errors import FeatureMapsError, Interrupted, LayerError
from ..models import LoadedModel, load_model
from ..pipeline import resolve_device
from .batches import Counted
from .cka import MIN_BATCH, CKAAccumulator
from .local import local_results
from .state import CompareState
from .step import GroupResult, StepSpec

Pool = Literal["none", "mean"]
POOLS: tuple[str, ...] = ("none", "mean")
ENGINES: tuple[str, ...] = ("local", "ray")
ESTIMATOR = (
    "debiased linear CKA, minibatch (Nguyen, Raghu & Kornblith 2021): mean unbiased "
    "HSIC_1 over batches, linear kernels"
)
Progress = Callable[[str, int, int], None]
"""Called as ``progress(phase, done, total)``; phase ``images`` counts images."""


@dataclass
class Side:
    """One model of the comparison and its layers."""

    model: LoadedModel
    layers: list[str]
    shapes: list[tuple[int, ...]]
    """``(C, H, W)`` of each layer for one image."""

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model.spec,
            "weights": self.model.weights,
            "preprocess": self.model.preprocess.describe(),
        }


@dataclass
class CompareResult:
    """What :func:`compare_models` computed.

    Attributes:
        a, b: the two models with their layers.
        matrix: ``(len(a.layers), len(b.layers))`` CKA; NaN where a layer is constant.
        images_total: files in the dataset.
        images_used: images that went into the estimate.
        skipped: ``(path, reason)`` of each file that could not be used.
        left_out: readable images not in the estimate: too few in all (under 4), or in
            a batch that non-finite activations left under 4. A batch with fewer than
            4 readable images otherwise joins its neighbour.
        batches: batches averaged.
        batch_size: images per batch.
        pool: ``none`` (flattened C·H·W maps) or ``mean`` (channel means).
        examples: display pictures ``(H, W, 3)`` uint8 of the first images used.
        example_maps_a, example_maps_b: per layer, those images' maps ``(N, C, H, W)``.
        seconds: wall time of this run's pass; images_per_second: images it used per second.
        resumed: images done by an earlier, interrupted run (from its checkpoint).
    """

    a: Side
    b: Side
    matrix: np.ndarray
    images_total: int
    images_used: int
    skipped: list[tuple[str, str]]
    left_out: int
    batches: int
    batch_size: int
    pool: str
    examples: list[np.ndarray] = field(default_factory=list)
    example_maps_a: dict[str, torch.Tensor] = field(default_factory=dict)
    example_maps_b: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_second: float = 0.0
    resumed: int = 0

    def to_json(self) -> dict[str, Any]:
        """The record written to ``cka.json`` (NaN as ``null``)."""
        return {
            "layers_a": list(self.a.layers),
            "layers_b": list(self.b.layers),
            "matrix": [[None if math.isnan(v) else float(v) for v in row] for row in self.matrix],
            "model_a": self.a.describe(),
            "model_b": self.b.describe(),
            "shapes_a": [list(s) for s in self.a.shapes],
            "shapes_b": [list(s) for s in self.b.shapes],
            "images_total": self.images_total,
            "images_used": self.images_used,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "left_out": self.left_out,
            "estimator": ESTIMATOR,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "pool": self.pool,
        }


def check_options(
    batch_size: int,
    pool: str,
    engine: str,
    workers: int,
    examples: int,
    gpus_per_worker: float | None = None,
) -> None:
    """Refuse bad options before any model is loaded."""
    if batch_size < MIN_BATCH:
        raise FeatureMapsError(
            f"--batch-size {batch_size}: the debiased CKA estimator needs at least "
            f"{MIN_BATCH} images per batch; use 32 or more for a stable estimate"
        )
    if pool not in POOLS:
        raise FeatureMapsError(
            f"--pool {pool!r}: use none (flattened maps) or mean (channel means)"
        )
    if engine not in ENGINES:
        raise FeatureMapsError(
            f"--engine {engine!r}: use local (this process) or ray (a Ray cluster)"
        )
    if workers < 0:
        raise FeatureMapsError(
            f"--workers {workers}: use 0 (decode in this process) or more (ray: model actors)"
        )
    if gpus_per_worker is not None and not gpus_per_worker >= 0:
        raise FeatureMapsError(f"--gpus-per-worker {gpus_per_worker:g}: use 0 or more")
    if examples < 0:
        raise FeatureMapsError(f"examples {examples}: use 0 or more")


def _side(
    loaded: LoadedModel, layers: str | Sequence[str], which: str, device: torch.device
) -> Side:
    """Resolve the layers with one blank input; learn their shapes."""
    side = int(loaded.preprocess.crop or 0)
    loaded.module.to(device)
    try:
        fm = capture(loaded.module, torch.zeros(1, 3, side, side, device=device), layers)
    except LayerError as exc:
        raise LayerError(
            f"model {which} ({loaded.spec}): {exc}. With --pool none or mean, each layer "
            "must give a (C, H, W) map; `featuremaps layers "
            f"{loaded.spec}` lists every layer and its shape"
        ) from exc
    names = list(fm)
    return Side(loaded, names, [tuple(int(v) for v in fm[n].shape[1:]) for n in names])


def _check_sizes(a: LoadedModel, b: LoadedModel) -> None:
    sa, sb = a.preprocess.crop, b.preprocess.crop
    if sa != sb:
        raise FeatureMapsError(
            f"model A ({a.spec}) takes {sa}x{sa} inputs but model B ({b.spec}) takes "
            f"{sb}x{sb}: CKA compares both models on the very same pixels, so their "
            "preprocessing must give one input size. Compare models with the same input "
            "size, or load one through a factory (package.module:factory) with matching "
            "preprocessing"
        )


class _Fold:
    """The driver's side of the pass: folds group results, in batch order, into the state."""

    def __init__(
        self,
        st: CompareState,
        paths: Sequence[str],
        examples: int,
        state_path: Path | None,
        checkpoint_seconds: float,
        progress: Progress | None,
        done: int,
    ) -> None:
        self.st, self.paths, self.examples = st, paths, examples
        self.state_path, self.checkpoint_seconds = state_path, checkpoint_seconds
        self.progress, self.done = progress, done
        self.last_save = time.monotonic()
        if progress:
            progress("images", done, len(paths))

    def want(self) -> int:
        """Example images still to keep."""
        return max(0, self.examples - len(self.st.kept))

    def arrived(self, batch: Counted) -> None:
        """A batch was decoded: warn of its bad files, count it."""
        for i, msg in batch.bad:
            warnings.warn(f"skipped {self.paths[i]}: {msg}", SkippedImageWarning, stacklevel=2)
        self.done += len(batch.ids) + len(batch.bad)
        if self.progress:
            self.progress("images", self.done, len(self.paths))

    def add(self, r: GroupResult) -> None:
        """Fold one group: its sums, its skipped files, its examples; checkpoint if due."""
        st = self.st
        st.skipped.extend((self.paths[i], msg) for i, msg in r.bad)
        for i in r.dropped:
            path = self.paths[int(i)]
            st.skipped.append((path, "non-finite activations"))
            warnings.warn(
                f"skipped {path}: non-finite activations", SkippedImageWarning, stacklevel=2
            )
        st.done.update(r.indices)
        if r.parts is None:
            st.left_out += r.used
            return
        st.acc.add(r.parts)
        want = self.want()
        if want > 0 and r.kept:
            st.kept.extend(r.kept[:want])
            for maps, got in ((st.maps_a, r.maps_a), (st.maps_b, r.maps_b)):
                for name, m in zip(maps, got, strict=True):
                    maps[name].append(m[:want])
        sp = self.state_path
        if sp is not None and time.monotonic() - self.last_save >= self.checkpoint_seconds:
            st.save(sp)
            self.last_save = time.monotonic()


def compare_models(
    model_a: str | LoadedModel,
    model_b: str | LoadedModel,
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    layers: str | Sequence[str] = "stages",
    layers_a: str | Sequence[str] | None = None,
    layers_b: str | Sequence[str] | None = None,
    weights_a: str = "DEFAULT",
    weights_b: str = "DEFAULT",
    batch_size: int = 32,
    pool: str = "none",
    engine: str = "local",
    device: str = "auto",
    workers: int = 2,
    gpus_per_worker: float | None = None,
    ray_address: str | None = None,
    examples: int = 4,
    progress: Progress | None = None,
    state_path: str | os.PathLike[str] | None = None,
    checkpoint_seconds: float = 60.0,
    restart: bool = False,
) -> CompareResult:
    """Debiased linear CKA between every selected layer of two models over a dataset.

    Args:
        model_a, model_b: model specs (see :func:`featuremaps.load_model`) or loaded models.
        data: a folder (recursively), a glob, a text file of paths, or a list of these.
        layers: names, globs or presets for both models (``stages``).
        layers_a, layers_b: per-model layers, overriding ``layers``.
        weights_a, weights_b: weights of models given as specs.
        batch_size: images per batch of the minibatch estimator (at least 4); with the
            number of images, the result is the full-batch debiased CKA.
        pool: ``none``: the flattened ``C·H·W`` map per image; ``mean``: channel means.
        engine: ``local`` (this process) or ``ray`` (a pool of Ray actors that read the
            images and run both models; see :mod:`.ray`). Both fold the same groups in
            the same order: the same matrix on the same kind of device.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (the local engine's forwards).
        workers: decoding processes (local) or model actors (ray; 0 means one).
        gpus_per_worker: GPUs per Ray actor (``None``: one where the cluster has GPUs).
        ray_address: the Ray cluster (``None``: ``RAY_ADDRESS``, else a local instance).
        examples: images whose maps are kept for the side-by-side pictures.
        progress: called as ``progress(phase, done, total)``.
        state_path: where to keep a checkpoint (``None``: none); a checkpoint of the same
            configuration found there is resumed (see :mod:`.state`).
        checkpoint_seconds: time between checkpoints (0: after every batch).
        restart: ignore a checkpoint at ``state_path``.

    Returns:
        A :class:`CompareResult`.

    Raises:
        FeatureMapsError: bad options, unknown models or layers, layers without a map,
            models with different input sizes, an empty dataset, or too few readable
            images for one batch of 4.

    Example:
        >>> r = compare_models("resnet18", "resnet18", "photos/", weights_a="none",
        ...                    weights_b="b.pth", layers="layer1,layer4")  # doctest: +SKIP
        >>> r.matrix.shape
        (2, 2)
    """
    check_options(batch_size, pool, engine, workers, examples, gpus_per_worker)
    paths = dataset_paths(data)
    la = model_a if isinstance(model_a, LoadedModel) else load_model(model_a, weights_a)
    lb = model_b if isinstance(model_b, LoadedModel) else load_model(model_b, weights_b)
    la = replace(la, preprocess=fixed_size(la.preprocess))
    lb = replace(lb, preprocess=fixed_size(lb.preprocess))
    _check_sizes(la, lb)
    # with Ray the driver only resolves the layers (on its CPU); the actors pick devices
    dev = torch.device("cpu") if engine == "ray" else resolve_device(device)
    a = _side(la, layers if layers_a is None else layers_a, "A", dev)
    b = _side(lb, layers if layers_b is None else layers_b, "B", dev)
    n_batches = math.ceil(len(paths) / batch_size)
    config = {
        "model_a": la.spec,
        "weights_a": la.weights,
        "preprocess_a": la.preprocess.to_dict(),
        "model_b": lb.spec,
        "weights_b": lb.weights,
        "preprocess_b": lb.preprocess.to_dict(),
        "layers_a": a.layers,
        "layers_b": b.layers,
        "pool": pool,
        "batch_size": batch_size,
        "examples": examples,
        "images": len(paths),
        "paths_sha256": sha256("\n".join(paths).encode()).hexdigest(),
    }
    sp = Path(state_path) if state_path is not None else None
    if sp is not None and sp.is_file() and not restart:
        st = CompareState.load(sp, config)
    else:
        st = CompareState(
            config,
            CKAAccumulator(len(a.layers), len(b.layers)),
            maps_a={n: [] for n in a.layers},
            maps_b={n: [] for n in b.layers},
        )
    acc = st.acc
    todo = [i for i in range(n_batches) if i not in st.done]
    resumed = sum(len(paths[i * batch_size : (i + 1) * batch_size]) for i in st.done)
    examples_before = acc.examples
    fold = _Fold(st, paths, examples, sp, checkpoint_seconds, progress, resumed)
    spec = StepSpec(tuple(a.layers), tuple(b.layers), pool, la.preprocess)
    start = time.monotonic()
    results: Iterator[GroupResult]
    if engine == "ray":
        from .ray import RayOptions, ray_results

        la.module.cpu()  # the models travel from the CPU
        lb.module.cpu()
        options = RayOptions(max(1, workers), gpus_per_worker, ray_address)
        results = ray_results(
            la.module, lb.module, paths, batch_size, todo, (la.preprocess, lb.preprocess),
            spec, options, fold.want, fold.arrived,
        )  # fmt: skip
    else:
        results = local_results(
            la.module, lb.module, paths, batch_size, todo, (la.preprocess, lb.preprocess),
            spec, dev, workers, fold.want, fold.arrived,
        )  # fmt: skip
    try:
        for result in results:
            fold.add(result)
    except KeyboardInterrupt:
        if sp is None:
            raise
        st.save(sp)  # every folded batch: the same command resumes from here
        folded = sum(len(paths[i * batch_size : (i + 1) * batch_size]) for i in st.done)
        where = f"the checkpoint {sp}; run the same command to resume"
        raise Interrupted(folded, len(paths), where) from None
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # stop the workers (or the actors) now, not when collected
    seconds = time.monotonic() - start
    if sp is not None:
        st.save(sp)
    if acc.batches == 0:
        raise FeatureMapsError(
            f"no batch of at least {MIN_BATCH} readable images in {len(paths)} file(s) "
            f"({len(st.skipped)} skipped): the debiased CKA needs 4 images per batch"
        )
    used_now = acc.examples - examples_before
    return CompareResult(
        a=a,
        b=b,
        matrix=acc.matrix(),
        images_total=len(paths),
        images_used=acc.examples,
        skipped=sorted(st.skipped),
        left_out=st.left_out,
        batches=acc.batches,
        batch_size=batch_size,
        pool=pool,
        examples=st.kept,
        example_maps_a={n: torch.cat(v) for n, v in st.maps_a.items() if v},
        example_maps_b={n: torch.cat(v) for n, v in st.maps_b.items() if v},
        seconds=seconds,
        images_per_second=used_now / seconds if seconds > 0 else 0.0,
        resumed=resumed,
    )
