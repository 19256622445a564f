"""The atlas driver: checks, the output lock, the fold in batch order, checkpoints, outputs.

Determinism. ``atlas.json`` is a function of the dataset and the options only:

* images are identified by their path; the canonical order is the sorted path strings;
* ties are broken by a total order, score descending then path ascending, so merging
  partial top-K lists is associative and commutative;
* batches are fixed chunks of ``batch_size`` consecutive images of the canonical order
  (minus unreadable files), whatever the engine and however often a run was resumed:
  some convolution kernels give last-bit differences for another batch size, so the
  same batches are what makes the engines agree bitwise;
* floating-point sums (mean activation, covariance) are folded batch by batch in batch
  order, from per-batch partials that each engine computes with the same code.

Checkpoints. Every ``checkpoint_seconds`` the whole state is written atomically to
``OUT/atlas_state.npz`` (see :mod:`featuremaps.atlas.state`); a run of the same
configuration resumes from it. One run at a time per output folder: the driver holds
:func:`featuremaps._files.output_lock` on it for the whole run.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from hashlib import sha256
from pathlib import Path

from .._files import describe_os_error, output_lock
from ..errors import FeatureMapsError, ImageError, Interrupted
from ..models import LoadedModel, load_model
from ..options import Device, OptionError, Score, check_range, parse_choice
from ..options import Engine as EngineName
from .batch import AtlasSpec, Precision, probe
from .crops import CropTiles
from .data import DataSpec, Plan, dataset_paths, fixed_size
from .engines import Engine, EngineOptions, create_engine
from .outputs import atlas_document, write_outputs
from .state import STATE_FILE, open_state
from .visuals import Pictures, VisualizeSpec, check_visualize, collect, plan_jobs

Progress = Callable[[str, int, int], None]
"""Called as ``progress(phase, done, total)``; phase ``images`` counts images, ``crops``
the crop sheets written (one per top list)."""


class SkippedImageWarning(UserWarning):
    """A file of the dataset could not be used (unreadable, or non-finite activations)."""


@dataclass
class AtlasResult:
    """What :func:`build_atlas` did.

    Attributes:
        out_dir: the output folder.
        atlas_json: path of ``atlas.json``.
        pca_basis: path of ``pca_basis.npz`` (for ``featuremaps run --pca-basis``).
        pages: the per-layer HTML pages (and ``index.html`` first).
        images_total: images in the dataset.
        images_used: images that went into the atlas.
        skipped: ``(path, reason)`` of every file that could not be used.
        resumed: images already done by an earlier, interrupted run.
        seconds: wall time of this run's inference loop.
        images_per_second: images this run processed per second of that loop.
        visualize_workers: distinct processes that made the feature visualizations
            (0 without ``visualize``).
    """

    out_dir: Path
    atlas_json: Path
    pca_basis: Path | None
    pages: list[Path]
    images_total: int
    images_used: int
    skipped: list[tuple[str, str]]
    resumed: int
    seconds: float
    images_per_second: float
    visualize_workers: int = 0


def build_atlas(
    model: str | LoadedModel,
    data: DataSpec,
    layers: str | Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    weights: str = "DEFAULT",
    top: int = 9,
    score: Score | str = Score.MAX,
    batch_size: int = 32,
    workers: int = 2,
    engine: EngineName | str = EngineName.LOCAL,
    device: Device | str = Device.AUTO,
    precision: Precision | str = Precision.FP32,
    gpus_per_worker: float | None = None,
    ray_address: str | None = None,
    checkpoint_seconds: float = 60.0,
    restart: bool = False,
    n_components: int = 3,
    report_url: str | None = None,
    visualize: bool = False,
    visualize_steps: int = 128,
    visualize_size: int = 96,
    visualize_batch: int = 16,
    progress: Progress | None = None,
) -> AtlasResult:
    """Build the channel atlas of ``layers`` over a dataset, resuming a checkpoint if any.

    Args:
        model: a model spec (see :func:`featuremaps.load_model`) or a loaded model.
        data: a folder (recursively), a glob, a text file of paths, or a list of these.
        layers: names, globs or presets (``stages``).
        out_dir: where ``atlas.json``, ``pca_basis.npz``, ``crops/``, the HTML pages and
            the checkpoint go.
        weights: weights of a model given as a spec.
        top: images kept per channel.
        score: ``max`` (spatial max of the channel) or ``mean``; ``relevance`` (for
            classifiers) keeps the ``max`` ranking and, beside it, each channel's top-K by
            its relevance to each image's own top-1 class (``top_relevance``).
        batch_size: images per forward; also fixes the batches (see the module notes).
        workers: decoding processes (local) or model actors (ray).
        engine: ``local`` or ``ray`` (see :mod:`featuremaps.atlas.engines`).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (local engine).
        precision: ``fp32``, or ``bf16``/``fp16`` for a forward under autocast
            (statistics are accumulated in float32/float64 either way).
        gpus_per_worker: GPUs per Ray actor (``None``: one where the cluster has GPUs).
        ray_address: the Ray cluster (``None``: ``RAY_ADDRESS`` or a local instance).
        checkpoint_seconds: time between checkpoints (0: after every batch).
        restart: ignore an existing checkpoint in ``out_dir``.
        n_components: PCA components of the dataset basis.
        report_url: link of each channel on the pages, a template with ``{layer}`` and
            ``{channel}`` (default: the channel's anchor on its page).
        visualize: add one feature visualization per channel (what maximizes its mean,
            see :func:`featuremaps.visualize`) to the pages, after the pass over the data;
            the Ray engine spreads the channels over its actors.
        visualize_steps: optimization steps per visualization.
        visualize_size: side of each visualization, in pixels.
        visualize_batch: channels optimized together.
        progress: called as ``progress(phase, done, total)`` (phases ``images``,
            ``visualize``, ``crops``).

    Returns:
        An :class:`AtlasResult`.

    Raises:
        FeatureMapsError: bad options, an unknown model or layer, an empty dataset or
            one without a usable image, an output folder that cannot be written or is
            in use by another run, or an unreadable checkpoint or one of another
            configuration in ``out_dir``.

    Example:
        >>> r = build_atlas("resnet18", "photos/", "layer3", "atlas", weights="none", top=9)
        >>> r.atlas_json.name
        'atlas.json'
    """
    score, engine, precision = _check_options(
        top, score, batch_size, workers, engine, precision, n_components, report_url
    )
    if gpus_per_worker is not None and not 0 <= gpus_per_worker <= 64:
        raise OptionError(f"--gpus-per-worker {gpus_per_worker:g}: use 0 to 64 (fractions share)")
    vspec = None
    if visualize:
        vspec = VisualizeSpec(visualize_steps, visualize_size, 0, visualize_batch)
        vspec.validate()
    options = EngineOptions(workers, device, precision, gpus_per_worker, ray_address)
    runner = create_engine(engine, options)  # a missing device or Ray fails here
    paths = dataset_paths(data)
    name = model.spec if isinstance(model, LoadedModel) else model
    with output_lock(out_dir, f"featuremaps atlas {name}") as lock:
        out = lock.parent
        try:
            return _build(
                model,
                paths,
                layers,
                out,
                runner,
                weights=weights,
                top=top,
                score=score,
                batch_size=batch_size,
                workers=workers,
                checkpoint_seconds=checkpoint_seconds,
                restart=restart,
                n_components=n_components,
                report_url=report_url,
                vspec=vspec,
                progress=progress,
            )
        except OSError as exc:
            raise FeatureMapsError(f"the atlas in {out}: {describe_os_error(exc)}") from exc


def _build(
    model: str | LoadedModel,
    paths: list[str],
    layers: str | Sequence[str],
    out: Path,
    runner: Engine,
    *,
    weights: str,
    top: int,
    score: Score,
    batch_size: int,
    workers: int,
    checkpoint_seconds: float,
    restart: bool,
    n_components: int,
    report_url: str | None,
    vspec: VisualizeSpec | None,
    progress: Progress | None,
) -> AtlasResult:
    """The run itself, under the output lock."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, weights)
    loaded = replace(loaded, preprocess=fixed_size(loaded.preprocess))
    spec, metas = probe(loaded, layers, score, top)
    if vspec is not None:
        check_visualize(loaded, spec, vspec)  # before the pass over the data
    plan = Plan(tuple(paths), batch_size)
    config = {
        "model": loaded.spec,
        "weights": loaded.weights,
        "preprocess": loaded.preprocess.to_dict(),
        "layers": list(spec.names),
        "score": score,
        "top": top,
        "batch_size": batch_size,
        "images": len(paths),
        "paths_sha256": sha256("\n".join(paths).encode()).hexdigest(),
    }
    state_path = out / STATE_FILE
    state = open_state(state_path, config, spec, restart)
    pending = [j for j in range(plan.n_batches) if j not in state.done]
    resumed = sum(len(plan.batch(j)[1]) for j in state.done)
    start = last_save = time.monotonic()
    seen = resumed
    if progress:
        progress("images", seen, len(paths))
    tiles = CropTiles(spec, metas, plan.paths, int(loaded.preprocess.crop or 0))
    results = runner.run(plan, pending, loaded, spec)
    try:
        for result in results:
            state.fold(result)
            tiles.add(state, result)
            result.pixels = None
            for i, msg in result.bad:
                warnings.warn(f"skipped {paths[i]}: {msg}", SkippedImageWarning, stacklevel=3)
            seen += len(plan.batch(result.index)[1])
            if time.monotonic() - last_save >= checkpoint_seconds:
                state.save(state_path)
                last_save = time.monotonic()
            if progress:
                progress("images", seen, len(paths))
    except KeyboardInterrupt:
        state.save(state_path)  # everything folded so far: a rerun resumes from here
        where = f"the checkpoint {state_path}; run the same command to resume"
        raise Interrupted(seen, len(paths), where) from None
    finally:
        results.close()  # an engine's clean-up (Ray's shutdown) runs now, not at exit
    seconds = time.monotonic() - start
    state.save(state_path)
    if state.n_images == 0:
        reasons = sorted({m for _, m in state.skipped})[:3]
        raise ImageError(
            f"none of the {len(paths)} images of the dataset could be used (for example: "
            f"{'; '.join(reasons)}); check the paths and files, then run again"
        )
    pictures, vis_workers = None, 0
    if vspec is not None:
        try:
            pictures, vis_workers = _visualize(runner, loaded, spec, vspec, progress)
        except KeyboardInterrupt:
            where = (
                f"the checkpoint {state_path} (the visualizations were not finished; run "
                "the same command to make them)"
            )
            raise Interrupted(seen, len(paths), where) from None
    doc = atlas_document(state, plan, loaded, spec, metas, pictures, vspec)
    atlas_json, basis, pages = write_outputs(
        out,
        doc,
        state,
        loaded,
        spec,
        metas,
        n_components,
        report_url,
        workers,
        progress,
        pictures,
        tiles,
    )
    done_now = seen - resumed
    return AtlasResult(
        out_dir=out,
        atlas_json=atlas_json,
        pca_basis=basis,
        pages=pages,
        images_total=len(paths),
        images_used=state.n_images,
        skipped=[(paths[i], m) for i, m in sorted(state.skipped)],
        resumed=resumed,
        seconds=seconds,
        images_per_second=done_now / seconds if seconds > 0 else 0.0,
        visualize_workers=vis_workers,
    )


def _visualize(
    runner: Engine,
    loaded: LoadedModel,
    spec: AtlasSpec,
    vspec: VisualizeSpec,
    progress: Progress | None,
) -> tuple[Pictures, int]:
    """Every channel's visualization, made by the engine; the pictures and how many
    processes made them."""
    jobs = plan_jobs(spec, vspec)
    pictures: Pictures = [{} for _ in spec.names]
    total, done, workers = sum(spec.channels), 0, set()
    if progress:
        progress("visualize", 0, total)
    results = runner.visualize(loaded, jobs, vspec)
    try:
        for result in results:
            done += collect(pictures, result, jobs)
            workers.add(result.worker)
            if progress:
                progress("visualize", done, total)
    finally:
        results.close()
    return pictures, len(workers)


def _check_options(
    top: int,
    score: Score | str,
    batch_size: int,
    workers: int,
    engine: EngineName | str,
    precision: Precision | str,
    n_components: int,
    report_url: str | None,
) -> tuple[Score, EngineName, Precision]:
    """The typed choices; every check raises before any model is loaded."""
    check_range(top, "--top", 1)
    check_range(batch_size, "--batch-size", 1)
    check_range(workers, "--workers", 0)
    check_range(n_components, "n_components", 1)
    typed = (
        parse_choice(Score, score, "--score"),
        parse_choice(EngineName, engine, "--engine"),
        parse_choice(Precision, precision, "--precision"),
    )
    if report_url is not None:
        try:
            report_url.format(layer="layer", channel=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise OptionError(
                f"--report-url {report_url!r}: a template with {{layer}} and {{channel}} "
                f"only ({exc!r})"
            ) from None
    return typed
