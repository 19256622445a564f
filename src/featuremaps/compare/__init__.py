"""Compare two models (or two checkpoints) layer by layer with CKA over a dataset.

* :mod:`.cka`: the debiased linear CKA, accumulated over minibatches (pure numerics).
* :mod:`.run`: one pass over the data through both models (:func:`compare_models`).
* :mod:`.batches`, :mod:`.step`: the fixed batches and how small ones are grouped; the
  engine-neutral step of one group (both forwards, its HSIC terms).
* :mod:`.local`, :mod:`.ray`: the engines (``--engine local|ray``); the driver folds
  their results in batch order, so both give the same matrix.
* :mod:`.joint`: one PCA basis over the same layer of two checkpoints (:func:`joint_pca`).
* :mod:`.outputs`: ``cka.json``, the heatmap ``cka.png`` and the page ``compare.html``.

Example:
    >>> r = build_compare("resnet18", "resnet18", "photos/", "cmp", weights_a="none",
    ...                   weights_b="b.pth", layers="stages")  # doctest: +SKIP
    >>> sorted(p.name for p in r.files.values())
    ['cka.json', 'cka.png', 'compare.html']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._files import output_lock, prepare_output_dir
from .cka import MIN_BATCH, CKAAccumulator, debiased_cka
from .joint import joint_basis, joint_pca
from .run import ESTIMATOR, CompareResult, Side, check_options, compare_models
from .state import STATE_FILE

__all__ = [
    "ESTIMATOR",
    "MIN_BATCH",
    "CKAAccumulator",
    "CompareOutput",
    "CompareResult",
    "Side",
    "build_compare",
    "compare_models",
    "debiased_cka",
    "joint_basis",
    "joint_pca",
]


@dataclass
class CompareOutput:
    """What :func:`build_compare` wrote: the result, and the files by kind.

    ``files`` maps ``json``, ``heatmap`` and ``html`` to the paths written.
    """

    result: CompareResult
    files: dict[str, Path]


def build_compare(
    model_a: Any,
    model_b: Any,
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    **kwargs: Any,
) -> CompareOutput:
    """Check and lock ``out_dir``, run :func:`compare_models`, write the three outputs.

    The folder is checked (created, writable) before any model is loaded, and held with
    an exclusive lock for the run, so two runs cannot write into one folder. It also holds
    the checkpoint (``compare_state.npz``): a run that was killed or interrupted resumes
    where it stopped (``restart=True`` starts over).

    Raises:
        FeatureMapsError: ``out_dir`` unusable or in use, or anything
            :func:`compare_models` raises.
    """
    from .outputs import write_outputs

    check_options(
        kwargs.get("batch_size", 32),
        kwargs.get("pool", "none"),
        kwargs.get("engine", "local"),
        kwargs.get("workers", 2),
        kwargs.get("examples", 4),
        kwargs.get("gpus_per_worker"),
    )
    folder = prepare_output_dir(out_dir)
    kwargs.setdefault("state_path", folder / STATE_FILE)
    with output_lock(folder, "featuremaps compare"):
        result = compare_models(model_a, model_b, data, **kwargs)
        files = write_outputs(result, folder)
    return CompareOutput(result, files)
